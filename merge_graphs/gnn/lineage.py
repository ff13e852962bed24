"""Lineage: do two models share a base (fine-tunes of one model) or were they trained independently?

The score is the *matched mean cosine* of the two models' GNN node embeddings: each permuted node
set's embeddings centred and unit-normalized (:func:`~merge_graphs.gnn.alignment.pseudo_tensors`),
B's units matched to A's (:func:`~merge_graphs.gnn.alignment.gnn_matching`), and the matching
objective divided by the number of matched units. It is 1 for a model against itself, does not
change when either model's units are permuted (the matching undoes any permutation; up to the local
optima of the coordinate descent where groups are coupled: at most 0.004 measured on a tiny Llama
with grouped-query heads, exact on MLP, GPT-2 and BERT), and is high for a base and its fine-tunes,
lower for models trained from different initializations.

The verdict compares the score with a threshold that ships beside the GNN's weights
(``weights/lineage.json``), fitted by ``python -m merge_graphs.lab.gnn_lineage`` on the
pretraining zoo's training seeds and their fine-tunes and evaluated there on held-out seeds.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_graphs.errors import SpecMismatchError
from merge_graphs.gnn.alignment import gnn_matching, pseudo_tensors
from merge_graphs.gnn.embedding import Embeddings, default_encoder, embed
from merge_graphs.gnn.encoder import GraphEncoder
from merge_graphs.gnn.pretrained import WEIGHTS_DIR
from merge_graphs.symmetry.spec import SymmetrySpec, permuted

SAME_BASE = "same base"
INDEPENDENT = "independent"
DIFFERENT = "different architectures"


@dataclass(frozen=True)
class LineagePair:
    """One pair's answer: its ``score`` (matched mean cosine; ``nan`` when the two models'
    architectures differ) and ``verdict``: ``"same base"``, ``"independent"`` or
    ``"different architectures"``. ``cosines`` (:func:`matched_cosines`, ``None`` for different
    architectures) keeps the matching the score came from, so further pair statistics (the
    predicted barrier of :mod:`merge_graphs.gnn.mergeability`) need not match the units again."""

    a: str
    b: str
    score: float
    verdict: str
    cosines: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)


@functools.lru_cache(maxsize=4)
def lineage_threshold(folder: str | os.PathLike = WEIGHTS_DIR) -> float:
    """The score above which two models are said to share a base: ``threshold`` of
    ``weights/lineage.json``, written by ``python -m merge_graphs.lab.gnn_lineage`` (the json also
    records the command, the pairs it was fitted on and the held-out figures)."""
    return float(json.loads((Path(folder) / "lineage.json").read_text())["threshold"])


def comparable(emb_a: Embeddings, emb_b: Embeddings) -> bool:
    """Whether the two models' permuted node sets match one for one (same names and unit counts)."""
    def sizes(emb: Embeddings) -> dict[str, int]:
        return {name: len(emb.nodes[name]) for name, ns in emb.graph.node_sets.items() if not ns.fixed}

    groups_a = {g: s.size for g, s in emb_a.graph.spec.groups.items()}
    groups_b = {g: s.size for g, s in emb_b.graph.spec.groups.items()}
    return groups_a == groups_b and sizes(emb_a) == sizes(emb_b)


def _embeddings(model, encoder: GraphEncoder | None) -> Embeddings:
    return model if isinstance(model, Embeddings) else embed(model, encoder)


