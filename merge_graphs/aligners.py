"""Aligners by name: how model B is mapped onto model A, behind one contract.

Each :class:`Aligner` takes the two models as :class:`~merge_graphs.sources.TensorSource` s and
returns an :class:`~merge_graphs.match.Alignment` (whose ``tensor`` maps one tensor at a time,
whatever it holds: permutations, folded norms, a residual rotation, within-head maps). It
declares whether it runs forward passes (``needs_models``: then the sources are models in
memory, :class:`~merge_graphs.sources.StateTensors`) or reads weights only (then it streams
from lazily opened checkpoints as well). Callers look aligners up here; none tests for a kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_graphs.activations import activation_matching
from merge_graphs.errors import UnsupportedArchitectureError
from merge_graphs.gnn.alignment import gnn_align
from merge_graphs.gnn.encoder import GraphEncoder
from merge_graphs.learned import learned_alignment, learned_permutations
from merge_graphs.match import Alignment, weight_matching
from merge_graphs.rotation import admits_rotation, folded_identity, rotation_alignment
from merge_graphs.sources import TensorSource
from merge_graphs.symmetry import SymmetrySpec, identity_permutations

logger = logging.getLogger(__name__)

#: How the residual stream may be aligned.
RESIDUALS = ("permutation", "rotation")
#: :attr:`Aligner.basis` of an aligner whose basis is the family's: ``"rotation"`` where the spec admits a
#: residual rotation (pre-norm transformers), ``"permutation"`` otherwise (post-LayerNorm encoders).
FAMILY = "family"


@dataclass
class AlignOptions:
    """What every aligner may read; each reads what applies to it.

    Attributes:
        residual: ``"permutation"`` or ``"rotation"`` (norms folded, the residual stream rotated).
        solver: the assignment solver (:func:`merge_graphs.match.solve`).
        groups: the root groups to match (None: all).
        seed: the visiting order of weight matching.
        refine: after activation or GNN matching, weight matching started from it.
        calibration: model inputs (``input_ids`` ...) for aligners that run forward passes.
        learn: settings of :func:`merge_graphs.learned.learned_alignment` (pre-norm families) or
            :func:`merge_graphs.learned.learned_permutations` (post-LayerNorm encoders).
        mask_token_id: the tokenizer's mask token, for a masked-LM loss (None: unknown).
        encoder: the graph encoder of GNN matching (None: the shipped, pretrained one).
    """

    residual: str = "permutation"
    solver: str = "exact"
    groups: list[str] | None = None
    seed: int = 0
    refine: bool = False
    calibration: Mapping[str, torch.Tensor] | None = None
    learn: Mapping[str, Any] = field(default_factory=dict)
    mask_token_id: int | None = None
    encoder: GraphEncoder | None = None


@dataclass(frozen=True)
class Aligner:
    """A registered alignment method.

    Attributes:
        name: the name recipes and the API use, e.g. ``"weight"``.
        needs_models: whether it runs forward passes on whole models (then it cannot stream).
        residuals: the residual alignments it supports.
        basis: the basis it merges in: a fixed one (``"permutation"`` or ``"rotation"``),
            :data:`FAMILY`: the one the family admits (learned alignment: a rotation for pre-norm
            transformers, permutations for post-LN encoders), or None: the one ``residual`` names.
        fn: ``fn(a, b, spec, options) -> Alignment``.
    """

    name: str
    needs_models: bool
    residuals: tuple[str, ...]
    basis: str | None
    fn: Callable[[TensorSource, TensorSource, SymmetrySpec, AlignOptions], Alignment]

    def __call__(self, a: TensorSource, b: TensorSource, spec: SymmetrySpec, options: AlignOptions) -> Alignment:
        """Align ``b`` to ``a`` (sources sharing ``spec``)."""
        self.check(spec)
        if options.residual not in self.residuals:
            raise ValueError(f"align method {self.name!r} aligns the residual stream by "
                             f"{' or '.join(self.residuals)}, not {options.residual!r}")
        return self.fn(a, b, spec, options)

    def check(self, spec: SymmetrySpec) -> None:
        """Raise :class:`UnsupportedArchitectureError` if ``spec`` (an architecture without a spec
        of its own) cannot be aligned this way; only ``none`` aligns every architecture."""
        if spec.unaligned is not None and self.name != "none":
            raise UnsupportedArchitectureError(
                f"{spec.unaligned} Alignment is unavailable for {spec.family} until it has a spec; it merges "
                "without alignment (align: {method: none}, or a mergekit recipe)")

    def merge_basis(self, residual: str = "permutation", spec: SymmetrySpec | None = None) -> str:
        """The basis this aligner's alignments of models with ``spec`` map into, asked for ``residual``."""
        if self.basis == FAMILY:
            if spec is None:
                raise ValueError(f"align method {self.name!r} merges in the basis the family admits: give the spec")
            return "rotation" if admits_rotation(spec) else "permutation"
        return self.basis or residual


ALIGNERS: dict[str, Aligner] = {}


def register_aligner(name: str, *, needs_models: bool, residuals: tuple[str, ...] = ("permutation",),
                     basis: str | None = None) -> Callable:
    """Decorator adding an aligner to :data:`ALIGNERS` under ``name``."""

    def decorator(fn):
        if name in ALIGNERS:
            raise ValueError(f"aligner {name!r} is already registered; pick another name")
        ALIGNERS[name] = Aligner(name, needs_models, residuals, basis, fn)
        return fn

    return decorator


