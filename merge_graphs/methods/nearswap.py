"""NearSwap (mergekit's ``nearswap.py``): take the other model's value where it lies near the
base's, keep the base's where they are far apart."""

from __future__ import annotations

import torch

from merge_graphs.methods.registry import register


@register("nearswap", base="required", models=(1, 1), global_parameters={"t": None}, model_parameters={},
          rows="elementwise")
def nearswap(tensors, base, model_parameters, parameters, generator):
    """``w * other + (1 - w) * base`` with ``w = clamp(t / |base - other|, 0, 1)`` entry by entry
    (``|base - other|`` floored at 1e-6): entries closer than ``t`` are swapped for the other
    model's, farther ones move towards it by ``t / distance``. ``t = 0`` returns the base."""
    (other,) = tensors
    distance = torch.abs(base - other)
    w = (parameters["t"] / distance.clamp(min=1e-6)).clamp(min=0, max=1)
    return w * other + (1 - w) * base
