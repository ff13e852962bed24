"""The generalized task arithmetic family (mergekit's ``generalized_task_arithmetic.py``):
``base + lambda * mix`` of the deltas ``t_i - base``, each optionally sparsified
(:mod:`merge_graphs.methods.sparsify`), mixed with or without TIES sign consensus.

========================  ==============  ==================  =========  =======
method                    pruning         sign consensus      normalize  rescale
========================  ==============  ==================  =========  =======
``task_arithmetic``       none            no                  false      false
``ties``                  magnitude       yes                 true       false
``dare_linear``           random          no                  false      true
``dare_ties``             random          yes                 false      true
``breadcrumbs``           outliers        no                  false      false
``breadcrumbs_ties``      outliers        yes                 false      false
``della_linear``          ranked random   no                  false      true
``della``                 ranked random   yes                 true       true
========================  ==============  ==================  =========  =======
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merge_graphs.methods.registry import METHODS, per_model, register
from merge_graphs.methods.sparsify import (
    della_cut,
    della_prune,
    magnitude_cut,
    magnitude_prune,
    outlier_cut,
    outlier_prune,
    random_cut,
    random_prune,
)


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES' elect step on deltas stacked along dim 0 (already weighted): where each agrees in
    sign with their sum (a zero sum counts as positive; a zero delta never agrees)."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return weighted.sign() == majority


def combine_deltas(deltas: Sequence[Tensor], base: Tensor, model_parameters: Sequence[Mapping[str, Any]],
                   parameters: Mapping[str, Any], *, consensus: bool) -> Tensor:
    """The task-arithmetic family's elementwise second half: ``base + lambda * mix`` of the
    (pruned) ``deltas``, with TIES sign consensus if ``consensus``. Rows of a tensor combine
    as the whole does.

    With ``consensus``, an entry keeps only the weighted deltas whose sign matches the sign of
    their sum, and ``normalize`` divides by the summed weights of exactly those models. The
    arithmetic runs in the deltas' dtype, weights included, as mergekit's does.
    """
    deltas = torch.stack(list(deltas))
    weights = per_model([p["weight"] for p in model_parameters], deltas)
    weighted = deltas * weights
    if consensus:
        agree = sign_consensus(weighted)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        # where no model survives, mixed is 0 and the base stays
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if parameters["normalize"]:
        mixed = mixed / divisor
    if parameters["lambda"] != 1:
        mixed = mixed * parameters["lambda"]
    return base + mixed


def _generalized_task_arithmetic(prune: Callable[..., Tensor] | None, consensus: bool,
                                 extra: str | None = None) -> Callable[..., Tensor]:
    def merge(tensors, base, model_parameters, parameters, generator):
        if not tensors:
            return base
        deltas = []
        for t, p in zip(tensors, model_parameters):
            delta = t - base
            if prune is not None:
                more = {} if extra is None else {extra: p[extra]}
                delta = prune(delta, p["density"], parameters["rescale"], generator=generator, **more)
            deltas.append(delta)
        return combine_deltas(deltas, base, model_parameters, parameters, consensus=consensus)

    return merge


def _pruned_rows(prune: str, consensus: bool) -> Callable[..., Iterator[Tensor]]:
    """The :attr:`~merge_graphs.methods.registry.MergeMethod.rows` of the pruning methods: each
    delta's cut first (``"magnitude"``, ``"outliers"``: the kept window of magnitudes, from one
    float32 copy of them; ``"random"``, ``"della"``: the L1 rescale, drawing the mask once to
    measure it), then the pruned deltas of each block combined (sign consensus is elementwise).
    DELLA ranks a vector as a whole, so a vector is pruned whole and its blocks sliced from it."""

    def rows(tensors, base, model_parameters, parameters, generator, blocks):
        if prune == "della" and base.dim() < 2:
            merged = METHODS[_DELLA[consensus]].fn(tensors, base, model_parameters, parameters, generator)
            yield from (merged[b] for b in blocks)
            return
        cuts = []
        for t, p in zip(tensors, model_parameters):
            def deltas(t=t):
                return (t[b] - base[b] for b in blocks)

            rescale = parameters["rescale"]
            if p["density"] >= 1:
                cuts.append(None)
            elif prune == "magnitude":
                cuts.append(magnitude_cut(deltas, t.numel(), p["density"], rescale))
            elif prune == "outliers":
                cuts.append(outlier_cut(deltas, t.numel(), p["density"], p["gamma"], rescale))
            elif prune == "random":
                cuts.append(random_cut(deltas, p["density"], rescale, generator))
            else:
                cuts.append(della_cut(deltas, p["density"], p["epsilon"], rescale, generator))
        offset = [0] * len(tensors)
        for b in blocks:
            if not tensors:
                yield base[b]
                continue
            pruned = []
            for i, t in enumerate(tensors):
                delta = t[b] - base[b]
                if cuts[i] is not None:
                    delta, n = cuts[i].apply(delta, offset[i])
                    offset[i] += n
                pruned.append(delta)
            yield combine_deltas(pruned, base[b], model_parameters, parameters, consensus=consensus)

    return rows


_DELLA = {True: "della", False: "della_linear"}


def _parameters(normalize: bool, rescale: bool) -> dict[str, Any]:
    # int8_mask only changes the dtype of mergekit's sign mask; accepted so recipes carry over
    return {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}


# density is declared for every method of the family, as in mergekit, though only the pruning
# methods read it
_MODEL = {"weight": None, "density": 1.0}
#: Model Breadcrumbs' share of the largest magnitudes dropped, per model.
BREADCRUMBS_MODEL = {**_MODEL, "gamma": 0.01}
#: DELLA's spread of keep probabilities around density, per model.
DELLA_MODEL = {**_MODEL, "epsilon": 0.15}


def _add(name: str, *, normalize: bool, rescale: bool, model: Mapping[str, Any], prune=None, consensus: bool,
         extra: str | None = None, rows=None, random: bool = False) -> None:
    fn = _generalized_task_arithmetic(prune, consensus, extra)
    fn.__name__ = fn.__qualname__ = name
    register(name, base="required", global_parameters=_parameters(normalize, rescale), model_parameters=model,
             rows=rows, random=random)(fn)


_add("task_arithmetic", normalize=False, rescale=False, model=_MODEL, consensus=False, rows="elementwise")
_add("ties", normalize=True, rescale=False, model=_MODEL, prune=magnitude_prune, consensus=True,
     rows=_pruned_rows("magnitude", consensus=True))
_add("dare_linear", normalize=False, rescale=True, model=_MODEL, prune=random_prune, consensus=False,
     rows=_pruned_rows("random", consensus=False), random=True)
_add("dare_ties", normalize=False, rescale=True, model=_MODEL, prune=random_prune, consensus=True,
     rows=_pruned_rows("random", consensus=True), random=True)
_add("breadcrumbs", normalize=False, rescale=False, model=BREADCRUMBS_MODEL, prune=outlier_prune, consensus=False,
     extra="gamma", rows=_pruned_rows("outliers", consensus=False))
_add("breadcrumbs_ties", normalize=False, rescale=False, model=BREADCRUMBS_MODEL, prune=outlier_prune,
     consensus=True, extra="gamma", rows=_pruned_rows("outliers", consensus=True))
_add("della", normalize=True, rescale=True, model=DELLA_MODEL, prune=della_prune, consensus=True, extra="epsilon",
     rows=_pruned_rows("della", consensus=True), random=True)
_add("della_linear", normalize=False, rescale=True, model=DELLA_MODEL, prune=della_prune, consensus=False,
     extra="epsilon", rows=_pruned_rows("della", consensus=False), random=True)
