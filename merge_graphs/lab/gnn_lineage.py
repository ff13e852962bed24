"""Lineage from GNN embeddings on the zoo: fit the shipped threshold, measure it on held-out seeds.

Every zoo architecture's models, each fine-tuned on its own data (``further_training``: 20, 100
and 400 steps at lr 3e-4; the digits MLPs: the same number of batches, whole epochs once a
fine-tune passes one). Pairs of one architecture are *same base* (a base and its fine-tunes,
two fine-tunes of one base) or *independent* (anything of two different seeds).

* Fit: every pair among the training seeds and their fine-tunes; the threshold is the one with
  the best balanced accuracy, in the middle of the widest gap that reaches it.
* Held out: every pair among the held-out seeds, their fine-tunes and randomly permuted copies of
  the fine-tunes (still the same base), and each of these against every training seed's base.
  Neither the GNN nor the threshold saw these models.
* Stress (reported apart, not fitted): each held-out base against a longer, stronger fine-tune of
  itself (600 steps at lr 1e-3) and against the other held-out base.

* Out of the zoo (``--bench-gpt2``, when the folder holds them): the byte-level GPT-2 models of
  ``merge-graphs bench gpt2`` (width 80, 3 layers, seeds 0-3), each fine-tuned for 100 and 400
  steps at lr 3e-4 on the training docstrings, plus permuted copies: every pair, with the shipped
  threshold.

Beside the shipped score (``matched weights``, :func:`~merge_graphs.gnn.lineage.lineage_score`), the
same figures for three baselines: the embeddings' own matched score (``matched GNN``,
:func:`~merge_graphs.gnn.lineage.embedding_score`, the shipped score until the long fine-tunes
showed where it fails), and two without matching: the cosine of the two models' weights (all
labelled tensors, flattened, as they are), and the GNN embeddings' cosine unit by unit as the
models are ordered. Each baseline's threshold is fitted the same way.

Run ``python -m merge_graphs.lab.gnn_lineage`` (~3.5 min with the zoo cached; it trains the zoo
first otherwise). It writes ``merge_graphs/gnn/weights/lineage.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import merge_graphs as mg
from merge_graphs.gnn.alignment import pseudo_tensors
from merge_graphs.gnn.embedding import Embeddings, default_encoder, embed
from merge_graphs.gnn.lineage import embedding_score, lineage_score
from merge_graphs.gnn.pretrained import WEIGHTS_DIR
from merge_graphs.lab import pretraining_zoo as zoo

FINE_TUNE_STEPS = (20, 100, 400)
STRESS = {"steps": 600, "lr": 1e-3}
SCORE = "matched weights"  # lineage_score: what the shipped threshold is fitted for
METHODS = (SCORE, "matched GNN", "identity weights", "identity GNN")
RANGED = (SCORE, "matched GNN")  # the scores whose min / median / max are printed


@dataclass
class Member:
    """One model of the evaluation: a zoo base, a fine-tune of it, or a permuted fine-tune."""

    name: str
    arch: str
    family: str
    base_seed: int
    role: str  # "base" | "fine-tune" | "permuted fine-tune" | "long fine-tune"
    heldout: bool
    model: nn.Module = field(repr=False)
    emb: Embeddings | None = field(default=None, repr=False)


@dataclass
class Pair:
    a: Member
    b: Member
    scores: dict[str, float]

    @property
    def same(self) -> bool:
        return self.a.base_seed == self.b.base_seed

    @property
    def kind(self) -> str:
        roles = " / ".join(sorted((self.a.role, self.b.role)))
        return f"{'same base' if self.same else 'independent'}: {roles}"


def fine_tune(entry: zoo.ZooEntry, model: nn.Module, steps: int, seed: int, lr: float = 3e-4) -> nn.Module:
    """A copy of ``model`` after ``steps`` more optimizer steps on its own training data."""
    model = copy.deepcopy(model)
    if entry.family != "mlp":
        if lr == 3e-4:
            return zoo.further_training(entry, model, seed, steps)
        return zoo.train(entry, model, seed=seed, steps=steps, warmup=1, lr=lr, final_lr_fraction=1.0)
    x = zoo.digits()[0]
    samples = min(64 * steps, len(x))
    epochs = max(1, round(64 * steps / len(x)))
    return zoo.train(entry, model, seed=seed, epochs=epochs, samples=samples, lr=lr)


def weight_cosine(a: Member, b: Member) -> float:
    """Cosine of the two models' labelled tensors, flattened and concatenated in the same order."""
    names = list(a.emb.graph.spec.tensors)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    va = torch.cat([sa[n].float().flatten() for n in names if n in sa])
    vb = torch.cat([sb[n].float().flatten() for n in names if n in sb])
    return float(torch.nn.functional.cosine_similarity(va, vb, dim=0))


