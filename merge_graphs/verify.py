"""The function-preservation check run before a merged model is written.

A permutation that the spec gets wrong would silently ruin a merge, so every alignment is
checked on a small random input: model B and B with its units permuted must compute the same
outputs (those in a permuted group, like a bare encoder's hidden states, after undoing the
permutation).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from merge_graphs.errors import AlignmentError
from merge_graphs.symmetry.spec import SymmetrySpec


def random_input(model: nn.Module, batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random input for ``model``: token ids for transformers, features or images otherwise."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if isinstance(model, nn.Sequential):
        first = next(m for m in model if isinstance(m, (nn.Linear, nn.Conv2d)))
        if isinstance(first, nn.Linear):
            return {"input": torch.randn(batch, first.in_features, generator=g).to(device)}
        # A CNN's image size is fixed by its flattening Linear, not recorded anywhere: try the usual ones.
        for side in (32, 28, 16, 8, 64, 224):
            x = torch.randn(batch, first.in_channels, side, side, generator=g).to(device)
            try:
                forward(model, {"input": x})
            except RuntimeError:
                continue
            return {"input": x}
        raise ValueError(f"found no image size that {type(model).__name__} accepts; pass verify=False")
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def forward(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named floating-point outputs of one forward pass in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs["input"]) if set(inputs) == {"input"} else model(**inputs)
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def check_function_preserved(
    model: nn.Module,
    permuted: nn.Module,
    spec: SymmetrySpec,
    permutations: Mapping[str, torch.Tensor],
    tolerance: float = 1e-4,
) -> float:
    """Raise :class:`AlignmentError` unless ``permuted`` computes what ``model`` computes.

    Returns the largest difference relative to the output scale.
    """
    inputs = random_input(model)
    return compare_outputs(type(model).__name__, forward(model, inputs), forward(permuted, inputs), spec,
                           permutations, tolerance)


def compare_outputs(
    name: str,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    spec: SymmetrySpec,
    permutations: Mapping[str, torch.Tensor],
    tolerance: float = 1e-4,
) -> float:
    """:func:`check_function_preserved` on outputs already computed (``name``: the model's class),
    so that the two models need not be in memory together."""
    worst = 0.0
    for key, a in before.items():
        if key in spec.outputs:
            a = a[..., permutations[spec.outputs[key]].to(a.device)]
        diff = float((a.float() - after[key].float()).abs().max() / a.float().abs().max().clamp_min(1e-12))
        worst = max(worst, diff)
        if diff > tolerance:
            raise AlignmentError(
                f"permuting {name} changed its output {key!r} by {diff:.2g} of its scale "
                f"(tolerance {tolerance:g}). The {spec.family} symmetry spec does not fit this model; "
                "nothing was written. Please report it with the model's config."
            )
    return worst
