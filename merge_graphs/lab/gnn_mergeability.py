"""Mergeability from GNN embeddings on the zoo: fit the shipped barrier regression, rank held-out pairs.

The members are :mod:`merge_graphs.lab.gnn_lineage`'s: every zoo architecture's bases, each fine-tuned
on its own data for 20, 100 and 400 steps at lr 3e-4, and for the held-out seeds a long fine-tune
(600 steps at lr 1e-3). Permuted copies are left out: weight matching undoes the permutation, so
they would repeat their unpermuted pair's barrier (the prediction's invariance is a unit test).

Each pair of one architecture gets its true barrier: B aligned to A by weight matching (the tool's
default data-free alignment), the loss along the straight line between them at 11 points on the
zoo's held-out data (:func:`~merge_graphs.lab.pretraining_zoo.loss_fn`), the barrier divided by the
mean of the two parents' losses.

* Fit: every pair among the training seeds and their fine-tunes; ridge regression through the origin
  on some of :func:`~merge_graphs.gnn.mergeability.pair_features` (see :mod:`merge_graphs.gnn.mergeability`):
  the form (one of :data:`FORMS`) and the penalty are those that rank best (Kendall's tau) in
  leave-one-architecture-out cross-validation on these pairs.
* Held out: every pair among the held-out seeds and their fine-tunes, each of these against every
  training seed's base, and each long fine-tune against each held-out base. The GNN and the
  regression saw none of these models.
* Out of the zoo (``--bench-gpt2``, when the folder holds them): the byte-level GPT-2 models of
  ``merge-graphs bench gpt2`` (width 80, 3 layers, seeds 0-3) and their fine-tunes of 100 and 400
  steps (:func:`~merge_graphs.lab.gnn_lineage.bench_gpt2_members`), every pair, with the zoo's
  GPT-2 loss; a shape the regression never saw.

Reported: Kendall's tau between predicted and true barrier over the held-out pairs, the independent
ones alone, and within each architecture, beside four baselines: the lineage score alone, which the
regression's distance is made of (higher score, lower barrier), the embeddings' own matched score
(:func:`~merge_graphs.gnn.lineage.embedding_score`, the distance until the lineage score changed;
likewise), the cosine of the weights as they are (likewise), and a lookup of the mean training
barrier of the pair's architecture and lineage verdict, which only works inside the zoo.

Run ``python -m merge_graphs.lab.gnn_mergeability`` (zoo version 2's eighteen architectures by default: ~12 min
on one thread with the zoo cached, 2 more for the out-of-zoo check; it trains the zoo first otherwise; ``--zoo-version
1`` for the first seven). It writes ``merge_graphs/gnn/weights/mergeability.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy.stats import kendalltau

import merge_graphs as mg
from merge_graphs.gnn.embedding import default_encoder
from merge_graphs.gnn.lineage import embedding_score, lineage_threshold
from merge_graphs.gnn.mergeability import SHAPES, BarrierModel, pair_features
from merge_graphs.gnn.pretrained import WEIGHTS_DIR
from merge_graphs.lab import pretraining_zoo as zoo
from merge_graphs.lab.bench.common import curve
from merge_graphs.lab.gnn_lineage import (
    FINE_TUNE_STEPS,
    STRESS,
    Member,
    bench_gpt2_members,
    build_members,
    start_run,
    weight_cosine,
    zoo_parser,
)

ALPHAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
#: the regression's candidate inputs, named; each holds the distance (see :mod:`merge_graphs.gnn.mergeability`)
FORMS = {
    "distance": ("distance",),
    "distance, squared": ("distance", "distance squared"),
    "distance x residual stream": ("distance", "distance x residual stream"),
    "distance x log width": ("distance", "distance x log width"),
    "distance x log depth": ("distance", "distance x log depth"),
    "distance x residual stream, log width": ("distance", "distance x residual stream", "distance x log width"),
    "distance x residual stream, log depth": ("distance", "distance x residual stream", "distance x log depth"),
    "distance x every shape term": ("distance", "distance x residual stream", "distance x log width",
                                    "distance x log depth"),
}
TARGET_TAU = 0.6
PREDICTORS = ("GNN regression", "lineage score", "embedding score", "weight cosine", "zoo lookup")


@dataclass
class Pair:
    a: Member
    b: Member
    features: dict[str, float]
    weight_cosine: float
    embedding: float  # embedding_score: the embeddings' own matched score
    barrier: float  # after weight matching, relative to the parents' mean loss
    predicted: dict[str, float]

    @property
    def same(self) -> bool:
        return self.a.base_seed == self.b.base_seed

    @property
    def kind(self) -> str:
        roles = " / ".join(sorted((self.a.role, self.b.role)))
        return f"{'same base' if self.same else 'independent'}: {roles}"


def measure(a: Member, b: Member, loss: Callable, parent_loss: dict[str, float]) -> Pair:
    """The pair's features and its true relative barrier after weight matching."""
    features = pair_features(a.emb, b.emb)
    found = mg.align(a.model, b.model, "weight")
    line = curve(a.model, a.model.state_dict(), found.apply(b.model.state_dict()), loss, "weight")
    for m in (a, b):
        if m.name not in parent_loss:
            parent_loss[m.name] = float(loss(m.model))
    scale = (parent_loss[a.name] + parent_loss[b.name]) / 2
    return Pair(a, b, features, weight_cosine(a, b), embedding_score(a.emb, b.emb), line.barrier / scale, {})


