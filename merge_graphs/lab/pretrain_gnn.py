"""Pretraining the graph encoder on the model zoo.

Stage 1 (known correspondence): a zoo model and a copy of it whose units are randomly
permuted and whose weights are perturbed: Gaussian noise of a random 0-0.3 x each tensor's
std, dropout of a random fraction of the weights, or a few more steps of training. Stage 2
(pseudo-labels): two zoo models of one architecture trained from different seeds, labelled
by the best teacher the data can find: activation matching, activation matching refined by
weight matching, or weight matching, whichever reaches the lowest midpoint loss on training
data. Stage 2 steps are mixed with stage 1 steps, so the encoder keeps what it learnt.

The loss is InfoNCE on every permuted node set: the cosine similarity of model B's node
embeddings to model A's (centred, as :mod:`merge_graphs.gnn.alignment` uses them), divided by a
temperature, cross-entropy against the true partner, in both directions.

Held-out seeds of the zoo are never trained on; they only feed the learning curve (recovered
fraction of a noisy permuted copy at noise 0.1, GNN matching alone).

Run ``python -m merge_graphs.lab.pretrain_gnn --help`` (or ``merge-graphs pretrain-gnn``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from merge_graphs.gnn.alignment import gnn_matching, recovered_fraction
from merge_graphs.gnn.embedding import embed
from merge_graphs.gnn.encoder import GraphEncoder
from merge_graphs.gnn.pretrained import save_encoder
from merge_graphs.graph import NeuralGraph
from merge_graphs.lab import pretraining_zoo
from merge_graphs.match import weight_matching
from merge_graphs.symmetry import symmetry_spec
from merge_graphs.symmetry.spec import Permutations, invert_permutations, permute_state_dict, random_permutations

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Everything that determines the pretrained weights."""

    dim: int = 48
    layers: int = 3
    steps: int = 6000
    stage2_from: float = 0.25  # fraction of steps after which half the steps are stage-2 pairs
    lr: float = 2e-3
    temperature: float = 0.05
    max_noise: float = 0.3
    max_dropout: float = 0.2
    seed: int = 0
    eval_every: int = 250


# --------------------------------------------------------------------------- pairs


def perturb(
    entry: pretraining_zoo.ZooEntry, model: nn.Module, rng: random.Random, max_noise: float = 0.3,
    max_dropout: float = 0.2,
) -> tuple[nn.Module, Permutations, str]:
    """A randomly permuted and perturbed copy of ``model``, the permutations, and what was done."""
    spec = symmetry_spec(model)
    kind = rng.choice(("noise", "noise", "dropout", "train"))
    copy_ = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    if kind == "train":
        copy_ = pretraining_zoo.further_training(entry, copy_, seed=rng.randrange(2**31), steps=rng.randint(1, 10))
        state = copy_.state_dict()
    else:
        amount = rng.uniform(0, max_noise if kind == "noise" else max_dropout)
        state = {k: perturb_tensor(v, kind, amount, gen) for k, v in copy_.state_dict().items()}
    perms = random_permutations(spec, seed=rng.randrange(2**31))
    copy_.load_state_dict(permute_state_dict(spec, state, perms))
    return copy_.eval(), perms, kind


def perturb_tensor(t: torch.Tensor, kind: str, amount: float, gen: torch.Generator) -> torch.Tensor:
    """``t`` with Gaussian noise of ``amount`` x its std, or a fraction ``amount`` of entries zeroed."""
    if not t.is_floating_point() or t.numel() < 2:
        return t
    if kind == "noise":
        return t + amount * t.float().std() * torch.randn(t.shape, generator=gen).to(t)
    return t * (torch.rand(t.shape, generator=gen) >= amount).to(t)


def noisy_copy(model: nn.Module, noise: float, seed: int) -> tuple[nn.Module, Permutations]:
    """A copy of ``model`` with Gaussian noise of ``noise`` x each tensor's std, then randomly permuted."""
    spec = symmetry_spec(model)
    gen = torch.Generator().manual_seed(seed)
    state = {k: perturb_tensor(v, "noise", noise, gen) for k, v in model.state_dict().items()}
    perms = random_permutations(spec, seed=seed + 1)
    out = copy.deepcopy(model)
    out.load_state_dict(permute_state_dict(spec, state, perms))
    return out.eval(), perms


def teacher(entry: pretraining_zoo.ZooEntry, a: nn.Module, b: nn.Module) -> tuple[Permutations, dict]:
    """The permutations of ``b`` (as ``b ~ permute(a, perms)``) from the teacher with the lowest
    midpoint loss on training data, and every teacher's midpoint loss."""
    from merge_graphs.activations import activation_matching
    from merge_graphs.evaluate import interpolate_state_dicts

    spec = symmetry_spec(a)
    state_a, state_b = a.state_dict(), b.state_dict()
    act = activation_matching(spec, a, b, pretraining_zoo.calibration(entry))
    candidates = {
        "activation": act,
        "activation+weight": weight_matching(spec, state_a, state_b, init=act.permutations),
        "weight": weight_matching(spec, state_a, state_b),
    }
    loss = pretraining_zoo.loss_fn(entry, "train")
    midpoint = {}
    for name, found in candidates.items():
        mid = copy.deepcopy(a)
        mid.load_state_dict(interpolate_state_dicts(state_a, found.apply(state_b), 0.5))
        midpoint[name] = loss(mid)
    best = min(midpoint, key=midpoint.get)
    return invert_permutations(spec, candidates[best].permutations), {"teacher": best, "midpoint": midpoint}


