"""The merge-method registry and :func:`merge_tensors`, the one entry point that merges a tensor.

Modelled on mergekit's ``merge_methods/registry.py`` and ``base.py``: a method declares its
parameters with their defaults (mergekit's names and values), whether it takes a base model, how
many other models it merges, and how it splits a large tensor into blocks of rows.

Conventions of :func:`merge_tensors`:

* ``tensors`` holds the models that are not the base; ``base`` is passed on its own. For a method
  that requires a base (``task_arithmetic``, ``ties`` ...), a mergekit recipe that lists its
  ``base_model`` among ``models`` maps here by dropping that entry and passing its tensor as
  ``base``: mergekit skips the base's per-model parameters for these methods.
* A method with an optional base (``nuslerp``, ``multislerp``) merges the deltas from ``base``
  when one is given, else the tensors themselves.
* A method that takes no base (``linear``, ``karcher``, ``passthrough``) merges every model
  alike: mergekit averages ``base_model`` like any other model (adding it to the inputs if it
  is not listed), so pass its tensor in ``tensors`` with its own parameters.
* Parameter values are scalars. mergekit's gradients and per-tensor-name filters must be
  evaluated for the tensor at hand before calling.
* A per-model parameter set in ``parameters`` applies to every model that does not set it
  itself, as a top-level ``parameters:`` entry does in a mergekit recipe.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from merge_graphs.errors import MergeParameterError


class _NotSet:
    """Default of a parameter that may stay unset: the method then gets ``None`` (mergekit's
    ``Optional[...] = None``, e.g. passthrough's ``scale``). A default of ``None`` itself means
    the parameter is required."""

    def __repr__(self) -> str:
        return "NOT_SET"


#: See :class:`_NotSet`.
NOT_SET = _NotSet()

BasePolicy = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: the name recipes use, e.g. ``"ties"``.
        needs_base: whether :func:`merge_tensors` requires ``base`` (``base == "required"``).
        global_parameters: ``{name: default}`` for parameters that apply to the whole merge;
            a default of ``None`` means the parameter is required, :data:`NOT_SET` that it may
            stay unset (the method gets ``None``).
        model_parameters: ``{name: default}`` for parameters set per model, likewise.
        fn: ``fn(tensors, base, model_parameters, parameters, generator) -> Tensor``, called
            with floating tensors of one dtype and fully resolved parameters.
        rows: how the method merges a large tensor a block of rows at a time, with the same
            result as ``fn`` on the whole, so that its temporaries (stacked inputs, masks) are a
            block's size: ``rows(tensors, base, model_parameters, parameters, generator, blocks)``
            yields the merged rows of each slice of ``blocks`` in order, after the whole-tensor
            statistics it needs (slerp's norms, a TIES threshold, a DARE rescale). ``None``: the
            method does not split and is merged whole.
        base: ``"required"``, ``"optional"`` (merged as deltas from the base when one is
            given) or ``"none"`` (a base model is merged like any other, in ``tensors``).
        models: ``(min, max)`` count of ``tensors`` (the models besides the base); ``max``
            ``None`` for no limit. Recipes should check it before loading anything.
        random: whether the result depends on ``generator`` (then a seed reproduces it).
        one_as_is: whether one model besides the base comes back as it is (mergekit's multislerp):
            the merge loop then does not read the base.
    """

    name: str
    needs_base: bool
    global_parameters: Mapping[str, Any]
    model_parameters: Mapping[str, Any]
    fn: Callable[..., Tensor]
    rows: Callable[..., Iterator[Tensor]] | None = None
    base: BasePolicy = "none"
    models: tuple[int, int | None] = (1, None)
    random: bool = False
    one_as_is: bool = False

    def check_count(self, n: int) -> None:
        """Raise :class:`MergeParameterError` unless ``n`` models besides the base is a count
        this method merges; the message names the method, the count and the fix."""
        low, high = self.models
        if low <= n and (high is None or n <= high):
            return
        if self.base == "required":  # counted with the base, as recipes list them
            low, high, n = low + 1, None if high is None else high + 1, n + 1
        want = (f"exactly {_count(low)}" if low == high else f"at least {_count(low)}" if high is None
                else f"{_count(low)} to {_count(high)}")
        want += " models" if (high or low) != 1 else " model"
        detail = {"required": " (base_model and the others)", "optional": " besides base_model (which is optional)",
                  "none": ""}[self.base]
        if self.base == "required" and low == high:
            detail = f" (base_model and {_count(low - 1)} other{'s' * (low > 2)})"
        raise MergeParameterError(f"{self.name} merges {want}{detail}, but got {n}; change the recipe's models "
                                  f"or pick another merge method")


def _count(n: int) -> str:
    return ("no", "one", "two", "three", "four")[n] if n < 5 else str(n)


#: Entries per block of rows when a method merges a large tensor in blocks (16 MB in float32).
#: :func:`merge_tensors` reads it from the package (``merge_graphs.methods.ROW_BLOCK``), so
#: setting it there takes effect.
ROW_BLOCK = 1 << 22


METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    needs_base: bool | None = None,
    global_parameters: Mapping[str, Any],
    model_parameters: Mapping[str, Any],
    rows: Callable[..., Iterator[Tensor]] | str | None = None,
    base: BasePolicy | None = None,
    models: tuple[int, int | None] | None = None,
    random: bool = False,
    one_as_is: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator adding a merge function to :data:`METHODS` under ``name``.

    ``rows`` says how it splits (:attr:`MergeMethod.rows`): a function, ``"elementwise"`` for a
    method whose every output entry depends only on the same entry of each input (then any
    block of rows merges as ``fn`` merges it), or ``None`` to be merged whole. Give ``base``
    (:attr:`MergeMethod.base`) or, as before, ``needs_base`` (``True``: ``"required"``,
    ``False``: ``"none"``). ``models`` defaults to ``(0, None)`` with a required base (the
    base alone merges to itself), else ``(1, None)``.

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
    if base is None:
        if needs_base is None:
            raise ValueError(f"merge method {name!r}: give base ('required', 'optional' or 'none') or needs_base")
        base = "required" if needs_base else "none"
    elif needs_base is not None and needs_base != (base == "required"):
        raise ValueError(f"merge method {name!r}: needs_base={needs_base} contradicts base={base!r}")
    if models is None:
        models = (0, None) if base == "required" else (1, None)

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered; pick another name")
        METHODS[name] = MergeMethod(
            name=name,
            needs_base=base == "required",
            global_parameters=MappingProxyType(dict(global_parameters)),
            model_parameters=MappingProxyType(dict(model_parameters)),
            fn=fn,
            rows=_elementwise_rows(fn) if rows == "elementwise" else rows,
            base=base,
            models=models,
            random=random,
            one_as_is=one_as_is,
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
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Merge one tensor position of several aligned models.

    A tensor of more than ``block`` entries (default :data:`ROW_BLOCK`) is merged a block of rows
    at a time by a method that declares how (:attr:`MergeMethod.rows`), with the same result.

    Args:
        method: a name in :data:`METHODS`.
        tensors: the non-base models' tensors, all of one shape (see the module docstring).
        base: the base model's tensor, for methods that take one.
        model_parameters: one mapping per entry of ``tensors``, e.g. ``{"weight": 0.5}``.
        parameters: the merge's global parameters, e.g. ``{"normalize": False}``, plus
            per-model ones that every model shares.
        generator: the random source of the random methods (``dare_*``, ``della*``, and
            ``arcee_fusion``'s quantile sample on tensors of over a million entries); pass a
            seeded one to reproduce a merge. ``None`` uses torch's global generator, as
            mergekit does.
        dtype: the floating dtype the inputs are cast to and the method's arithmetic runs in,
            as mergekit's recipe ``dtype`` (some methods still accumulate in float32 there,
            e.g. ``linear`` and ``slerp``; each does what mergekit does). ``None``: at least
            float32 (the reference's dtype if wider).

    Returns:
        The merged tensor in the dtype of the reference tensor: ``base`` for methods that need
        one, else ``tensors[0]``. A non-floating reference (e.g. integer position ids) comes
        back unchanged: such tensors are copied, never averaged.

    Raises:
        MergeParameterError: unknown method or parameter, a missing required one, a base given
            to a method that takes none (or missing), a count of models the method does not
            merge (:attr:`MergeMethod.models`), tensors of different shapes.

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
    if m.base == "none" and base is not None:
        raise MergeParameterError(
            f"merge method {m.name!r} takes no separate base: mergekit averages base_model like "
            "any other model here, so pass its tensor in tensors with its own parameters"
        )
    if base is None and not tensors:
        raise MergeParameterError(f"merge method {m.name!r} got no tensors to merge; pass at least one")
    m.check_count(len(tensors))
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MergeParameterError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    global_values, model_values = _resolve_parameters(m, len(tensors), model_parameters, parameters or {})

    reference = base if base is not None else tensors[0]
    shapes = {tuple(t.shape) for t in tensors} | {tuple(reference.shape)}
    if len(shapes) > 1:
        raise MergeParameterError(f"merge method {m.name!r} got tensors of different shapes {sorted(shapes)}; align them first")
    if not reference.dtype.is_floating_point:
        return reference

    work = torch.promote_types(reference.dtype, torch.float32) if dtype is None else dtype
    inputs = [t.to(work) for t in tensors]
    base = None if base is None else base.to(work)
    shape = reference.shape
    block = sys.modules[__package__].ROW_BLOCK if block is None else block
    if m.rows is None or reference.dim() == 0 or shape[0] < 2 or reference.numel() <= block:
        merged = m.fn(inputs, base, model_values, global_values, generator)
    else:
        step = max(1, block // max(1, math.prod(shape[1:])))
        blocks = [slice(start, start + step) for start in range(0, shape[0], step)]
        merged = None
        for rows, merged_rows in zip(blocks, m.rows(inputs, base, model_values, global_values, generator, blocks)):
            if merged is None:  # the dtype a method returns (arcee_fusion's mask promotes float16)
                merged = torch.empty(shape, dtype=merged_rows.dtype, device=reference.device)
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
            if value is NOT_SET:
                values[name] = None
    return global_values, model_values


def per_model(values: Sequence[float], like: Tensor) -> Tensor:
    """``values`` as a tensor of ``like``'s dtype broadcasting against ``like``, which is stacked
    along dim 0 (one entry per model)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))


def accumulator(t: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: where mergekit's ``linear``, ``slerp`` and
    ``karcher`` accumulate whatever the recipe's dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
