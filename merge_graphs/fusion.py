"""OT fusion (Singh & Jaggi, "Model Fusion via Optimal Transport"): merge models whose hidden
layers have different widths.

Model B is projected onto model A's units one group at a time, in forward order. For group
``g`` the similarity of A's unit ``i`` and B's unit ``j`` is the inner product of their
incoming weights (the unit's own rows, bias and norm vectors), with B's earlier groups
already projected so both live in A's basis. With uniform marginals this is the same
transport problem as squared Euclidean cost: the norm terms add a constant per row and per
column, which no plan can change. ``T = transport_plan(sim)`` has shape ``(n_a, n_b)``; every
B axis that ``g`` moves is then multiplied, unit axis first, by

* ``T / T.sum(1)`` where the axis holds the units' own parameters: each A unit becomes the
  barycentre of the B units sent to it;
* ``T / T.sum(0)`` where the axis is the next layer's fan-in: B unit ``j``'s outgoing weights
  are split over the A units it was sent to, in proportion, so the next layer still sums
  ``W[:, j] h_j`` once. A unit duplicated in B (outgoing weights halved) fuses back exactly.

For equal widths and a permutation plan both are the permutation matrix, so fusing a
permuted copy of A gives back A. Only root groups are supported (MLPs, CNNs): attention heads
nest groups inside each other and need equal widths.

Example:
    >>> import torch, merge_graphs
    >>> from merge_graphs.fusion import fuse
    >>> def mlp(width):
    ...     return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    >>> a, b = mlp(8), mlp(16)
    >>> spec_a, spec_b = merge_graphs.symmetry_spec(a), merge_graphs.symmetry_spec(b)
    >>> fused = fuse(spec_a, a.state_dict(), spec_b, b.state_dict())
    >>> fused.plans["mlp.0"].shape, fused.state["2.weight"].shape
    (torch.Size([8, 16]), torch.Size([2, 8]))
    >>> merged = {k: (v + fused.state[k]) / 2 for k, v in a.state_dict().items()}
    >>> a.load_state_dict(merged)
    <All keys matched successfully>
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from merge_graphs.match import transport_plan
from merge_graphs.symmetry.spec import Space, SymmetrySpec, TensorSpec

__all__ = ["FusionResult", "fuse"]


@dataclass
class FusionResult:
    """What :func:`fuse` found and made.

    Attributes:
        plans: per group, the ``(n_a, n_b)`` transport plan (uniform marginals); ``plans[g][i, j]``
            is the mass of B's unit ``j`` sent to A's unit ``i``.
        state: B's tensors projected into A's shapes and unit order (same names as ``state_a``).
        seconds: time spent.
    """

    plans: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    seconds: float


def fuse(
    spec_a: SymmetrySpec,
    state_a: Mapping[str, torch.Tensor],
    spec_b: SymmetrySpec,
    state_b: Mapping[str, torch.Tensor],
    *,
    reg: float | None = None,
) -> FusionResult:
    """Project model B onto model A's hidden units with optimal transport, group by group.

    Args:
        spec_a, state_a: the reference model A (its widths are kept).
        spec_b, state_b: model B, of the same architecture up to hidden widths.
        reg: entropic regularization (relative to the cost's scale); None for exact transport.

    Returns:
        A :class:`FusionResult`; average ``state_a`` with its ``state`` to merge the models.

    Raises:
        NotImplementedError: a spec has nested groups (attention heads).
        ValueError: the models differ in anything but hidden widths.
    """
    start = time.perf_counter()
    _check(spec_a, state_a, spec_b, state_b)
    size_a = {g: grp.size for g, grp in spec_a.groups.items()}
    size_b = {g: grp.size for g, grp in spec_b.groups.items()}  # B's current widths, updated as we go
    state = dict(state_b)
    plans = {}
    for g in spec_a.groups:  # builders create groups in forward order
        sim = torch.zeros(size_a[g], size_b[g])
        for name, axis in spec_a.touching(g):
            t = spec_a.tensors[name]
            if not _own(t, axis):
                continue
            ra = _unit_rows(state_a[name], t.axes[axis], axis, g, size_a)
            rb = _unit_rows(state[name], spec_b.tensors[name].axes[axis], axis, g, size_b)
            if ra.shape[1] != rb.shape[1]:
                raise ValueError(
                    f"tensor {name}: its other axes are not yet in A's shape when group {g} is fused; "
                    "fusion needs groups in forward order, as MLP and CNN specs list them")
            sim += ra.to(sim.device) @ rb.to(sim.device).T
        plan = transport_plan(sim, reg=reg)
        plans[g] = plan
        own = plan / plan.sum(1, keepdim=True)  # rows sum to 1: barycentres
        fan_in = plan / plan.sum(0, keepdim=True)  # columns sum to 1: B's outgoing weights split
        for name, axis in spec_b.touching(g):
            t = spec_b.tensors[name]
            m = own if _own(t, axis) else fan_in
            x = state[name]
            wide = torch.promote_types(x.dtype, torch.float32)
            y = _along(x.to(wide), t.axes[axis], axis, g, size_b, lambda u, m=m: m.to(u) @ u)
            state[name] = y.to(x.dtype)
        size_b[g] = size_a[g]
    for name, x in state_a.items():
        if state[name].shape != x.shape:
            raise ValueError(f"tensor {name}: fused shape {tuple(state[name].shape)} is not A's {tuple(x.shape)}")
    return FusionResult(plans, state, time.perf_counter() - start)


def _own(t: TensorSpec, axis: int) -> bool:
    """Whether ``axis`` indexes the units' own parameters (rows, biases, norms), not their fan-in."""
    return len(t.axes) == 1 or axis != t.fan_in_axis


def _along(
    x: torch.Tensor, spaces: tuple[Space, ...], axis: int, g: str, sizes: Mapping[str, int],
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``x`` with ``fn`` applied to every factor of ``axis`` that ``g`` moves.

    ``fn`` maps a ``(units, rest)`` matrix to ``(new units, rest)``; fixed factors (a flattened
    conv map's positions) and other spaces of a concatenated axis ride along untouched.
    """
    parts, offset = [], 0
    rest = list(x.shape[:axis] + x.shape[axis + 1:])
    for s in spaces:
        shape = [sizes[f] if f else k for f, k in s.factors]
        part = x.narrow(axis, offset, math.prod(shape))
        offset += math.prod(shape)
        if g in s.groups:
            i = [f for f, _ in s.factors].index(g)
            y = part.movedim(axis, 0).reshape(*shape, *rest).movedim(i, 0)
            inner = list(y.shape[1:])
            y = fn(y.reshape(shape[i], -1)).reshape(-1, *inner).movedim(0, i)
            part = y.reshape(-1, *rest).movedim(0, axis)
        parts.append(part)
    return torch.cat(parts, axis)


def _unit_rows(x, spaces, axis, g, sizes) -> torch.Tensor:
    """``(units of g, everything else)``: one row of parameters per unit, in float32."""
    rows = []

    def keep(u):
        rows.append(u)
        return u

    _along(x.float(), spaces, axis, g, sizes, keep)
    return torch.cat(rows, 1)


def _layout(t: TensorSpec, shape: torch.Size):
    """A tensor's axes with group widths erased: what must agree between the two models."""
    return tuple(
        shape[a] if spaces is None
        else tuple((s.name, tuple((f, None if f else k) for f, k in s.factors)) for s in spaces)
        for a, spaces in enumerate(t.axes)
    )


def _check(spec_a, state_a, spec_b, state_b) -> None:
    for spec in (spec_a, spec_b):
        if any(grp.parent is not None for grp in spec.groups.values()):
            raise NotImplementedError(
                f"unequal-width fusion supports MLP and CNN models; transformers need equal widths "
                f"(this {spec.family} spec nests groups inside attention heads)")

    def differ(what, a, b):
        if a != b:
            raise ValueError(f"the models have different {what}: only in A {sorted(a - b)}, only in B {sorted(b - a)}")

    differ("groups", set(spec_a.groups), set(spec_b.groups))
    differ("labelled tensors", set(spec_a.tensors), set(spec_b.tensors))
    differ("state dict keys", set(state_a), set(state_b))
    fixed_a = {n: s.size for n, s in spec_a.spaces.items() if not s.groups}
    fixed_b = {n: s.size for n, s in spec_b.spaces.items() if not s.groups}
    differ("fixed spaces", set(fixed_a), set(fixed_b))
    for n, k in fixed_a.items():
        if fixed_b[n] != k:
            raise ValueError(
                f"fixed space {n!r} has {k} units in A and {fixed_b[n]} in B; fusion only changes hidden widths")
    for name, t in spec_a.tensors.items():
        la, lb = _layout(t, state_a[name].shape), _layout(spec_b.tensors[name], state_b[name].shape)
        if la != lb:
            raise ValueError(
                f"tensor {name} is laid out as {la} in A but {lb} in B; fusion only changes hidden widths")
