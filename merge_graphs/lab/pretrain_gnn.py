"""Pretraining the graph encoder on the model zoo.

Stage 1 (known correspondence): a zoo model and a copy of it whose units are randomly
permuted and whose weights are perturbed: Gaussian noise of a random 0-0.3 x each tensor's
std, dropout of a random fraction of the weights, or a few more steps of training. Stage 2
(pseudo-labels): two zoo models of one architecture trained from different seeds, labelled
by the best teacher the data can find: activation matching, activation matching refined by
weight matching, weight matching, and (``--teacher-steps`` > 0) learned permutations
(straight-through, on the interpolated models' own loss,
:func:`merge_graphs.learned.learned_permutations`) started from the best of those three,
whichever reaches the lowest midpoint loss on training data. Labels are cached beside the zoo.
Stage 2 steps are mixed with stage 1 steps, so the encoder keeps what it learnt.

The loss is InfoNCE on every permuted node set: the cosine similarity of model B's node
embeddings to model A's (centred, as :mod:`merge_graphs.gnn.alignment` uses them), divided by a
temperature, cross-entropy against the true partner, in both directions.

Held-out seeds of the zoo are never touched here (the benchmark's). Validation seeds are never
trained on: every ``eval_every`` steps the encoder matches each architecture's validation pair
(GNN matching alone, and refined by weight matching), and with ``--keep best`` the encoder kept is
the one whose matching leaves the least of the naive midpoint barrier on held-out data (mean over
pairs of the barrier left / naive's); the curves also show the recovered fraction of noisy
permuted copies of validation models.

Run ``python -m merge_graphs.lab.pretrain_gnn --help`` (or ``merge-graphs pretrain-gnn``); without
options it is the shipped weights' recipe (zoo version 1, no learned teacher, the last step kept).
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from merge_graphs.gnn.alignment import gnn_matching, recovered_fraction
from merge_graphs.gnn.embedding import embed
from merge_graphs.gnn.encoder import GraphEncoder
from merge_graphs.gnn.pretrained import load_encoder, save_encoder
from merge_graphs.graph import NeuralGraph
from merge_graphs.lab import pretraining_zoo
from merge_graphs.match import weight_matching
from merge_graphs.symmetry import symmetry_spec
from merge_graphs.symmetry.spec import Permutations, invert_permutations, permute_state_dict, random_permutations

logger = logging.getLogger(__name__)

#: The zoo version the shipped weights were trained on (with :class:`PretrainConfig`'s defaults).
SHIPPED_ZOO_VERSION = 1


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
    # The defaults are the shipped weights' recipe (with zoo version 1). The learned teacher and early
    # stopping (teacher_steps=200, keep="best", zoo version 2) trained no better encoder: README, "Which
    # encoder ships".
    teacher_steps: int = 0  # learned-permutation steps of the stage-2 teacher (0: no learned teacher)
    keep: str = "last"  # the encoder returned: "best" on the validation pairs, or "last"


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


def midpoint_loss(a: nn.Module, state_b: Mapping[str, torch.Tensor], loss: Callable[[nn.Module], float]) -> float:
    """``loss`` of the average of ``a`` and the (aligned) state dict ``state_b``."""
    from merge_graphs.evaluate import interpolate_state_dicts

    mid = copy.deepcopy(a)
    mid.load_state_dict(interpolate_state_dicts(a.state_dict(), state_b, 0.5))
    return loss(mid)


def teacher(
    entry: pretraining_zoo.ZooEntry, a: nn.Module, b: nn.Module, learn_steps: int = 200,
) -> tuple[Permutations, dict]:
    """The permutations of ``b`` (as ``b ~ permute(a, perms)``) from the teacher with the lowest
    midpoint loss on training data, and every teacher's midpoint loss. ``learn_steps`` > 0 adds
    learned permutations started from the best of the data-free and activation teachers."""
    from merge_graphs.activations import activation_matching
    from merge_graphs.learned import learned_permutations

    spec = symmetry_spec(a)
    state_a, state_b = a.state_dict(), b.state_dict()
    act = activation_matching(spec, a, b, pretraining_zoo.calibration(entry))
    candidates = {
        "activation": act,
        "activation+weight": weight_matching(spec, state_a, state_b, init=act.permutations),
        "weight": weight_matching(spec, state_a, state_b),
    }
    loss = pretraining_zoo.loss_fn(entry, "train")
    midpoint = {name: midpoint_loss(a, found.apply(state_b), loss) for name, found in candidates.items()}
    report: dict = {}
    if learn_steps > 0:
        start = min(midpoint, key=midpoint.get)
        mask = {"mask_token_id": pretraining_zoo.MASK_ID} if entry.family == "bert" else {}
        candidates["learned"] = learned_permutations(a, b, pretraining_zoo.learning_inputs(entry),
                                                     start=candidates[start], steps=learn_steps, **mask)
        midpoint["learned"] = midpoint_loss(a, candidates["learned"].apply(state_b), loss)
        report["learned_from"] = start
    best = min(midpoint, key=midpoint.get)
    return invert_permutations(spec, candidates[best].permutations), {"teacher": best, "midpoint": midpoint, **report}


def cached_teacher(
    x: pretraining_zoo.ZooEntry, y: pretraining_zoo.ZooEntry, a: nn.Module, b: nn.Module, learn_steps: int,
    folder: Path | None,
) -> tuple[Permutations, dict]:
    """:func:`teacher`, read from (or written to) ``folder`` while both entries and ``learn_steps`` match:
    the labels cost minutes, the pretraining runs that reuse them do not need to."""
    if folder is None:
        return teacher(x, a, b, learn_steps)
    key = json.loads(json.dumps({"a": x.metadata(), "b": y.metadata(), "learn_steps": learn_steps}))
    path = folder / f"{x.name}__{y.name}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if json.loads(saved["key"]) == key:
            return saved["perms"], json.loads(saved["report"])
    perms, report = teacher(x, a, b, learn_steps)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"key": json.dumps(key), "perms": dict(perms), "report": json.dumps(report)}, path)
    return perms, report


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


def recovery(encoder: GraphEncoder, models: Sequence[pretraining_zoo.ZooModel], noise: float = 0.1) -> float:
    """Mean fraction of units that GNN matching alone recovers on noisy permuted copies."""
    encoder = copy.deepcopy(encoder).cpu().eval()  # embed() moves an encoder to the model's device
    fractions = []
    for i, zm in enumerate(models):
        b, perms = noisy_copy(zm.model, noise, seed=1000 + i)
        spec = symmetry_spec(zm.model)
        found = gnn_matching(spec, embed(zm.model, encoder), embed(b, encoder))
        fractions.append(recovered_fraction(spec, found.permutations, perms))
    return sum(fractions) / len(fractions)


@dataclass
class ValidationPair:
    """Two validation seeds of one architecture, their held-out loss and naive averaging's midpoint barrier."""

    name: str
    a: nn.Module
    b: nn.Module
    loss: Callable[[nn.Module], float]
    ends: float  # mean of the two models' losses
    naive: float  # midpoint loss minus ``ends``, unaligned

    @classmethod
    def of(cls, x: pretraining_zoo.ZooModel, y: pretraining_zoo.ZooModel) -> ValidationPair:
        loss = pretraining_zoo.loss_fn(x.entry, "heldout")
        ends = 0.5 * (loss(x.model) + loss(y.model))
        naive = midpoint_loss(x.model, y.model.state_dict(), loss) - ends
        return cls(f"{x.entry.name}/{y.entry.seed}", x.model, y.model, loss, ends, naive)


