"""The public Python API. The CLI is a thin layer over these functions; nothing here prints."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from merge_graphs.activations import Calibration, activation_matching, prepare_inputs
from merge_graphs.errors import SpecMismatchError
from merge_graphs.graph import NeuralGraph
from merge_graphs.learned import learned_alignment
from merge_graphs.match import Alignment, weight_matching
from merge_graphs.methods import get_method, merge_tensors
from merge_graphs.rotation import rotation_alignment
from merge_graphs.symmetry import SymmetrySpec, identity_permutations, permute_state_dict, symmetry_spec
from merge_graphs.verify import check_function_preserved

logger = logging.getLogger(__name__)

ALIGN_METHODS = ("none", "weight", "activation", "gnn", "learned")


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
    return _with_state(model, permute_state_dict(spec, model.state_dict(), permutations))


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
        learn: for ``method="learned"`` (pre-norm causal LMs; implies ``residual="rotation"``):
            settings of :func:`merge_graphs.learned.learned_alignment` (``steps``, ``lr``,
            ``batch_size``, ``heads``). It starts from the data-free rotation alignment and learns
            B's residual map (and with ``heads``, within-head maps) on the loss of the
            interpolated models on ``calibration`` texts.

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
    spec = compatible_spec(model_a, model_b)
    if residual == "rotation" or method == "learned":
        return _rotation_alignment(model_a, model_b, method, solver=solver, calibration=calibration,
                                   tokenizer=tokenizer, groups=groups, seed=seed, learn=learn)
    if residual != "permutation":
        raise ValueError(f"unknown residual alignment {residual!r}; choose 'permutation' or 'rotation'")
    if method == "none":
        return Alignment(spec, identity_permutations(spec), "none")
    if method == "weight":
        return weight_matching(spec, model_a.state_dict(), model_b.state_dict(), solver=solver, groups=groups, seed=seed)
    if method == "gnn":
        from merge_graphs.gnn.match import gnn_align

        return gnn_align(model_a, model_b, spec, refine=refine, solver=solver, groups=groups, seed=seed)
    if method == "activation":
        _require_calibration(calibration)
        inputs = _to_device(prepare_inputs(calibration, tokenizer), model_a)
        found = activation_matching(spec, model_a, model_b, inputs, solver=solver, seed=seed)
        if refine:
            refined = weight_matching(spec, model_a.state_dict(), model_b.state_dict(), init=found.permutations,
                                      solver=solver, groups=groups, seed=seed)
            refined.method, refined.seconds = "activation+weight", refined.seconds + found.seconds
            return refined
        return found
    raise ValueError(f"unknown alignment method {method!r}; choose one of {ALIGN_METHODS}")


def _require_calibration(calibration, method: str = "activation") -> None:
    if calibration is None:
        raise ValueError(f"{method} alignment needs calibration inputs: pass calibration=... (a tensor, "
                         "a dict of model inputs, or texts with tokenizer=...), or use method='weight'")


def _rotation_alignment(model_a, model_b, method, *, solver, calibration, tokenizer, groups, seed,
                        learn) -> Alignment:
    if method not in ("weight", "activation", "learned"):
        raise ValueError(f"residual='rotation' works with method 'weight' (data-free), 'activation' or 'learned', "
                         f"not {method!r}")
    inputs = None
    if method in ("activation", "learned"):
        _require_calibration(calibration, method)
        inputs = _to_device(prepare_inputs(calibration, tokenizer), model_a)
    if method == "learned":
        return learned_alignment(model_a, model_b, inputs, solver=solver, groups=groups, seed=seed, **(learn or {}))
    return rotation_alignment(model_a, model_b, calibration=inputs, solver=solver, groups=groups, seed=seed)


def identity_alignment(model: nn.Module, residual: str = "permutation") -> Alignment:
    """The alignment of ``model`` with itself, in the basis that ``residual`` merges in."""
    if residual == "rotation":
        from merge_graphs.rotation import identity_alignment as folded_identity

        return folded_identity(model)
    spec = symmetry_spec(model)
    return Alignment(spec, identity_permutations(spec), "none")




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

    The same steps as :func:`align_models` then :func:`merge_states`.

    The reference is ``base_model`` if given, else ``models[0]``; the result is a new model of
    the reference's class, in the reference's unit order. Methods that need a base
    (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``slerp``) take it from
    ``base_model``, as in mergekit; ``linear`` averages ``models`` only.

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
            ``residual="rotation"`` (or ``align="learned"``) the result is the reference's class
            with folded norms.
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
    needs_base = get_method(method).needs_base
    if needs_base and base_model is None:
        raise ValueError(f"merge method {method!r} needs a base: pass base_model=...")
    if weights is not None and len(weights) != len(models):
        raise ValueError(f"got {len(weights)} weights for {len(models)} models; give one weight per model")
    per_model = list(model_parameters) if model_parameters is not None else [{} for _ in models]
    if weights is not None or "weight" in get_method(method).model_parameters:
        per_model = [{"weight": 1.0 if weights is None else weights[i], **p} for i, p in enumerate(per_model)]
    keep = [i for i, m in enumerate(models) if not (needs_base and m is base_model)]
    merged_models = [models[i] for i in keep]
    residual = merge_basis(align, residual)
    alignments = align_models(reference, merged_models, align, residual=residual, solver=solver,
                              calibration=calibration, tokenizer=tokenizer, seed=seed, verify=verify, learn=learn)
    return merge_aligned(reference, merged_models, alignments, method, residual=residual,
                         base_model=base_model if needs_base else None,
                         model_parameters=[per_model[i] for i in keep], parameters=parameters, seed=seed)


def merge_basis(method: str, residual: str = "permutation") -> str:
    """The basis an alignment method merges in: ``"rotation"`` (norms folded) or ``"permutation"``."""
    return "rotation" if method == "learned" else residual


def merge_aligned(
    reference: nn.Module,
    models: Sequence[nn.Module],
    alignments: Sequence[Alignment],
    method: str = "linear",
    *,
    residual: str = "permutation",
    base_model: nn.Module | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Merge ``models``, each mapped onto ``reference`` by its alignment, into a new model.

    The merge happens in the basis ``residual`` merges in (for ``"rotation"``: every model's
    norms folded), and the result is :func:`output_skeleton`'s class and config. A tensor that
    the *output* model holds under two names (a tied LM head) is merged once; in the folded basis
    the head is untied, so it is merged on its own.
    """
    basis = identity_alignment(reference, residual)
    skeleton = output_skeleton(reference, residual)
    merged = merge_states(
        basis.spec, basis.apply(reference.state_dict()),
        [a.apply(m.state_dict()) for a, m in zip(alignments, models)], method,
        base_state=basis.apply(base_model.state_dict()) if base_model is not None else None,
        model_parameters=model_parameters, parameters=parameters, seed=seed,
        tied=tied_names(skeleton.state_dict()),
    )
    return _with_state(skeleton, merged)