def split_pairs(pool: list[Member], loss: Callable, parent_loss: dict[str, float]) -> tuple[list[Pair], list[Pair]]:
    """(fit, held-out) pairs of one architecture's members (as the module docstring says)."""
    fit, heldout = [], []
    plain = [m for m in pool if m.role in ("base", "fine-tune")]
    for a, b in itertools.combinations(plain, 2):
        if not a.heldout and not b.heldout:
            fit.append(measure(a, b, loss, parent_loss))
        elif (a.heldout and b.heldout) or (a if b.heldout else b).role == "base":
            heldout.append(measure(a, b, loss, parent_loss))
    bases = [m for m in pool if m.heldout and m.role == "base"]
    for long in (m for m in pool if m.role == "long fine-tune"):
        heldout.extend(measure(b, long, loss, parent_loss) for b in bases)
    return fit, heldout


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float, features: Sequence[str],
              shapes: dict[str, dict[str, tuple[float, float]]] | None = None) -> BarrierModel:
    """Ridge regression through the origin in closed form, each feature scaled to unit root mean square
    (every feature is 0 for a model against itself, whose barrier is 0: no intercept).

    Example:
        >>> x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
        >>> m = fit_ridge(x, 2 * x[:, 0], alpha=1e-9, features=("f",))
        >>> round(m.predict({"f": 4.0}), 6)
        8.0
    """
    scale = x.pow(2).mean(0).sqrt().clamp_min(1e-12)
    z = x / scale
    coef = torch.linalg.solve(z.T @ z + alpha * torch.eye(z.shape[1], dtype=z.dtype), z.T @ y)
    return BarrierModel(tuple(features), tuple(scale.tolist()), tuple(coef.tolist()), dict(shapes or {}))


def shape_ranges(pairs: Sequence[Pair]) -> dict[str, dict[str, tuple[float, float]]]:
    """The range of each of :data:`~merge_graphs.gnn.mergeability.SHAPES` over ``pairs``, apart for models
    without (``"0"``) and with (``"1"``) a residual stream (:meth:`BarrierModel.covers` reads them)."""
    out = {}
    for group in sorted({str(int(q.features["residual stream"])) for q in pairs}):
        members = [q for q in pairs if str(int(q.features["residual stream"])) == group]
        out[group] = {k: (min(q.features[k] for q in members), max(q.features[k] for q in members)) for k in SHAPES}
    return out