def validation_pairs(models: Sequence[pretraining_zoo.ZooModel]) -> list[ValidationPair]:
    """The pair of the first two validation seeds of every architecture that has two."""
    by_arch: dict[str, list] = {}
    for zm in models:
        if zm.entry.split == "validation":
            by_arch.setdefault(zm.entry.arch.name, []).append(zm)
    return [ValidationPair.of(*group[:2]) for group in by_arch.values() if len(group) >= 2]


def validation_barriers(encoder: GraphEncoder, pairs: Sequence[ValidationPair]) -> dict:
    """Per pair, the midpoint barrier (midpoint loss minus the mean of the ends) after GNN matching alone
    (``gnn``) and refined by weight matching (``gnn+weight``), as a fraction of naive averaging's; and the
    means over pairs, ``barrier`` (the early-stopping criterion) and ``barrier_refined``."""
    encoder = copy.deepcopy(encoder).cpu().eval()
    per_pair = {}
    for p in pairs:
        spec = symmetry_spec(p.a)
        state_a, state_b = p.a.state_dict(), p.b.state_dict()
        found = gnn_matching(spec, embed(p.a, encoder), embed(p.b, encoder))
        refined = weight_matching(spec, state_a, state_b, init=found.permutations)
        per_pair[p.name] = {name: (midpoint_loss(p.a, al.apply(state_b), p.loss) - p.ends) / p.naive
                            for name, al in (("gnn", found), ("gnn+weight", refined))}
    return {"barrier": statistics.mean(v["gnn"] for v in per_pair.values()),
            "barrier_refined": statistics.mean(v["gnn+weight"] for v in per_pair.values()), "pairs": per_pair}


