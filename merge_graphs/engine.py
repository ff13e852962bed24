"""The one merge loop: aligned tensor sources in, merged named tensors out.

Every merge, from the Python API or a recipe, in memory or streamed from disk, is this loop.
Its inputs are :class:`~merge_graphs.sources.TensorSource` s (a model in memory and a lazily
opened checkpoint are two sources of the same named tensors) seen through their
:class:`~merge_graphs.match.Alignment` s, whose :meth:`~merge_graphs.match.Alignment.tensor`
maps one tensor at a time. The plan says which tensors of which models make each output tensor
(:func:`merge_graphs.slices.plan_tensors`: the same name in every model, or mergekit's slices of
layers). The loop reads one tensor of every model, resolves the merge's parameters for it
(:mod:`merge_graphs.parameters`), merges it
(:func:`~merge_graphs.methods.merge_tensors`, which splits a large tensor into row blocks when
the method says how) and hands it on. Its output, a :class:`MergedModel`, goes to one of two
sinks: :func:`~merge_graphs.io.writer.write_tensor_folder` writes it tensor by tensor to a
model folder, :meth:`MergedModel.into` loads it into a module.

Memory: one aligned copy of one tensor per model at a time (float32), the merged tensor, and a
block's worth of the method's temporaries, whatever the model's depth.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from merge_graphs.aligners import basis_identity
from merge_graphs.errors import MergeParameterError
from merge_graphs.match import AlignedTensors, Alignment
from merge_graphs.methods import get_method, merge_tensors
from merge_graphs.modules import DEFAULT
from merge_graphs.parameters import check_setting, filters, resolve
from merge_graphs.slices import OutputModule, OutputSlice, SliceSource, TensorTask, plan_tensors
from merge_graphs.sources import TensorSource, module_tensors
from merge_graphs.symmetry import SymmetrySpec
from merge_graphs.tensors import TensorInfo
from merge_graphs.vocabulary import Vocabulary


@dataclass
class MergedModel:
    """A merge, planned: what it writes, and the loop that computes it (:meth:`tensors`).

    Attributes:
        basis: the basis it merges in: ``"permutation"``, or ``"rotation"`` (norms folded).
        spec: the spec of that basis (the reference's, folded for ``"rotation"``).
        names: the names it stores, in the model's order.
        aliases: ``{name: stored name}`` for names the output model ties to another.
        layout: shape and (the reference's) dtype of every stored name.
        config: the output model's config: the reference's, untied in the folded basis, with
            as many layers as the slices stack.
        tasks: how each stored name is made (:class:`~merge_graphs.slices.TensorTask`).
    """

    basis: str
    spec: SymmetrySpec
    names: list[str]
    aliases: dict[str, str]
    layout: dict[str, TensorInfo]
    config: Any
    tasks: dict[str, TensorTask]
    views: dict[int, AlignedTensors]
    method: str
    seed: int
    device: torch.device
    dtype: torch.dtype | None = None
    vocabulary: Vocabulary | None = None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, merged tensor)`` for every stored name, in order; nothing kept between steps.

        Non-floating tensors (integer ids, masks) are the first input's, as they are. ``seed``
        seeds random pruning, drawn in this order. The method computes in ``dtype`` (default:
        each tensor's stored dtype), as mergekit does.
        """
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        method = get_method(self.method)
        per_model = method.model_parameters
        for name in self.names:
            task = self.tasks[name]
            first = task.base or task.inputs[0]
            if not self.layout[name].dtype.is_floating_point:
                yield name, self.views[id(first.model)][first.name]
                continue
            shared: dict[str, Any] = {}
            for level in reversed(task.parameters):
                shared.update(resolve(level, name, task.t))
            # as in mergekit, a per-model parameter is looked up for each input under the input's own
            # name (another layer's, in a slice), at every level: the model's, its slice's, its
            # module's, the merge's
            shared = {k: v for k, v in shared.items() if k not in per_model}
            own = []
            for i in task.inputs:
                found: dict[str, Any] = {}
                for level in reversed(task.parameters):
                    found.update({k: v for k, v in resolve(level, i.name, task.t).items() if k in per_model})
                own.append({**found, **resolve(i.parameters, i.name, task.t)})
            base = task.base
            remapped = self.vocabulary is not None and name in self.vocabulary.axes
            if base is not None and method.one_as_is and len(task.inputs) == 1 and not remapped:
                base = None  # the result is the one model's tensor: reading the base costs a model's read
            inputs = [self.views[id(i.model)][i.name].float() for i in task.inputs]
            base_tensor = None if base is None else self.views[id(base.model)][base.name].float()
            if remapped:
                inputs, base_tensor = self._on_vocabulary(name, task, inputs, base_tensor)
            yield name, merge_tensors(
                self.method, inputs, base=base_tensor,
                model_parameters=own,
                parameters=shared, generator=generator, dtype=self.dtype or self.layout[name].dtype,
            )

    def _on_vocabulary(self, name: str, task: TensorTask, inputs: list[torch.Tensor],
                       base: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A token-indexed tensor of every model moved onto the output vocabulary (in mergekit's
        model order: the models, then the base)."""
        vocabulary = self.vocabulary
        owners = [vocabulary.owners[id(i.model)] for i in task.inputs]
        base_owner = None if task.base is None else vocabulary.owners[id(task.base.model)]
        moved = vocabulary.remap(inputs + ([base] if base is not None else []), owners + [base_owner] * (base is not None),
                                 axis=vocabulary.axes[name], base=vocabulary.base, dtype=self.dtype or self.layout[name].dtype)
        return moved[:len(inputs)], (moved[-1] if base is not None else None)

    def into(self, skeleton: nn.Module) -> nn.Module:
        """The merge loaded into a module like ``skeleton`` (the output's class, e.g.
        :func:`output_skeleton`): a copy of it, or, when slices stack another number of layers, a
        new one of its class built from :attr:`config`; tied names get their stored tensor."""
        merged = dict(self.tensors())
        merged.update({alias: merged[name] for alias, name in self.aliases.items()})
        if any(getattr(self.config, key, None) is not None and getattr(getattr(skeleton, "config", None), key, None)
               not in (None, getattr(self.config, key)) for key in ("num_hidden_layers", "vocab_size")):
            out = type(skeleton)._from_config(self.config).eval()
        else:
            out = copy.deepcopy(skeleton)
        out.load_state_dict(dict(module_tensors(out, merged)))
        return out


def plan_merge(
    reference: TensorSource,
    models: Sequence[TensorSource],
    alignments: Sequence[Alignment],
    method: str = "linear",
    *,
    base: TensorSource | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    slices: Sequence[OutputSlice] | None = None,
    modules: Sequence[OutputModule] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    vocabulary: Vocabulary | None = None,
) -> MergedModel:
    """Plan the merge of ``models``, each mapped onto ``reference`` by its alignment.

    All alignments map into one basis (:attr:`Alignment.basis`); the reference and ``base``
    are seen in it too. In the folded basis the output model is the reference folded: its head
    is untied and stored on its own.

    Args:
        reference: the model whose names, order, config and carried tensors the output takes.
        models: the models to merge.
        alignments: one per model (the reference's own: :func:`~merge_graphs.aligners.basis_identity`).
        method: a name in :data:`merge_graphs.methods.METHODS`.
        model_parameters, parameters: as for :func:`merge_graphs.methods.merge_tensors`, each
            value a setting of :mod:`merge_graphs.parameters` (a number, a gradient over the
            layers, or ``{filter, value}`` conditions on tensor names).
        base: the base of a task-vector method.
        slices: build the output from ranges of layers of ``models`` (and ``base``)
            (:class:`~merge_graphs.slices.OutputSlice`, mergekit's ``slices``) instead of
            merging whole models; ``model_parameters`` is then unused (each source carries
            its own).
        modules: build the output part by part (:class:`~merge_graphs.slices.OutputModule`,
            mergekit's ``modules``), each from its own whole models or slices, instead of
            ``slices`` or whole ``models``.
        seed: seeds random pruning (``dare_*`` ...).
        dtype: the dtype the method computes in (mergekit's recipe ``dtype``); None: each
            tensor's stored dtype (a bfloat16 checkpoint merges in bfloat16, as in mergekit;
            some methods accumulate in float32 anyway).
        vocabulary: one output vocabulary (mergekit's ``tokenizer_source``): the token-indexed
            tensors of every model are moved onto it before they are merged
            (:meth:`~merge_graphs.vocabulary.Vocabulary.remap`), and the config says its size.

    Raises:
        MergeParameterError: a malformed setting, a filter matching no tensor, slices that do
            not line up; nothing has been read.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.aligners import basis_identity
        >>> from merge_graphs.engine import plan_merge
        >>> from merge_graphs.sources import StateTensors
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> b = merge_graphs.permute(a, merge_graphs.random_permutations(merge_graphs.symmetry_spec(a), seed=1))
        >>> sa, sb = StateTensors(a), StateTensors(b)
        >>> found = merge_graphs.align(a, b)
        >>> merged = plan_merge(sa, [sa, sb], [basis_identity(sa), found], model_parameters=[{"weight": 1.0}] * 2)
        >>> torch.allclose(merged.into(a)[0].weight, a[0].weight)
        True
    """
    if len(models) != len(alignments):
        raise ValueError(f"got {len(alignments)} alignments for {len(models)} models; give one per model")
    if model_parameters is not None and len(model_parameters) != len(models):
        raise MergeParameterError(f"got {len(model_parameters)} model_parameters entries for {len(models)} models; "
                                  "give one mapping per model (the base takes none)")
    bases = {a.basis for a in alignments} or {"permutation"}
    if len(bases) > 1:
        raise ValueError(f"the alignments map into different bases {sorted(bases)}; align every model one way")
    basis = bases.pop()
    identity = basis_identity(reference, basis)
    views = {id(m): a.tensors(m) for a, m in zip(alignments, models)}
    for source in (reference, base):
        if source is not None and id(source) not in views:
            views[id(source)] = basis_identity(source, basis).tensors(source)

    if modules is None:
        whole = slices is None
        if whole:
            per_model = model_parameters or [{} for _ in models]
            sources = [SliceSource(m, None, p) for m, p in zip(models, per_model)]
            if base is not None and not any(m is base for m in models):
                sources.append(SliceSource(base))
            slices = [OutputSlice(sources, base)]
        modules = [OutputModule(DEFAULT, None, slices, whole)]
    settings = [parameters or {}, *(m.parameters for m in modules),
                *(src.parameters for m in modules for s in m.slices for src in s.sources),
                *(s.parameters for m in modules for s in m.slices)]
    for mapping in settings:
        for key, setting in mapping.items():
            try:
                check_setting(setting)
            except ValueError as e:
                raise MergeParameterError(f"parameter {key!r}: {e}") from None

    config = reference.config
    if basis == "rotation":
        names, aliases = identity.names(reference), {}
        config = copy.deepcopy(config)
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    else:
        names, aliases = reference.stored(), dict(reference.aliases)
    plan = plan_tensors(names, modules, separate_base=get_method(method).base != "none", parameters=parameters or {},
                        views={k: list(v) for k, v in views.items()})
    names, tasks = plan.names, plan.tasks
    layout = _layout(tasks, views, vocabulary)
    for key, layers in plan.layers.items():
        config = _with_layers(config, layers, key)
    if vocabulary is not None:
        config = _with_vocabulary(config, vocabulary.size)

    merged_names = [n for n in names if layout[n].dtype.is_floating_point]
    # A module's settings act on its own tensors only: a filter naming another module's is a mistake.
    scopes = [([parameters or {}], merged_names, reference.label)]
    for m in modules:
        owned = [n for n in merged_names if tasks[n].parameters[1] is m.parameters]
        where = reference.label if len(modules) == 1 else f"the {m.name} of {reference.label}"
        scopes.append(([m.parameters, *(s.parameters for s in m.slices),
                        *(src.parameters for s in m.slices for src in s.sources)], owned, where))
    for scope, owned, where in scopes:
        for pattern, key in filters(scope).items():
            if not any(pattern in n for n in owned):
                raise MergeParameterError(
                    f"filter {pattern!r} of parameter {key!r} matches no tensor of {where} (its names look "
                    f"like {', '.join(owned[:3])}); fix the filter or remove that entry")
    return MergedModel(
        basis=basis, spec=identity.spec, names=names, aliases=aliases, layout=layout, config=config, tasks=tasks,
        views=views, method=method, seed=seed, device=reference.device, dtype=dtype, vocabulary=vocabulary,
    )


def _layout(tasks: Mapping[str, TensorTask], views: Mapping[int, AlignedTensors],
            vocabulary: Vocabulary | None = None) -> dict[str, TensorInfo]:
    """Shape and dtype of every output tensor, from its first input's header; every input must
    exist and agree in shape (token-indexed tensors beyond their vocabulary axis, which has the
    output vocabulary's size)."""
    infos: dict[int, dict[str, TensorInfo]] = {}
    layout = {}
    for name, task in tasks.items():
        inputs = [*([task.base] if task.base else []), *task.inputs]
        found = []
        for i in inputs:
            known = infos.setdefault(id(i.model), i.model.infos())
            if i.name not in views[id(i.model)] or i.name not in known:
                raise MergeParameterError(f"{i.model.label} has no tensor {i.name!r} (wanted for {name!r}); merge "
                                          "models of one architecture")
            found.append(known[i.name])
        axis = vocabulary.axes.get(name) if vocabulary is not None else None
        shapes = {info.shape if axis is None else info.shape[:axis] + info.shape[axis + 1:] for info in found}
        if len(shapes) > 1:
            raise MergeParameterError(f"{name!r} is made from tensors of different shapes "
                                      f"({', '.join(f'{i.model.label}: {tuple(f.shape)}' for i, f in zip(inputs, found))}); "
                                      "merge models of one architecture and size")
        layout[name] = found[0]
        if axis is not None:
            shape = list(found[0].shape)
            shape[axis] = vocabulary.size
            layout[name] = TensorInfo(shape, found[0].dtype)
    return layout


def _with_vocabulary(config: Any, size: int) -> Any:
    """``config`` with ``vocab_size`` (its text config's, for a composite model) set to ``size``."""
    if config is None:
        return None
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.vocab_size = size
    return config


def _with_layers(config: Any, layers: Sequence[tuple[TensorSource, int]], key: str = "num_hidden_layers") -> Any:
    """``config`` for a stack of ``layers`` (each a model's layer) counted by ``key`` (dotted for a
    part's own config, ``text_config.num_hidden_layers``): its layer count, and beside it the
    per-layer settings (``layer_types``: sliding or full attention) taken from where each layer comes from."""
    if config is None:
        return None
    config = copy.deepcopy(config)
    *path, count = key.split(".")
    holder = config
    for part in path:
        holder = getattr(holder, part)
    setattr(holder, count, len(layers))
    if isinstance(getattr(holder, "layer_types", None), list):
        def types(source: TensorSource) -> list[str]:
            sub = source.config
            for part in path:
                sub = getattr(sub, part)
            return sub.layer_types

        holder.layer_types = [types(source)[i] for source, i in layers]
    return config
