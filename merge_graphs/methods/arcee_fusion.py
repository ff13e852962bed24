"""Arcee Fusion (mergekit's ``arcee_fusion.py``): take the other model's value where its change
from the base matters most, by ``|delta|`` times the KL divergence between the softmaxes of the
two tensors' last axis, above a threshold from that importance's quartiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from merge_graphs.methods.registry import register

#: Above this many entries the quartiles come from a sample of this many, drawn with replacement.
QUANTILE_SAMPLE = 1_000_000


def importance(other: Tensor, base: Tensor, eps: float = 1e-8) -> Tensor:
    """``|other - base|`` times, per vector along the last axis, ``KL(softmax(other) || softmax(base))``."""
    p = F.softmax(other, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartile_threshold(scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``median + 1.5 * (q3 - q1)`` of ``scores`` (sorted-entry quantiles, rounded down, no
    interpolation), from a random sample of :data:`QUANTILE_SAMPLE` entries of a larger tensor."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


def _fusion_rows(tensors, base, model_parameters, parameters, generator, blocks):
    """The importance of the whole tensor first, block by block (rows are vectors along the last
    axis, so a matrix's blocks of rows score as the whole does; a vector is scored whole), then the
    threshold, then each block fused."""
    (other,) = tensors
    if base.dim() < 2:
        scores = importance(other, base)
    else:
        scores = torch.cat([importance(other[b], base[b]) for b in blocks])
    threshold = quartile_threshold(scores, generator)
    for b in blocks:
        mask = (scores[b] >= threshold).float()
        yield base[b] + (other[b] - base[b]) * mask


@register("arcee_fusion", base="required", models=(1, 1), global_parameters={}, model_parameters={},
          rows=_fusion_rows, random=True)
def arcee_fusion(tensors, base, model_parameters, parameters, generator):
    """``base + (other - base) * (importance >= threshold)`` (:func:`importance`,
    :func:`quartile_threshold`). Deterministic up to a million entries; above, the threshold
    comes from a sample drawn from ``generator``. The mask is float32, so float16 inputs come
    out float32, as in mergekit."""
    return next(_fusion_rows(tensors, base, model_parameters, parameters, generator, [...]))
