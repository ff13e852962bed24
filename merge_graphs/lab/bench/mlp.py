"""Suite ``mlp``: different-seed MLPs on scikit-learn's digits.

    merge-graphs bench mlp [--pairs N] [--steps EPOCHS] [--quick] [--out DIR]

``pairs`` (default 5) pairs of 64-512-512-512-10 ReLU MLPs trained here on scikit-learn's digits
(:func:`merge_graphs.lab.trainers.train_digits_mlp`, 20 epochs, deterministic; pair ``i`` is seeds ``2i``
and ``2i + 1``). For each pair and each method of :data:`MLP_METHODS` (``naive``, ``weight``,
``activation`` on the first 512 training inputs, ``activation+weight``: activation matching
refined by weight matching, ``gnn``: the pretrained GNN's embeddings, data-free, ``gnn+weight``:
refined by weight matching) the test cross-entropy at 11 points from A to aligned B, the barrier,
the share of the naive barrier removed, the midpoint (alpha 0.5) test loss and accuracy and the
alignment time; ``OUT/bench-mlp.json`` and ``OUT/bench-mlp.png`` (pair 0). A ``rebasin`` row, the
external ``rebasin`` package's weight matching run in this process, is added when that package is
installed (:mod:`merge_graphs.lab.bench.rebasin_baseline`); otherwise the report says why not. ``--quick`` (one pair
of 64-128-128-10 MLPs, 10 epochs) is the CI smoke run.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from merge_graphs.evaluate import InterpolationCurve, interpolate_state_dicts
from merge_graphs.lab import trainers
from merge_graphs.lab.bench import rebasin_baseline
from merge_graphs.lab.bench.common import (
    POINTS,
    add_removed,
    cell,
    curve,
    machine,
    machine_line,
    out_folder,
    register,
    summary,
    write_report,
)
from merge_graphs.lab.plots import plot_curves

logger = logging.getLogger(__name__)

#: MLP suite: method name -> (``align`` method, ``refine``, needs calibration).
MLP_METHODS: dict[str, tuple[str, bool, bool]] = {
    "naive": ("none", False, False),
    "weight": ("weight", False, False),
    "activation": ("activation", False, True),
    "activation+weight": ("activation", True, True),
    "gnn": ("gnn", False, False),
    "gnn+weight": ("gnn", True, False),
}
MLP = {"widths": (64, 512, 512, 512, 10), "epochs": 20, "calibration": 512}
MLP_QUICK = {"widths": (64, 128, 128, 10), "epochs": 10}
#: Inputs ``rebasin`` traces the models with.
TRACE_INPUTS = 4


def classifier_settings(defaults: Mapping[str, Any], quick_settings: Mapping[str, Any], pairs: int,
                        steps: int | None, quick: bool, lr: float | None) -> tuple[int, dict[str, Any]]:
    """``(pairs, settings)`` of a transformer classifier suite (bert, vit, clip): ``defaults``, with
    ``quick_settings`` and one pair under ``--quick``, else ``steps`` as the epochs; ``lr`` replaces the rate."""
    settings = dict(defaults, **(quick_settings if quick else {}))
    if quick:
        pairs = 1
    elif steps is not None:
        settings["epochs"] = steps
    if lr is not None:
        settings["lr"] = lr
    if pairs < 1 or settings["epochs"] < 1 or not settings["lr"] > 0:
        raise ValueError(f"pairs and epochs must be at least 1 and lr positive; got {pairs}, {settings['epochs']}, "
                         f"{settings['lr']}")
    return pairs, settings


def classifier_pair(a: nn.Module, b: nn.Module, loss: Callable[[nn.Module], float],
                    acc: Callable[[nn.Module], float], calibration: Any, trace_inputs: Any, *,
                    methods: Mapping[str, tuple[str, bool, bool]] = MLP_METHODS,
                    align_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                    progress: bool = False) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Every method's figures for one pair of classifiers, and why ``rebasin`` was skipped (None when it ran).

    For each of ``methods`` (and ``rebasin``, :mod:`merge_graphs.lab.bench.rebasin_baseline`, traced on
    ``trace_inputs``, when it is installed and supports the model): ``loss`` at 11 points from A to
    aligned B, its barrier and midpoint, ``acc`` at the midpoint and the alignment time.
    ``align_kwargs[name]`` overrides :func:`merge_graphs.align`'s arguments for the method ``name``
    (e.g. labelled ``calibration`` and ``learn`` settings for learned alignment).
    """
    from tqdm.auto import tqdm

    import merge_graphs as mg

    aligned = {}
    for name in tqdm(methods, desc="methods", leave=False, disable=not progress):
        method, refine, needs_data = methods[name]
        start = time.perf_counter()
        kwargs = {"refine": refine, "calibration": calibration if needs_data else None,
                  **(align_kwargs or {}).get(name, {})}
        alignment = mg.align(a, b, method, **kwargs)
        aligned[name] = (alignment.apply(b.state_dict()), time.perf_counter() - start, alignment.method)
    skipped = rebasin_baseline.unavailable()
    if skipped is None:
        found = rebasin_baseline.align_state(a, b, trace_inputs)
        if isinstance(found, str):
            skipped = found
        else:
            aligned["rebasin"] = (*found, "rebasin weight matching")
    state_a = a.state_dict()
    scratch = copy.deepcopy(a)
    rows = {}
    for name, (state_b, seconds, how) in aligned.items():
        line = curve(a, state_a, state_b, loss, name)
        scratch.load_state_dict(interpolate_state_dicts(state_a, state_b, 0.5))
        rows[name] = {"barrier": line.barrier, "midpoint": line.midpoint, "midpoint_acc": acc(scratch),
                      "align_s": seconds, "alignment": how, "curve": line.to_dict()}
        logger.info("%s: barrier %.4f, midpoint %.4f, aligned in %.2f s", name, line.barrier, line.midpoint, seconds)
    add_removed(rows)
    return rows, skipped


