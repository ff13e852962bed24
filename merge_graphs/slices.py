"""Slices: which input layers make each output layer (mergekit's ``slices`` and ``layer_range``).

A merge of whole models maps every tensor to the same name in each model. A recipe with
``slices`` builds its output a stack of layers at a time instead, mergekit's way: each slice
takes a range of layers from each of its sources (all of one length), merges them layer by
layer, and the slices are stacked in order, so that the output can have more or fewer layers
than its parents (a "frankenmerge"; with one source per slice and ``passthrough``, plain layer
stacking). Tensors outside the layers (embeddings, final norm, head) come from the first
slice's sources before the layers and from the last slice's after them. Inside a slice, the
``t`` of gradients (:mod:`merge_graphs.parameters`) runs from 0 at its first layer to 1 at its
last.

:func:`plan_tensors` turns slices (or whole models) into one :class:`TensorTask` per output
tensor, which the merge loop (:mod:`merge_graphs.engine`) computes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merge_graphs.errors import MergeParameterError
from merge_graphs.sources import TensorSource

__all__ = ["OutputModule", "OutputSlice", "SliceSource", "TensorInput", "TensorPlan", "TensorTask", "layer_positions", "layer_stack", "plan_tensors"]

# The first all-digit component of a name is its layer's index: model.layers.3.mlp...,
# transformer.h.3...; a later one (an expert's index in model.layers.3.experts.5...) is not.
_LAYER = re.compile(r"^(.*?)\.(\d+)(\..*|)$")
# The head and the final norm come after the layers also where a checkpoint's order is its file's
# (alphabetical: lm_head.weight before model.layers...), as in mergekit's post-weights.
_AFTER_LAYERS = re.compile(r"^(.*\.)?(lm_head|norm|ln_f|final_layernorm|final_layer_norm|post_layernorm|"
                           r"layernorm_post)\.")


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """``t`` of every tensor name: ``i / (n - 1)`` for layer ``i`` of the ``n`` layers under its
    prefix (``model.layers``, ``transformer.h`` ...; 1 when there is one), 0 outside the layers.

    Example:
        >>> t = layer_positions(["model.embed_tokens.weight", "model.layers.0.mlp.weight",
        ...                      "model.layers.1.mlp.weight", "model.layers.2.mlp.weight"])
        >>> [t[n] for n in sorted(t)]
        [0.0, 0.0, 0.5, 1.0]
    """
    found = {name: m for name in names if (m := _LAYER.match(name))}
    layers: dict[str, set[int]] = {}
    for m in found.values():
        layers.setdefault(m.group(1), set()).add(int(m.group(2)))
    positions = {}
    for name in names:
        m = found.get(name)
        if m is None:
            positions[name] = 0.0
            continue
        indices = sorted(layers[m.group(1)])
        n = len(indices)
        positions[name] = indices.index(int(m.group(2))) / (n - 1) if n > 1 else 1.0
    return positions


@dataclass(frozen=True)
class SliceSource:
    """Layers ``layer_range`` (start, stop; all layers if None) of ``model``, with the model's own
    merge parameters in this slice."""

    model: TensorSource
    layer_range: tuple[int, int] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """Output layers made from each source's range, merged layer by layer. ``base``: the source
    that is the base of a task-vector method here; ``parameters``: settings for this slice."""

    sources: Sequence[SliceSource]
    base: TensorSource | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputModule:
    """One part of the output (mergekit's ``modules``; :mod:`merge_graphs.modules`): ``select``
    picks its tensors from a model's names (None: every name), made from whole models (``whole``:
    one slice, its sources' layer ranges unused) or from ``slices``, with the module's own
    ``parameters`` (between a slice's and the merge's); ``layers_key``: the config key of its layer count."""

    name: str
    select: Callable[[Sequence[str]], list[str]] | None
    slices: Sequence[OutputSlice]
    whole: bool
    parameters: Mapping[str, Any] = field(default_factory=dict)
    layers_key: str | None = "num_hidden_layers"


@dataclass(frozen=True)
class TensorInput:
    """One model's tensor that goes into an output tensor, and that model's own settings."""

    model: TensorSource
    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made: ``inputs`` merged (with ``base`` for task-vector methods),
    at layer position ``t``, with the merge's settings ``parameters`` (highest precedence first)."""

    name: str
    inputs: tuple[TensorInput, ...]
    base: TensorInput | None
    parameters: tuple[Mapping[str, Any], ...]
    t: float


@dataclass(frozen=True)
class TensorPlan:
    """What a merge writes: ``names`` in order, the ``tasks`` that make them, and for each
    config key of a sliced module's layer count, per output layer, the model and layer it is
    taken from (the first source's)."""

    names: list[str]
    tasks: dict[str, TensorTask]
    layers: dict[str, list[tuple[TensorSource, int]]]


@dataclass(frozen=True)
class LayerStack:
    """A model's stack of layers: ``prefix.{i}.rest`` for ``i`` in ``layers``."""

    prefix: str
    layers: dict[int, list[str]]

    def rename(self, name: str, index: int) -> str:
        """``name`` of one of its layers, moved to layer ``index``."""
        m = _LAYER.match(name)
        return f"{m.group(1)}.{index}{m.group(3)}"


def layer_stack(names: Sequence[str], label: str) -> LayerStack:
    """The one stack of layers among ``names``.

    Raises:
        MergeParameterError: no stack, or several (a vision tower beside a text model): slices
            address one.
    """
    stacks: dict[str, dict[int, list[str]]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            stacks.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(name)
    if len(stacks) != 1:
        found = ", ".join(f"{p} ({len(v)} layers)" for p, v in stacks.items()) or "none"
        raise MergeParameterError(f"slices take layers from one stack of layers, and {label} has "
                                  f"{'several' if stacks else 'none'}: {found}; merge whole models (models:) instead")
    ((prefix, layers),) = stacks.items()
    if sorted(layers) != list(range(len(layers))):
        raise MergeParameterError(f"the layers of {label} under {prefix} are not numbered 0 to {len(layers) - 1}")
    return LayerStack(prefix, layers)


def plan_tensors(
    names: Sequence[str],
    modules: Sequence[OutputModule],
    *,
    separate_base: bool,
    parameters: Mapping[str, Any],
    views: Mapping[int, Sequence[str]],
) -> TensorPlan:
    """The output's names, in order (module by module), the task of each, and where the layers
    of sliced modules come from.

    Args:
        names: the reference's names (in the merge's basis), in order.
        modules: the parts of the output (one module holding every name for a model of one part).
        separate_base: whether the method takes a slice's base apart from its other inputs.
        parameters: the merge's own settings (below every module's and slice's).
        views: the names each model holds in the merge's basis, by ``id`` of its source.
    """
    out: list[str] = []
    tasks: dict[str, TensorTask] = {}
    layers: dict[str, list[tuple[TensorSource, int]]] = {}
    for module in modules:
        where = "" if len(modules) == 1 else f"modules.{module.name}."
        part = _plan_module(module, names, where, separate_base, parameters, views)
        out += part.names
        tasks.update(part.tasks)
        layers.update(part.layers)
    return TensorPlan(out, tasks, layers)


def _plan_module(module: OutputModule, names: Sequence[str], where: str, separate_base: bool, parameters: Mapping[str, Any],
                 views: Mapping[int, Sequence[str]]) -> TensorPlan:
    def select(listed: Sequence[str]) -> list[str]:
        return list(listed) if module.select is None else module.select(listed)

    slices, names = module.slices, select(names)
    if not names:
        raise MergeParameterError(f"{where.rstrip('.')} holds no tensor of the reference; check the module's name")
    for i, s in enumerate(slices):
        if not s.sources:
            raise MergeParameterError(f"{where}slices[{i}] has no sources; list at least one model with its layer_range")
        if separate_base and s.base is not None and not any(src.model is s.base for src in s.sources):
            raise MergeParameterError(f"{where}slices[{i}]: the base model {s.base.label} is not among its sources; "
                                      "add it with the layer_range it contributes")

    def task(name: str, s: OutputSlice, inputs: list[tuple[SliceSource, str]], t: float) -> TensorTask:
        made = [TensorInput(src.model, n, src.parameters) for src, n in inputs]
        base = None
        if separate_base and s.base is not None:
            base = next(x for x in made if x.model is s.base)
            made = [x for x in made if x is not base]
        return TensorTask(name, tuple(made), base, (s.parameters, module.parameters, parameters), t)

    if module.whole:
        (s,) = slices
        t = layer_positions(names)
        return TensorPlan(names, {n: task(n, s, [(src, n) for src in s.sources], t[n]) for n in names}, {})

    if module.layers_key is None:
        raise MergeParameterError(f"the {module.name} has no stack of layers to take ranges of; give it models: "
                                  "instead of slices:")
    label = f"the {module.name} of " if where else ""
    stacks = {id(src.model): layer_stack(select(views[id(src.model)]), f"{label}{src.model.label}")
              for s in slices for src in s.sources}
    reference = layer_stack(names, f"{label}the reference")
    in_layers = {n for layer in reference.layers.values() for n in layer}
    first_layer = min(k for k, n in enumerate(names) if n in in_layers)
    post = [n for k, n in enumerate(names) if n not in in_layers and (k > first_layer or _AFTER_LAYERS.match(n))]
    pre = [n for n in names if n not in in_layers and n not in post]

    out_names = list(pre)
    tasks = {n: task(n, slices[0], [(src, n) for src in slices[0].sources], 0.0) for n in pre}
    layers: list[tuple[TensorSource, int]] = []
    for i, s in enumerate(slices):
        ranges = []
        for src in s.sources:
            n_layers = len(stacks[id(src.model)].layers)
            start, stop = src.layer_range if src.layer_range is not None else (0, n_layers)
            if not 0 <= start < stop <= n_layers:
                raise MergeParameterError(f"{where}slices[{i}]: layer_range [{start}, {stop}] of {src.model.label} is "
                                          f"out of bounds: it has layers 0 to {n_layers - 1} (a range is [start, stop), "
                                          f"stop at most {n_layers})")
            ranges.append((start, stop))
        lengths = {stop - start for start, stop in ranges}
        if len(lengths) > 1:
            raise MergeParameterError(f"{where}slices[{i}]: its sources' layer ranges have different lengths "
                                      f"{[list(r) for r in ranges]}; every source of a slice gives as many layers")
        (length,) = lengths
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            first = stacks[id(s.sources[0].model)]
            for name in first.layers[ranges[0][0] + offset]:
                inputs = []
                for src, (start, _) in zip(s.sources, ranges):
                    stack = stacks[id(src.model)]
                    inputs.append((src, stack.rename(name, start + offset)))
                out = first.rename(name, len(layers))
                out_names.append(out)
                tasks[out] = task(out, s, inputs, t)
            layers.append((s.sources[0].model, ranges[0][0] + offset))
    for n in post:
        out_names.append(n)
        tasks[n] = task(n, slices[-1], [(src, n) for src in slices[-1].sources], 0.0)
    return TensorPlan(out_names, tasks, {module.layers_key: layers})
