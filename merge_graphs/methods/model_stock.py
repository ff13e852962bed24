"""Model Stock (mergekit's ``model_stock.py``): interpolate between the base and the average of
the fine-tunes by a ratio from the mean cosine between their deltas from the base."""

from __future__ import annotations

import torch

from merge_graphs.methods.registry import register


@register("model_stock", base="required", models=(2, None), global_parameters={"filter_wise": False},
          model_parameters={})
def model_stock(tensors, base, model_parameters, parameters, generator):
    """``t * mean(models) + (1 - t) * base`` with ``t = k cos / (1 + (k - 1) cos)`` for ``k``
    models and ``cos`` the mean pairwise cosine of their deltas: of the whole tensors, or row by
    row (vectors along the last axis) with ``filter_wise``. Where ``1 + (k - 1) cos`` is within
    1e-6 of 0, the base is kept."""
    shape = base.shape
    if parameters["filter_wise"]:
        origin, models = (base.unsqueeze(0), [t.unsqueeze(0) for t in tensors]) if base.dim() == 1 else (base, tensors)
    else:
        origin, models = base.reshape(-1), [t.reshape(-1) for t in tensors]
    deltas = [m - origin for m in models]
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(models)
    denominator = 1 + (k - 1) * cosine
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cosine),
                        (k * cosine) / torch.where(singular, torch.ones_like(denominator), denominator))
    return (ratio * (sum(models) / k) + (1 - ratio) * origin).reshape(shape)
