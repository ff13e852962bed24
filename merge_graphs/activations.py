"""Activation matching: correlate the two models' units on calibration inputs.

Every permuted space of the spec is observed where a weight reads it (the input of the
module that owns the tensor) and where one writes it (the module's output).
Standardized activations are then labelled with their space like any tensor, so the block
matching of :func:`merge_graphs.match.weight_matching` (attention heads as blocks included)
matches units on correlations instead of weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from merge_graphs.errors import UnsupportedArchitectureError
from merge_graphs.match import Alignment, weight_matching
from merge_graphs.symmetry.spec import Space, SymmetrySpec, TensorSpec, outer_parents

Calibration = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[str]


def prepare_inputs(calibration: Calibration, tokenizer: Any = None, max_length: int = 128) -> dict[str, torch.Tensor]:
    """Keyword arguments for a forward pass: a tensor (``{"input": x}``), a dict as is, or texts
    tokenized with ``tokenizer``."""
    if isinstance(calibration, torch.Tensor):
        return {"input": calibration}
    if isinstance(calibration, Mapping):
        return dict(calibration)
    if tokenizer is None:
        raise ValueError("calibration texts need a tokenizer: pass the reference model's tokenizer")
    texts = list(calibration)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def _observers(spec: SymmetrySpec) -> list[tuple[Space, str, int, bool]]:
    """``(space, module name, offset in the module's feature axis, read input?)`` per permuted space.

    A space is observed both where weights read it (post-activation: what the next layer
    sees) and where they write it (pre-activation, which still tells dead units apart).
    """
    out = []
    for t in spec.tensors.values():
        if len(t.axes) < 2:
            continue
        module = t.name.rsplit(".", 1)[0]
        for axis, read in ((t.fan_in_axis, True), (1 - t.fan_in_axis, False)):
            offset = 0
            for s in t.axes[axis] or ():
                if s.groups:
                    out.append((s, module, offset, read))
                offset += s.size
    return out


def capture(model: nn.Module, spec: SymmetrySpec, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Standardized activations ``(samples, units)`` of every permuted space, one entry per observer."""
    observers = _observers(spec)
    mask = inputs.get("attention_mask")
    found: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(key, space, offset, conv, read):
        def fn(module, args, output):
            x = args[0] if read else output
            if conv:
                x = x.movedim(1, -1)
            if mask is not None and x.dim() >= 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1])[:, offset:offset + space.size].float()
            found[key] = (x - x.mean(0)) / (x.std(0) + 1e-6)
        return fn

    for k, (space, module_name, offset, read) in enumerate(observers):
        module = model.get_submodule(module_name)
        key = f"{space.name}@{module_name}:{'in' if read else 'out'}"
        hooks.append(module.register_forward_hook(hook(key, space, offset, isinstance(module, nn.Conv2d), read)))
    try:
        with torch.no_grad():
            if set(inputs) == {"input"}:
                model(inputs["input"])
            else:
                model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


def activation_matching(
    spec: SymmetrySpec,
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    solver: str = "exact",
    seed: int = 0,
) -> Alignment:
    """Match each group on the correlation of its units' activations over ``inputs``.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.activations import activation_matching
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = merge_graphs.symmetry_spec(mlp)
        >>> perms = merge_graphs.random_permutations(spec, seed=0)
        >>> found = activation_matching(spec, mlp, merge_graphs.permute(mlp, perms), {"input": torch.randn(64, 4)})
        >>> torch.equal(found.permutations["mlp.0"], merge_graphs.invert_permutations(spec, perms)["mlp.0"])
        True
    """
    experts = [t.name for t in spec.tensors.values()
               if t.slot is not None or any(outer_parents(spec, t, a) for a in range(len(t.axes)))]
    if experts:
        raise UnsupportedArchitectureError(
            f"activation matching observes each weight's module, but a mixture of experts ({spec.family}) computes "
            f"its experts inside one module, each on the tokens routed to it ({experts[0]} ...): their hidden units "
            "cannot be observed one by one. Align it with weight or gnn matching, or learned alignment.")
    acts_a = capture(model_a, spec, inputs)
    acts_b = capture(model_b, spec, inputs)
    spaces = {s.name: s for s in spec.spaces.values()}
    pseudo = SymmetrySpec(
        spec.family,
        spec.groups,
        {k: TensorSpec(k, (None, (spaces[k.split("@")[0]],)), "activation", 0) for k in acts_a},
    )
    found = weight_matching(pseudo, acts_a, acts_b, solver=solver, seed=seed)
    found.spec = spec
    found.method = "activation"
    return found
