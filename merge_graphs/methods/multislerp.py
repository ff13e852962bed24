"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere (mergekit's
``multislerp.py``): the tensors, as deltas from the base when there is one, are flattened and
normalized, their weighted mean direction found in the tangent space at their normalized
weighted Euclidean mean and mapped back to the sphere, then scaled to their weighted mean norm."""

from __future__ import annotations

import torch

from merge_graphs.errors import MergeParameterError
from merge_graphs.methods.registry import register


@register("multislerp", base="optional", models=(1, None),
          global_parameters={"normalize_weights": True, "eps": 1e-8}, model_parameters={"weight": None},
          one_as_is=True)
def multislerp(tensors, base, model_parameters, parameters, generator):
    """See the module docstring; one model comes back as it is (its delta is not added back)."""
    if len(tensors) == 1:
        return tensors[0]
    eps = parameters["eps"]
    stacked = torch.stack(tensors)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor([p["weight"] for p in model_parameters], dtype=stacked.dtype, device=stacked.device)
    if parameters["normalize_weights"]:
        weights = weights / weights.sum()
    column = weights.view(-1, 1)

    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * column).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise MergeParameterError(
                "multislerp: the weighted mean of the normalized models is zero (antipodal models whose "
                "weights balance out); change the weights")
        out = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
        return out if base is None else out + base
    mean = mean / mean_norm

    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    direction = (tangents * column).sum(0)
    length = torch.norm(direction) + eps
    out = mean * torch.cos(length) + direction * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return out if base is None else out + base
