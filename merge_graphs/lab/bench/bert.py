"""Suite ``bert``: different-seed BERT classifiers (post-LayerNorm encoders).

    merge-graphs bench bert [--pairs N] [--steps EPOCHS] [--lr LR] [--quick] [--out DIR]

``pairs`` (default 3) pairs of small ``BertForSequenceClassification`` models
(:func:`merge_graphs.lab.trainers.make_digits_bert`: 3 layers, width 64, 4 heads) are trained here on
scikit-learn's digits read as sequences of 64 pixel tokens after ``[CLS]``
(:func:`merge_graphs.lab.trainers.train_digits_bert`: Adam at ``lr``, ``steps`` epochs, deterministic;
pair ``i`` is seeds ``2i`` and ``2i + 1``), or reused from ``OUT/models`` when a cached model's
training metadata is identical. For each pair and method

* ``naive``: no alignment;
* ``weight``: permutation weight matching (data-free);
* ``activation``: permutation activation matching on the first 256 training inputs;
* ``activation+weight``: activation matching refined by weight matching;
* ``gnn``, ``gnn+weight``: the pretrained GNN's embeddings (data-free), then refined by weight
  matching;
* ``learned (STE permutations, N steps x B of M inputs)``: weight matching's permutations, then learned
  (:func:`merge_graphs.learned.learned_permutations`, every group and the dims inside each head: hard
  permutations forward, Sinkhorn backward) on
  the classifiers' own cross-entropy at ``(1 - lam) A + lam B'``, ``lam ~ U(0.4, 0.6)``: N Adam steps
  of B labelled inputs drawn from the first M training inputs (300 x 32 of all 1437; ``--quick``: 20
  steps);
* ``rebasin``: the external ``rebasin`` package's weight matching, run in this process, when it
  is installed and supports the model (:mod:`merge_graphs.lab.bench.rebasin_baseline`); otherwise
  the report says why it was skipped;

the test cross-entropy at 11 points from A to aligned B, the barrier, the share of the naive
barrier removed, the midpoint (alpha 0.5) loss and accuracy and the alignment time, with the
median and range over pairs. Post-LN BERT has no rotation symmetry (FACTS), so permutations are
all there is to find. ``OUT/bench-bert.json`` holds every figure, ``OUT/bench-bert.png`` the
curves of pair 0. ``--quick`` (one pair of 1-layer width-32 models, 5 epochs) is the CI smoke run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_graphs.evaluate import InterpolationCurve, accuracy, cross_entropy
from merge_graphs.lab import trainers
from merge_graphs.lab.bench.common import POINTS, machine, out_folder, register, summary, write_report
from merge_graphs.lab.bench.mlp import MLP_METHODS, classifier_pair, classifier_settings, classifier_table
from merge_graphs.lab.plots import plot_curves

logger = logging.getLogger(__name__)

BERT = {"config": dict(trainers.DIGITS_BERT), "epochs": 30, "lr": 1e-3, "batch_size": 32, "calibration": 256,
        "learn": {"steps": 300, "batch_size": 32, "inputs": 1437}}
BERT_QUICK = {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
              "epochs": 5, "lr": 3e-3, "learn": {"steps": 20, "batch_size": 32, "inputs": 1437}}


def learned_row(learn: Mapping[str, int]) -> str:
    """The name of the learned-permutations row: its steps, batch and labelled training inputs (the first
    ``inputs`` of the training split, all 1437 by default)."""
    return f"learned (STE permutations, {learn['steps']} steps x {learn['batch_size']} of {learn['inputs']} inputs)"


def bert_methods(quick: bool = False) -> dict[str, tuple[str, bool, bool]]:
    """The methods of the MLP suite and learned permutations (``rebasin`` is added when it runs)."""
    return {**MLP_METHODS, learned_row((BERT_QUICK if quick else BERT)["learn"]): ("learned", False, True)}


#: The full run's methods.
BERT_METHODS = bert_methods()
#: Inputs ``rebasin`` traces the models with.
TRACE_INPUTS = 4


def cached_model(folder: Path, record: Mapping[str, Any], train: Callable[[], nn.Module],
                 load: Callable[[Path], nn.Module]) -> tuple[nn.Module, float | None]:
    """The model saved in ``folder`` if its ``training.json`` equals ``record``, else ``train()``'s, saved
    there with ``record``; returns ``(model in eval mode, training seconds or None when reused)``."""
    meta = folder / "training.json"
    try:
        if json.loads(meta.read_text(encoding="utf-8")) == json.loads(json.dumps(record)):
            logger.info("reusing %s", folder)
            return load(folder).eval(), None
    except (OSError, ValueError):
        pass
    start = time.perf_counter()
    model = train()
    seconds = time.perf_counter() - start
    # Written beside the target and renamed, so that an interrupted run never leaves a half model.
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    logger.info("trained %s in %.1f s", folder, seconds)
    return model.eval(), seconds


def format_bert(report: Mapping[str, Any]) -> str:
    """The summary table: per method, median [min, max] over pairs, and why any method was skipped."""
    settings = report["settings"]
    return "\n".join([(f"bert suite: {settings['pairs']} pair(s), digits BERT classifiers (hidden "
                       f"{settings['config']['hidden_size']}, {settings['config']['num_hidden_layers']} layers), "
                       f"{settings['epochs']} epochs at lr {settings['lr']:g}, test cross-entropy on "
                       f"{settings['test_inputs']} digits; median [min, max] over pairs"), *classifier_table(report)])


@register("bert", format=format_bert)
def bert_suite(pairs: int = 3, steps: int | None = None, quick: bool = False, out: str | os.PathLike | None = None,
               lr: float | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run the BERT different-seed suite (``steps``: training epochs, default 30; ``lr`` default 1e-3); writes
    ``bench-bert.json`` and ``bench-bert.png`` into ``out`` and returns every figure (see the module docstring)."""
    from tqdm.auto import tqdm
    from transformers import BertForSequenceClassification

    total_start = time.perf_counter()
    pairs, settings = classifier_settings(BERT, BERT_QUICK, pairs, steps, quick, lr)
    out = out_folder(out)
    config = dict(trainers.DIGITS_BERT, **settings["config"])
    x_train, y_train, x_test, y_test = trainers.load_digit_tokens()
    calibration = {"input_ids": x_train[:settings["calibration"], 0],
                   "attention_mask": x_train[:settings["calibration"], 1]}
    # Learned permutations: the classifiers' own loss on labelled training inputs.
    methods = bert_methods(quick)
    learn = dict(settings["learn"])
    m = learn.pop("inputs")
    labelled = {"input_ids": x_train[:m, 0], "attention_mask": x_train[:m, 1], "labels": y_train[:m]}
    align_kwargs = {learned_row(settings["learn"]): {"calibration": labelled, "learn": learn}}
    training = {k: settings[k] for k in ("epochs", "lr", "batch_size")}
    record = {"architecture": "BertForSequenceClassification", "config": config,
              "data": "trainers.load_digit_tokens(0)", "training": dict(training, optimizer="adam", threads=1),
              "torch": torch.__version__, "python": platform.python_version()}
    tag = f"h{config['hidden_size']}-l{config['num_hidden_layers']}-ep{training['epochs']}-lr{training['lr']:g}"

    def loss(model: nn.Module) -> float:
        return cross_entropy(trainers.SequenceLogits(model), x_test, y_test)

    def acc(model: nn.Module) -> float:
        return accuracy(trainers.SequenceLogits(model), x_test, y_test)

    results, train_wall, rebasin_skip = [], 0.0, None
    for i in tqdm(range(pairs), desc="pairs", disable=not progress):
        seeds = [2 * i, 2 * i + 1]
        models, seconds = [], []
        for s in seeds:
            model, spent = cached_model(out / "models" / f"bert-seed{s}-{tag}", dict(record, seed=s),
                                        lambda s=s: trainers.train_digits_bert(s, **training, **config),
                                        BertForSequenceClassification.from_pretrained)
            models.append(model)
            seconds.append(spent)
            train_wall += spent or 0.0
        a, b = models
        trace = (x_train[:TRACE_INPUTS, 0], x_train[:TRACE_INPUTS, 1])
        rows, skipped = classifier_pair(a, b, loss, acc, calibration, trace, methods=methods,
                                        align_kwargs=align_kwargs, progress=progress)
        rebasin_skip = rebasin_skip or skipped
        results.append({"seeds": seeds, "train_s": seconds, "loss_a": loss(a), "loss_b": loss(b), "acc_a": acc(a),
                        "acc_b": acc(b), "methods": rows})
    names = [n for n in results[0]["methods"] if all(n in r["methods"] for r in results)]
    report = {
        "suite": "bert",
        "settings": {"pairs": pairs, "quick": quick, "epochs": training["epochs"], "lr": training["lr"],
                     "batch_size": training["batch_size"], "config": config,
                     "data": "sklearn digits as [CLS] + 64 pixel tokens (trainers.load_digit_tokens(0))",
                     "train_inputs": len(x_train), "test_inputs": len(x_test),
                     "calibration": settings["calibration"], "learn": settings["learn"],
                     "points": POINTS},
        "machine": machine(),
        "methods": {name: {"align": m, "refine": r, "calibration": d} for name, (m, r, d) in methods.items()},
        "skipped": {} if rebasin_skip is None else {"rebasin": rebasin_skip},
        "pairs": results,
        "summary": summary(results, names, ("barrier", "removed", "midpoint", "midpoint_acc", "align_s")),
        "train_wall_s": train_wall,
    }
    plot = plot_curves({name: InterpolationCurve.from_dict(row["curve"]) for name, row in results[0]["methods"].items()},
                       out / "bench-bert.png",
                       title=f"digits BERT classifier, seeds {results[0]['seeds'][0]}/{results[0]['seeds'][1]}, "
                             f"{training['epochs']} epochs",
                       ylabel="test cross-entropy")
    return write_report(report, out, "bert", plot, total_start)