def identity_gnn(a: Member, b: Member) -> float:
    """Mean cosine of the centred, unit-norm node embeddings, unit i of A against unit i of B."""
    _, ta = pseudo_tensors(a.emb)
    _, tb = pseudo_tensors(b.emb)
    units = sum(t.shape[1] for t in ta.values())
    return float(sum((ta[k] * tb[k]).sum() for k in ta)) / units


def score(a: Member, b: Member) -> Pair:
    return Pair(a, b, {SCORE: lineage_score(a.emb, b.emb), "matched GNN": embedding_score(a.emb, b.emb),
                       "identity weights": weight_cosine(a, b),
                       "identity GNN": identity_gnn(a, b)})


def fit_threshold(scores: Sequence[float], same: Sequence[bool]) -> float:
    """The threshold (``score > t`` says same base) of best balanced accuracy, at the middle of the
    widest gap between consecutive scores that reaches it.

    Example:
        >>> fit_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True])
        0.5
    """
    values = sorted(set(scores))
    cuts = [(values[0] - 1.0, values[0])] + list(zip(values, values[1:])) + [(values[-1], values[-1] + 1.0)]
    best, best_gap, best_t = -1.0, -1.0, values[0]
    for lo, hi in cuts:
        t = (lo + hi) / 2
        acc = balanced_accuracy([s > t for s in scores], same)
        if acc > best + 1e-12 or (abs(acc - best) <= 1e-12 and hi - lo > best_gap):
            best, best_gap, best_t = acc, hi - lo, t
    return best_t


def balanced_accuracy(said: Sequence[bool], same: Sequence[bool]) -> float:
    """The mean of the accuracy on same-base pairs and on independent pairs (those present)."""
    parts = []
    for cls in (True, False):
        idx = [i for i, s in enumerate(same) if s == cls]
        if idx:
            parts.append(sum(said[i] == cls for i in idx) / len(idx))
    return sum(parts) / len(parts)


def accuracy(pairs: Sequence[Pair], method: str, threshold: float) -> tuple[float, float]:
    said = [p.scores[method] > threshold for p in pairs]
    same = [p.same for p in pairs]
    return sum(s == t for s, t in zip(said, same)) / len(pairs), balanced_accuracy(said, same)


