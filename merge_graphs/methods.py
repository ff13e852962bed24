"""Merge methods: combine the tensors that N aligned models hold at one position.

The definitions, parameter names and defaults follow mergekit's (``merge_methods/linear.py``,
``slerp.py``, ``generalized_task_arithmetic.py``, ``registry.py`` and ``sparsify.py``), so a
recipe means the same thing in both tools.

Conventions of :func:`merge_tensors`:

* ``tensors`` holds the models that are not the base; ``base`` is passed on its own.
  For ``task_arithmetic``, ``ties``, ``dare_linear`` and ``dare_ties``, a mergekit recipe that
  lists its ``base_model`` among ``models`` maps here by dropping that entry and passing its
  tensor as ``base``: mergekit skips the base's ``weight`` and ``density`` for these methods.
* ``slerp`` takes ``base`` (the ``t = 0`` end, as in mergekit) and exactly one other tensor
  (the ``t = 1`` end), whether or not the recipe lists the base among its models.
* ``linear`` takes no ``base``: mergekit averages ``base_model`` like any other model (adding
  it to the inputs if it is not listed), so pass it in ``tensors`` with its own ``weight``.
* Parameter values are scalars. mergekit's gradients and per-tensor-name filters must be
  evaluated for the tensor at hand before calling.
* A per-model parameter set in ``parameters`` applies to every model that does not set it
  itself, as a top-level ``parameters:`` entry does in a mergekit recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from merge_graphs.errors import MergeParameterError

# Above this |cosine| slerp falls back to lerp, as in mergekit: the slerp weights divide by
# sin(theta), which vanishes for (anti-)colinear tensors.
DOT_THRESHOLD = 0.9995


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: the name recipes use, e.g. ``"ties"``.
        needs_base: whether :func:`merge_tensors` requires ``base``.
        global_parameters: ``{name: default}`` for parameters that apply to the whole merge;
            a default of ``None`` means the parameter is required.
        model_parameters: ``{name: default}`` for parameters set per model, likewise.
        fn: ``fn(tensors, base, model_parameters, parameters, generator) -> Tensor``, called
            with floating tensors of one dtype and fully resolved parameters.
        rows: how the method merges a large tensor a block of rows at a time, with the same
            result as ``fn`` on the whole, so that its temporaries (stacked inputs, masks) are a
            block's size: ``rows(tensors, base, model_parameters, parameters, generator, blocks)``
            yields the merged rows of each slice of ``blocks`` in order, after the whole-tensor
            statistics it needs (slerp's norms, a TIES threshold, a DARE rescale). ``None``: the
            method does not split and is merged whole.
    """

    name: str
    needs_base: bool
    global_parameters: Mapping[str, Any]
    model_parameters: Mapping[str, Any]
    fn: Callable[..., Tensor]
    rows: Callable[..., Iterator[Tensor]] | None = None


#: Entries per block of rows when a method merges a large tensor in blocks (16 MB in float32).
ROW_BLOCK = 1 << 22


METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    needs_base: bool,
    global_parameters: Mapping[str, Any],
    model_parameters: Mapping[str, Any],
    rows: Callable[..., Iterator[Tensor]] | str | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator adding a merge function to :data:`METHODS` under ``name``.

    ``rows`` says how it splits (:attr:`MergeMethod.rows`): a function, ``"elementwise"`` for a
    method whose every output entry depends only on the same entry of each input (then any
    block of rows merges as ``fn`` merges it), or ``None`` to be merged whole.

    Example:
        >>> import torch
        >>> from merge_graphs.methods import METHODS, merge_tensors, register
        >>> @register("first", needs_base=False, global_parameters={}, model_parameters={})
        ... def first(tensors, base, model_parameters, parameters, generator):
        ...     return tensors[0]
        >>> merge_tensors("first", [torch.ones(2), torch.zeros(2)])
        tensor([1., 1.])
        >>> del METHODS["first"]
    """

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered; pick another name")
        METHODS[name] = MergeMethod(
            name=name,
            needs_base=needs_base,
            global_parameters=MappingProxyType(dict(global_parameters)),
            model_parameters=MappingProxyType(dict(model_parameters)),
            fn=fn,
            rows=_elementwise_rows(fn) if rows == "elementwise" else rows,
        )
        return fn

    return decorator


def get_method(name: str) -> MergeMethod:
    """The registered merge method called ``name``; ValueError listing the known ones if none."""
    if name not in METHODS:
        raise MergeParameterError(f"unknown merge method {name!r}; known methods: {_names(METHODS)}")
    return METHODS[name]


def merge_tensors(
    method: str,
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    block: int | None = None,
) -> Tensor:
    """Merge one tensor position of several aligned models.

    A tensor of more than ``block`` entries (default :data:`ROW_BLOCK`) is merged a block of rows
    at a time by a method that declares how (:attr:`MergeMethod.rows`), with the same result.

    Args:
        method: a name in :data:`METHODS`.
        tensors: the non-base models' tensors, all of one shape (see the module docstring).
        base: the base model's tensor, for methods that need one.
        model_parameters: one mapping per entry of ``tensors``, e.g. ``{"weight": 0.5}``.
        parameters: the merge's global parameters, e.g. ``{"normalize": False}``, plus
            per-model ones that every model shares.
        generator: the random source of ``dare_*`` pruning; pass a seeded one to reproduce a
            merge. ``None`` uses torch's global generator, as mergekit does.

    Returns:
        The merged tensor in the dtype of the reference tensor: ``base`` for methods that need
        one, else ``tensors[0]``. The arithmetic runs in at least float32. A non-floating
        reference (e.g. integer position ids) comes back unchanged: such tensors are copied,
        never averaged.

    Example:
        >>> import torch
        >>> from merge_graphs.methods import merge_tensors
        >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
        >>> merge_tensors("linear", [a, b], model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
        tensor([2.5000, 5.0000])
        >>> merge_tensors("task_arithmetic", [b], base=a, parameters={"weight": 1.0, "lambda": 0.5})
        tensor([2., 4.])
    """
    m = get_method(method)
    tensors = list(tensors)
    if m.needs_base and base is None:
        raise MergeParameterError(f"merge method {m.name!r} needs a base model: set base_model in the recipe")
    if not m.needs_base and base is not None:
        raise MergeParameterError(
            f"merge method {m.name!r} takes no separate base: mergekit averages base_model like "
            "any other model here, so pass its tensor in tensors with its own parameters"
        )
    if base is None and not tensors:
        raise MergeParameterError(f"merge method {m.name!r} got no tensors to merge; pass at least one")
    global_values, model_values = _resolve_parameters(m, len(tensors), model_parameters, parameters or {})

    reference = base if base is not None else tensors[0]
    shapes = {tuple(t.shape) for t in tensors} | {tuple(reference.shape)}
    if len(shapes) > 1:
        raise MergeParameterError(f"merge method {m.name!r} got tensors of different shapes {sorted(shapes)}; align them first")
    if not reference.dtype.is_floating_point:
        return reference

    work = torch.promote_types(reference.dtype, torch.float32)
    inputs = [t.to(work) for t in tensors]
    base = None if base is None else base.to(work)
    shape = reference.shape
    block = ROW_BLOCK if block is None else block
    if m.rows is None or reference.dim() == 0 or shape[0] < 2 or reference.numel() <= block:
        merged = m.fn(inputs, base, model_values, global_values, generator)
    else:
        step = max(1, block // max(1, math.prod(shape[1:])))
        blocks = [slice(start, start + step) for start in range(0, shape[0], step)]
        merged = torch.empty(shape, dtype=work, device=reference.device)
        for rows, merged_rows in zip(blocks, m.rows(inputs, base, model_values, global_values, generator, blocks)):
            merged[rows] = merged_rows
    return merged.to(reference.dtype)


def _elementwise_rows(fn: Callable[..., Tensor]) -> Callable[..., Iterator[Tensor]]:
    def rows(tensors, base, model_parameters, parameters, generator, blocks):
        for b in blocks:
            yield fn([t[b] for t in tensors], None if base is None else base[b], model_parameters, parameters,
                     generator)

    return rows


def _names(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


def _lookup(name: str, default: Any, *sources: Mapping[str, Any]) -> Any:
    # mergekit treats an explicit None like an absent entry and falls through to the next level
    for source in sources:
        if source.get(name) is not None:
            return source[name]
    return default


def _resolve_parameters(
    m: MergeMethod,
    n: int,
    model_parameters: Sequence[Mapping[str, Any]] | None,
    parameters: Mapping[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    allowed = {**m.global_parameters, **m.model_parameters}
    for name in parameters:
        if name not in allowed:
            raise MergeParameterError(f"unknown parameter {name!r} for merge method {m.name!r}; allowed: {_names(allowed)}")
    if model_parameters is None:
        model_parameters = [{}] * n
    if len(model_parameters) != n:
        raise MergeParameterError(
            f"merge method {m.name!r} got {len(model_parameters)} model_parameters entries for "
            f"{n} tensors; give one mapping per tensor (the base takes none)"
        )
    for mp in model_parameters:
        for name in mp:
            if name in m.global_parameters:
                raise MergeParameterError(
                    f"{name!r} is a global parameter of merge method {m.name!r}, not a per-model one; "
                    "set it in parameters"
                )
            if name not in m.model_parameters:
                raise MergeParameterError(
                    f"unknown per-model parameter {name!r} for merge method {m.name!r}; "
                    f"allowed: {_names(m.model_parameters)}"
                )

    global_values = {name: _lookup(name, default, parameters) for name, default in m.global_parameters.items()}
    model_values = [
        {name: _lookup(name, default, mp, parameters) for name, default in m.model_parameters.items()}
        for mp in model_parameters
    ]
    for where, values in [("", global_values)] + [(f" for model {i}", v) for i, v in enumerate(model_values)]:
        for name, value in values.items():
            if value is None:
                raise MergeParameterError(f"merge method {m.name!r} needs parameter {name!r}{where}; set it in the recipe")
    return global_values, model_values


def _per_model(values: Sequence[float], like: Tensor) -> Tensor:
    """``values`` as a tensor broadcasting against ``like``, which is stacked along dim 0."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))


@register("linear", needs_base=False, global_parameters={"normalize": True}, model_parameters={"weight": None},
          rows="elementwise")
def linear(tensors, base, model_parameters, parameters, generator):
    """sum_i w_i t_i, divided by sum_i w_i when ``normalize``."""
    stacked = torch.stack(tensors)
    weights = [p["weight"] for p in model_parameters]
    merged = (_per_model(weights, stacked) * stacked).sum(dim=0)
    if parameters["normalize"]:
        # mergekit divides anyway and writes inf/nan; no recipe means that
        if sum(weights) == 0:
            raise MergeParameterError(
                "linear merge with normalize needs weights that do not sum to 0; "
                "change the weights or set normalize: false"
            )
        merged = merged / sum(weights)
    return merged


def slerp_row_moments(v0: Tensor, v1: Tensor) -> Tensor:
    """``(rows, 3)`` float64: per row (first axis) the sums of ``v0 * v1``, ``v0**2`` and ``v1**2``.

    Rows are summed separately so that a tensor merged a block of rows at a time
    (:attr:`MergeMethod.rows`) gets bitwise the moments of the whole.
    """
    rows = max(1, v0.shape[0]) if v0.dim() else 1
    a, b = v0.reshape(rows, -1), v1.reshape(rows, -1)
    return torch.stack([(a * b).sum(1, dtype=torch.float64), (a * a).sum(1, dtype=torch.float64),
                        (b * b).sum(1, dtype=torch.float64)], 1)


def slerp_coefficients(moments: Tensor, t: float, eps: float = 1e-8) -> tuple[float, float]:
    """``(c0, c1)`` with ``slerp(v0, v1, t) = c0 * v0 + c1 * v1``, from :func:`slerp_row_moments`.

    Each tensor is flattened to one vector and normalized (a near-zero one is left as it is, so
    its cosine with anything is 0, as in mergekit); lerp where they are (anti-)colinear.
    """
    dot, sq0, sq1 = moments.sum(0).tolist()
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    cosine = dot / (n0 if n0 > eps else 1.0) / (n1 if n1 > eps else 1.0)
    if abs(cosine) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cosine)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _slerp_rows(tensors, base, model_parameters, parameters, generator, blocks):
    """Slerp a block of rows at a time: the whole tensor's moments first, then each block
    combined as the whole is."""
    if len(tensors) != 1:
        raise MergeParameterError(
            f"slerp merges exactly two models, base_model (t=0) and one other (t=1), but got "
            f"{1 + len(tensors)}; pass the base as base and the other model alone in tensors"
        )
    (other,) = tensors
    moments = torch.cat([slerp_row_moments(base[b], other[b]) for b in blocks])
    c0, c1 = slerp_coefficients(moments, parameters["t"])
    for b in blocks:
        yield c0 * base[b] + c1 * other[b]


