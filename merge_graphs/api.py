"""The public Python API. The CLI is a thin layer over these functions; nothing here prints.

Every function here is the one engine seen from models in memory: models become
:class:`~merge_graphs.sources.StateTensors`, are aligned by an aligner of
:mod:`merge_graphs.aligners` and merged by :mod:`merge_graphs.engine`'s loop, as a recipe's
checkpoints are.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from merge_graphs.activations import Calibration, prepare_inputs
from merge_graphs.aligners import AlignOptions, align_sources, get_aligner
from merge_graphs.engine import plan_merge
from merge_graphs.gnn.encoder import GraphEncoder
from merge_graphs.gnn.pretrained import load_encoder
from merge_graphs.graph import NeuralGraph
from merge_graphs.match import Alignment
from merge_graphs.methods import get_method
from merge_graphs.rotation import folded_model
from merge_graphs.sources import StateTensors, compatible, module_tensors
from merge_graphs.symmetry import SymmetrySpec, permute_state_dict, symmetry_spec
from merge_graphs.verify import check_alignment


def permute(model: nn.Module, permutations: Mapping[str, torch.Tensor], spec: SymmetrySpec | None = None) -> nn.Module:
    """A new model computing the same function, with its hidden units permuted.

    Args:
        model: a supported transformers model or ``nn.Sequential``; it is not modified.
        permutations: ``{group: LongTensor}`` as from :func:`random_permutations`; groups left
            out stay in place.
        spec: the model's spec, if already computed.

    Outputs that live in a permuted group (a bare encoder's ``last_hidden_state`` in the
    residual stream, see ``spec.outputs``) come out permuted the same way; every other output
    is unchanged.

    Example:
        >>> import torch, merge_graphs
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> perms = merge_graphs.random_permutations(merge_graphs.symmetry_spec(mlp), seed=0)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(mlp(x), merge_graphs.permute(mlp, perms)(x), atol=1e-6)
        True
    """
    spec = spec or symmetry_spec(model)
    return load_state(model, permute_state_dict(spec, model.state_dict(), permutations))


def neural_graph(model: nn.Module, spec: SymmetrySpec | None = None) -> NeuralGraph:
    """The neural graph of a model: units as nodes, weights as typed edge blocks.

    The graph references the model's tensors; it copies no weights.

    Example:
        >>> import torch, merge_graphs
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> g = merge_graphs.neural_graph(mlp)
        >>> g.num_nodes, g.num_edges
        (14, 48)
    """
    spec = spec or symmetry_spec(model)
    return NeuralGraph(spec, model.state_dict())


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    method: str = "weight",
    *,
    solver: str = "exact",
    refine: bool = False,
    calibration: Calibration | None = None,
    tokenizer: Any = None,
    groups: list[str] | None = None,
    residual: str = "permutation",
    seed: int = 0,
    learn: Mapping[str, Any] | None = None,
    encoder: GraphEncoder | str | os.PathLike | None = None,
) -> Alignment:
    """Find the permutation of ``model_b``'s units that best matches ``model_a``'s.

    Args:
        model_a: the reference model.
        model_b: a model of the same architecture and size, e.g. trained from another seed.
        method: ``"weight"`` (data-free Git Re-Basin weight matching), ``"activation"``
            (correlation of activations on ``calibration``), ``"gnn"`` (data-free: similarity of
            the pretrained GNN's node embeddings, attention heads as blocks) or ``"none"``.
        solver: ``"exact"``, ``"emd"`` or ``"sinkhorn"`` (see :func:`merge_graphs.match.solve`).
        refine: after activation or GNN matching, refine with weight matching started from it.
        calibration: inputs for activation matching: a tensor, a dict of model inputs, or a
            list of texts (with ``tokenizer``).
        tokenizer: the reference model's tokenizer, for calibration texts.
        groups: match only these root groups (and their children); others stay in place.
        residual: ``"permutation"``, or ``"rotation"`` for pre-norm models (GPT-2, Llama family):
            fold the norms and align the residual stream with an orthogonal map (Procrustes on the
            embeddings, or on residual activations with ``method="activation"``), alternated with
            permutations of the other groups. Returns a
            :class:`~merge_graphs.rotation.RotationAlignment`; merge its ``apply(b)`` with A folded.
        seed: seed for the order in which weight matching visits groups.
        learn: for ``method="learned"``, which merges in the basis the family admits. Pre-norm
            causal LMs (a rotation): settings of :func:`merge_graphs.learned.learned_alignment`
            (``steps``, ``lr``, ``batch_size``, ``heads``); it starts from the data-free rotation
            alignment and learns B's residual map (and with ``heads``, within-head maps) on the
            loss of the interpolated models on ``calibration`` texts. Post-LayerNorm encoders
            (BERT, RoBERTa: permutations): settings of
            :func:`merge_graphs.learned.learned_permutations` (``steps``, ``lr``, ``batch_size``,
            ``tau``); it starts from weight matching and learns the permutations by a
            straight-through estimator on the task head's loss when ``calibration`` is a dict
            with ``labels``, else on the masked-LM loss (a ``...ForMaskedLM``; the mask token is
            ``tokenizer``'s when given).
        encoder: for ``method="gnn"``, the graph encoder (or a folder of its weights, as
            ``merge-graphs pretrain-gnn`` writes them); default the pretrained one that ships.

    Example:
        >>> import torch, merge_graphs
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> b = merge_graphs.permute(a, merge_graphs.random_permutations(merge_graphs.symmetry_spec(a), seed=1))
        >>> alignment = merge_graphs.align(a, b)
        >>> torch.equal(merge_graphs.permute(b, alignment.permutations)[0].weight, a[0].weight)
        True
    """
    aligner = get_aligner(method)
    source_a, source_b = StateTensors(model_a), StateTensors(model_b)
    spec = compatible(source_a, [source_b])
    if encoder is not None and method != "gnn":
        raise ValueError(f"encoder= is the GNN's (method='gnn'); method {method!r} uses none: leave encoder out")
    if encoder is not None and not isinstance(encoder, GraphEncoder):
        encoder = load_encoder(encoder)
    return aligner(source_a, source_b, spec, _options(model_a, residual, solver, groups, seed, refine, calibration,
                                                          tokenizer, learn, encoder))


def _options(model, residual, solver, groups, seed, refine, calibration, tokenizer, learn,
             encoder=None) -> AlignOptions:
    if residual not in ("permutation", "rotation"):
        raise ValueError(f"unknown residual alignment {residual!r}; choose 'permutation' or 'rotation'")
    inputs = None
    if calibration is not None:
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in prepare_inputs(calibration, tokenizer).items()}
    return AlignOptions(residual=residual, solver=solver, groups=groups, seed=seed, refine=refine, calibration=inputs,
                        learn=dict(learn or {}), mask_token_id=getattr(tokenizer, "mask_token_id", None),
                        encoder=encoder)


def aligned_model(model: nn.Module, alignment: Alignment, *, verify: bool = True) -> nn.Module:
    """A new model computing what ``model`` computes, in the basis ``alignment`` maps it into
    (for a rotation: norms folded, head untied); with ``verify``, checked on a random input.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.api import aligned_model
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> b = merge_graphs.permute(a, merge_graphs.random_permutations(merge_graphs.symmetry_spec(a), seed=1))
        >>> torch.equal(aligned_model(b, merge_graphs.align(a, b))[0].weight, a[0].weight)
        True
    """
    source = StateTensors(model)
    if verify:
        check_alignment(source, alignment)
    return load_state(output_skeleton(model, alignment.basis), alignment.apply(source))


def merge_models(
    models: Sequence[nn.Module],
    method: str = "linear",
    align: str = "weight",
    *,
    weights: Sequence[float] | None = None,
    base_model: nn.Module | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    solver: str = "exact",
    residual: str = "permutation",
    calibration: Calibration | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    verify: bool = True,
    learn: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Align every model to a reference, then merge them tensor by tensor.

    The same steps as :func:`align_models` then :func:`merge_aligned`.

    The reference is ``base_model`` if given, else ``models[0]``; the result is a new model of
    the reference's class, in the reference's unit order. Methods that take a base
    (:attr:`~merge_graphs.methods.MergeMethod.base`: ``task_arithmetic``, ``ties``, ``slerp`` ...;
    optionally ``nuslerp``, ``multislerp``) take it from ``base_model``, as in mergekit;
    ``linear`` averages ``models`` only.

    Args:
        models: the models to merge (a base model listed here too is ignored for methods
            that take a base, as mergekit does).
        method: a merge method of :mod:`merge_graphs.methods`.
        align: ``"weight"``, ``"activation"``, ``"gnn"``, ``"learned"`` or ``"none"`` (plain
            mergekit-style merging).
        weights: one weight per model (mergekit's ``weight``); 1.0 each by default.
        base_model: the base for task-vector methods, and the reference for alignment.
        parameters: the method's global parameters, e.g. ``{"t": 0.5}`` for slerp.
        model_parameters: per-model parameters, e.g. ``[{"density": 0.5}, ...]``.
        solver, residual, calibration, tokenizer, learn: as in :func:`align`. With
            ``residual="rotation"`` (or ``align="learned"`` on a pre-norm LM) the result is the
            reference's class with folded norms.
        seed: seeds the alignment's visiting order and ``dare_*`` pruning.
        verify: check every alignment preserves its model's function before merging.

    Example:
        >>> import torch, merge_graphs
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> b = merge_graphs.permute(a, merge_graphs.random_permutations(merge_graphs.symmetry_spec(a), seed=1))
        >>> merged = merge_graphs.merge_models([a, b], method="linear", align="weight")
        >>> torch.allclose(merged[0].weight, a[0].weight)
        True
    """
    if not models:
        raise ValueError("merge_models needs at least one model")
    reference = base_model if base_model is not None else models[0]
    policy = get_method(method).base
    if policy == "required" and base_model is None:
        raise ValueError(f"merge method {method!r} needs a base: pass base_model=...")
    if weights is not None and len(weights) != len(models):
        raise ValueError(f"got {len(weights)} weights for {len(models)} models; give one weight per model")
    per_model = list(model_parameters) if model_parameters is not None else [{} for _ in models]
    if weights is not None or "weight" in get_method(method).model_parameters:
        per_model = [{"weight": 1.0 if weights is None else weights[i], **p} for i, p in enumerate(per_model)]
    takes_base = policy != "none" and base_model is not None
    keep = [i for i, m in enumerate(models) if not (takes_base and m is base_model)]
    merged_models = [models[i] for i in keep]
    alignments = align_models(reference, merged_models, align, residual=residual, solver=solver,
                              calibration=calibration, tokenizer=tokenizer, seed=seed, verify=verify, learn=learn)
    return merge_aligned(reference, merged_models, alignments, method, base_model=base_model if takes_base else None,
                         model_parameters=[per_model[i] for i in keep], parameters=parameters, seed=seed)


def merge_aligned(
    reference: nn.Module,
    models: Sequence[nn.Module],
    alignments: Sequence[Alignment],
    method: str = "linear",
    *,
    base_model: nn.Module | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Merge ``models``, each mapped onto ``reference`` by its alignment, into a new model.

    The merge happens in the basis the alignments map into (:attr:`Alignment.basis`; for
    ``"rotation"``: every model's norms folded), and the result is :func:`output_skeleton`'s class
    and config, e.g. with its head untied in the folded basis. The same loop as a recipe's
    (:func:`merge_graphs.engine.plan_merge`).
    """
    sources = {id(m): StateTensors(m) for m in (reference, *models, *([base_model] if base_model is not None else []))}
    merged = plan_merge(
        sources[id(reference)], [sources[id(m)] for m in models], alignments, method,
        base=None if base_model is None else sources[id(base_model)],
        model_parameters=model_parameters, parameters=parameters, seed=seed,
    )
    return merged.into(output_skeleton(reference, merged.basis))


def output_skeleton(reference: nn.Module, basis: str = "permutation") -> nn.Module:
    """The model class and config a merge in ``basis`` is written as: the reference, folded for rotations."""
    return folded_model(reference) if basis == "rotation" else reference


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``state`` (named as the model's state dict or as its checkpoint stores it)."""
    out = copy.deepcopy(model)
    out.load_state_dict(dict(module_tensors(out, state)))
    return out


def align_models(
    reference: nn.Module,
    models: Sequence[nn.Module],
    method: str = "weight",
    *,
    verify: bool = True,
    progress: bool = False,
    residual: str = "permutation",
    solver: str = "exact",
    refine: bool = False,
    calibration: Calibration | None = None,
    tokenizer: Any = None,
    groups: list[str] | None = None,
    seed: int = 0,
    learn: Mapping[str, Any] | None = None,
) -> list[Alignment]:
    """Align each of ``models`` to ``reference`` (the reference itself gets the identity, in the
    basis the method merges in).

    Keyword arguments are those of :func:`align`. With ``verify``, each alignment is checked to
    leave its model's function unchanged on a small random input
    (:func:`merge_graphs.verify.check_alignment`).
    """
    source = StateTensors(reference)
    sources = [source if m is reference else StateTensors(m) for m in models]
    spec = compatible(source, sources)
    options = _options(reference, residual, solver, groups, seed, refine, calibration, tokenizer, learn)
    alignments = align_sources(source, sources, method, spec, options, progress=progress)
    if verify:
        for m, alignment in zip(sources, alignments):
            if alignment.method != "none":
                check_alignment(m, alignment)
    return alignments
