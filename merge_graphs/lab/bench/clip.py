"""Suite ``clip``: different-seed CLIP models (two pre-LayerNorm towers) on digit images and captions.

    merge-graphs bench clip [--pairs N] [--steps EPOCHS] [--lr LR] [--quick] [--out DIR]

``pairs`` (default 3) pairs of small ``CLIPModel`` models (:func:`merge_graphs.lab.trainers.make_digits_clip`:
a vision tower over 8x8 one-channel images in 2x2 patches and a text tower over the ten captions "this is
digit k" (:data:`~merge_graphs.lab.trainers.DIGIT_CAPTIONS`), both 2 layers of width 64, projected to 32) are
trained here with CLIP's contrastive loss on scikit-learn's digits, each image beside its class's caption
(:func:`merge_graphs.lab.trainers.train_digits_clip`: Adam at ``lr``, ``steps`` epochs, deterministic; pair
``i`` is seeds ``2i`` and ``2i + 1``), or reused from ``OUT/models`` when a cached model's training metadata
is identical. The metric is zero-shot classification: each test image's ``logits_per_image`` against the ten
captions (:class:`~merge_graphs.lab.trainers.ZeroShotLogits`), its cross-entropy and accuracy. For each pair
and method

* ``naive``: no alignment;
* ``weight``: permutation weight matching of both towers (data-free);
* ``activation``: permutation activation matching on the first 256 training images and their captions;
* ``rotation`` only where the spec admits it; CLIP's does not (the vision tower's ``pre_layrnorm`` gain sits
  on its stream), so the report says why instead;
* ``learned``: weight matching's permutations, then learned (:func:`merge_graphs.learned.learned_permutations`,
  straight-through) on CLIP's own contrastive loss at ``(1 - lam) A + lam B'`` over every training image beside
  its caption (``--quick``: 10 steps);
* ``rebasin``: the external ``rebasin`` package's weight matching, when it is installed and supports
  the model; otherwise the report says why it was skipped;

the test cross-entropy at 11 points from A to aligned B, the barrier, the share of the naive barrier
removed, the midpoint (alpha 0.5) loss and accuracy and the alignment time, with the median and range
over pairs. ``OUT/bench-clip.json`` holds every figure, ``OUT/bench-clip.png`` the curves of pair 0.
``--quick`` (one pair of 1-layer width-32 towers, 5 epochs) is the CI smoke run.
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

#: Method name -> (``align`` method, ``refine``, needs calibration); ``rotation`` runs only where the spec admits it.
CLIP_METHODS: dict[str, tuple[str, bool, bool]] = {
    "naive": ("none", False, False),
    "weight": ("weight", False, False),
    "rotation": ("weight", False, False),
    "activation": ("activation", False, True),
    "learned": ("learned", False, True),
}
CLIP_ALIGN_KWARGS = {"rotation": {"residual": "rotation"}}
#: ``learn``: the learned row's settings on top of :func:`merge_graphs.learned.learned_permutations`'s defaults.
CLIP = {"config": {}, "epochs": 30, "lr": 1e-3, "batch_size": 32, "calibration": 256, "learn": {}}
CLIP_QUICK = {"config": {"projection_dim": 16,
                         "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "intermediate_size": 64},
                         "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "intermediate_size": 64}},
              "epochs": 5, "lr": 3e-3, "learn": {"steps": 10}}


def format_clip(report: Mapping[str, Any]) -> str:
    """The summary table: per method, median [min, max] over pairs, and why any method was skipped."""
    settings = report["settings"]
    vision, text = settings["config"]["vision_config"], settings["config"]["text_config"]
    return "\n".join([(f"clip suite: {settings['pairs']} pair(s), digits CLIP (vision hidden {vision['hidden_size']}, "
                       f"{vision['num_hidden_layers']} layers, {vision['patch_size']}x{vision['patch_size']} patches; "
                       f"text hidden {text['hidden_size']}, {text['num_hidden_layers']} layers), {settings['epochs']} "
                       f"epochs at lr {settings['lr']:g}, zero-shot test cross-entropy on {settings['test_inputs']} "
                       "digits against the 10 class captions; median [min, max] over pairs"),
                      *classifier_table(report)])


@register("clip", format=format_clip)
def clip_suite(pairs: int = 3, steps: int | None = None, quick: bool = False, out: str | os.PathLike | None = None,
               lr: float | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run the CLIP different-seed suite (``steps``: training epochs, default 30; ``lr`` default 1e-3); writes
    ``bench-clip.json`` and ``bench-clip.png`` into ``out`` and returns every figure (see the module docstring)."""
    from tqdm.auto import tqdm
    from transformers import CLIPModel

    from merge_graphs import symmetry_spec

    total_start = time.perf_counter()
    pairs, settings = classifier_settings(CLIP, CLIP_QUICK, pairs, steps, quick, lr)
    out = out_folder(out)
    # The whole config, so that the cache record and the report name every field the models were made with.
    made = trainers.make_digits_clip(None, **settings["config"]).config
    config = {"projection_dim": made.projection_dim,
              **{name: {k: getattr(getattr(made, name), k) for k in trainers.DIGITS_CLIP[name]}
                 for name in ("text_config", "vision_config")}}
    spec = symmetry_spec(trainers.make_digits_clip(0, **config))
    unrotated = None if spec.rotation else spec.unrotated
    methods = {k: v for k, v in CLIP_METHODS.items() if k != "rotation" or unrotated is None}
    x_train, y_train, x_test, y_test = trainers.load_digit_images()
    n = settings["calibration"]
    calibration = {"pixel_values": x_train[:n], "input_ids": trainers.DIGIT_CAPTIONS[y_train[:n]]}
    trace = (trainers.DIGIT_CAPTIONS[y_train[:TRACE_INPUTS]], x_train[:TRACE_INPUTS])
    # The learned row learns on CLIP's own contrastive loss over every training image beside its caption.
    align_kwargs = {**CLIP_ALIGN_KWARGS, "learned": {
        "calibration": {"pixel_values": x_train, "input_ids": trainers.DIGIT_CAPTIONS[y_train]},
        "learn": settings["learn"]}}
    training = {k: settings[k] for k in ("epochs", "lr", "batch_size")}
    record = {"architecture": "CLIPModel", "config": config, "captions": trainers.DIGIT_CAPTIONS.tolist(),
              "data": "trainers.load_digit_images(0)", "training": dict(training, optimizer="adam", threads=1),
              "torch": torch.__version__, "python": platform.python_version()}
    vision = config["vision_config"]
    tag = f"h{vision['hidden_size']}-l{vision['num_hidden_layers']}-ep{training['epochs']}-lr{training['lr']:g}"

    def loss(model: nn.Module) -> float:
        return cross_entropy(trainers.ZeroShotLogits(model), x_test, y_test)

    def acc(model: nn.Module) -> float:
        return accuracy(trainers.ZeroShotLogits(model), x_test, y_test)

    results, train_wall, rebasin_skip = [], 0.0, None
    for i in tqdm(range(pairs), desc="pairs", disable=not progress):
        seeds = [2 * i, 2 * i + 1]
        models, seconds = [], []
        for s in seeds:
            model, spent = cached_model(out / "models" / f"clip-seed{s}-{tag}", dict(record, seed=s),
                                        lambda s=s: trainers.train_digits_clip(s, **training, **config),
                                        CLIPModel.from_pretrained)
            models.append(model)
            seconds.append(spent)
            train_wall += spent or 0.0
        a, b = models
        rows, skipped = classifier_pair(a, b, loss, acc, calibration, trace, methods=methods,
                                        align_kwargs=align_kwargs, progress=progress)
        rebasin_skip = rebasin_skip or skipped
        results.append({"seeds": seeds, "train_s": seconds, "loss_a": loss(a), "loss_b": loss(b), "acc_a": acc(a),
                        "acc_b": acc(b), "methods": rows})
    names = [n for n in results[0]["methods"] if all(n in r["methods"] for r in results)]
    skips = {"rotation": unrotated, "rebasin": rebasin_skip}
    report = {
        "suite": "clip",
        "settings": {"pairs": pairs, "quick": quick, "epochs": training["epochs"], "lr": training["lr"],
                     "batch_size": training["batch_size"], "config": config,
                     "data": "sklearn digits as 1x8x8 images scaled to [0, 1] (trainers.load_digit_images(0)), "
                             "each beside its class caption (trainers.DIGIT_CAPTIONS)",
                     "train_inputs": len(x_train), "test_inputs": len(x_test),
                     "calibration": settings["calibration"], "learn": settings["learn"], "points": POINTS},
        "machine": machine(),
        "methods": {name: {"align": m, "refine": r, "calibration": d, **CLIP_ALIGN_KWARGS.get(name, {})}
                    for name, (m, r, d) in methods.items()},
        "skipped": {name: why for name, why in skips.items() if why is not None},
        "pairs": results,
        "summary": summary(results, names, ("barrier", "removed", "midpoint", "midpoint_acc", "align_s")),
        "train_wall_s": train_wall,
    }
    plot = plot_curves({name: InterpolationCurve.from_dict(row["curve"]) for name, row in results[0]["methods"].items()},
                       out / "bench-clip.png",
                       title=f"digits CLIP, seeds {results[0]['seeds'][0]}/{results[0]['seeds'][1]}, "
                             f"{training['epochs']} epochs",
                       ylabel="zero-shot test cross-entropy")
    return write_report(report, out, "clip", plot, total_start)
