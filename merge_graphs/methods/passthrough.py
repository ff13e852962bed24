"""Passthrough (mergekit's ``passthrough.py``): one model's tensor, optionally scaled."""

from __future__ import annotations

from merge_graphs.methods.registry import NOT_SET, register


@register("passthrough", base="none", models=(1, 1), global_parameters={}, model_parameters={"scale": NOT_SET},
          rows="elementwise")
def passthrough(tensors, base, model_parameters, parameters, generator):
    """The one model's tensor, times its ``scale`` if set."""
    scale = model_parameters[0]["scale"]
    return tensors[0] if scale is None else tensors[0] * scale
