"""Suite ``mlp``: different-seed MLPs on scikit-learn's digits.

    merge-graphs bench mlp [--pairs N] [--steps EPOCHS] [--quick] [--out DIR]

``pairs`` (default 5) pairs of 64-512-512-512-10 ReLU MLPs trained here on scikit-learn's digits
(:func:`merge_graphs.zoo.train_digits_mlp`, 20 epochs, deterministic; pair ``i`` is seeds ``2i``
and ``2i + 1``). For each pair and each method of :data:`MLP_METHODS` (``naive``, ``weight``,
``activation`` on the first 512 training inputs, ``activation+weight``: activation matching
refined by weight matching) the test cross-entropy at 11 points from A to aligned B, the barrier,
the share of the naive barrier removed, the midpoint (alpha 0.5) test loss and accuracy and the
alignment time; ``OUT/bench-mlp.json`` and ``OUT/bench-mlp.png`` (pair 0). ``--quick`` (one pair
of 64-128-128-10 MLPs, 10 epochs) is the CI smoke run.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from torch import nn

from merge_graphs import zoo
from merge_graphs.bench.common import (
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
from merge_graphs.evaluate import InterpolationCurve, interpolate_state_dicts, plot_curves

logger = logging.getLogger(__name__)

#: MLP suite: method name -> (``align`` method, ``refine``, needs calibration).
MLP_METHODS: dict[str, tuple[str, bool, bool]] = {
    "naive": ("none", False, False),
    "weight": ("weight", False, False),
    "activation": ("activation", False, True),
    "activation+weight": ("activation", True, True),
}
MLP = {"widths": (64, 512, 512, 512, 10), "epochs": 20, "calibration": 512}
MLP_QUICK = {"widths": (64, 128, 128, 10), "epochs": 10}


def format_mlp(report: Mapping[str, Any]) -> str:
    """The summary table: per method, median [min, max] over pairs."""
    settings = report["settings"]
    lines = [(f"mlp suite: {settings['pairs']} pair(s), {'-'.join(map(str, settings['widths']))} MLPs, "
              f"{settings['epochs']} epochs per model, test cross-entropy on {settings['test_inputs']} digits; "
              "median [min, max] over pairs"),
             (f"{'method':18s} {'barrier':>24s} {'% removed':>24s} {'midpoint loss':>24s} {'midpoint acc %':>21s} "
              f"{'align s':>21s}")]
    for name, s in report["summary"].items():
        lines.append(f"{name:18s} {cell(s['barrier'], '.4f'):>24s} {cell(s['removed'], '.1f', 100):>24s} "
                     f"{cell(s['midpoint'], '.4f'):>24s} {cell(s['midpoint_acc'], '.1f', 100):>21s} "
                     f"{cell(s['align_s'], '.2f'):>21s}")
    parents = [f"{r['seeds'][0]}/{r['seeds'][1]}: {100 * r['acc_a']:.1f}% / {100 * r['acc_b']:.1f}% "
               f"(loss {r['loss_a']:.4f} / {r['loss_b']:.4f})" for r in report["pairs"]]
    lines.append("parents' test accuracy (A / B): " + "; ".join(parents))
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


@register("mlp", format=format_mlp)
def mlp_suite(pairs: int = 5, steps: int | None = None, quick: bool = False, out: str | os.PathLike | None = None,
              jobs: int = 1, *, progress: bool = False) -> dict[str, Any]:
    """Run the MLP different-seed suite on digits (``steps``: training epochs, default 20); writes
    ``bench-mlp.json`` and ``bench-mlp.png`` into ``out`` and returns every figure (see the module
    docstring). ``jobs`` is accepted for the command's sake; training is sequential."""
    from tqdm.auto import tqdm

    import merge_graphs as mg
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
    x_train, _, x_test, y_test = zoo.load_digits_split()
    calibration = x_train[:MLP["calibration"]]

    def loss(model: nn.Module) -> float:
        return cross_entropy(model, x_test, y_test)

    results = []
    train_wall = 0.0
    for i in tqdm(range(pairs), desc="pairs", disable=not progress):
        seeds = [2 * i, 2 * i + 1]
        start = time.perf_counter()
        a, b = (zoo.train_digits_mlp(s, widths, epochs=epochs) for s in seeds)
        train_wall += time.perf_counter() - start
        row: dict[str, Any] = {"seeds": seeds, "loss_a": loss(a), "loss_b": loss(b),
                               "acc_a": accuracy(a, x_test, y_test), "acc_b": accuracy(b, x_test, y_test),
                               "methods": {}}
        state_a = a.state_dict()
        scratch = copy.deepcopy(a)
        for name in tqdm(MLP_METHODS, desc="methods", leave=False, disable=not progress):
            method, refine, needs_data = MLP_METHODS[name]
            start = time.perf_counter()
            alignment = mg.align(a, b, method, refine=refine, calibration=calibration if needs_data else None)
            seconds = time.perf_counter() - start
            state_b = alignment.apply(b.state_dict())
            line = curve(a, state_a, state_b, loss, name)
            scratch.load_state_dict(interpolate_state_dicts(state_a, state_b, 0.5))
            row["methods"][name] = {
                "barrier": line.barrier, "midpoint": line.midpoint,
                "midpoint_acc": accuracy(scratch, x_test, y_test), "align_s": seconds,
                "alignment": alignment.method, "curve": line.to_dict(),
            }
            logger.info("pair %d %s: barrier %.4f, midpoint %.4f, aligned in %.2f s", i, name, line.barrier,
                        line.midpoint, seconds)
        add_removed(row["methods"])
        results.append(row)
    report = {
        "suite": "mlp",
        "settings": {"pairs": pairs, "quick": quick, "widths": list(widths), "epochs": epochs,
                     "activation": "relu", "data": "sklearn digits (load_digits_split(0))",
                     "test_inputs": len(x_test), "calibration": len(calibration), "points": POINTS},
        "machine": machine(),
        "methods": {name: {"align": m, "refine": r, "calibration": d} for name, (m, r, d) in MLP_METHODS.items()},
        "pairs": results,
        "summary": summary(results, list(MLP_METHODS), ("barrier", "removed", "midpoint", "midpoint_acc", "align_s")),
        "train_wall_s": train_wall,
    }
    plot = plot_curves({name: InterpolationCurve.from_dict(row["curve"]) for name, row in results[0]["methods"].items()},
                       out / "bench-mlp.png",
                       title=f"digits MLP {'-'.join(map(str, widths))}, seeds {results[0]['seeds'][0]}/"
                             f"{results[0]['seeds'][1]}, {epochs} epochs",
                       ylabel="test cross-entropy")
    return write_report(report, out, "mlp", plot, total_start)