def build_members(archs, cache: str, encoder, *, stress: bool, log) -> dict[str, list[Member]]:
    """Every architecture's bases, fine-tunes, permuted fine-tunes (held-out seeds) and long fine-tunes."""
    members: dict[str, list[Member]] = {}
    for arch in archs:
        # Validation seeds chose the encoder's training step: neither training seeds nor untouched held-out ones.
        entries = [e for e in zoo.zoo_entries([arch]) if e.split != "validation"]
        pool = []
        for zm in zoo.load_zoo(entries, cache):
            e = zm.entry
            pool.append(Member(e.name, arch.name, arch.family, e.seed, "base", e.heldout, zm.model))
            spec = mg.symmetry_spec(zm.model)
            for steps in FINE_TUNE_STEPS:
                tuned = fine_tune(e, zm.model, steps, seed=10_000 + 100 * e.seed + steps)
                pool.append(Member(f"{e.name}+ft{steps}", arch.name, arch.family, e.seed, "fine-tune", e.heldout, tuned))
                if e.heldout:
                    perms = mg.random_permutations(spec, seed=20_000 + 100 * e.seed + steps)
                    pool.append(Member(f"{e.name}+ft{steps}+perm", arch.name, arch.family, e.seed,
                                       "permuted fine-tune", True, mg.permute(tuned, perms, spec)))
            if stress and e.heldout:
                tuned = fine_tune(e, zm.model, STRESS["steps"], seed=30_000 + e.seed, lr=STRESS["lr"])
                pool.append(Member(f"{e.name}+long", arch.name, arch.family, e.seed, "long fine-tune", True, tuned))
        for m in pool:
            m.emb = embed(m.model, encoder)
        members[arch.name] = pool
        log(f"{arch.name}: {len(pool)} models")
    return members


def bench_gpt2_members(folder: Path, encoder, seeds=range(4)) -> list[Member]:
    """The bench's width-80 GPT-2 models (``gpt2-seed{k}-steps800``), fine-tunes and permuted fine-tunes."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from merge_graphs.lab import trainers

    hf_logging.disable_progress_bar()
    pool = []
    for seed in seeds:
        base = AutoModelForCausalLM.from_pretrained(folder / f"gpt2-seed{seed}-steps800").eval()
        name = f"bench-gpt2-s{seed}"
        pool.append(Member(name, "bench-gpt2-80", "gpt2", seed, "base", True, base))
        spec = mg.symmetry_spec(base)
        for steps in (100, 400):
            tuned = trainers.train_byte_lm(copy.deepcopy(base), zoo.corpus_text("train"), 40_000 + 100 * seed + steps,
                                           steps=steps, batch_size=16, seq_len=64, warmup=1, lr=3e-4,
                                           final_lr_fraction=1.0)
            pool.append(Member(f"{name}+ft{steps}", "bench-gpt2-80", "gpt2", seed, "fine-tune", True, tuned))
            perms = mg.random_permutations(spec, seed=50_000 + 100 * seed + steps)
            pool.append(Member(f"{name}+ft{steps}+perm", "bench-gpt2-80", "gpt2", seed, "permuted fine-tune", True,
                               mg.permute(tuned, perms, spec)))
    for m in pool:
        m.emb = embed(m.model, encoder)
    return pool


def split_pairs(pool: list[Member]) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(fit, held-out, stress) pairs of one architecture's members."""
    fit, heldout, stress = [], [], []
    plain = [m for m in pool if m.role != "long fine-tune"]
    for a, b in itertools.combinations(plain, 2):
        if not a.heldout and not b.heldout:
            fit.append(score(a, b))
        elif a.heldout and b.heldout:
            heldout.append(score(a, b))
        elif (a if b.heldout else b).role == "base":  # a held-out model against a training seed's base
            heldout.append(score(a, b))
    bases = [m for m in pool if m.heldout and m.role == "base"]
    for long in (m for m in pool if m.role == "long fine-tune"):
        stress.extend(score(b, long) for b in bases)
    return fit, heldout, stress


def summarize(pairs: Sequence[Pair], thresholds: dict[str, float]) -> dict:
    """Accuracy and balanced accuracy of each method, counts of each kind."""
    out = {"pairs": len(pairs), "same base": sum(p.same for p in pairs),
           "independent": sum(not p.same for p in pairs)}
    for method in METHODS:
        acc, bal = accuracy(pairs, method, thresholds[method])
        out[method] = {"accuracy": round(acc, 4), "balanced_accuracy": round(bal, 4)}
    return out