@register("slerp", needs_base=True, global_parameters={"t": None}, model_parameters={}, rows=_slerp_rows)
def slerp(tensors, base, model_parameters, parameters, generator):
    """Spherical interpolation from ``base`` (t=0) to the other tensor (t=1), each flattened
    to one vector; lerp where they are (anti-)colinear."""
    return next(_slerp_rows(tensors, base, model_parameters, parameters, generator, [...]))


def _l1(x: Tensor) -> Tensor:
    """Per-row (first axis) sums of ``|x|`` in float64: the same whether ``x`` is a whole tensor
    or a block of its rows."""
    rows = max(1, x.shape[0]) if x.dim() else 1
    return x.reshape(rows, -1).abs().sum(1, dtype=torch.float64)


def _l1_scale(before: Tensor, after: Tensor, eps: float = 1e-7) -> float:
    # mergekit's `rescale` restores the L1 norm of the delta; for random pruning the factor
    # concentrates at 1/density on large tensors
    before, after = float(before.sum()), float(after.sum())
    return 1.0 if before < eps or after < eps else before / after


def _rescale_l1(delta: Tensor, pruned: Tensor) -> Tensor:
    scale = _l1_scale(_l1(delta), _l1(pruned))
    return pruned if scale == 1.0 else pruned * scale