def matched_cosines(model_a, model_b, *, encoder: GraphEncoder | None = None, solver: str = "exact",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Each permuted node set's per-unit cosines after matching B's units to A's: ``{node set: (units,)}``.

    The embeddings are centred and unit-normalized per node set
    (:func:`~merge_graphs.gnn.alignment.pseudo_tensors`), B's units matched to A's
    (:func:`~merge_graphs.gnn.alignment.gnn_matching`), and unit ``i`` of A compared with the unit of B
    matched to it. Arguments and errors as :func:`lineage_score`, whose score is the mean of every
    entry.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.gnn.lineage import matched_cosines
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> shuffled = merge_graphs.permute(mlp, merge_graphs.random_permutations(merge_graphs.symmetry_spec(mlp), seed=0))
        >>> {name: round(float(c.min()), 4) for name, c in matched_cosines(mlp, shuffled).items()}
        {'mlp.0': 1.0}
    """
    emb_a, emb_b = _embeddings(model_a, encoder), _embeddings(model_b, encoder)
    if not comparable(emb_a, emb_b):
        raise SpecMismatchError("lineage needs two models of one architecture: their permuted units differ")
    specs, a = pseudo_tensors(emb_a)
    _, b = pseudo_tensors(emb_b)
    if not a:
        raise SpecMismatchError("the models have no permuted units to compare")
    found = gnn_matching(emb_a.graph.spec, emb_a, emb_b, solver=solver, seed=seed)
    pseudo = SymmetrySpec(emb_a.graph.spec.family, emb_a.graph.spec.groups, specs)
    # The keys are "gnn:<node set>"; each column of a pseudo tensor is one unit's unit-norm embedding.
    return {key.removeprefix("gnn:"): (a[key] * permuted(pseudo, key, b, found.permutations)).sum(0) for key in a}


def lineage_score(model_a, model_b, *, encoder: GraphEncoder | None = None, solver: str = "exact",
                  seed: int = 0) -> float:
    """The matched mean cosine of two models' GNN node embeddings, in [-1, 1].

    Args:
        model_a, model_b: ``nn.Module`` s, or their :func:`~merge_graphs.gnn.embed` (pass
            embeddings to embed each model once when scoring many pairs).
        encoder: embeds the models given as modules; default the pretrained one.
        solver, seed: as in :func:`~merge_graphs.gnn.alignment.gnn_matching`.

    Raises:
        SpecMismatchError: the two models' permuted units do not correspond (different architectures).

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.gnn.lineage import lineage_score
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = merge_graphs.symmetry_spec(mlp)
        >>> shuffled = merge_graphs.permute(mlp, merge_graphs.random_permutations(spec, seed=0))
        >>> round(lineage_score(mlp, shuffled), 4)
        1.0
    """
    return score_of(matched_cosines(model_a, model_b, encoder=encoder, solver=solver, seed=seed))


def score_of(cosines: dict[str, torch.Tensor]) -> float:
    """The lineage score of :func:`matched_cosines`' output: the mean over every unit."""
    return float(sum(c.sum() for c in cosines.values())) / sum(c.numel() for c in cosines.values())


def lineage(models: Sequence, names: Sequence[str] | None = None, *, threshold: float | None = None,
            encoder: GraphEncoder | None = None) -> list[LineagePair]:
    """Every pair of ``models``: its lineage score and verdict.

    Args:
        models: ``nn.Module`` s or their :func:`~merge_graphs.gnn.embed` (each module is embedded once).
        names: one per model (default ``"0"``, ``"1"``, ...).
        threshold: a score above it says ``"same base"``; default :func:`lineage_threshold`.
        encoder: embeds the models given as modules; default the pretrained one.

    Returns:
        One :class:`LineagePair` per pair ``(i, j)``, ``i < j``, in order.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.gnn.lineage import lineage
        >>> def mlp(seed):
        ...     torch.manual_seed(seed)
        ...     return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> base, other = mlp(0), mlp(1)
        >>> spec = merge_graphs.symmetry_spec(base)
        >>> tuned = merge_graphs.permute(base, merge_graphs.random_permutations(spec, seed=1))
        >>> with torch.no_grad():
        ...     _ = [p.add_(0.01 * torch.randn_like(p)) for p in tuned.parameters()]
        >>> for pair in lineage([base, tuned, other], ["base", "tuned", "other"], threshold=0.7):
        ...     print(pair.a, pair.b, pair.verdict)
        base tuned same base
        base other independent
        tuned other independent
    """
    names = list(names) if names is not None else [str(i) for i in range(len(models))]
    if len(names) != len(models):
        raise ValueError(f"{len(models)} models but {len(names)} names")
    threshold = lineage_threshold() if threshold is None else threshold
    if encoder is None and any(not isinstance(m, Embeddings) for m in models):
        encoder = default_encoder()
    embs = [_embeddings(m, encoder) for m in models]
    out = []
    for i, j in itertools.combinations(range(len(embs)), 2):
        if not comparable(embs[i], embs[j]):
            out.append(LineagePair(names[i], names[j], float("nan"), DIFFERENT))
            continue
        cosines = matched_cosines(embs[i], embs[j])
        score = score_of(cosines)
        out.append(LineagePair(names[i], names[j], score, SAME_BASE if score > threshold else INDEPENDENT, cosines))
    return out


__all__ = ["DIFFERENT", "INDEPENDENT", "SAME_BASE", "LineagePair", "lineage", "lineage_score", "lineage_threshold",
           "matched_cosines", "score_of"]

