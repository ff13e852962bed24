"""The one merge loop: aligned tensor sources in, merged named tensors out.

Every merge, from the Python API or a recipe, in memory or streamed from disk, is this loop.
Its inputs are :class:`~merge_graphs.sources.TensorSource` s (a model in memory and a lazily
opened checkpoint are two sources of the same named tensors) seen through their
:class:`~merge_graphs.match.Alignment` s, whose :meth:`~merge_graphs.match.Alignment.tensor`
maps one tensor at a time. The loop reads one tensor of every model, merges it
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
from merge_graphs.methods import merge_tensors
from merge_graphs.parameters import check_setting, filters, layer_positions, resolve
from merge_graphs.sources import TensorSource
from merge_graphs.symmetry import SymmetrySpec
from merge_graphs.tensors import TensorInfo


@dataclass
class MergedModel:
    """A merge, planned: what it writes, and the loop that computes it (:meth:`tensors`).

    Attributes:
        basis: the basis it merges in: ``"permutation"``, or ``"rotation"`` (norms folded).
        spec: the spec of that basis (the reference's, folded for ``"rotation"``).
        names: the names it stores, in the model's order.
        aliases: ``{name: stored name}`` for names the output model ties to another.
        layout: shape and (the reference's) dtype of every stored name.
        config: the output model's config: the reference's, untied in the folded basis.
    """

    basis: str
    spec: SymmetrySpec
    names: list[str]
    aliases: dict[str, str]
    layout: dict[str, TensorInfo]
    config: Any
    reference: AlignedTensors
    models: list[AlignedTensors]
    base: AlignedTensors | None
    method: str
    model_parameters: Sequence[Mapping[str, Any]] | None
    parameters: Mapping[str, Any] | None
    seed: int
    device: torch.device

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, merged tensor)`` for every stored name, in order; nothing kept between steps.

        Tensors the spec does not label (integer ids, RoPE buffers) are the reference's, as
        they are. ``seed`` seeds ``dare_*`` pruning, drawn in this order. Gradients and filters
        (:mod:`merge_graphs.parameters`) are resolved for each tensor by its name and layer.
        """
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        positions = layer_positions(self.names)
        for name in self.names:
            if name not in self.spec.tensors:
                yield name, self.reference[name]
                continue
            t = positions[name]
            yield name, merge_tensors(
                self.method, [m[name].float() for m in self.models],
                base=None if self.base is None else self.base[name].float(),
                model_parameters=None if self.model_parameters is None
                else [resolve(mp, name, t) for mp in self.model_parameters],
                parameters=resolve(self.parameters or {}, name, t), generator=generator,
            )

    def into(self, skeleton: nn.Module) -> nn.Module:
        """The merge loaded into a copy of ``skeleton`` (a module of the output's class and
        config, e.g. :func:`output_skeleton`); tied names get their stored tensor."""
        merged = dict(self.tensors())
        merged.update({alias: merged[name] for alias, name in self.aliases.items()})
        out = copy.deepcopy(skeleton)
        out.load_state_dict(merged)
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
    seed: int = 0,
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
        seed: seeds ``dare_*`` pruning.

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
    settings = [parameters or {}, *(model_parameters or [])]
    for mapping in settings:
        for key, setting in mapping.items():
            try:
                check_setting(setting)
            except ValueError as e:
                raise MergeParameterError(f"parameter {key!r}: {e}") from None
    bases = {a.basis for a in alignments} or {"permutation"}
    if len(bases) > 1:
        raise ValueError(f"the alignments map into different bases {sorted(bases)}; align every model one way")
    basis = bases.pop()
    identity = basis_identity(reference, basis)
    infos = reference.infos()
    config = reference.config
    if basis == "rotation":
        names, aliases = identity.names(reference), {}
        config = copy.deepcopy(config)
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    else:
        names, aliases = reference.stored(), dict(reference.aliases)
    merged_names = [n for n in names if n in identity.spec.tensors]
    for pattern, key in filters(settings).items():
        if not any(pattern in n for n in merged_names):
            raise MergeParameterError(
                f"filter {pattern!r} of parameter {key!r} matches no tensor of {reference.label} (its names look "
                f"like {', '.join(merged_names[:3])}); fix the filter or remove that entry")
    return MergedModel(
        basis=basis, spec=identity.spec, names=names, aliases=aliases, layout={n: infos[n] for n in names}, config=config,
        reference=identity.tensors(reference), models=[a.tensors(m) for a, m in zip(alignments, models)],
        base=None if base is None else basis_identity(base, basis).tensors(base), method=method,
        model_parameters=model_parameters, parameters=parameters, seed=seed, device=reference.device,
    )