def _kth_smallest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest (from 0) of a 1-D tensor, which it may reorder."""
    if values.device.type == "cpu" and values.dtype in (torch.float16, torch.float32, torch.float64):
        # In place, no copy and no index tensor (torch's kthvalue makes both).
        array = values.detach().numpy()
        array.partition(k)
        return values[k].clone()
    return values.kthvalue(k + 1).values


@dataclass(frozen=True)
class MagnitudeCut:
    """What magnitude pruning keeps of one delta: the entries with ``|delta| > threshold``, and
    of those equal to it the first ``tied`` by flat index (what a stable descending sort
    keeps); ``scale`` is the L1 rescale factor (1 without ``rescale``)."""

    threshold: Tensor
    tied: int
    scale: float

    def apply(self, block: Tensor, tied_before: int = 0) -> tuple[Tensor, int]:
        """The pruned block of rows, given how many tied entries the rows before it hold; and
        how many this block holds."""
        magnitude = block.abs()
        keep, tied = (magnitude > self.threshold).flatten(), (magnitude == self.threshold).flatten()
        del magnitude
        n = block.numel() + tied_before
        rank = tied.cumsum(0, dtype=torch.int32 if n < 2**31 else torch.int64) + tied_before
        keep |= tied & (rank <= self.tied)
        count = int(rank[-1]) - tied_before if rank.numel() else 0
        del tied, rank
        pruned = block * keep.view_as(block)
        return (pruned if self.scale == 1.0 else pruned * self.scale), count


def magnitude_cut(blocks: Callable[[], Iterable[Tensor]], numel: int, density: float, rescale: bool) -> MagnitudeCut:
    """:class:`MagnitudeCut` of a delta read as row blocks, in order, by ``blocks()`` (called
    once, twice with ``rescale``): the k-th largest magnitude from one float32 copy of
    ``|delta|``, partitioned in place (no sort, no index tensor), then the L1 sums block by block.

    Raises:
        MergeParameterError: ``density`` keeps no entry.
    """
    k = int(density * numel)
    if k < 1:
        raise MergeParameterError(f"density {density} keeps no entry of a tensor with {numel} elements; raise density")
    magnitudes = torch.empty(numel)
    offset = 0
    for block in blocks():
        magnitudes[offset:offset + block.numel()] = block.abs().flatten()
        offset += block.numel()
    threshold = _kth_smallest(magnitudes, numel - k)
    above = int((magnitudes > threshold).sum())
    del magnitudes
    cut = MagnitudeCut(threshold, k - above, 1.0)
    if not rescale:
        return cut
    before, after, tied = [], [], 0
    for block in blocks():
        pruned, count = cut.apply(block, tied)
        tied += count
        before.append(_l1(block))
        after.append(_l1(pruned))
    return MagnitudeCut(threshold, k - above, _l1_scale(torch.cat(before), torch.cat(after)))


def _magnitude_prune(delta: Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> Tensor:
    """Keep the int(density * numel) entries of largest |delta|; ties go to the lower flat index."""
    if density >= 1:
        return delta
    # The cut without its rescale: the pruned delta is at hand here, so it is measured once.
    pruned = magnitude_cut(lambda: [delta], delta.numel(), density, rescale=False).apply(delta)[0]
    return _rescale_l1(delta, pruned) if rescale else pruned


@dataclass(frozen=True)
class RandomCut:
    """DARE's pruning of one delta read a block of rows at a time: ``generator`` stands where the
    whole delta's mask was first drawn (masks are drawn entry by entry, in order, so blocks drawn
    one after the other give the whole mask); ``scale`` is the L1 rescale factor."""

    generator: torch.Generator
    density: float
    scale: float

    def apply(self, block: Tensor, state: int = 0) -> tuple[Tensor, int]:
        """The pruned next block of rows (``state`` is passed through, as for :class:`MagnitudeCut`)."""
        pruned = block * torch.bernoulli(torch.full_like(block, self.density), generator=self.generator)
        return (pruned if self.scale == 1.0 else pruned * self.scale), state


def random_cut(blocks: Callable[[], Iterable[Tensor]], density: float, rescale: bool,
               generator: torch.Generator) -> RandomCut:
    """:class:`RandomCut` of a delta read as row blocks by ``blocks()``. Draws the whole mask from
    ``generator`` (leaving it where pruning the whole delta would) for the L1 sums, and keeps a
    copy of the generator as it was, to draw the same mask again block by block."""
    start = torch.Generator(device=generator.device)
    start.set_state(generator.get_state())
    before, after = [], []
    for block in blocks():
        mask = torch.bernoulli(torch.full_like(block, density), generator=generator)
        if rescale:
            before.append(_l1(block))
            after.append(_l1(block * mask))
    return RandomCut(start, density, _l1_scale(torch.cat(before), torch.cat(after)) if rescale else 1.0)


def _random_prune(delta: Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> Tensor:
    """Keep each entry independently with probability density (DARE)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    pruned = delta * mask
    return _rescale_l1(delta, pruned) if rescale else pruned


