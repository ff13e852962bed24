"""Matching units between two models, group by group, with optimal transport.

Cost and solver are separate: a *similarity* matrix between the units of model A and model
B (from weights, activations, or GNN embeddings) goes in, a matching comes out.

* :func:`solve` turns a square similarity into a permutation: ``"exact"`` (scipy's
  assignment, the fast path), ``"emd"`` (POT's exact transport; the same matching) or
  ``"sinkhorn"`` (entropic transport rounded to the nearest permutation).
* :func:`transport_plan` couples groups of unequal width (OT fusion).
* :func:`weight_matching` is Git Re-Basin's coordinate descent over every group of a
  :class:`SymmetrySpec`, on named tensors. A group with child groups (attention heads and
  the dims inside each head; experts and the hidden units inside each expert) is matched as
  blocks: the best within-unit matching is found for every pair of units, then the units are
  matched on those scores.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

import merge_graphs.assignment as assignment
from merge_graphs.errors import SpecMismatchError
from merge_graphs.symmetry.spec import (
    Permutations,
    SymmetrySpec,
    TensorSpec,
    check_permutations,
    identity_permutations,
    outer_parents,
    permute_tensor,
    permuted,
    source_name,
)

logger = logging.getLogger(__name__)

SOLVERS = ("exact", "emd", "sinkhorn", "torch", "auto")


def solve(similarity: torch.Tensor, solver: str = "exact", reg: float = 0.05) -> torch.Tensor:
    """The permutation ``perm`` maximizing ``sum_i similarity[i, perm[i]]``.

    Args:
        similarity: ``(n, n)`` similarities between A's units (rows) and B's units (columns).
        solver: ``"exact"`` (scipy's optimum; from
            :data:`~merge_graphs.assignment.CANDIDATES_FROM` units found on candidate pairs and
            certified optimal, see :func:`~merge_graphs.assignment.candidate_assignment`),
            ``"emd"``, ``"sinkhorn"``, ``"torch"`` (the auction of :mod:`merge_graphs.assignment`,
            on the similarity's device, optimal to float32 resolution) or ``"auto"``:
            ``"torch"`` for a similarity on a GPU, ``"exact"`` on CPU.
        reg: entropic regularization for ``"sinkhorn"``, relative to the cost's scale.

    Returns:
        The permutation as a CPU ``LongTensor``, whatever the solver's device.

    Example:
        >>> import torch
        >>> from merge_graphs.match import solve
        >>> solve(torch.tensor([[0., 1.], [1., 0.]])).tolist()
        [1, 0]
    """
    solver = _resolve(solver, similarity)
    if solver == "torch":
        return assignment.auction(similarity).cpu()
    return _solve_array(_as_array(similarity), solver, reg)


def _resolve(solver: str, similarity: torch.Tensor) -> str:
    if solver == "auto":
        return "exact" if similarity.device.type == "cpu" else "torch"
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    return solver


def _as_array(similarity: torch.Tensor) -> np.ndarray:
    s = similarity.detach().double().cpu().numpy()
    if s.shape != (s.shape[0], s.shape[0]):
        raise ValueError(f"solve needs a square similarity, got {s.shape}; use transport_plan for unequal widths")
    return s


def _solve_array(s: np.ndarray, solver: str, reg: float = 0.05) -> torch.Tensor:
    """:func:`solve`'s CPU solvers on a square float64 array."""
    # Imported here, not at the top: POT pulls in scikit-learn and scipy.stats (1.5 s and 90 MB at
    # the start of every merge, also those that never match a unit).
    import ot
    from scipy.optimize import linear_sum_assignment

    n = s.shape[0]
    if solver == "exact":
        if n >= assignment.CANDIDATES_FROM and np.isfinite(s).all():
            found = assignment.candidate_assignment(s)
            if found is not None:
                return torch.as_tensor(found)
        return torch.as_tensor(linear_sum_assignment(s, maximize=True)[1])
    cost = _cost(s)
    uniform = np.full(n, 1.0 / n)
    if solver == "emd":
        plan = ot.emd(uniform, uniform, cost, numItermax=max(100_000, 50 * n * n))
    else:
        plan = ot.sinkhorn(uniform, uniform, cost, reg, method="sinkhorn_log", numItermax=2000)
    return torch.as_tensor(linear_sum_assignment(plan, maximize=True)[1])


def transport_plan(
    similarity: torch.Tensor, reg: float | None = None, reg_m: float | None = None
) -> torch.Tensor:
    """A transport plan between A's ``n`` units and B's ``m`` units with uniform marginals.

    Exact (``ot.emd``) by default; entropic with ``reg``; unbalanced (``ot.unbalanced``) with
    ``reg`` and ``reg_m``. ``plan[i, j]`` is the mass of B's unit ``j`` sent to A's unit ``i``.
    """
    import ot

    s = similarity.detach().double().cpu().numpy()
    n, m = s.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    cost = _cost(s)
    if reg is None:
        plan = ot.emd(a, b, cost, numItermax=max(100_000, 50 * n * m))
    elif reg_m is None:
        plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=2000)
    else:
        plan = ot.unbalanced.sinkhorn_unbalanced(a, b, cost, reg, reg_m, method="sinkhorn_stabilized")
    return torch.as_tensor(plan, dtype=torch.float32)