def _range(values: Sequence[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def zoo_parser(script: str, doc: str, out: Path, what: str, version: int = 1) -> argparse.ArgumentParser:
    """The options the zoo's lab scripts share: ``--zoo``, ``--out``, ``--archs``, ``--bench-gpt2``,
    ``--zoo-version`` (default ``version``: the one the script's shipped json was fitted on), ``--threads``."""
    p = argparse.ArgumentParser(prog=f"python -m merge_graphs.lab.{script}", description=doc.split("\n\n")[0])
    p.add_argument("--zoo", default=str(zoo.DEFAULT_CACHE), help="model zoo cache folder")
    p.add_argument("--out", default=str(out), help=f"where to write {what} and figures ('-' for nowhere)")
    p.add_argument("--archs", nargs="*", help="zoo architectures (default: all)")
    p.add_argument("--bench-gpt2", default="out/bench/models",
                   help="folder of `merge-graphs bench gpt2`'s models (gpt2-seed0-steps800 ...); skipped if absent")
    p.add_argument("--zoo-version", type=int, default=version,
                   help="the zoo's architectures up to this version (default %(default)s: what the shipped json was "
                        "fitted on)")
    p.add_argument("--threads", type=int, default=1)
    return p


def start_run(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[zoo.Arch], Callable[[str], None], float]:
    """The architectures ``args`` select (a usage error through ``p`` names any the zoo version lacks), a
    logger of elapsed time to stderr and the start time; sets the thread count and quiets the matching's
    per-call log lines."""
    known = zoo.archs_of(args.zoo_version)
    unknown = sorted(set(args.archs or ()) - {a.name for a in known})
    if unknown:
        p.error(f"zoo version {args.zoo_version} has no architecture {', '.join(unknown)}; "
                f"choose among {', '.join(a.name for a in known)} (or a higher --zoo-version)")
    logging.getLogger("merge_graphs.match").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return [a for a in known if not args.archs or a.name in args.archs], log, start


def main(argv: Sequence[str] | None = None) -> int:
    p = zoo_parser("gnn_lineage", __doc__, WEIGHTS_DIR / "lineage.json", "the fitted threshold")
    p.add_argument("--no-stress", action="store_true", help="skip the long fine-tunes")
    args = p.parse_args(argv)
    archs, log, start = start_run(p, args)
    encoder = default_encoder()
    members = build_members(archs, args.zoo, encoder, stress=not args.no_stress, log=log)
    fit, heldout, stress = [], [], []
    for pool in members.values():
        f, h, s = split_pairs(pool)
        fit, heldout, stress = fit + f, heldout + h, stress + s
    log(f"scored {len(fit) + len(heldout) + len(stress)} pairs")
    thresholds = {m: fit_threshold([q.scores[m] for q in fit], [q.same for q in fit]) for m in METHODS}

    print(f"fit on training seeds: {len(fit)} pairs ({sum(q.same for q in fit)} same base, "
          f"{sum(not q.same for q in fit)} independent)")
    print("threshold (score > t says same base): " + ", ".join(f"{m} {t:.3f}" for m, t in thresholds.items()))
    print()
    print("held-out seeds: accuracy (balanced accuracy) per family")
    print("| family | pairs (same base / independent) | " + " | ".join(METHODS) + " |")
    print("| --- | --- |" + " --- |" * len(METHODS))
    families = defaultdict(list)
    for q in heldout:
        families[q.a.family].append(q)
    report = {"fit": summarize(fit, thresholds), "heldout": summarize(heldout, thresholds), "families": {}}
    for name, pairs in [*families.items(), ("all", heldout)]:
        s = summarize(pairs, thresholds)
        if name != "all":
            report["families"][name] = s
        cells = [f"{100 * s[m]['accuracy']:.1f}% ({100 * s[m]['balanced_accuracy']:.1f}%)" for m in METHODS]
        print(f"| {name} | {s['pairs']} ({s['same base']} / {s['independent']}) | " + " | ".join(cells) + " |")
    print()
    print("held-out seeds by kind of pair: count, scores' min / median / max, accuracy of each method")
    print("| kind | pairs | " + " | ".join(f"{m} score" for m in RANGED) + " | " + " | ".join(METHODS) + " |")
    print("| --- | --- |" + " --- |" * (len(RANGED) + len(METHODS)))
    kinds = defaultdict(list)
    for q in heldout:
        kinds[q.kind].append(q)
    for q in stress:
        kinds[q.kind + " (stress)"].append(q)
    report["kinds"] = {}
    for kind in sorted(kinds):
        pairs = kinds[kind]
        accs = {m: accuracy(pairs, m, thresholds[m])[0] for m in METHODS}
        ranges = {m: _range([q.scores[m] for q in pairs]) for m in RANGED}
        report["kinds"][kind] = {"pairs": len(pairs), "score_ranges": ranges,
                                 **{m: round(a, 4) for m, a in accs.items()}}
        print(f"| {kind} | {len(pairs)} | " + " | ".join(ranges.values()) + " | "
              + " | ".join(f"{100 * accs[m]:.1f}%" for m in METHODS) + " |")
    if stress:
        s = summarize(stress, thresholds)
        report["stress"] = s
        print()
        print(f"stress ({STRESS['steps']} steps at lr {STRESS['lr']:g} against held-out bases): "
              + ", ".join(f"{m} {100 * s[m]['accuracy']:.1f}%" for m in METHODS))
        for q in stress:
            print(f"  {q.a.name} vs {q.b.name}: " + ", ".join(f"{m} {q.scores[m]:.3f}" for m in RANGED) + " "
                  f"({'same base' if q.same else 'independent'})")
    bench = Path(args.bench_gpt2)
    if (bench / "gpt2-seed0-steps800").is_dir():
        pool = bench_gpt2_members(bench, encoder)
        pairs = [score(a, b) for a, b in itertools.combinations(pool, 2)]
        log(f"bench GPT-2: {len(pool)} models, {len(pairs)} pairs")
        s = summarize(pairs, thresholds)
        report["bench_gpt2"] = s
        print()
        print(f"out of the zoo, bench GPT-2 (width 80, 3 layers; seeds 0-3, fine-tunes of 100 and 400 steps, "
              f"permuted copies): {s['pairs']} pairs ({s['same base']} same base / {s['independent']} independent)")
        for method in METHODS:
            print(f"  {method}: accuracy {100 * s[method]['accuracy']:.1f}% "
                  f"(balanced {100 * s[method]['balanced_accuracy']:.1f}%)")
        for method, same in itertools.product(RANGED, (True, False)):
            values = [q.scores[method] for q in pairs if q.same == same]
            print(f"  {method} score, {'same base' if same else 'independent'}: min / median / max {_range(values)}")
    else:
        print(f"\n(no bench GPT-2 models in {bench}: `merge-graphs bench gpt2` makes them)")
    seconds = time.perf_counter() - start
    print(f"\n{seconds:.0f} s")
    if args.out != "-":
        weights = WEIGHTS_DIR / "encoder.safetensors"
        info = {
            "threshold": round(thresholds[SCORE], 4),
            "comment": ("lineage_score > threshold says 'same base'. Fitted (best balanced accuracy, middle of the "
                        "widest gap) on pairs of the pretraining zoo's training seeds and their fine-tunes by "
                        "the command below, for the GNN weights whose sha256 is given; rerun it after retraining them."),
            "command": " ".join(["python -m merge_graphs.lab.gnn_lineage", *(sys.argv[1:] if argv is None else argv)]),
            "encoder_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "fine_tune_steps": list(FINE_TUNE_STEPS), "stress_fine_tune": STRESS,
            "baseline_thresholds": {m: round(t, 4) for m, t in thresholds.items() if m != SCORE},
            **report, "seconds": round(seconds, 1), "torch": torch.__version__,
        }
        Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if not math.isnan(thresholds[SCORE]) else 1


if __name__ == "__main__":
    sys.exit(main())