def classifier_table(report: Mapping[str, Any]) -> list[str]:
    """The rows shared by the classifier suites' tables: per method, median [min, max] over pairs; skipped
    methods; the parents; the machine."""
    width = max([18, *map(len, report["summary"])])
    lines = [(f"{'method':{width}s} {'barrier':>24s} {'% removed':>24s} {'midpoint loss':>24s} {'midpoint acc %':>21s} "
              f"{'align s':>21s}")]
    for name, s in report["summary"].items():
        lines.append(f"{name:{width}s} {cell(s['barrier'], '.4f'):>24s} {cell(s['removed'], '.1f', 100):>24s} "
                     f"{cell(s['midpoint'], '.4f'):>24s} {cell(s['midpoint_acc'], '.1f', 100):>21s} "
                     f"{cell(s['align_s'], '.2f'):>21s}")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name:{width}s} skipped: {why}")
    parents = [f"{r['seeds'][0]}/{r['seeds'][1]}: {100 * r['acc_a']:.1f}% / {100 * r['acc_b']:.1f}% "
               f"(loss {r['loss_a']:.4f} / {r['loss_b']:.4f})" for r in report["pairs"]]
    lines.append("parents' test accuracy (A / B): " + "; ".join(parents))
    lines.append(machine_line(report["machine"]))
    return lines


def format_mlp(report: Mapping[str, Any]) -> str:
    """The summary table: per method, median [min, max] over pairs."""
    settings = report["settings"]
    return "\n".join([(f"mlp suite: {settings['pairs']} pair(s), {'-'.join(map(str, settings['widths']))} MLPs, "
                       f"{settings['epochs']} epochs per model, test cross-entropy on {settings['test_inputs']} "
                       "digits; median [min, max] over pairs"), *classifier_table(report)])


@register("mlp", format=format_mlp)
def mlp_suite(pairs: int = 5, steps: int | None = None, quick: bool = False, out: str | os.PathLike | None = None,
              jobs: int = 1, *, progress: bool = False) -> dict[str, Any]:
    """Run the MLP different-seed suite on digits (``steps``: training epochs, default 20); writes
    ``bench-mlp.json`` and ``bench-mlp.png`` into ``out`` and returns every figure (see the module
    docstring). ``jobs`` is accepted for the command's sake; training is sequential."""
    from tqdm.auto import tqdm

    from merge_graphs.evaluate import accuracy, cross_entropy

    total_start = time.perf_counter()
    widths, epochs = MLP["widths"], MLP["epochs"]
    if quick:
        pairs, widths, epochs = 1, MLP_QUICK["widths"], MLP_QUICK["epochs"]
    if steps is not None and not quick:
        epochs = steps
    if pairs < 1 or epochs < 1:
        raise ValueError(f"pairs and epochs must be at least 1; got {pairs} and {epochs}")
    out = out_folder(out)
    x_train, _, x_test, y_test = trainers.load_digits_split()
    calibration = x_train[:MLP["calibration"]]

    def loss(model: nn.Module) -> float:
        return cross_entropy(model, x_test, y_test)

    def acc(model: nn.Module) -> float:
        return accuracy(model, x_test, y_test)

    results = []
    train_wall = 0.0
    rebasin_skip = None
    for i in tqdm(range(pairs), desc="pairs", disable=not progress):
        seeds = [2 * i, 2 * i + 1]
        start = time.perf_counter()
        a, b = (trainers.train_digits_mlp(s, widths, epochs=epochs) for s in seeds)
        train_wall += time.perf_counter() - start
        methods, skipped = classifier_pair(a, b, loss, acc, calibration, x_train[:TRACE_INPUTS], progress=progress)
        rebasin_skip = rebasin_skip or skipped
        results.append({"seeds": seeds, "loss_a": loss(a), "loss_b": loss(b), "acc_a": acc(a), "acc_b": acc(b),
                        "methods": methods})
    report = {
        "suite": "mlp",
        "settings": {"pairs": pairs, "quick": quick, "widths": list(widths), "epochs": epochs,
                     "activation": "relu", "data": "sklearn digits (load_digits_split(0))",
                     "test_inputs": len(x_test), "calibration": len(calibration), "points": POINTS},
        "machine": machine(),
        "methods": {name: {"align": m, "refine": r, "calibration": d} for name, (m, r, d) in MLP_METHODS.items()},
        "skipped": {} if rebasin_skip is None else {"rebasin": rebasin_skip},
        "pairs": results,
        "summary": summary(results, [n for n in results[0]["methods"] if all(n in r["methods"] for r in results)],
                           ("barrier", "removed", "midpoint", "midpoint_acc", "align_s")),
        "train_wall_s": train_wall,
    }
    plot = plot_curves({name: InterpolationCurve.from_dict(row["curve"]) for name, row in results[0]["methods"].items()},
                       out / "bench-mlp.png",
                       title=f"digits MLP {'-'.join(map(str, widths))}, seeds {results[0]['seeds'][0]}/"
                             f"{results[0]['seeds'][1]}, {epochs} epochs",
                       ylabel="test cross-entropy")
    return write_report(report, out, "mlp", plot, total_start)
