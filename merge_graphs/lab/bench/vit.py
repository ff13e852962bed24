"""Suite ``vit``: different-seed ViT image classifiers (pre-LayerNorm encoders).

    merge-graphs bench vit [--pairs N] [--steps EPOCHS] [--lr LR] [--quick] [--out DIR]

``pairs`` (default 3) pairs of small ``ViTForImageClassification`` models
(:func:`merge_graphs.lab.trainers.make_digits_vit`: 8x8 one-channel images in 2x2 patches, 3 layers,
width 64, 4 heads) are trained here on scikit-learn's digits (:func:`merge_graphs.lab.trainers.train_digits_vit`:
Adam at ``lr``, ``steps`` epochs, deterministic; pair ``i`` is seeds ``2i`` and ``2i + 1``), or reused from
``OUT/models`` when a cached model's training metadata is identical. For each pair and method

* ``naive``: no alignment;
* ``weight``: permutation weight matching (data-free);
* ``rotation``: weight matching's permutations, then an orthogonal map of the residual stream
  (``residual="rotation"``, data-free): ViT is pre-LN, so its folded stream admits rotations that fix
  the all-ones direction (FACTS);
* ``activation``: permutation activation matching on the first 256 training images;
* ``learned``: learned alignment from the rotation (:func:`merge_graphs.learned.learned_alignment`, its
  defaults: the residual map and within-head maps) on the classifiers' own cross-entropy at
  ``(1 - lam) A + lam B'``, batches drawn from all 1437 labelled training images (``--quick``: 10 steps);
* ``rebasin``: the external ``rebasin`` package's weight matching, when it is installed and supports
  the model; otherwise the report says why it was skipped;

the test cross-entropy at 11 points from A to aligned B, the barrier, the share of the naive barrier
removed, the midpoint (alpha 0.5) loss and accuracy and the alignment time, with the median and range
over pairs. ``OUT/bench-vit.json`` holds every figure, ``OUT/bench-vit.png`` the curves of pair 0.
``--quick`` (one pair of 1-layer width-32 models, 5 epochs) is the CI smoke run.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from merge_graphs.evaluate import InterpolationCurve, accuracy, cross_entropy
from merge_graphs.lab import trainers
from merge_graphs.lab.bench.bert import TRACE_INPUTS, cached_model
from merge_graphs.lab.bench.common import POINTS, machine, out_folder, register, summary, write_report
from merge_graphs.lab.bench.mlp import classifier_pair, classifier_settings, classifier_table
from merge_graphs.lab.plots import plot_curves

#: Method name -> (``align`` method, ``refine``, needs calibration); :data:`VIT_ALIGN_KWARGS` adds the rest.
VIT_METHODS: dict[str, tuple[str, bool, bool]] = {
    "naive": ("none", False, False),
    "weight": ("weight", False, False),
    "rotation": ("weight", False, False),
    "activation": ("activation", False, True),
    "learned": ("learned", False, True),
}
VIT_ALIGN_KWARGS = {"rotation": {"residual": "rotation"}}
#: ``learn``: the learned row's settings on top of :func:`merge_graphs.learned.learned_alignment`'s defaults.
VIT = {"config": dict(trainers.DIGITS_VIT), "epochs": 30, "lr": 1e-3, "batch_size": 32, "calibration": 256,
       "learn": {}}
VIT_QUICK = {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
             "epochs": 5, "lr": 3e-3, "learn": {"steps": 10}}


def format_vit(report: Mapping[str, Any]) -> str:
    """The summary table: per method, median [min, max] over pairs, and why any method was skipped."""
    settings = report["settings"]
    config = settings["config"]
    return "\n".join([(f"vit suite: {settings['pairs']} pair(s), digits ViT classifiers (hidden {config['hidden_size']}, "
                       f"{config['num_hidden_layers']} layers, {config['patch_size']}x{config['patch_size']} patches), "
                       f"{settings['epochs']} epochs at lr {settings['lr']:g}, test cross-entropy on "
                       f"{settings['test_inputs']} digits; median [min, max] over pairs"), *classifier_table(report)])


@register("vit", format=format_vit)
def vit_suite(pairs: int = 3, steps: int | None = None, quick: bool = False, out: str | os.PathLike | None = None,
              lr: float | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run the ViT different-seed suite (``steps``: training epochs, default 30; ``lr`` default 1e-3); writes
    ``bench-vit.json`` and ``bench-vit.png`` into ``out`` and returns every figure (see the module docstring)."""
    from tqdm.auto import tqdm
    from transformers import ViTForImageClassification

    total_start = time.perf_counter()
    pairs, settings = classifier_settings(VIT, VIT_QUICK, pairs, steps, quick, lr)
    out = out_folder(out)
    config = dict(trainers.DIGITS_VIT, **settings["config"])
    x_train, y_train, x_test, y_test = trainers.load_digit_images()
    calibration = {"pixel_values": x_train[:settings["calibration"]]}
    training = {k: settings[k] for k in ("epochs", "lr", "batch_size")}
    record = {"architecture": "ViTForImageClassification", "config": config,
              "data": "trainers.load_digit_images(0)", "training": dict(training, optimizer="adam", threads=1),
              "torch": torch.__version__, "python": platform.python_version()}
    tag = f"h{config['hidden_size']}-l{config['num_hidden_layers']}-ep{training['epochs']}-lr{training['lr']:g}"

    # The learned row learns on the classifiers' own cross-entropy over every labelled training image.
    align_kwargs = {**VIT_ALIGN_KWARGS, "learned": {"calibration": {"pixel_values": x_train, "labels": y_train},
                                                    "learn": settings["learn"]}}

    def loss(model: nn.Module) -> float:
        return cross_entropy(trainers.ImageLogits(model), x_test, y_test)

    def acc(model: nn.Module) -> float:
        return accuracy(trainers.ImageLogits(model), x_test, y_test)

    results, train_wall, rebasin_skip = [], 0.0, None
    for i in tqdm(range(pairs), desc="pairs", disable=not progress):
        seeds = [2 * i, 2 * i + 1]
        models, seconds = [], []
        for s in seeds:
            model, spent = cached_model(out / "models" / f"vit-seed{s}-{tag}", dict(record, seed=s),
                                        lambda s=s: trainers.train_digits_vit(s, **training, **config),
                                        ViTForImageClassification.from_pretrained)
            models.append(model)
            seconds.append(spent)
            train_wall += spent or 0.0
        a, b = models
        rows, skipped = classifier_pair(a, b, loss, acc, calibration, x_train[:TRACE_INPUTS], methods=VIT_METHODS,
                                        align_kwargs=align_kwargs, progress=progress)
        rebasin_skip = rebasin_skip or skipped
        results.append({"seeds": seeds, "train_s": seconds, "loss_a": loss(a), "loss_b": loss(b), "acc_a": acc(a),
                        "acc_b": acc(b), "methods": rows})
    names = [n for n in results[0]["methods"] if all(n in r["methods"] for r in results)]
    report = {
        "suite": "vit",
        "settings": {"pairs": pairs, "quick": quick, "epochs": training["epochs"], "lr": training["lr"],
                     "batch_size": training["batch_size"], "config": config,
                     "data": "sklearn digits as 1x8x8 images scaled to [0, 1] (trainers.load_digit_images(0))",
                     "train_inputs": len(x_train), "test_inputs": len(x_test),
                     "calibration": settings["calibration"], "learn": settings["learn"], "points": POINTS},
        "machine": machine(),
        "methods": {name: {"align": m, "refine": r, "calibration": d, **VIT_ALIGN_KWARGS.get(name, {})}
                    for name, (m, r, d) in VIT_METHODS.items()},
        "skipped": {} if rebasin_skip is None else {"rebasin": rebasin_skip},
        "pairs": results,
        "summary": summary(results, names, ("barrier", "removed", "midpoint", "midpoint_acc", "align_s")),
        "train_wall_s": train_wall,
    }
    plot = plot_curves({name: InterpolationCurve.from_dict(row["curve"]) for name, row in results[0]["methods"].items()},
                       out / "bench-vit.png",
                       title=f"digits ViT classifier, seeds {results[0]['seeds'][0]}/{results[0]['seeds'][1]}, "
                             f"{training['epochs']} epochs",
                       ylabel="test cross-entropy")
    return write_report(report, out, "vit", plot, total_start)