def matrix(pairs: Sequence[Pair], features: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([[p.features[f] for f in features] for p in pairs], dtype=torch.float64)
    return x, torch.tensor([p.barrier for p in pairs], dtype=torch.float64)


def choose_form(fit: Sequence[Pair], forms: Mapping[str, Sequence[str]] = FORMS,
                alphas: Sequence[float] = ALPHAS) -> tuple[str, float, dict[str, dict[str, dict[str, float]]]]:
    """The form and ridge penalty whose predictions rank best (Kendall's tau, the figure reported) when
    each architecture's pairs are predicted by a fit on the other architectures' pairs; with every
    form's and alpha's tau and mean squared error.

    Example:
        Three architectures whose barrier grows with the distance at slopes 1, 2 and 3 (their shape
        term): the distance alone cannot rank one against another.

        >>> from types import SimpleNamespace as P
        >>> pairs = [P(a=P(arch=arch), features={"distance": d, "distance x shape": d * s}, barrier=d * s)
        ...          for arch, s in zip("xyz", (1, 2, 3)) for d in (0.2, 0.4, 0.6)]
        >>> choose_form(pairs, {"d": ("distance",), "d x shape": ("distance x shape",)}, (1e-3,))[:2]
        ('d x shape', 0.001)
    """
    archs = sorted({p.a.arch for p in fit})
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for form, features in forms.items():
        scores[form] = {}
        for alpha in alphas:
            predicted, true = [], []
            for arch in archs:
                model = fit_ridge(*matrix([p for p in fit if p.a.arch != arch], features), alpha, features)
                predicted += [model.predict(p.features) for p in fit if p.a.arch == arch]
                true += [p.barrier for p in fit if p.a.arch == arch]
            scores[form][str(alpha)] = {
                "tau": round(float(kendalltau(predicted, true).statistic), 4),
                "mse": round(statistics.fmean((x - y) ** 2 for x, y in zip(predicted, true)), 5)}
    form, alpha = max(((f, a) for f in scores for a in scores[f]), key=lambda fa: scores[fa[0]][fa[1]]["tau"])
    return form, float(alpha), scores


def tau(pairs: Sequence[Pair], predictor: str) -> float:
    """Kendall's tau-b between a predictor's ranking and the true barriers (``nan`` for under 3 pairs)."""
    if len(pairs) < 3:
        return math.nan
    return float(kendalltau([p.predicted[predictor] for p in pairs], [p.barrier for p in pairs]).statistic)


def summarize(pairs: Sequence[Pair]) -> dict:
    out = {"pairs": len(pairs), "same base": sum(p.same for p in pairs), "independent": sum(not p.same for p in pairs),
           "barrier_range": _range([p.barrier for p in pairs]),
           "mean_abs_error": round(statistics.fmean(abs(p.predicted["GNN regression"] - p.barrier) for p in pairs), 4)}
    return out | {f"tau {m}": _round(tau(pairs, m)) for m in PREDICTORS}


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def _range(values: Sequence[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def _cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = zoo_parser("gnn_mergeability", __doc__, WEIGHTS_DIR / "mergeability.json", "the fitted regression", version=2)
    args = p.parse_args(argv)
    archs, log, start = start_run(p, args)
    if len(archs) < 2:
        p.error("the penalty is chosen by leaving one architecture out: give --archs two or more (or none for all)")
    encoder = default_encoder()
    members = build_members(archs, args.zoo, encoder, stress=True, log=log)
    fit, heldout = [], []
    for arch in archs:
        loss = zoo.loss_fn(zoo.ZooEntry(arch, arch.seeds[0]), "heldout")
        f, h = split_pairs(members[arch.name], loss, {})
        fit, heldout = fit + f, heldout + h
        log(f"{arch.name}: {len(f)} fit pairs, {len(h)} held-out pairs measured")

    form, alpha, cv = choose_form(fit)
    model = fit_ridge(*matrix(fit, FORMS[form]), alpha, FORMS[form], shapes=shape_ranges(fit))
    threshold = lineage_threshold()
    lookup = defaultdict(list)
    for q in fit:
        lookup[q.a.arch, q.features["lineage score"] > threshold].append(q.barrier)

    def predict(pairs: Sequence[Pair]) -> None:
        for q in pairs:
            known = lookup.get((q.a.arch, q.features["lineage score"] > threshold))
            q.predicted = {"GNN regression": model.predict(q.features), "lineage score": -q.features["lineage score"],
                           "embedding score": -q.embedding, "weight cosine": -q.weight_cosine,
                           "zoo lookup": statistics.fmean(known) if known else math.nan}

    predict(fit + heldout)

    independent = [q for q in heldout if not q.same]
    first = {a.name for a in archs if a.since == 1}
    report = {"fit": summarize(fit), "heldout": summarize(heldout), "heldout_independent": summarize(independent),
              "heldout_same_base": summarize([q for q in heldout if q.same]), "architectures": {}, "kinds": {}}
    if first != {a.name for a in archs}:
        report["heldout_version_1"] = summarize([q for q in heldout if q.a.arch in first])
    met = report["heldout"]["tau GNN regression"] >= TARGET_TAU
    print(f"fit on training seeds: {len(fit)} pairs ({report['fit']['same base']} same base, "
          f"{report['fit']['independent']} independent); form '{form}', ridge penalty {alpha:g}, "
          f"leave-one-architecture-out tau {cv[form][str(alpha)]['tau']:.3f}")
    print("leave-one-architecture-out tau of each form (its best penalty): " + "; ".join(
        f"{name} {max(v['tau'] for v in by_alpha.values()):.3f}" for name, by_alpha in cv.items()))
    print(f"target: relative barrier after weight matching; issue target tau >= {TARGET_TAU}: "
          f"{'met' if met else 'not met'} (held-out tau {report['heldout']['tau GNN regression']:.3f})")
    print()
    print("Kendall's tau between predicted and true barrier (held-out seeds unless said)")
    print("| pairs | count (same base / independent) | barrier min / median / max | "
          + " | ".join(PREDICTORS) + " |")
    print("| --- | --- | --- |" + " --- |" * len(PREDICTORS))
    rows = [("fit (training seeds, in-sample)", report["fit"]), ("held out, all", report["heldout"]),
            ("held out, independent", report["heldout_independent"]),
            ("held out, same base", report["heldout_same_base"])]
    if "heldout_version_1" in report:
        rows.append(("held out, zoo version 1's architectures", report["heldout_version_1"]))
    for arch in archs:
        pairs = [q for q in heldout if q.a.arch == arch.name]
        s = summarize(pairs)
        s_ind = summarize([q for q in pairs if not q.same])
        report["architectures"][arch.name] = {"all": s, "independent": s_ind}
        rows += [(f"{arch.name}, all", s), (f"{arch.name}, independent", s_ind)]
    for name, s in rows:
        print(f"| {name} | {s['pairs']} ({s['same base']} / {s['independent']}) | {s['barrier_range']} | "
              + " | ".join(_cell(s[f"tau {m}"]) for m in PREDICTORS) + " |")
    print()
    print("held-out pairs by kind: true and predicted barrier, min / median / max")
    print("| kind | pairs | true barrier | predicted |")
    print("| --- | --- | --- | --- |")
    kinds = defaultdict(list)
    for q in heldout:
        kinds[q.kind].append(q)
    for kind in sorted(kinds):
        pairs = kinds[kind]
        true, pred = _range([q.barrier for q in pairs]), _range([q.predicted["GNN regression"] for q in pairs])
        report["kinds"][kind] = {"pairs": len(pairs), "barrier_range": true, "predicted_range": pred}
        print(f"| {kind} | {len(pairs)} | {true} | {pred} |")
    bench = Path(args.bench_gpt2)
    if (bench / "gpt2-seed0-steps800").is_dir():
        pool = [m for m in bench_gpt2_members(bench, encoder) if m.role != "permuted fine-tune"]
        loss = zoo.loss_fn(zoo.ZooEntry(next(a for a in zoo.ARCHS if a.family == "gpt2"), 0), "heldout")
        parent_loss: dict[str, float] = {}
        pairs = [measure(a, b, loss, parent_loss) for a, b in itertools.combinations(pool, 2)]
        predict(pairs)
        log(f"bench GPT-2: {len(pool)} models, {len(pairs)} pairs measured")
        report["bench_gpt2"] = {"all": summarize(pairs), "independent": summarize([q for q in pairs if not q.same]),
                                "within_fitted_shapes": all(model.covers(q.features) for q in pairs)}
        print()
        print("out of the zoo, bench GPT-2 (width 80, 3 layers; seeds 0-3 and fine-tunes of 100 and 400 steps; "
              f"{'within' if report['bench_gpt2']['within_fitted_shapes'] else 'outside'} the fitted shapes):")
        for name in ("all", "independent"):
            s = report["bench_gpt2"][name]
            print(f"  {name}: {s['pairs']} pairs, true barrier {s['barrier_range']}, predicted "
                  f"{_range([q.predicted['GNN regression'] for q in pairs if name == 'all' or not q.same])}, tau "
                  + ", ".join(f"{m} {_cell(s[f'tau {m}'])}" for m in PREDICTORS))
    else:
        print(f"\n(no bench GPT-2 models in {bench}: `merge-graphs bench gpt2` makes them)")
    print()
    print("coefficients (per unit of each feature): "
          + ", ".join(f"{f} {c / s:+.4f}" for f, c, s in zip(model.features, model.coef, model.scale)))
    seconds = time.perf_counter() - start
    print(f"\n{seconds:.0f} s")
    if args.out != "-":
        weights = WEIGHTS_DIR / "encoder.safetensors"
        info = {
            "model": model.to_dict(),
            "target": "barrier after weight matching / mean of the parents' losses (zoo held-out data, 11 points)",
            "comment": ("predicted_barrier = max(0, coef . features / scale). Ridge regression through the origin fitted on "
                        "pairs of the pretraining zoo's training seeds and their fine-tunes by the command below, for "
                        "the GNN weights whose sha256 is given; rerun it after retraining them."),
            "command": " ".join(["python -m merge_graphs.lab.gnn_mergeability",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "encoder_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "form": form, "alpha": alpha, "leave_one_architecture_out": cv,
            "fine_tune_steps": list(FINE_TUNE_STEPS), "long_fine_tune": STRESS, "target_tau": TARGET_TAU,
            "target_met": met, **report, "seconds": round(seconds, 1), "torch": torch.__version__,
        }
        with open(args.out, "w") as f:
            f.write(json.dumps(info, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
