"""Linear: the weighted average of the models (mergekit's ``linear.py``)."""

from __future__ import annotations

import torch

from merge_graphs.errors import MergeParameterError
from merge_graphs.methods.registry import accumulator, register


@register("linear", base="none", global_parameters={"normalize": True}, model_parameters={"weight": None},
          rows="elementwise")
def linear(tensors, base, model_parameters, parameters, generator):
    """sum_i w_i t_i, divided by sum_i w_i when ``normalize``; accumulated in float32 (float64
    for float64 inputs) whatever the inputs' dtype, as mergekit does, and returned in theirs."""
    first = tensors[0]
    acc = accumulator(first)
    weights = torch.tensor([p["weight"] for p in model_parameters], dtype=acc, device=first.device)
    merged = torch.zeros_like(first, dtype=acc)
    for t, w in zip(tensors, weights):
        merged.addcmul_(t, w)
    if parameters["normalize"]:
        total = weights.sum()
        # mergekit divides anyway and writes inf/nan; no recipe means that
        if total == 0:
            raise MergeParameterError(
                "linear merge with normalize needs weights that do not sum to 0; "
                "change the weights or set normalize: false"
            )
        merged.div_(total)
    return merged.to(first.dtype)