def _cost(similarity: np.ndarray) -> np.ndarray:
    """Similarities as costs scaled to [0, 1], so regularization means the same at every scale."""
    cost = similarity.max() - similarity
    return cost / cost.max() if cost.max() > 0 else cost


@dataclass
class Alignment:
    """How to permute model B's units onto model A's.

    Attributes:
        spec: the symmetry spec both models share.
        permutations: ``{group: LongTensor}`` to apply to B (see :func:`permute`).
        method: how it was found (``"weight"``, ``"activation"`` ...).
        objective_before, objective_after: the matching objective (sum of inner products of
            the two models' tensors) before and after, in total and per group.
        seconds: time spent.
        iterations: coordinate-descent sweeps over the groups.
        loss_curve: for a learned alignment, the interpolated models' loss at each step.
        stage_seconds: where ``seconds`` went, for aligners that report it (the GNN's: ``embed``,
            ``match``, ``refine``).
    """

    spec: SymmetrySpec
    permutations: Permutations
    method: str
    objective_before: float = math.nan
    objective_after: float = math.nan
    group_objective_before: dict[str, float] = field(default_factory=dict)
    group_objective_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    iterations: int = 0
    loss_curve: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    #: The basis it maps into: ``"permutation"`` (the models' own), or ``"rotation"`` (norms folded).
    basis = "permutation"

    def tensor(self, name: str, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """B's tensor ``name`` in A's basis, read from ``source`` (B's named tensors).

        The one contract every alignment keeps: a per-tensor transform that reads what it needs
        from ``source`` and nothing else, so an aligned model streams from disk as it maps a
        state dict in memory. Here: the tensor with its units put in A's order.
        """
        if self.method == "none":
            return source[name]
        return permuted(self.spec, name, source, self.permutations)

    def names(self, source: Mapping[str, torch.Tensor]) -> list[str]:
        """The names B has in A's basis: ``source``'s."""
        return list(source)

    def tensors(self, source: Mapping[str, torch.Tensor]) -> AlignedTensors:
        """B's named tensors in A's basis, computed one at a time when asked for."""
        return AlignedTensors(self, source)

    def apply(self, state_b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """B's tensors in A's basis, all at once (:meth:`tensors`, gathered)."""
        check_permutations(self.spec, self.permutations)
        check_names(self.spec, state_b)
        return dict(self.tensors(state_b))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per-group objective before and after, for reports and model cards."""
        return {
            g: {"before": self.group_objective_before.get(g, math.nan), "after": self.group_objective_after.get(g, math.nan)}
            for g in self.permutations
        }


def check_names(spec: SymmetrySpec, state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`SpecMismatchError` when ``state`` names its tensors otherwise than ``spec`` labels
    them: a model's state dict (stacked experts) given to an alignment over its checkpoint's names
    (one tensor per expert), which would leave the unlabelled tensors unmapped."""
    absent = [n for n in spec.tensors if n not in state and n not in spec.tied]
    unknown = [n for n in state if n not in spec.tensors and n not in spec.carried and state[n].is_floating_point()]
    if absent and unknown:
        raise SpecMismatchError(
            f"this alignment labels tensors such as {absent[0]!r}, but was given {unknown[0]!r} instead: the tensors "
            "are named otherwise than the spec it was made with (e.g. a model's state_dict, whose experts are "
            "stacked, for an alignment over its checkpoint's names). Pass the model's tensors as its checkpoint "
            "stores them, merge_graphs.sources.StateTensors(model), or align with the spec of the names you hold")


class AlignedTensors(Mapping[str, torch.Tensor]):
    """A source's named tensors seen through an alignment (:meth:`Alignment.tensor`), lazily.

    Nothing is computed until a tensor is asked for, and nothing is kept: over a lazily opened
    checkpoint this holds no model in memory.
    """

    def __init__(self, alignment: Alignment, source: Mapping[str, torch.Tensor]) -> None:
        self.alignment = alignment
        self.source = source
        self._names = alignment.names(source)
        self._known = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.alignment.tensor(name, self.source)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def objective(
    spec: SymmetrySpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> tuple[float, dict[str, float]]:
    """Weight-matching objective: sum over labelled tensors of ``<A, perms(B)>``, total and per group."""
    moved = _without_identities(perms)
    per_tensor = {name: inner(a[name], permuted(spec, name, b, moved)) for name in spec.tensors if name in a}
    per_group = {g: sum(per_tensor.get(t, 0.0) for t in {t for t, _ in spec.touching(g)}) for g in spec.groups}
    return sum(per_tensor.values()), per_group


def weight_matching(
    spec: SymmetrySpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    solver: str = "exact",
    groups: list[str] | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> Alignment:
    """Git Re-Basin weight matching: coordinate descent over groups until none improves.

    Each step fixes every other group and solves one group's assignment, maximizing the sum
    over the tensors it touches of ``<A, perms(B)>``. Groups are visited in a random order
    (``seed``) each sweep.

    Args:
        spec: the symmetry spec of both models.
        state_a, state_b: named tensors of the reference model A and of model B.
        init: a starting matching (e.g. the GNN's); refinement never makes the objective worse.
        solver: the assignment solver for root groups (see :func:`solve`).
        groups: root groups to match (default: all); their child groups come along. Others
            stay as in ``init``.
        max_iter: the most sweeps.
        seed: seed for the visiting order.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.match import weight_matching
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = merge_graphs.symmetry_spec(mlp)
        >>> perms = merge_graphs.random_permutations(spec, seed=0)
        >>> shuffled = merge_graphs.permute(mlp, perms)
        >>> found = weight_matching(spec, mlp.state_dict(), shuffled.state_dict())
        >>> torch.equal(found.permutations["mlp.0"], merge_graphs.invert_permutations(spec, perms)["mlp.0"])
        True
    """
    start = time.perf_counter()
    total_before, per_group_before = objective(spec, state_a, state_b, _start(spec, init))
    perms, sweeps = coordinate_ascent(spec, state_a, state_b, init=init, solver=solver, groups=groups,
                                      max_iter=max_iter, seed=seed)
    total_after, per_group_after = objective(spec, state_a, state_b, perms)
    logger.info("weight matching: %d sweeps, objective %.4g -> %.4g", sweeps, total_before, total_after)
    return Alignment(
        spec, perms, "weight", total_before, total_after, per_group_before, per_group_after,
        time.perf_counter() - start, sweeps,
    )


def coordinate_ascent(
    spec: SymmetrySpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    solver: str = "exact",
    groups: list[str] | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[Permutations, int]:
    """The permutations of :func:`weight_matching` and its number of sweeps, without scoring them.

    Weight matching reads both models twice more to report its objective before and after; a
    caller that scores the result its own way (orthogonal weight matching, once per round) calls
    this. Arguments as :func:`weight_matching`'s.
    """
    roots = [g for g in spec.groups if spec.groups[g].parent is None]
    todo = roots if groups is None else [g for g in roots if g in set(groups)]
    unknown = set(groups or ()) - set(spec.groups)
    if unknown:
        raise ValueError(f"unknown groups {sorted(unknown)}; the spec has {sorted(spec.groups)}")
    perms = _start(spec, init)
    children = {g: [c for c, grp in spec.groups.items() if grp.parent == g] for g in roots}
    reads = {g: _reads(spec, {g, *children[g]}) for g in todo}
    version = dict.fromkeys(roots, 0)  # bumped whenever a root group's block changes
    solved_at: dict[str, dict[str, int]] = {}
    gen = torch.Generator().manual_seed(seed)
    sweeps = 0
    # A root group's assignment (one CPU core in scipy, which releases the GIL) runs in a
    # worker thread while the next group's similarity is computed, unless that one reads it:
    # the result is exactly that of solving one group after the other. At most two assignments
    # are in flight (side by side, with two workers), each holding its similarity.
    pool = _assignment_pool(ASSIGNMENT_WORKERS)
    pending: dict[str, tuple[dict[str, int], Callable[[], tuple[Permutations, float, float]]]] = {}
    improved = False

    def settle(g: str) -> None:
        nonlocal improved
        now, finish = pending.pop(g)
        found, old, new = finish()
        solved_at[g] = now
        if new > old + 1e-6 * max(abs(old), 1.0):
            perms.update(found)
            version[g] += 1
            improved = True

    for sweeps in range(1, max_iter + 1):
        improved = False
        for i in torch.randperm(len(todo), generator=gen).tolist():
            g = todo[i]
            for waiting in [p for p in pending if p in reads[g]]:
                settle(waiting)
            now = {r: version[r] for r in reads[g]}
            if solved_at.get(g) == now:
                # Nothing its subproblem reads has changed since it was last solved: the
                # solvers are deterministic, so solving again would give the same answer.
                # On a large model this skips most of the last, confirming sweep.
                continue
            pending[g] = now, _start_block(spec, state_a, state_b, perms, g, children[g], solver, pool)
            # Attention blocks are solved by now; an assignment still running goes on through
            # them and is waited for once the next one is handed over (and runs beside it).
            for waiting in [p for p in pending if p != g and (children[p] or not children[g])]:
                settle(waiting)
        for waiting in list(pending):
            settle(waiting)
        if not improved:
            break
    return perms, sweeps


def _start(spec: SymmetrySpec, init: Mapping[str, torch.Tensor] | None) -> Permutations:
    """``init`` (checked) over the identity: where weight matching starts."""
    perms = identity_permutations(spec)
    if init is not None:
        check_permutations(spec, init)
        perms.update({k: v.cpu() for k, v in init.items()})
    return perms


#: Entries of a tensor converted to float32 at a time when a low-precision checkpoint's tensors
#: are multiplied (64 MB): matching accumulates in float32 without a float32 copy of the tensor.
BLOCK = 1 << 24


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y.T`` in float32, for ``x`` and ``y`` of any floating dtype."""
    if x.dtype == y.dtype == torch.float32:
        return x @ y.T
    step = max(1, BLOCK // max(1, x.shape[0]))
    out = torch.zeros(x.shape[0], y.shape[0], device=x.device)
    for start in range(0, x.shape[1], step):
        out.addmm_(x[:, start:start + step].float(), y[:, start:start + step].float().T)
    return out


def inner(x: torch.Tensor, y: torch.Tensor) -> float:
    """``<x, y>`` accumulated in float32 a block at a time (and across blocks in float64)."""
    x, y = x.reshape(-1), y.reshape(-1)
    return sum((float((x[i:i + BLOCK].float() * y[i:i + BLOCK].float()).sum()) for i in range(0, x.numel(), BLOCK)), 0.0)


#: Threads that run scipy's assignments beside the similarity products: two (one on a single
#: core), since :func:`weight_matching` hands over an assignment while the one before it may
#: still run. Where similarities are cheap (GNN embeddings) the two run side by side.
ASSIGNMENT_WORKERS = max(1, min(2, os.cpu_count() or 1))
_ASSIGNMENT_POOLS: dict[int, ThreadPoolExecutor] = {}


def _assignment_pool(workers: int) -> ThreadPoolExecutor:
    """The ``workers`` threads assignments run in, made once: a thread per call would leave
    another allocator arena resident each time."""
    if workers not in _ASSIGNMENT_POOLS:
        _ASSIGNMENT_POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="assignment")
    return _ASSIGNMENT_POOLS[workers]


def _without_identities(perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``perms`` without the groups still at the identity. :func:`permute_tensor` leaves a missing
    group's units in place, so the result is the same, but no copy of a large tensor is made
    (at the start of weight matching every group is at the identity)."""
    return {g: p for g, p in perms.items() if not bool((p == torch.arange(p.shape[-1], device=p.device)).all())}


def _reads(spec: SymmetrySpec, block: set[str]) -> set[str]:
    """The root groups whose permutations a block's subproblem reads: every group on an axis
    other than the one the block moves, in every tensor the block moves (the block's own root
    too when it meets itself on a second axis), and the group a moved tensor is one unit of."""
    def root(g: str) -> str:
        while spec.groups[g].parent is not None:
            g = spec.groups[g].parent
        return g

    out = set()
    for t in spec.tensors.values():
        moved = {i for i, spaces in enumerate(t.axes) if any(block & set(s.groups) for s in spaces or ())}
        whole = t.slot is not None and t.slot.group in block
        if moved and t.slot is not None and not whole:
            out.add(root(t.slot.group))
        for i, spaces in enumerate(t.axes):
            if moved - {i} or whole:
                out.update(root(g) for s in spaces or () for g in s.groups)
    return out


def _occurrences(spec, a, b, perms, block: set[str]):
    """For each axis that a block of groups moves: A's and B's tensors with that axis split
    into its factors (moved to the front) and every other axis put in A's order.

    Yields ``(factor groups, A part, B part)`` with parts shaped ``(*factor sizes, rest)``, in
    the checkpoints' dtype (converting a bf16 embedding whole would copy it in float32). A
    parent group on one axis and its children on another (stacked experts: experts x hidden x
    residual) are one occurrence whose factors are the parent's then the space's; the tensors of
    a :class:`~merge_graphs.symmetry.spec.Slot` stack whose group is in the block are stacked on a
    leading axis first.
    """
    for name, t in spec.tensors.items():
        if name not in a:
            continue
        if t.slot is not None and t.slot.group in block:
            if t.slot.index == 0:
                yield from _stack_occurrences(spec, a, b, perms, block, t)
            continue
        touched = [i for i, spaces in enumerate(t.axes) if any(block & set(s.groups) for s in spaces or ())]
        joint = _joint(spec, t, touched)
        if joint is not None:
            parent, child = joint
            tb = _in_a_order(spec, t, b, perms, {parent, child})
            yield from _split(a[name], tb, t.axes[child], child, block, parent, t.axes[parent][0].groups[0])
            continue
        for axis in touched:
            yield from _split(a[name], _in_a_order(spec, t, b, perms, {axis}), t.axes[axis], axis, block)


def _joint(spec: SymmetrySpec, t: TensorSpec, touched: list[int]) -> tuple[int, int] | None:
    """``(parent axis, child axis)`` when a block moves exactly those two axes of ``t``: a parent
    group alone on one, its children on the other."""
    for child in touched:
        outer = outer_parents(spec, t, child)
        if outer and set(touched) == {child, *outer.values()}:
            return next(iter(outer.values())), child
    return None


def _stack_occurrences(spec, a, b, perms, block: set[str], t: TensorSpec):
    """:func:`_occurrences` of a slot stack whose group the block matches: its tensors stacked in
    B's own order (the block's matching is what orders them), other axes in A's order."""
    others = {g: p for g, p in perms.items() if g != t.slot.group}
    touched = [i for i, spaces in enumerate(t.axes) if any(block & set(s.groups) for s in spaces or ())]
    if len(touched) > 1:
        raise NotImplementedError(f"{t.name}: a block moves {len(touched)} axes of one unit's tensor")
    stacked_a = torch.stack([a[n] for n in t.slot.names])
    stacked_b = torch.stack([_in_a_order(spec, spec.tensors[n], b, others, set(touched)) for n in t.slot.names])
    if not touched:
        yield (t.slot.group,), stacked_a.reshape(len(t.slot.names), -1), stacked_b.reshape(len(t.slot.names), -1)
        return
    child = touched[0]
    yield from _split(stacked_a, stacked_b, t.axes[child], child + 1, block, 0, t.slot.group)


def _split(ta, tb, spaces, axis: int, block: set[str], parent_axis: int | None = None, parent: str | None = None):
    """The parts of ``axis`` (concatenated ``spaces``) that the block moves, factors to the front
    (after the parent's axis, if any)."""
    offset = 0
    for s in spaces:
        if block & set(s.groups):
            if set(s.groups) - block:
                raise NotImplementedError(f"space {s.name} mixes groups of different blocks")
            pa, pb = ta.narrow(axis, offset, s.size), tb.narrow(axis, offset, s.size)
            sizes = [k for _, k in s.factors]
            if parent_axis is None:
                yield tuple(g for g, _ in s.factors), pa.movedim(axis, 0).reshape(*sizes, -1), \
                    pb.movedim(axis, 0).reshape(*sizes, -1)
            else:
                n = pa.shape[parent_axis]
                yield (parent, *(g for g, _ in s.factors)), \
                    pa.movedim((parent_axis, axis), (0, 1)).reshape(n, *sizes, -1), \
                    pb.movedim((parent_axis, axis), (0, 1)).reshape(n, *sizes, -1)
        offset += s.size


def _in_a_order(spec: SymmetrySpec, t: TensorSpec, b, perms, skip: set[int]) -> torch.Tensor:
    """B's tensor ``t`` with every axis but ``skip`` in A's order (read from the unit that ``perms``
    moves to its name, for a slot)."""
    tb = b[source_name(spec, t.name, perms)]
    if not any(axis for i, axis in enumerate(t.axes) if i not in skip):
        return tb
    view = dataclasses.replace(t, axes=tuple(None if i in skip else axis for i, axis in enumerate(t.axes)))
    return permute_tensor(SymmetrySpec(spec.family, spec.groups, {t.name: view}), t.name, tb, perms)


def _match_block(spec, a, b, perms, group, children, solver) -> tuple[Permutations, float, float]:
    """The best permutation of ``group`` (and its children) with every other group fixed,
    and the block's objective under the current and the found permutations."""
    return _start_block(spec, a, b, perms, group, children, solver)()


def _start_block(spec, a, b, perms, group, children, solver, pool: Executor | None = None):
    """:func:`_match_block`, with a root group's assignment handed to ``pool``: returns a
    callable that waits for it and gives ``(found, old objective, new objective)``."""
    n = spec.groups[group].size
    moved = _without_identities(perms)
    if len(children) == 1 and (n * spec.groups[children[0]].size) ** 2 > PAIRWISE_GRAM:
        result = _match_pairwise(spec, a, b, perms, moved, group, children[0], solver)
        return lambda: result
    if children:
        result = _match_heads(spec, a, b, perms, moved, group, children, solver)
        return lambda: result
    # Tensor by tensor: the residual stream touches every tensor of the model, so its
    # similarity is accumulated while holding one (A, B) pair at a time (lazy checkpoints).
    sim = None
    for factors, pa, pb in _occurrences(spec, a, b, moved, {group}):
        i = factors.index(group)
        part = _gram(pa.movedim(i, 0).reshape(n, -1), pb.movedim(i, 0).reshape(n, -1))
        sim = part if sim is None else sim.add_(part)
    # The linearized objective, as in Git Re-Basin: a group that meets itself on a second
    # axis (a residual-to-residual matrix) is held at its current permutation there.
    resolved = _resolve(solver, sim)
    if pool is not None and resolved != "torch":
        # Anything the worker allocates stays in its own allocator arena: hand it the array
        # scipy reads rather than converting there.
        return _hand_over(pool, _as_array(sim), resolved, group, perms[group])
    rows = torch.arange(n, device=sim.device)
    old = float(sim[rows, perms[group].to(sim.device)].sum())
    solving = pool.submit(solve, sim, resolved) if pool is not None else None

    def finish() -> tuple[Permutations, float, float]:
        found = solving.result() if solving is not None else solve(sim, solver)
        return {group: found}, old, float(sim[rows, found.to(sim.device)].sum())

    return finish


def _hand_over(pool: Executor, array: np.ndarray, solver: str, group: str, current: torch.Tensor):
    """:func:`_start_block`'s callable for a CPU solver running in ``pool`` on ``array``: an
    assignment in flight holds that array only, not the float32 similarity too."""
    solving = pool.submit(_solve_array, array, solver)

    def objective_at(perm: torch.Tensor) -> float:
        # The float64 array holds the float32 similarities exactly: summed in float32, as the
        # similarity itself would be.
        return float(torch.from_numpy(array[np.arange(len(array)), perm.cpu().numpy()]).float().sum())

    old = objective_at(current)

    def finish() -> tuple[Permutations, float, float]:
        found = solving.result()
        return {group: found}, old, objective_at(found)

    return finish


def _match_heads(spec, a, b, perms, moved, group, children, solver) -> tuple[Permutations, float, float]:
    """Attention heads as blocks: for every (A head, B head) pair the best within-head
    permutations of the child groups (alternating between children, twice), then heads matched
    on the scores those permutations reach."""
    n = spec.groups[group].size
    grams = [_HeadGram(factors, pa, pb) for factors, pa, pb in _occurrences(spec, a, b, moved, {group, *children})]
    device = grams[0].gram.device
    rows = torch.arange(n, device=device)
    heads_now = perms[group].to(device)
    # The block's current objective, read off the same Gram matrices as the new one, so that
    # "improved" compares like with like.
    now = {}
    for c in children:
        now[c] = torch.arange(spec.groups[c].size, device=device).repeat(n, n, 1)
        now[c][rows, heads_now] = perms[c].to(device)
    old = float(sum(g.scores(now) for g in grams)[rows, heads_now].sum())
    pair = {c: torch.arange(spec.groups[c].size, device=device).repeat(n, n, 1) for c in children}
    for _ in range(2):
        for c in children:
            m = sum(g.child_similarity(c, pair) for g in grams if c in g.kids).cpu()
            pair[c] = torch.stack([torch.stack([solve(m[i, j]) for j in range(n)]) for i in range(n)]).to(device)
    score = sum(g.scores(pair) for g in grams)
    heads = solve(score, solver).to(device)
    found = {group: heads.cpu(), **{c: pair[c][rows, heads].cpu() for c in children}}
    return found, old, float(score[rows, heads].sum())


#: Entries of a block's all-pairs Gram matrix (``(units x child units)^2``) above which a block with one
#: child group is matched one pair of units at a time (:func:`_match_pairwise`): 256 MB in float32. A
#: Mixtral layer's experts (8 x 14336 hidden units) would need 53 GB at once.
PAIRWISE_GRAM = 1 << 26


def _match_pairwise(spec, a, b, perms, moved, group, child, solver) -> tuple[Permutations, float, float]:
    """:func:`_match_heads` for a group with one child (experts and their hidden units), one pair of
    units at a time: for A's unit ``i`` and B's unit ``j`` the child similarity (summed over every
    occurrence) is built, its best matching solved and scored; then the units are matched on the scores.
    The same answer, holding one ``(child, child)`` similarity instead of all of them."""
    n, k = spec.groups[group].size, spec.groups[child].size
    parts = list(_occurrences(spec, a, b, moved, {group, child}))
    units_now, child_now = perms[group].cpu(), perms[child].cpu()
    rows = torch.arange(k)
    score = torch.zeros(n, n, dtype=torch.float64)
    inside = torch.empty(n, n, k, dtype=torch.long)
    old = 0.0
    for i in range(n):
        for j in range(n):
            sim, own = torch.zeros(k, k), 0.0
            for factors, pa, pb in parts:
                if child in factors:
                    # Unpermuted factors (RoPE's head dims) are summed over, like the other axes.
                    at = factors.index(child) - 1
                    sim = sim + _gram(pa[i].movedim(at, 0).reshape(k, -1), pb[j].movedim(at, 0).reshape(k, -1)).cpu()
                else:
                    own += inner(pa[i], pb[j])
            inside[i, j] = solve(sim)
            score[i, j] = own + float(sim[rows, inside[i, j]].sum())
            if j == units_now[i]:
                old += own + float(sim[rows, child_now[i]].sum())
    units = solve(score, solver)
    return {group: units, child: inside[torch.arange(n), units]}, old, float(score[torch.arange(n), units].sum())


class _HeadGram:
    """One tensor's occurrence in an attention block as a Gram matrix between A's and B's units.

    ``gram[i, j, *a, *b]`` is the inner product (over the tensor's other axes and any
    unpermuted factor, such as RoPE's head dims) of A's unit ``(head i, child units a)`` with
    B's unit ``(head j, child units b)``. Every within-head score the matching needs is a sum
    of gathered entries of it, so each tensor is multiplied once per block solve instead of
    once per child, iteration and head.
    """

    def __init__(self, factors, pa, pb) -> None:
        pa, pb = pa.float(), pb.float()  # one attention tensor
        fixed = [k for k, f in enumerate(factors) if f is None]
        self.kids = [f for f in factors[1:] if f is not None]
        behind = list(range(pa.dim() - 1 - len(fixed), pa.dim() - 1))  # just before the other axes
        pa, pb = pa.movedim(fixed, behind), pb.movedim(fixed, behind)
        sizes = pa.shape[: 1 + len(self.kids)]
        units = math.prod(sizes)
        gram = _gram(pa.reshape(units, -1), pb.reshape(units, -1)).view(*sizes, *sizes)
        m = len(self.kids)
        self.gram = gram.permute(0, m + 1, *range(1, m + 1), *range(m + 2, 2 * m + 2))

    def _contract(self, pair, keep=None) -> torch.Tensor:
        """Sum over every child except ``keep`` of A's child units against B's as ``pair`` maps them."""
        x, alive = self.gram, list(self.kids)
        for c in self.kids:
            if c == keep:
                continue
            t, m = alive.index(c), len(alive)
            a_axis, b_axis = 2 + t, 2 + m + t
            shape = [1] * x.dim()
            shape[0], shape[1], shape[a_axis] = x.shape[0], x.shape[1], x.shape[a_axis]
            target = list(x.shape)
            target[b_axis] = 1
            x = x.gather(b_axis, pair[c].view(shape).expand(target)).squeeze(b_axis).sum(a_axis)
            alive.remove(c)
        return x

    def child_similarity(self, child, pair) -> torch.Tensor:
        """``(n, n, size, size)``: A head i's ``child`` units against B head j's, other children as paired."""
        return self._contract(pair, keep=child)

    def scores(self, pair) -> torch.Tensor:
        """``(n, n)``: A head i against B head j with every child as paired."""
        return self._contract(pair)