def output_skeleton(reference: nn.Module, residual: str = "permutation") -> nn.Module:
    """The model class and config a merge is written as: the reference, folded for rotations."""
    if residual == "rotation":
        from merge_graphs.rotation import folded_model

        return folded_model(reference)
    return reference


def align_models(
    reference: nn.Module,
    models: Sequence[nn.Module],
    method: str = "weight",
    *,
    verify: bool = True,
    progress: bool = False,
    **kwargs: Any,
) -> list[Alignment]:
    """Align each of ``models`` to ``reference`` (the reference itself gets the identity).

    Keyword arguments are those of :func:`align`. With ``verify``, each permutation is checked
    to leave its model's function unchanged on a small random input.
    """
    from tqdm.auto import tqdm

    from merge_graphs.rotation import RotationAlignment

    out = []
    for m in tqdm(models, desc="aligning", disable=not progress or len(models) < 2):
        if m is reference:
            out.append(identity_alignment(reference, merge_basis(method, kwargs.get("residual", "permutation"))))
            continue
        alignment = align(reference, m, method, **kwargs)
        if verify and isinstance(alignment, RotationAlignment):
            alignment.apply(m, verify=True)
        elif verify and method != "none":
            check_function_preserved(m, _with_state(m, alignment.apply(m.state_dict())), alignment.spec,
                                     alignment.permutations)
        logger.info("aligned %s (%s): objective %.4g -> %.4g in %.1fs", type(m).__name__, alignment.method,
                    alignment.objective_before, alignment.objective_after, alignment.seconds)
        out.append(alignment)
    return out


def merge_states(
    spec: SymmetrySpec,
    reference: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    method: str = "linear",
    *,
    base_state: Mapping[str, torch.Tensor] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
    tied: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge aligned named tensors one name at a time.

    Tensors the spec does not label (integer ids, buffers) are copied from ``reference``.
    ``seed`` makes ``dare_*`` pruning reproducible. A tensor the model holds under two names (a
    head tied to the embedding; ``tied`` maps the second name to the first, by default found in
    ``reference`` by :func:`tied_names`) is merged once, as the streamed path merges it, so
    ``dare_*`` draws one mask for it.
    """
    device = next(iter(reference.values())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tied = tied_names(reference) if tied is None else tied
    merged: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        if name not in spec.tensors:
            merged[name] = ref.clone()
            continue
        if tied.get(name) in merged:
            merged[name] = merged[tied[name]]
            continue
        merged[name] = merge_tensors(
            method, [s[name] for s in states], base=None if base_state is None else base_state[name],
            model_parameters=model_parameters, parameters=parameters, generator=generator,
        )
    return merged


def tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{name: earlier name}`` for the names of ``state`` that hold the same tensor as an
    earlier one (a state dict's tied weights).

    Example:
        >>> import torch
        >>> w = torch.ones(2, 2)
        >>> tied_names({"embed": w, "norm": torch.ones(2), "head": w})
        {'head': 'embed'}
    """
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in state.items():
        if not t.numel():
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def compatible_spec(model_a: nn.Module, model_b: nn.Module) -> SymmetrySpec:
    """The spec two models share, or :class:`SpecMismatchError` naming the first difference."""
    spec_a, spec_b = symmetry_spec(model_a), symmetry_spec(model_b)
    if spec_a.family != spec_b.family:
        raise SpecMismatchError(f"cannot align a {spec_a.family} model with a {spec_b.family} model; "
                                "merge models of one architecture")
    for name, g in spec_a.groups.items():
        other = spec_b.groups.get(name)
        if other is None or other.size != g.size:
            raise SpecMismatchError(
                f"group {name!r} has {g.size} units in the first model and "
                f"{'none' if other is None else other.size} in the second; alignment needs models of "
                "the same size (for MLPs of different widths use merge_graphs.fusion)")
    shapes_a = {k: v.shape for k, v in model_a.state_dict().items()}
    shapes_b = {k: v.shape for k, v in model_b.state_dict().items()}
    if shapes_a != shapes_b:
        diff = sorted(set(shapes_a) ^ set(shapes_b)) or sorted(k for k in shapes_a if shapes_a[k] != shapes_b[k])
        raise SpecMismatchError(f"the models' tensors differ ({', '.join(diff[:3])}); merge models of one "
                                "architecture and size")
    return spec_a


def _with_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


def _to_device(inputs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
