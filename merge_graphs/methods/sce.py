"""SCE, select-calculate-erase (mergekit's ``sce.py``): keep the entries where the models'
deltas vary most, weight each model by its delta's mean square, and average only the deltas that
agree in sign with the (TIES) majority."""

from __future__ import annotations

import torch
from torch import Tensor

from merge_graphs.methods.registry import register
from merge_graphs.methods.task_arithmetic import sign_consensus


def select_mask(deltas: Tensor, density: float, dtype: torch.dtype) -> Tensor:
    """1 at the ``int(count_nonzero(var) * density)`` entries of largest variance across the
    models (population variance, torch's top-k order among equals), 0 elsewhere."""
    if density <= 0:
        return torch.zeros_like(deltas[0], dtype=dtype)
    if density >= 1:
        return torch.ones_like(deltas[0], dtype=dtype)
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * density)
    mask = torch.zeros_like(variance, dtype=dtype)
    if k:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def model_weights(deltas: Tensor) -> Tensor:
    """Each model's mean squared delta over their sum (equal weights when that is below 1e-6)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


@register("sce", base="required", global_parameters={"int8_mask": False, "select_topk": 1.0}, model_parameters={})
def sce(tensors, base, model_parameters, parameters, generator):
    """``base`` plus the weighted mean (:func:`model_weights`) of the deltas, selected
    (:func:`select_mask`, with ``select_topk`` < 1) and erased where they disagree in sign with
    their sum; the weights of the agreeing models are the divisor (floored at 1e-6)."""
    if not tensors:
        return base
    mask_dtype = torch.int8 if parameters["int8_mask"] else base.dtype
    deltas = torch.stack([t - base for t in tensors])
    if parameters["select_topk"] < 1:
        deltas = deltas * select_mask(deltas, parameters["select_topk"], mask_dtype).unsqueeze(0)
    weights = model_weights(deltas)
    weights = weights.view(-1, *[1] * (deltas.dim() - 1)) * sign_consensus(deltas)
    return base + (deltas * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)
