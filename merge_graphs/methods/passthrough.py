"""Passthrough (mergekit's ``passthrough.py``): one model's tensor, optionally scaled."""

from __future__ import annotations

from merge_graphs.methods.registry import NOT_SET, register


# Merged whole, not by row blocks: unscaled, the result is the input itself, and a block-by-block
# copy of it into a new tensor doubled a 1.1B passthrough's time (fresh pages are slow to fill and write).
@register("passthrough", base="none", models=(1, 1), global_parameters={}, model_parameters={"scale": NOT_SET})
def passthrough(tensors, base, model_parameters, parameters, generator):
    """The one model's tensor, times its ``scale`` if set."""
    scale = model_parameters[0]["scale"]
    return tensors[0] if scale is None else tensors[0] * scale