def evaluate(
    encoder: GraphEncoder, models: Sequence[pretraining_zoo.ZooModel], pairs: Sequence[ValidationPair],
) -> dict:
    """Validation figures for the learning curve: recovery of noisy permuted copies (noise 0.1 and
    1.0 x std) of ``models``, and (with ``pairs``) :func:`validation_barriers`."""
    return {"recovery_0.1": recovery(encoder, models, 0.1),
            "recovery_1.0": recovery(encoder, models, 1.0),
            **(validation_barriers(encoder, pairs) if pairs else {})}


# --------------------------------------------------------------------------- training


def pretrain(
    config: PretrainConfig, train_models: Sequence[pretraining_zoo.ZooModel],
    validation_models: Sequence[pretraining_zoo.ZooModel] = (), *, labels: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[GraphEncoder, dict]:
    """Train an encoder on ``train_models``; returns it (eval mode) and the learning curves.

    ``validation_models`` (never trained on) feed the curves: :func:`evaluate` every
    ``config.eval_every`` steps on one model per architecture and on the pair of an
    architecture's first two validation seeds. The encoder returned is the one of the evaluation
    with the lowest mean validation barrier (GNN matching alone), or the last one without
    validation pairs or with ``config.keep == "last"``. ``labels``: a folder caching the stage-2
    pseudo-labels.

    Deterministic given ``config.seed`` on one CPU thread, for one set of package versions and one
    CPU kernel level (``torch.backends.cpu.get_cpu_capability()``): the same recipe run under
    ``ATEN_CPU_CAPABILITY=avx2``, ``default`` and the machine's AVX512 trains three different
    encoders, since 6000 optimizer steps amplify the kernels' last-bit rounding differences.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    encoder = GraphEncoder(dim=config.dim, layers=config.layers).to(device).train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=1e-4)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    labels = Path(labels) if labels is not None else None
    pairs = _stage2_pairs(train_models, config.teacher_steps, labels, progress=progress) if config.stage2_from < 1 else []
    probes = [zm for zm in validation_models if zm.entry.seed == zm.entry.arch.validation[0]]
    checks = validation_pairs(validation_models)
    teachers = [p[3] for p in pairs]
    history: dict = {"step": [], "loss": [], "stage": [], "eval_step": [], "eval": [], "teachers": teachers,
                     "teacher_wins": dict(collections.Counter(t["teacher"] for t in teachers)),
                     "naive_barrier": {p.name: p.naive for p in checks}, "best_step": config.steps}
    best, best_state = math.inf, None
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
            history["eval"].append(evaluate(encoder, probes, checks))
            score = history["eval"][-1].get("barrier", math.nan)
            if score < best:
                best, best_state, history["best_step"] = score, copy.deepcopy(encoder.state_dict()), step + 1
            logger.info("step %d: loss %.4f, validation %s", step + 1,
                        sum(history["loss"][-config.eval_every:]) / config.eval_every,
                        {k: round(v, 4) for k, v in history["eval"][-1].items() if k != "pairs"})
    history["seconds"] = time.perf_counter() - start
    if best_state is not None and config.keep == "best":
        encoder.load_state_dict(best_state)
    else:
        history["best_step"] = config.steps
    return encoder.eval(), history


def _stage2_pairs(
    models: Sequence[pretraining_zoo.ZooModel], learn_steps: int, labels: Path | None, *, progress: bool,
) -> list:
    """``(a, b, perms, teacher report)`` for every pair of one architecture's training seeds."""
    out = []
    by_arch: dict[str, list] = {}
    for zm in models:
        by_arch.setdefault(zm.entry.arch.name, []).append(zm)
    todo = [(x, y) for group in by_arch.values() for i, x in enumerate(group) for y in group[i + 1:]]
    for x, y in tqdm(todo, desc="pseudo-labels", disable=not progress):
        start = time.perf_counter()
        perms, report = cached_teacher(x.entry, y.entry, x.model, y.model, learn_steps, labels)
        logger.info("%s / %s: teacher %s (%.1f s)", x.entry.name, y.entry.name, report["teacher"],
                    time.perf_counter() - start)
        out.append((x.model, y.model, perms, {"a": x.entry.name, "b": y.entry.name, **report}))
    return out


def plot_history(history: dict, path: str | Path) -> None:
    """Learning curves (training loss, smoothed; validation recovery and barrier) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    k = max(1, len(history["loss"]) // 50)
    for stage, label in ((1, "stage 1: permuted, perturbed copies"), (2, "stage 2: independent pairs, pseudo-labels")):
        steps = [s for s, st in zip(history["step"], history["stage"]) if st == stage]
        loss = [x for x, st in zip(history["loss"], history["stage"]) if st == stage]
        chunks = [(steps[i], sum(loss[i:i + k]) / len(loss[i:i + k])) for i in range(0, len(loss), k)]
        if chunks:
            ax1.plot(*zip(*chunks), label=label)
    ax1.set(xlabel="step", ylabel="InfoNCE loss", yscale="log", title="training loss (mean of 1/50 of the run)")
    ax1.legend()
    for key, label in (("recovery_0.1", "noise 0.1 x std"), ("recovery_1.0", "noise 1.0 x std")):
        ax2.plot(history["eval_step"], [e[key] for e in history["eval"]], marker="o", label=label)
    ax2.set(xlabel="step", ylabel="fraction of units", title="validation models: permuted copy recovered (GNN alone)")
    ax2.legend()
    if history["eval"] and "barrier" in history["eval"][0]:
        for key, label in (("barrier", "GNN alone"), ("barrier_refined", "GNN + weight matching")):
            ax3.plot(history["eval_step"], [e[key] for e in history["eval"]], marker="o", label=label)
        ax3.axvline(history["best_step"], color="grey", linestyle=":", label=f"kept: step {history['best_step']}")
        ax3.legend()
    ax3.set(xlabel="step", ylabel="barrier left / naive's (mean)", title="validation pairs: midpoint barrier")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


REPRODUCIBILITY_PACKAGES = ("torch", "transformers", "numpy", "scipy", "POT", "safetensors")


def package_versions() -> dict[str, str | None]:
    """The versions of the packages whose numerics the weights depend on (the zoo's training, the teachers)."""

    def known(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: known(name) for name in REPRODUCIBILITY_PACKAGES}


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes, in name order): two runs trained on
    the same zoo models have the same digests.

    Example:
        >>> a = torch.nn.Linear(2, 2)
        >>> state_sha256(a) == state_sha256(copy.deepcopy(a)) != state_sha256(torch.nn.Linear(2, 2))
        True
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def validate(folders: Sequence[str | os.PathLike], zoo: str | os.PathLike, zoo_version: int) -> int:
    """Print :func:`validation_barriers` of each saved encoder (as shipped: float16 weights) on the
    validation pairs of ``zoo_version``: one line per encoder, then one per pair.

    Raises:
        CheckpointNotFoundError: a folder holds no saved encoder (before any zoo model is trained).
    """
    encoders = {str(f): load_encoder(f) for f in folders}
    models = pretraining_zoo.load_zoo(pretraining_zoo.zoo_entries(pretraining_zoo.archs_of(zoo_version),
                                                                  split="validation"), zoo, progress=True)
    pairs = validation_pairs(models)
    if not pairs:
        logger.error("zoo version %d has no architecture with two validation seeds: nothing to validate on",
                     zoo_version)
        return 1
    results = {f: validation_barriers(encoder, pairs) for f, encoder in encoders.items()}
    print(f"validation barrier (share of naive's left, mean of {len(pairs)} zoo version {zoo_version} pairs):")
    print(f"{'encoder':<48} {'gnn':>8} {'gnn+weight':>11}")
    for f, r in results.items():
        print(f"{f:<48} {r['barrier']:8.4f} {r['barrier_refined']:11.4f}")
    print(f"{'pair':<32}" + "".join(f" {Path(f).name[-16:]:>16}" for f in results))
    for name in next(iter(results.values()))["pairs"]:
        print(f"{name:<32}" + "".join(f" {r['pairs'][name]['gnn']:16.4f}" for r in results.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train the zoo (cached), pretrain, save weights, json and learning curves."""
    defaults = PretrainConfig()
    p = argparse.ArgumentParser(prog="merge-graphs pretrain-gnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/gnn", help="folder for encoder.safetensors, encoder.json and curves.png")
    p.add_argument("--zoo", default=str(pretraining_zoo.DEFAULT_CACHE),
                   help="model zoo cache folder (stage-2 labels are cached in its labels/)")
    for name in ("dim", "layers", "steps", "seed", "eval_every", "teacher_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "temperature", "stage2_from", "max_noise", "max_dropout"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    p.add_argument("--keep", choices=("best", "last"), default=defaults.keep,
                   help="the encoder saved: the best on the validation pairs, or the last step's")
    p.add_argument("--zoo-version", type=int, default=SHIPPED_ZOO_VERSION,
                   help="train on this zoo version's architectures (default %(default)s, with the other defaults: "
                        "the shipped weights' recipe)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: bit-identical between runs with the same packages and CPU kernel level)")
    p.add_argument("--validate", nargs="+", metavar="DIR",
                   help="train nothing: print the validation barriers of the encoders saved in these folders, on "
                        "--zoo-version's validation pairs (the early-stopping criterion, to choose between runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("merge_graphs.match", "merge_graphs.learned"):  # one line per matching is noise here
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.validate:
        return validate(args.validate, args.zoo, args.zoo_version)
    config = PretrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    archs = pretraining_zoo.archs_of(args.zoo_version)
    train_models = pretraining_zoo.load_zoo(pretraining_zoo.zoo_entries(archs, split="train"), args.zoo,
                                            progress=True)
    validation_models = pretraining_zoo.load_zoo(pretraining_zoo.zoo_entries(archs, split="validation"), args.zoo,
                                                 progress=True)
    encoder, history = pretrain(config, train_models, validation_models, labels=Path(args.zoo) / "labels",
                                progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_history(history, out / "curves.png")
    (out / "history.json").write_text(json.dumps(history))
    best = history["eval_step"].index(history["best_step"]) if history["best_step"] in history["eval_step"] else -1
    info = {
        "version": 2,
        "command": " ".join(["python -m merge_graphs.lab.pretrain_gnn", *(sys.argv[1:] if argv is None else argv)]),
        "config": asdict(config), "seed": config.seed, "packages": package_versions(),
        # torch picks its CPU kernels by instruction set: the same script and zoo can round differently elsewhere
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "zoo": {"version": args.zoo_version, "train": [zm.entry.name for zm in train_models],
                "validation": [zm.entry.name for zm in validation_models],
                "heldout": [e.name for e in pretraining_zoo.zoo_entries(archs, split="heldout")],
                "sha256": {zm.entry.name: state_sha256(zm.model) for zm in [*train_models, *validation_models]}},
        "teacher_wins": history["teacher_wins"],
        "best_step": history["best_step"],
        "validation": ({k: v for k, v in history["eval"][best].items() if k != "pairs"} if history["eval"] else None),
        "pretraining_seconds": round(history["seconds"], 1),
    }
    save_encoder(encoder, out, info)
    logger.info("saved %s (step %d, validation %s, %.0f s)", out, info["best_step"], info["validation"],
                history["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
