"""Suite ``gpt2``: different-seed byte-level GPT-2 language models.

    merge-graphs bench gpt2 [--pairs N] [--steps S] [--lr LR] [--quick] [--out DIR] [--jobs J]

``pairs`` pairs of byte-level GPT-2 language models (the quickstart's architecture, data and
training recipe, :data:`merge_graphs.quickstart.TRAINING`, with ``lr`` when given; pair ``i`` is
seeds ``2i`` and ``2i + 1``, ``steps`` per model) are trained here, deterministically, or
reused from ``OUT/models`` when a cached model's training metadata is identical. For each
pair and each method

* ``naive``: no alignment;
* ``weight``: permutation weight matching (data-free);
* ``activation``: permutation activation matching on 64 x 128-byte training-text windows
  (:func:`merge_graphs.quickstart.calibration_inputs`);
* ``gnn``, ``gnn+weight``: the pretrained GNN's embeddings (data-free), then refined by weight
  matching;
* ``rotation``: norms folded, residual stream rotated (orthogonal weight matching: Procrustes on
  every tensor that touches the stream alternated with weight matching, then the family's
  within-head maps, :data:`merge_graphs.rotation.DEFAULT_HEAD_MAPS`; data-free);
* ``rotation+activation``: the residual rotation fitted on the same calibration activations;

the held-out loss (:func:`merge_graphs.quickstart.heldout_loss` on the first 64 windows of the
quickstart's held-out text) is measured at 11 points of the straight line from A to aligned B
(for the rotation methods, in the folded basis: A folded, B folded, permuted and rotated), and
the barrier (the largest excess over the line between the endpoint losses), the midpoint loss,
the share of the naive barrier removed and the alignment time are reported, with the median
and range over pairs. ``OUT/bench-gpt2.json`` holds every figure, ``OUT/bench-gpt2.png`` the
curves of pair 0. ``--quick`` (one pair, a few training steps, few windows) is the CI smoke run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_graphs import quickstart, zoo
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
from merge_graphs.evaluate import InterpolationCurve, plot_curves

logger = logging.getLogger(__name__)

#: Method name -> (``align`` method, residual alignment, needs calibration, ``refine``).
METHODS: dict[str, tuple[str, str, bool, bool]] = {
    "naive": ("none", "permutation", False, False),
    "weight": ("weight", "permutation", False, False),
    "activation": ("activation", "permutation", True, False),
    "gnn": ("gnn", "permutation", False, False),
    "gnn+weight": ("gnn", "permutation", False, True),
    "rotation": ("weight", "rotation", False, False),
    "rotation+activation": ("activation", "rotation", True, False),
}

WINDOWS = 64
CALIBRATION = (64, 128)
QUICK = {"steps": 60, "windows": 8, "calibration": (16, 128)}


def _training(steps: int, lr: float | None) -> dict[str, Any]:
    return dict(quickstart.TRAINING, steps=steps, **({"lr": lr} if lr is not None else {}))


def _training_record(seed: int, training: Mapping[str, Any], train_sha: str) -> dict[str, Any]:
    return {
        "architecture": "GPT2LMHeadModel",
        "config": dict(zoo.BYTE_GPT2, vocab_size=zoo.BYTE_VOCAB_SIZE),
        "training": dict(training, threads=1),
        "train_sha256": train_sha,
        "seed": seed,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _folder(root: Path, seed: int, training: Mapping[str, Any]) -> Path:
    lr = "" if training["lr"] == quickstart.TRAINING["lr"] else f"-lr{training['lr']:g}"
    return root / f"gpt2-seed{seed}-steps{training['steps']}{lr}"


def _train_one(seed: int, folder: str, train_text: str, record: dict[str, Any]) -> float:
    """Train and save one model (top-level so that spawned workers can run it); returns seconds."""
    start = time.perf_counter()
    training = {k: v for k, v in record["training"].items() if k != "threads"}
    model = zoo.train_byte_gpt2(train_text, seed, **training)
    seconds = time.perf_counter() - start
    tmp = Path(folder + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if Path(folder).exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    logger.info("trained seed %d (%d steps) in %.1f s -> %s", seed, training["steps"], seconds, folder)
    return seconds


def _cached(folder: Path, record: Mapping[str, Any]) -> bool:
    path = folder / "training.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(record))
    except (OSError, ValueError):
        return False


def _models(seeds: Sequence[int], training: Mapping[str, Any], train_text: str, root: Path,
            jobs: int) -> tuple[dict[int, nn.Module], dict[int, float | None]]:
    """``{seed: model}`` and ``{seed: training seconds (None when reused)}``."""
    from transformers import GPT2LMHeadModel

    sha = zoo.docstring_corpus_sha256(train_text)
    tasks, seconds = [], {}
    for seed in seeds:
        folder = _folder(root, seed, training)
        record = _training_record(seed, training, sha)
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
    models = {s: GPT2LMHeadModel.from_pretrained(_folder(root, s, training)).eval() for s in seeds}
    return models, seconds


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
        method, residual, needs_data, refine = METHODS[name]
        start = time.perf_counter()
        alignment = mg.align(a, b, method, residual=residual, refine=refine,
                             calibration=calibration if needs_data else None)
        seconds = time.perf_counter() - start
        if residual not in folded:
            basis = identity_alignment(a, residual)
            folded[residual] = (output_skeleton(a, residual), basis.apply(a.state_dict()))
        skeleton, state_a = folded[residual]
        line = curve(skeleton, state_a, alignment.apply(b.state_dict()), loss, name)
        out["methods"][name] = {
            "barrier": line.barrier, "midpoint": line.midpoint, "align_s": seconds,
            "alignment": alignment.method, "curve": line.to_dict(),
        }
        logger.info("%s: barrier %.4f, midpoint %.4f, aligned in %.2f s", name, line.barrier, line.midpoint, seconds)
    add_removed(out["methods"])
    return out


def format_gpt2(report: Mapping[str, Any]) -> str:
    """The summary table: per method, median [min, max] over pairs."""
    settings = report["settings"]
    lines = [(f"gpt2 suite: {settings['pairs']} pair(s), {settings['steps']} steps per model at lr "
              f"{settings['training']['lr']:g}, held-out loss (nats/byte) on {settings['heldout_windows']} windows of "
              f"{settings['window']} bytes; median [min, max] over pairs"),
             f"{'method':21s} {'barrier':>24s} {'% removed':>24s} {'midpoint':>24s} {'align s':>21s}"]
    for name, s in report["summary"].items():
        lines.append(f"{name:21s} {cell(s['barrier'], '.4f'):>24s} {cell(s['removed'], '.1f', 100):>24s} "
                     f"{cell(s['midpoint'], '.4f'):>24s} {cell(s['align_s'], '.2f'):>21s}")
    parents = [f"{r['seeds'][0]}/{r['seeds'][1]}: {r['loss_a']:.4f} / {r['loss_b']:.4f}" for r in report["pairs"]]
    lines.append("parents (A / B): " + "; ".join(parents))
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


@register("gpt2", format=format_gpt2)
def gpt2_suite(pairs: int = 3, steps: int = 800, quick: bool = False, out: str | os.PathLike | None = None,
               jobs: int = 1, lr: float | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run the GPT-2 different-seed suite; writes ``bench-gpt2.json`` and ``bench-gpt2.png`` into ``out``
    and returns every figure (see the module docstring). ``lr`` replaces the quickstart's learning rate."""
    from tqdm.auto import tqdm

    total_start = time.perf_counter()
    windows, (n_cal, cal_len) = WINDOWS, CALIBRATION
    if quick:
        pairs, steps, windows, (n_cal, cal_len) = 1, QUICK["steps"], QUICK["windows"], QUICK["calibration"]
    if pairs < 1 or steps < 1:
        raise ValueError(f"pairs and steps must be at least 1; got {pairs} and {steps}")
    if lr is not None and not lr > 0:
        raise ValueError(f"the learning rate must be positive; got {lr}")
    out = out_folder(out)
    training = _training(steps, lr)
    train_text = zoo.load_docstring_corpus("train")
    heldout_text = zoo.load_docstring_corpus("heldout")
    seeds = [s for i in range(pairs) for s in (2 * i, 2 * i + 1)]
    start = time.perf_counter()
    models, train_seconds = _models(seeds, training, train_text, out / "models", jobs)
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
    report = {
        "suite": "gpt2",
        "settings": {"pairs": pairs, "steps": steps, "quick": quick, "jobs": jobs, "heldout_windows": windows,
                     "window": zoo.BYTE_GPT2["n_positions"], "calibration": [n_cal, cal_len], "points": POINTS,
                     "training": training, "config": dict(zoo.BYTE_GPT2)},
        "machine": machine(),
        "methods": {name: {"align": m, "residual": r, "calibration": d, "refine": f}
                    for name, (m, r, d, f) in METHODS.items()},
        "pairs": results,
        "summary": summary(results, list(METHODS), ("barrier", "removed", "midpoint", "align_s")),
        "train_wall_s": train_wall,
    }
    plot = plot_curves({name: InterpolationCurve.from_dict(row["curve"]) for name, row in results[0]["methods"].items()},
                       out / "bench-gpt2.png",
                       title=f"byte GPT-2, seeds {results[0]['seeds'][0]}/{results[0]['seeds'][1]}, {steps} steps, "
                             f"lr {training['lr']:g}",
                       ylabel="held-out loss (nats/byte)")
    return write_report(report, out, "gpt2", plot, total_start)