def _generalized_task_arithmetic(tensors, base, model_parameters, parameters, generator, *, prune, consensus):
    """base + lambda * mix of the (pruned) deltas t_i - base, as mergekit's GTATask.

    With ``consensus`` (TIES "sum"), an entry keeps only the weighted deltas whose sign matches
    the sign of their sum (a zero sum counts as positive; pruned zeros never match), and
    ``normalize`` divides by the summed weights of exactly those models.
    """
    if not tensors:
        return base
    deltas = []
    for t, p in zip(tensors, model_parameters):
        delta = t - base
        if prune is not None:
            delta = prune(delta, p["density"], parameters["rescale"], generator)
        deltas.append(delta)
    return combine_deltas(deltas, base, model_parameters, parameters, consensus=consensus)


def combine_deltas(deltas: Sequence[Tensor], base: Tensor, model_parameters: Sequence[Mapping[str, Any]],
                   parameters: Mapping[str, Any], *, consensus: bool) -> Tensor:
    """The task-arithmetic family's elementwise second half: ``base + lambda * mix`` of the
    (pruned) ``deltas``, with TIES sign consensus if ``consensus``. Rows of a tensor combine
    as the whole does."""
    deltas = torch.stack(list(deltas))
    weights = _per_model([p["weight"] for p in model_parameters], deltas)
    weighted = deltas * weights
    if consensus:
        majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        # where no model survives, mixed is 0 and the base stays
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum().item()
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if parameters["normalize"]:
        mixed = mixed / divisor
    return base + parameters["lambda"] * mixed