# --------------------------------------------------------------------------- loss


def node_targets(graph: NeuralGraph, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For every permuted node set of the permuted model (``permute(a, perms)``), the index of
    each node's partner in model A's node set."""
    order = graph.node_order(perms)
    return {name: order[ns.offset:ns.offset + ns.size] - ns.offset
            for name, ns in graph.node_sets.items() if not ns.fixed and ns.size > 1}


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def contrastive_loss(
    encoder: GraphEncoder, graph_a: NeuralGraph, graph_b: NeuralGraph, targets: Mapping[str, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Mean over node sets of the symmetric InfoNCE loss of B's nodes against A's."""
    ha, hb = encoder(graph_a), encoder(graph_b)
    losses = []
    for name, target in targets.items():
        target = target.to(ha[name].device)
        logits = _unit(hb[name]) @ _unit(ha[name]).T / temperature  # (B nodes, A nodes)
        losses.append(0.5 * (nn.functional.cross_entropy(logits, target)
                             + nn.functional.cross_entropy(logits.T, torch.argsort(target))))
    return torch.stack(losses).mean()


def _graph(model: nn.Module, device: torch.device) -> NeuralGraph:
    return NeuralGraph(symmetry_spec(model), {k: v.to(device) for k, v in model.state_dict().items()})


# --------------------------------------------------------------------------- evaluation


def heldout_recovery(encoder: GraphEncoder, models: Sequence[pretraining_zoo.ZooModel], noise: float = 0.1) -> float:
    """Mean fraction of units that GNN matching alone recovers on noisy permuted copies."""
    encoder = copy.deepcopy(encoder).cpu().eval()  # embed() moves an encoder to the model's device
    fractions = []
    for i, zm in enumerate(models):
        b, perms = noisy_copy(zm.model, noise, seed=1000 + i)
        spec = symmetry_spec(zm.model)
        found = gnn_matching(spec, embed(zm.model, encoder), embed(b, encoder))
        fractions.append(recovered_fraction(spec, found.permutations, perms))
    return sum(fractions) / len(fractions)


def teacher_agreement(encoder: GraphEncoder, pairs: Sequence[tuple]) -> float:
    """Mean fraction of units on which GNN matching alone agrees with the teacher's pseudo-labels."""
    encoder = copy.deepcopy(encoder).cpu().eval()
    fractions = []
    for a, b, perms, _ in pairs:
        spec = symmetry_spec(a)
        found = gnn_matching(spec, embed(a, encoder), embed(b, encoder))
        fractions.append(recovered_fraction(spec, found.permutations, perms))
    return sum(fractions) / len(fractions)


def evaluate(
    encoder: GraphEncoder, models: Sequence[pretraining_zoo.ZooModel], pairs: Sequence[tuple],
) -> dict[str, float]:
    """Held-out figures for the learning curve: recovery of noisy permuted copies (noise 0.1 and
    1.0 x std) of ``models``, and agreement with the teacher on independent ``pairs``."""
    return {"recovery_0.1": heldout_recovery(encoder, models, 0.1),
            "recovery_1.0": heldout_recovery(encoder, models, 1.0),
            "teacher_agreement": teacher_agreement(encoder, pairs) if pairs else math.nan}


# --------------------------------------------------------------------------- training


def pretrain(
    config: PretrainConfig, train_models: Sequence[pretraining_zoo.ZooModel],
    heldout_models: Sequence[pretraining_zoo.ZooModel] = (), *, progress: bool = False,
) -> tuple[GraphEncoder, dict]:
    """Train an encoder on ``train_models``; returns it (eval mode) and the learning curves.

    ``heldout_models`` (never trained on) only feed the curves: :func:`evaluate` every
    ``config.eval_every`` steps on one model per architecture, and on the pair of an
    architecture's first two held-out seeds.

    Deterministic given ``config.seed`` on one device (use one CPU thread for bit-identical
    runs across machines).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    encoder = GraphEncoder(dim=config.dim, layers=config.layers).to(device).train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=1e-4)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    pairs = _stage2_pairs(train_models, progress=progress) if config.stage2_from < 1 else []
    probes = [zm for zm in heldout_models if zm.entry.seed == zm.entry.arch.heldout[0]]
    probe_pairs = _stage2_pairs(heldout_models, progress=progress) if heldout_models else []
    history: dict = {"step": [], "loss": [], "stage": [], "eval_step": [], "eval": [],
                     "teachers": [p[3] for p in pairs], "heldout_teachers": [p[3] for p in probe_pairs]}
    start = time.perf_counter()
    for step in tqdm(range(config.steps), desc="pretraining", disable=not progress):
        stage = 2 if pairs and step >= config.stage2_from * config.steps and rng.random() < 0.5 else 1
        if stage == 1:
            zm = rng.choice(train_models)
            b, perms, _ = perturb(zm.entry, zm.model, rng, config.max_noise, config.max_dropout)
            a = zm.model
        else:
            a, b, perms, _ = rng.choice(pairs)
        graph_a, graph_b = _graph(a, device), _graph(b, device)
        loss = contrastive_loss(encoder, graph_a, graph_b, node_targets(graph_a, perms), config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        sched.step()
        history["step"].append(step)
        history["loss"].append(float(loss.detach()))
        history["stage"].append(stage)
        if probes and (step + 1) % config.eval_every == 0:
            history["eval_step"].append(step + 1)
            history["eval"].append(evaluate(encoder, probes, probe_pairs))
            logger.info("step %d: loss %.4f, held-out %s", step + 1,
                        sum(history["loss"][-config.eval_every:]) / config.eval_every,
                        {k: round(v, 4) for k, v in history["eval"][-1].items()})
    history["seconds"] = time.perf_counter() - start
    return encoder.eval(), history


def _stage2_pairs(models: Sequence[pretraining_zoo.ZooModel], *, progress: bool) -> list:
    """``(a, b, perms, teacher report)`` for every pair of one architecture's training seeds."""
    out = []
    by_arch: dict[str, list] = {}
    for zm in models:
        by_arch.setdefault(zm.entry.arch.name, []).append(zm)
    todo = [(x, y) for group in by_arch.values() for i, x in enumerate(group) for y in group[i + 1:]]
    for x, y in tqdm(todo, desc="pseudo-labels", disable=not progress):
        perms, report = teacher(x.entry, x.model, y.model)
        out.append((x.model, y.model, perms, {"a": x.entry.name, "b": y.entry.name, **report}))
    return out


def plot_history(history: dict, path: str | Path) -> None:
    """Learning curves (training loss, smoothed; held-out recovery) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    k = max(1, len(history["loss"]) // 50)
    for stage, label in ((1, "stage 1: permuted, perturbed copies"), (2, "stage 2: independent pairs, pseudo-labels")):
        steps = [s for s, st in zip(history["step"], history["stage"]) if st == stage]
        loss = [x for x, st in zip(history["loss"], history["stage"]) if st == stage]
        chunks = [(steps[i], sum(loss[i:i + k]) / len(loss[i:i + k])) for i in range(0, len(loss), k)]
        if chunks:
            ax1.plot(*zip(*chunks), label=label)
    ax1.set(xlabel="step", ylabel="InfoNCE loss", yscale="log", title="training loss (mean of 1/50 of the run)")
    ax1.legend()
    names = {"recovery_0.1": "permuted copy, noise 0.1 x std", "recovery_1.0": "permuted copy, noise 1.0 x std",
             "teacher_agreement": "independent pair: agreement with teacher"}
    for key, label in names.items():
        ax2.plot(history["eval_step"], [e[key] for e in history["eval"]], marker="o", label=label)
    ax2.set(xlabel="step", ylabel="fraction of units", title="held-out zoo models, GNN matching alone")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train the zoo (cached), pretrain, save weights, json and learning curves."""
    defaults = PretrainConfig()
    p = argparse.ArgumentParser(prog="merge-graphs pretrain-gnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/gnn", help="folder for encoder.safetensors, encoder.json and curves.png")
    p.add_argument("--zoo", default=str(pretraining_zoo.DEFAULT_CACHE), help="model zoo cache folder")
    for name in ("dim", "layers", "steps", "seed", "eval_every"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "temperature", "stage2_from", "max_noise", "max_dropout"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: bit-identical across machines)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("merge_graphs.match").setLevel(logging.WARNING)  # one line per matching is noise here
    torch.set_num_threads(args.threads)
    config = PretrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    train_models = pretraining_zoo.load_zoo(pretraining_zoo.zoo_entries(heldout=False), args.zoo, progress=True)
    heldout_models = pretraining_zoo.load_zoo(pretraining_zoo.zoo_entries(heldout=True), args.zoo, progress=True)
    encoder, history = pretrain(config, train_models, heldout_models, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_history(history, out / "curves.png")
    (out / "history.json").write_text(json.dumps(history))
    info = {
        "version": 1,
        "command": " ".join(["python -m merge_graphs.lab.pretrain_gnn", *(sys.argv[1:] if argv is None else argv)]),
        "config": asdict(config), "seed": config.seed, "torch": torch.__version__,
        "zoo": {"version": pretraining_zoo.ZOO_VERSION, "train": [zm.entry.name for zm in train_models],
                "heldout": [e.name for e in pretraining_zoo.zoo_entries(heldout=True)]},
        "heldout": history["eval"][-1] if history["eval"] else None,
        "pretraining_seconds": round(history["seconds"], 1),
    }
    save_encoder(encoder, out, info)
    logger.info("saved %s (held-out %s, %.0f s)", out, info["heldout"], history["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
