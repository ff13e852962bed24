"""Suite ``families``: one different-seed pair per decoder family, at one shared size.

    merge-graphs bench families [--families A,B] [--pairs N] [--steps S] [--lr LR] [--quick] [--out DIR] [--jobs J]

Each family is one row of :data:`ROWS`: the transformers class of its causal LM (whose own config class
builds it, :func:`merge_graphs.lab.trainers.make_byte_lm`) and the config fields that set the family apart,
laid over the size every row shares (:data:`SIZE`: 2 layers, width 128, 4 query heads over 2 key-value
heads of 32 dims, a gated MLP of 256 units, context 128, byte vocabulary of 257). Adding a family is
adding a row. Every row trains the same way on the same data: :func:`merge_graphs.lab.trainers.train_byte_lm`
with :data:`TRAINING` (the ``llama`` suite's recipe, 300 steps) on the standard-library docstring corpus,
deterministically (one thread); models are cached in ``OUT/models/families`` and reused when their
training metadata is identical. Llama is the reference row.

For each family's pair (seeds 0 and 1; ``--pairs N`` adds pairs ``2i, 2i + 1``) the machinery of
:mod:`merge_graphs.lab.bench.lm` measures, all without data:

* ``naive``: no alignment (the plain average, as mergekit's linear merge);
* ``weight``: permutation weight matching of every group;
* ``rotation``, the best data-free alignment where the family admits it: norms folded and the residual stream
  rotated (orthogonal weight matching). Only pre-norm families admit it (the spec's ``rotation``); for the
  others (post-norms on the stream's write path: Gemma 2, Gemma 3, OLMo 2) the best data-free alignment *is*
  ``weight``, and the table says so and why (the spec's ``unrotated``);
* ``learned+sampled``: learned alignment on 4096 sequences of 128 bytes sampled from the two parents themselves
  (:func:`merge_graphs.sampled_text.sample_calibration`; still no data): the residual map and within-head maps
  from the rotation where the family admits it, else the permutations (straight-through) from weight matching.

The barrier (the held-out loss's largest excess over the straight line between the parents, 11 points on
the first 64 held-out windows of 128 bytes), the share of naive's barrier removed and the midpoint's loss
are reported per family, with the parents' losses, parameter counts and training seconds.
``OUT/bench-families.json`` holds every figure and curve. ``--quick`` (tiny models of :data:`QUICK_SIZE`,
:data:`QUICK_TRAINING`'s 100 steps of 8 windows, held-out loss on 16 windows of 32 bytes: a few CPU-seconds
per family) is the CI smoke run.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_graphs.lab import trainers
from merge_graphs.lab.bench.common import DEFAULT_OUT, machine, machine_line, out_folder, register, write_report
from merge_graphs.lab.bench.lm import LLAMA_TRAINING, Family, measure_family

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One family of the suite.

    Attributes:
        architecture: the transformers causal-LM class; its config class builds the model.
        config: the config fields that set the family apart, laid over the shared size.
        what: what the family changes about the shared block, for the table.
    """

    architecture: str
    config: Mapping[str, Any]
    what: str


#: The size every row shares (head_dim spelled out: Qwen3 and Gemma would otherwise pick their own).
SIZE = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "intermediate_size": 256, "max_position_embeddings": 128, "tie_word_embeddings": False}
#: ``--quick``'s size: the same heads of 32 dims (so every row's config holds), a width of 32, context 32.
QUICK_SIZE = dict(SIZE, hidden_size=32, intermediate_size=48, max_position_embeddings=32)

