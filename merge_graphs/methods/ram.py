"""Reinforced Agent Merging (mergekit's ``ram.py``): an entry's deltas are summed where one model
changes it (by more than ``epsilon``), averaged over the models that do where several do.
``ramplus_tl`` amplifies each model's unique changes by how much it otherwise overlaps the others
in the tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from merge_graphs.methods.registry import register


def _task_vectors(tensors: list[Tensor], base: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """The deltas ``(models, entries)``; where each is above ``epsilon`` in magnitude; how many
    models are, per entry ``(1, entries)``."""
    deltas = torch.stack([t - base for t in tensors]).view(len(tensors), -1)
    changed = deltas.abs() > epsilon
    return deltas, changed, changed.sum(dim=0, keepdim=True)


def _merge(base: Tensor, deltas: Tensor, changed: Tensor, count: Tensor, unique_scale: Tensor | None) -> Tensor:
    kept = deltas * changed
    unique = kept * (count == 1)
    if unique_scale is not None:
        unique = unique * unique_scale.unsqueeze(-1)
    merged = (unique + kept * (count > 1) / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@register("ram", base="required", global_parameters={"epsilon": 1e-5}, model_parameters={}, rows="elementwise")
def ram(tensors, base, model_parameters, parameters, generator):
    """``base`` plus, per entry, the changes of the models that change it, averaged."""
    if not tensors:
        return base
    return _merge(base, *_task_vectors(tensors, base, parameters["epsilon"]), None)


def _amplification(shared: Tensor, unique: Tensor, parameters) -> Tensor:
    """``1 + r * clamp(shared / unique, 0, alpha)`` per model, from its counts of changed entries
    that other models change too (``shared``) and that it alone changes (``unique``)."""
    ratio = shared / unique.clamp(min=parameters["epsilon"])
    return 1 + parameters["r"] * ratio.clamp(min=0, max=parameters["alpha"])


def _ramplus_rows(tensors, base, model_parameters, parameters, generator, blocks):
    """The per-model counts over the whole tensor first (exact integers), then block by block."""
    if not tensors:
        yield from (base[b] for b in blocks)
        return
    shared = unique = 0
    for b in blocks:
        _, changed, count = _task_vectors([t[b] for t in tensors], base[b], parameters["epsilon"])
        shared = shared + (changed & (count > 1)).sum(dim=1)
        unique = unique + (changed & (count == 1)).sum(dim=1)
    scale = _amplification(shared, unique, parameters)
    for b in blocks:
        yield _merge(base[b], *_task_vectors([t[b] for t in tensors], base[b], parameters["epsilon"]), scale)


@register("ramplus_tl", base="required", global_parameters={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
          model_parameters={}, rows=_ramplus_rows)
def ramplus_tl(tensors, base, model_parameters, parameters, generator):
    """As ``ram``, with each model's unique changes times :func:`_amplification` of its counts
    in this tensor."""
    if not tensors:
        return base
    deltas, changed, count = _task_vectors(tensors, base, parameters["epsilon"])
    scale = _amplification((changed & (count > 1)).sum(dim=1), (changed & (count == 1)).sum(dim=1), parameters)
    return _merge(base, deltas, changed, count, scale)