def get_aligner(name: str) -> Aligner:
    """The aligner called ``name``; ValueError listing the known ones if none."""
    if name not in ALIGNERS:
        raise ValueError(f"unknown alignment method {name!r}; choose one of {', '.join(ALIGNERS)}")
    return ALIGNERS[name]


def align_sources(
    reference: TensorSource,
    models: Sequence[TensorSource],
    method: str,
    spec: SymmetrySpec,
    options: AlignOptions,
    *,
    progress: bool = False,
) -> list[Alignment]:
    """Align each of ``models`` to ``reference`` (the reference itself gets :func:`basis_identity`).

    ``spec`` is the spec they share (:func:`merge_graphs.sources.compatible`). Nothing is checked
    here; see :func:`merge_graphs.verify.check_alignment`.
    """
    from tqdm.auto import tqdm

    aligner = get_aligner(method)
    out = []
    for model in tqdm(models, desc="aligning", disable=not progress or len(models) < 2):
        if model is reference:
            out.append(basis_identity(reference, aligner.merge_basis(options.residual, spec)))
            continue
        alignment = aligner(reference, model, spec, options)
        logger.info("aligned %s (%s): objective %.4g -> %.4g in %.1fs", model.label, alignment.method,
                    alignment.objective_before, alignment.objective_after, alignment.seconds)
        out.append(alignment)
    return out


def basis_identity(source: TensorSource, basis: str = "permutation") -> Alignment:
    """The alignment of a model with itself in ``basis``: as it is, or with its norms folded."""
    if basis == "rotation":
        return folded_identity(source)
    if basis != "permutation":
        raise ValueError(f"unknown basis {basis!r}; choose one of {RESIDUALS}")
    return Alignment(source.spec(), {}, "none")


def _require_calibration(options: AlignOptions, method: str) -> Mapping[str, torch.Tensor]:
    if options.calibration is None:
        raise ValueError(f"{method} alignment needs calibration inputs: pass calibration=... (a tensor, a dict of "
                         "model inputs, or texts with tokenizer=...), or use method='weight'")
    return options.calibration


@register_aligner("none", needs_models=False)
def _none(a: TensorSource, b: TensorSource, spec: SymmetrySpec, options: AlignOptions) -> Alignment:
    """The models as they are (mergekit's merges)."""
    return Alignment(spec, identity_permutations(spec), "none")


@register_aligner("weight", needs_models=False, residuals=RESIDUALS)
def _weight(a: TensorSource, b: TensorSource, spec: SymmetrySpec, options: AlignOptions) -> Alignment:
    """Git Re-Basin weight matching; with a rotated residual stream, orthogonal weight matching."""
    if options.residual == "rotation":
        return rotation_alignment(a, b, solver=options.solver, groups=options.groups, seed=options.seed)
    return weight_matching(spec, a, b, solver=options.solver, groups=options.groups, seed=options.seed)


@register_aligner("gnn", needs_models=False, residuals=RESIDUALS)
def _gnn(a: TensorSource, b: TensorSource, spec: SymmetrySpec, options: AlignOptions) -> Alignment:
    """The pretrained GNN's node embeddings matched (then weight matching, with ``refine``); with a rotated
    residual stream, orthogonal weight matching started from the GNN's permutations of the other groups."""
    return gnn_align(a, b, spec, refine=options.refine, residual=options.residual, encoder=options.encoder,
                     solver=options.solver, groups=options.groups, seed=options.seed)


@register_aligner("activation", needs_models=True, residuals=RESIDUALS)
def _activation(a: TensorSource, b: TensorSource, spec: SymmetrySpec, options: AlignOptions) -> Alignment:
    """Correlation of activations on calibration inputs (a rotation: Procrustes on residual activations)."""
    inputs = _require_calibration(options, "activation")
    if options.residual == "rotation":
        return rotation_alignment(a.model, b.model, calibration=inputs, solver=options.solver, groups=options.groups,
                                  seed=options.seed)
    found = activation_matching(spec, a.model, b.model, inputs, solver=options.solver, seed=options.seed)
    if not options.refine:
        return found
    refined = weight_matching(spec, a, b, init=found.permutations, solver=options.solver, groups=options.groups,
                              seed=options.seed)
    refined.method, refined.seconds = "activation+weight", refined.seconds + found.seconds
    return refined


@register_aligner("learned", needs_models=True, residuals=RESIDUALS, basis=FAMILY)
def _learned(a: TensorSource, b: TensorSource, spec: SymmetrySpec, options: AlignOptions) -> Alignment:
    """A data-free start, then refined on the interpolated models' loss: the residual rotation (and
    within-head maps) of pre-norm families, the permutations (straight-through) of post-LN encoders."""
    inputs = _require_calibration(options, "learned")
    settings = {k: v for k, v in options.learn.items() if v is not None}
    if admits_rotation(spec) or options.residual == "rotation":
        # A family without the symmetry refuses in rotation_alignment, saying why.
        return learned_alignment(a.model, b.model, inputs, solver=options.solver, groups=options.groups,
                                 seed=options.seed, **settings)
    settings.setdefault("mask_token_id", options.mask_token_id)
    return learned_permutations(a.model, b.model, inputs, solver=options.solver, groups=options.groups,
                                seed=options.seed, **settings)
