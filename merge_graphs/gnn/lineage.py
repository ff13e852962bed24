"""Lineage: do two models share a base (fine-tunes of one model) or were they trained independently?

The score is the *matched weight correlation*: B's units matched to A's, first on the two models' GNN
node embeddings (:func:`~merge_graphs.gnn.alignment.gnn_matching`), then by weight matching started
from that matching (:func:`~merge_graphs.match.weight_matching`); then each labelled tensor of A
compared with B's permuted tensor by their correlation (the cosine once each tensor's mean is taken
out), and the correlations averaged, every tensor counting once. It is
1 for a model against itself, does not change when either model's units are permuted (the matching
undoes any permutation; up to the local optima of the coordinate descent where groups are coupled),
stays high for a base and its fine-tunes (fine-tuning moves the weights little once the permutation
is undone) and is lower for models trained from different initializations.

The embeddings alone also give a score, :func:`embedding_score` (the matched mean cosine of the unit
embeddings), which :mod:`merge_graphs.gnn.mergeability` builds on. It was the lineage score until
fine-tunes that move the weights about as far as training did were seen to fall below its threshold
(their embeddings drift while their weights stay close: see the README).

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
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_graphs.errors import SpecMismatchError
from merge_graphs.gnn.alignment import gnn_matching, pseudo_tensors
from merge_graphs.gnn.embedding import Embeddings, default_encoder, embed
from merge_graphs.gnn.encoder import GraphEncoder
from merge_graphs.gnn.pretrained import WEIGHTS_DIR
from merge_graphs.graph import EdgeBlock
from merge_graphs.match import weight_matching
from merge_graphs.symmetry.spec import Permutations, SymmetrySpec, permuted

SAME_BASE = "same base"
INDEPENDENT = "independent"
DIFFERENT = "different architectures"


@dataclass(frozen=True)
class LineagePair:
    """One pair's answer: its ``score`` (:func:`lineage_score`; ``nan`` when the two models'
    architectures differ) and ``verdict``: ``"same base"``, ``"independent"`` or
    ``"different architectures"``. The predicted barrier of :mod:`merge_graphs.gnn.mergeability`
    takes the score, so the units need not be matched again."""

    a: str
    b: str
    score: float
    verdict: str


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


def _matching(emb_a: Embeddings, emb_b: Embeddings, solver: str, seed: int) -> Permutations:
    """B's units matched to A's on their embeddings (what both scores start from)."""
    if not comparable(emb_a, emb_b):
        raise SpecMismatchError("lineage needs two models of one architecture: their permuted units differ")
    if all(ns.fixed for ns in emb_a.graph.node_sets.values()):
        raise SpecMismatchError("the models have no permuted units to compare")
    return gnn_matching(emb_a.graph.spec, emb_a, emb_b, solver=solver, seed=seed).permutations


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() > 1:
        # What every trained model shares (norm weights near one) says nothing about which base it came from.
        x, y = x - x.mean(), y - y.mean()
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0.0 or ny == 0.0:
        return 1.0 if torch.equal(x, y) else 0.0  # two constant tensors: equal or not, nothing to correlate
    return float(x @ y) / (nx * ny)


def matched_cosines(model_a, model_b, *, encoder: GraphEncoder | None = None, solver: str = "exact",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Each permuted node set's per-unit embedding cosines after matching B's units to A's:
    ``{node set: (units,)}``.

    The embeddings are centred and unit-normalized per node set
    (:func:`~merge_graphs.gnn.alignment.pseudo_tensors`), B's units matched to A's
    (:func:`~merge_graphs.gnn.alignment.gnn_matching`), and unit ``i`` of A compared with the unit of B
    matched to it. Arguments and errors as :func:`lineage_score`; :func:`embedding_score` is the mean
    of every entry.

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
    perms = _matching(emb_a, emb_b, solver, seed)
    specs, a = pseudo_tensors(emb_a)
    _, b = pseudo_tensors(emb_b)
    pseudo = SymmetrySpec(emb_a.graph.spec.family, emb_a.graph.spec.groups, specs)
    # The keys are "gnn:<node set>"; each column of a pseudo tensor is one unit's unit-norm embedding.
    return {key.removeprefix("gnn:"): (a[key] * permuted(pseudo, key, b, perms)).sum(0) for key in a}


def matched_weight_correlations(model_a, model_b, *, encoder: GraphEncoder | None = None,
                                solver: str = "exact", seed: int = 0) -> dict[str, float]:
    """Each labelled tensor's correlation between A and B after B's units are matched to A's:
    ``{tensor name: correlation}``.

    The matching is the embeddings' (:func:`~merge_graphs.gnn.alignment.gnn_matching`) refined by
    weight matching started from it; the correlation is the cosine of the two tensors, each less its
    mean (a tensor of one element keeps it). A tensor that stacks a mixture's experts counts as the
    tensors a per-expert checkpoint stores: one value per expert and part (``"name#k"``), so either
    layout scores alike. Arguments and errors as :func:`lineage_score`, which is the mean of the values.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.gnn.lineage import matched_weight_correlations
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> shuffled = merge_graphs.permute(mlp, merge_graphs.random_permutations(merge_graphs.symmetry_spec(mlp), seed=0))
        >>> {name: round(c, 4) for name, c in matched_weight_correlations(mlp, shuffled).items()}
        {'0.weight': 1.0, '0.bias': 1.0, '2.weight': 1.0, '2.bias': 1.0}
    """
    emb_a, emb_b = _embeddings(model_a, encoder), _embeddings(model_b, encoder)
    spec, a, b = emb_a.graph.spec, emb_a.graph.tensors, emb_b.graph.tensors
    # The embeddings' matching is only a start: fine-tunes drift further in embedding space than in weights.
    perms = weight_matching(spec, a, b, init=_matching(emb_a, emb_b, solver, seed), solver=solver,
                            seed=seed).permutations
    stacked: dict[str, list[EdgeBlock]] = {}
    for edge in emb_a.graph.edges:
        if edge.select is not None:
            stacked.setdefault(edge.tensor, []).append(edge)
    out = {}
    for name in spec.tensors:
        xb = permuted(spec, name, b, perms)
        if name not in stacked:
            out[name] = _correlation(a[name], xb)
            continue
        for k, edge in enumerate(stacked[name]):
            out[f"{name}#{k}"] = _correlation(emb_a.graph.block(edge), emb_a.graph.block(edge, xb))
    return out


def lineage_score(model_a, model_b, *, encoder: GraphEncoder | None = None, solver: str = "exact",
                  seed: int = 0) -> float:
    """The matched weight correlation of two models, in [-1, 1]: the mean over their labelled tensors
    of :func:`matched_weight_correlations`.

    The mean gives every tensor one vote: the cosine of all weights flattened together is ruled by
    the largest matrices, where what independently trained transformers share outweighs which base
    they came from (in a trial on the zoo, independent GPT-2 and BERT pairs scored above 0.9 that way).
    Taking out each tensor's mean keeps norm weights, near one in every trained model, from lifting
    independent pairs.

    Args:
        model_a, model_b: ``nn.Module`` s, or their :func:`~merge_graphs.gnn.embed` (pass
            embeddings to embed each model once when scoring many pairs).
        encoder: embeds the models given as modules; default the pretrained one.
        solver, seed: as in :func:`~merge_graphs.match.weight_matching`.

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
    values = matched_weight_correlations(model_a, model_b, encoder=encoder, solver=solver, seed=seed)
    return sum(values.values()) / len(values)


def embedding_score(model_a, model_b, *, encoder: GraphEncoder | None = None, solver: str = "exact",
                    seed: int = 0) -> float:
    """The matched mean cosine of two models' GNN unit embeddings, in [-1, 1]: the mean of every
    entry of :func:`matched_cosines`. Arguments and errors as :func:`lineage_score`.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.gnn.lineage import embedding_score
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = merge_graphs.symmetry_spec(mlp)
        >>> round(embedding_score(mlp, merge_graphs.permute(mlp, merge_graphs.random_permutations(spec))), 4)
        1.0
    """
    return score_of(matched_cosines(model_a, model_b, encoder=encoder, solver=solver, seed=seed))


def score_of(cosines: dict[str, torch.Tensor]) -> float:
    """The mean over every unit of :func:`matched_cosines`' output (:func:`embedding_score`)."""
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
        score = lineage_score(embs[i], embs[j])
        out.append(LineagePair(names[i], names[j], score, SAME_BASE if score > threshold else INDEPENDENT))
    return out


__all__ = ["DIFFERENT", "INDEPENDENT", "SAME_BASE", "LineagePair", "embedding_score", "lineage", "lineage_score",
           "lineage_threshold", "matched_cosines", "matched_weight_correlations", "score_of"]