#: Gemma 2 and 3 as their checkpoints set them: attention scores scaled by head_dim ** -0.5 (transformers'
#: default of 256 is Gemma's head_dim), and a sliding-window layer before a global one.
_GEMMA_LAYERS = {"query_pre_attn_scalar": SIZE["head_dim"], "sliding_window": 16,
                 "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True}

#: Mixtures of experts: 4 experts of 128 units (half the dense MLP), each token through its top 2, as much
#: compute a token as the dense rows. Trained on the language-model loss alone (no load-balancing loss).
_EXPERTS = {"num_experts_per_tok": 2, "moe_intermediate_size": 128}

#: The families: name -> row. Vision families (ViT, CLIP) need a task of their own (images, a classifier's loss)
#: that this suite does not have yet.
ROWS: dict[str, Row] = {
    "llama": Row("LlamaForCausalLM", {}, "reference: pre-RMSNorm, GQA, RoPE, untied head"),
    "qwen3": Row("Qwen3ForCausalLM", {"tie_word_embeddings": True}, "q/k RMSNorm in each head, tied head"),
    "gemma": Row("GemmaForCausalLM", {"num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True},
                 "(1 + w) norm gains, sqrt(d) embedding scale, MQA, head_dim 32 apart from d / heads, tied head"),
    "gemma2": Row("Gemma2ForCausalLM", _GEMMA_LAYERS,
                  "pre- and post-norms, logit soft-capping, a sliding and a global layer, tied head"),
    "gemma3": Row("Gemma3ForCausalLM", _GEMMA_LAYERS, "Gemma 2's norms and layers with q/k RMSNorm in each head"),
    "olmo2": Row("Olmo2ForCausalLM", {}, "post-norms only, q/k RMSNorm over the whole projection"),
    "phi3": Row("Phi3ForCausalLM", {}, "fused qkv_proj and gate_up_proj"),
    "mixtral": Row("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128},
                   "4 experts (top-2) of 128 units: experts a group, each expert's units a group"),
    "qwen2_moe": Row("Qwen2MoeForCausalLM", {**_EXPERTS, "num_experts": 4, "shared_expert_intermediate_size": 128},
                     "Mixtral's experts with Qwen's q/k/v biases, and a gated shared expert of 128 units"),
    "qwen3_moe": Row("Qwen3MoeForCausalLM", {**_EXPERTS, "num_experts": 4, "tie_word_embeddings": True},
                     "Mixtral's experts with Qwen3's q/k RMSNorm in each head, tied head"),
}

#: The training recipe (:func:`merge_graphs.lab.trainers.train_byte_lm`): the ``llama`` suite's, for 300 steps.
TRAINING = dict(LLAMA_TRAINING, steps=300)
# Measured here (torch 2.13 CPU, one thread, on a machine shared with other jobs): 0.37-0.54 s a step at SIZE;
# the 20 models took 90-282 s of wall time each, about a CPU-minute (the dense rows' run: 33 min wall, 14.8
# CPU-min; then the mixture-of-experts rows': 18 min wall, 9.2 CPU-min). Parents reach 1.92-2.08 nats/byte on the
# held-out text (Gemma, with 2 query heads over 1: 2.30-2.32), against 3.48 for a byte unigram.
QUICK_TRAINING = dict(TRAINING, steps=100, batch_size=8, lr=3e-3, warmup=10)
QUICK = {"steps": QUICK_TRAINING["steps"], "windows": 16, "calibration": (8, 32)}

#: Method name -> (``align`` method, residual alignment, needs calibration, ``refine``), as in
#: :data:`merge_graphs.lab.bench.lm.LLAMA_METHODS`. ``rotation`` runs only where the spec admits it.
#: ``learned+sampled`` learns on text sampled from the pair itself (no data; the family picks what is learned).
METHODS: dict[str, tuple[str, str, bool, bool]] = {
    "naive": ("none", "permutation", False, False),
    "weight": ("weight", "permutation", False, False),
    "rotation": ("weight", "rotation", False, False),
    "learned+sampled": ("learned", "permutation", True, False),
}


def family(name: str, quick: bool = False) -> tuple[Family, str | None]:
    """The :class:`~merge_graphs.lab.bench.lm.Family` of row ``name`` (at :data:`QUICK_SIZE` with ``quick``), and
    why its residual stream admits no rotation (None when it does: then its methods include ``rotation``)."""
    from merge_graphs import symmetry_spec

    if name not in ROWS:
        raise ValueError(f"unknown family {name!r}; choose from {', '.join(ROWS)}")
    row = ROWS[name]
    config = dict(QUICK_SIZE if quick else SIZE, **row.config)
    make = functools.partial(trainers.make_byte_lm, row.architecture, **config)
    spec = symmetry_spec(make(0))
    unrotated = None if spec.rotation else spec.unrotated
    methods = {k: v for k, v in METHODS.items() if k != "rotation" or unrotated is None}
    return Family(name, name, row.architecture, config, "max_position_embeddings", make,
                  QUICK_TRAINING if quick else TRAINING, methods, quick=QUICK), unrotated


def _value(spread: Mapping[str, float], fmt: str, scale: float = 1.0) -> str:
    """One pair's value, or the median [min, max] over pairs."""
    if spread["min"] == spread["max"]:
        return f"{spread['median'] * scale:{fmt}}"
    return f"{spread['median'] * scale:{fmt}} [{spread['min'] * scale:{fmt}}, {spread['max'] * scale:{fmt}}]"


def format_families(report: Mapping[str, Any]) -> str:
    """The table: per family, naive, weight matching and the best data-free alignment it admits; then each
    family's parents and training time."""
    settings = report["settings"]
    lines = [(f"families suite: {settings['pairs']} pair(s) per family, {settings['steps']} steps per model at lr "
              f"{settings['training']['lr']:g}, width {settings['size']['hidden_size']}, "
              f"{settings['size']['num_hidden_layers']} layers; held-out loss (nats/byte) on "
              f"{settings['heldout_windows']} windows of {settings['window']} bytes"
              + ("; median [min, max] over pairs" if settings["pairs"] > 1 else "")),
             f"{'family':10s} {'method':40s} {'barrier':>10s} {'% removed':>10s} {'midpoint':>10s} {'align s':>8s}"]
    for name, fam in report["families"].items():
        s = fam["summary"]
        best = "rotation" if "rotation" in s else "weight"
        rows = [("naive", "naive"), ("weight", "weight (permutations)"),
                (best, "best data-free: rotation (norms folded)" if best == "rotation"
                 else "best data-free: = weight (no rotation)"),
                ("learned+sampled", "learned on sampled text (no data)")]
        for i, (method, label) in enumerate(rows):
            m = s[method]
            lines.append(f"{name if i == 0 else '':10s} {label:40s} {_value(m['barrier'], '.4f'):>10s} "
                         f"{_value(m['removed'], '.1f', 100):>10s} {_value(m['midpoint'], '.4f'):>10s} "
                         f"{_value(m['align_s'], '.2f'):>8s}")
    lines.append(f"{'family':10s} {'class':20s} {'params':>8s}  {'parents A / B':>16s}  {'train s A / B':>14s}  what")
    for name, fam in report["families"].items():
        pair = fam["pairs"][0]
        seconds = " / ".join("cached" if t is None else f"{t:.0f}" for t in pair["train_s"])
        lines.append(f"{name:10s} {fam['architecture']:20s} {fam['params']:>8d}  "
                     f"{pair['loss_a']:.4f} / {pair['loss_b']:.4f}  {seconds:>14s}  {fam['what']}")
    unrotated = [name for name, fam in report["families"].items() if fam["unrotated"]]
    if unrotated:
        lines.append(f"no rotation for {', '.join(unrotated)}: norms after attention and the MLP sit on the residual "
                     "stream's write path, so the stream admits permutations only (see the specs)")
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


@register("families", format=format_families)
def families_suite(pairs: int = 1, steps: int | None = None, quick: bool = False,
                   out: str | os.PathLike | None = None, jobs: int = 1, lr: float | None = None,
                   families: Sequence[str] | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run the suite over ``families`` (default: every row of :data:`ROWS`); writes ``bench-families.json`` into
    ``out`` and returns every figure (see the module docstring). ``steps`` and ``lr`` replace :data:`TRAINING`'s."""
    total_start = time.perf_counter()
    names = list(ROWS) if families is None else list(families)
    rows = {name: family(name, quick) for name in names}  # refuses an unknown name before training anything
    models = Path(out or DEFAULT_OUT) / "models" / "families"
    measured = {}
    for name, (fam, unrotated) in rows.items():
        logger.info("family %s (%s)", name, fam.architecture)
        report = measure_family(fam, pairs, steps, quick, models, jobs, lr, progress=progress)
        measured[name] = {
            "architecture": fam.architecture, "what": ROWS[name].what, "unrotated": unrotated,
            "params": sum(p.numel() for p in fam.make(0).parameters()),
            **{k: report[k] for k in ("settings", "methods", "pairs", "summary", "train_wall_s")},
        }
    first = next(iter(measured.values()))["settings"]
    report = {
        "suite": "families",
        "settings": {**{k: first[k] for k in ("pairs", "steps", "quick", "jobs", "heldout_windows", "window",
                                              "points", "training")},
                     "size": QUICK_SIZE if quick else SIZE},
        "machine": machine(),
        "families": measured,
        "train_wall_s": sum(m["train_wall_s"] for m in measured.values()),
    }
    return write_report(report, out_folder(out), "families", None, total_start)