def _gta_globals(normalize: bool, rescale: bool) -> dict[str, Any]:
    # int8_mask only changes the dtype of mergekit's sign mask; accepted so recipes carry over
    return {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}


# density is declared for every task-arithmetic method, as in mergekit, though only the pruning
# methods read it
_GTA_MODEL = {"weight": None, "density": 1.0}


def _pruned_rows(magnitude: bool, consensus: bool) -> Callable[..., Iterator[Tensor]]:
    """The task-arithmetic family's :attr:`MergeMethod.rows`: each delta's cut first (TIES: the
    magnitude threshold, from one float32 copy of the delta's magnitudes; DARE: the L1 rescale,
    drawing the mask once to measure it), then the pruned deltas of each block combined (sign
    consensus is elementwise)."""

    def rows(tensors, base, model_parameters, parameters, generator, blocks):
        cuts: list[MagnitudeCut | RandomCut | None] = []
        for t, p in zip(tensors, model_parameters):
            def deltas(t=t):
                return (t[b] - base[b] for b in blocks)

            if p["density"] >= 1:
                cuts.append(None)
            elif magnitude:
                cuts.append(magnitude_cut(deltas, t.numel(), p["density"], parameters["rescale"]))
            else:
                cuts.append(random_cut(deltas, p["density"], parameters["rescale"], generator))
        state = [0] * len(tensors)
        for b in blocks:
            pruned = []
            for i, t in enumerate(tensors):
                delta = t[b] - base[b]
                if cuts[i] is not None:
                    delta, state[i] = cuts[i].apply(delta, state[i])
                pruned.append(delta)
            yield combine_deltas(pruned, base[b], model_parameters, parameters, consensus=consensus)

    return rows


@register("task_arithmetic", needs_base=True, global_parameters=_gta_globals(False, False), model_parameters=_GTA_MODEL,
          rows="elementwise")
def task_arithmetic(tensors, base, model_parameters, parameters, generator):
    """base + lambda * sum_i w_i (t_i - base), divided by sum_i w_i when ``normalize``."""
    return _generalized_task_arithmetic(
        tensors, base, model_parameters, parameters, generator, prune=None, consensus=False
    )


@register("ties", needs_base=True, global_parameters=_gta_globals(True, False), model_parameters=_GTA_MODEL,
          rows=_pruned_rows(magnitude=True, consensus=True))
def ties(tensors, base, model_parameters, parameters, generator):
    """TIES: magnitude pruning of each delta, sign consensus by sum, disjoint mean."""
    return _generalized_task_arithmetic(
        tensors, base, model_parameters, parameters, generator, prune=_magnitude_prune, consensus=True
    )


@register("dare_linear", needs_base=True, global_parameters=_gta_globals(False, True), model_parameters=_GTA_MODEL,
          rows=_pruned_rows(magnitude=False, consensus=False))
def dare_linear(tensors, base, model_parameters, parameters, generator):
    """DARE: random pruning of each delta, rescaled to its L1 norm, then task arithmetic."""
    return _generalized_task_arithmetic(
        tensors, base, model_parameters, parameters, generator, prune=_random_prune, consensus=False
    )


@register("dare_ties", needs_base=True, global_parameters=_gta_globals(False, True), model_parameters=_GTA_MODEL,
          rows=_pruned_rows(magnitude=False, consensus=True))
def dare_ties(tensors, base, model_parameters, parameters, generator):
    """DARE pruning with TIES sign consensus."""
    return _generalized_task_arithmetic(
        tensors, base, model_parameters, parameters, generator, prune=_random_prune, consensus=True
    )
