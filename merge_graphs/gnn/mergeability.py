"""Mergeability: predict a pair's loss barrier after weight matching, before aligning or merging it.

What it predicts: the barrier of the straight line between model A and model B *after the tool's
default data-free alignment* (weight matching), divided by the mean of the two parents' losses, so
families with different loss scales share one scale. The barrier of naive averaging is not
predicted: it depends on the order of B's units, which no permutation-invariant feature can see.

The model: the pair's *distance*, one minus the lineage score (the mean correlation of the two
models' tensors once B's units are matched to A's, :func:`~merge_graphs.gnn.lineage.lineage_score`),
in a ridge regression through the origin on some of :data:`FEATURES`: the distance, its square, and
the distance times each shape term (whether a residual stream joins the layers, log width, log
depth). Which of them, and the ridge penalty, are chosen by how well the fit ranks the pairs of an
architecture left out of it (Kendall's tau in leave-one-architecture-out cross-validation); the
shipped fit, on zoo version 2's eighteen architectures, uses the distance and its square::

    barrier = max(0, w1 * distance + w2 * distance ** 2)

Through the origin because a model against itself (or a permuted copy) has no barrier in any
architecture: a linear model with an intercept gave same-base pairs of a high-barrier architecture a
higher prediction than independent pairs of a low-barrier one. For one architecture the prediction
orders pairs as the lineage score does (where the fitted curve rises). The shape terms were chosen
when the fit saw zoo version 1's seven architectures, and there ranked held-out pairs best, but over
version 2's eighteen they ranked an architecture left out worse than the distance alone: what makes
one architecture merge worse than another is not its width or depth (the zoo's learning rates and
training lengths move the barrier as much). Per-kind cosines (hidden units, residual stream,
attention), the worst layer and the pooled cosine were tried as further inputs on version 1, and the
matched correlations per kind of tensor, their minimum and their spread on version 2 (a scratch
comparison, in issue #19's notes); each ranked worse in cross-validation. Family one-hots are deliberately absent: they would memorize the zoo's four
families and say nothing about a family it lacks. The fit saw widths and depths of small models:
outside them it extrapolates (:meth:`BarrierModel.covers` says so). Every input is unchanged when
either model's units are permuted, so the prediction is too.

The coefficients ship beside the GNN's weights (``weights/mergeability.json``, with the weights'
sha256), fitted by ``python -m merge_graphs.lab.gnn_mergeability`` on the pretraining zoo's
training seeds and their fine-tunes and evaluated on held-out seeds (the json holds the figures).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from merge_graphs.gnn.embedding import Embeddings, default_encoder, embed
from merge_graphs.gnn.encoder import GraphEncoder
from merge_graphs.gnn.lineage import lineage_score
from merge_graphs.gnn.pretrained import WEIGHTS_DIR

#: the inputs a fit may use (:attr:`BarrierModel.features` says which the shipped one does)
FEATURES = ("distance", "distance squared", "distance x residual stream", "distance x log width",
            "distance x log depth")
SHAPES = ("log width", "log depth")
HIDDEN_ROLES = ("hidden", "mlp")


@dataclass(frozen=True)
class BarrierModel:
    """A ridge regression through the origin from :func:`pair_features` to the relative barrier after
    weight matching: ``max(0, coef . x / scale)``. ``shapes`` holds the ranges of :data:`SHAPES` the
    fit saw, apart for models without (``"0"``) and with (``"1"``) a residual stream; a pair outside
    them is an extrapolation (:meth:`covers`)."""

    features: tuple[str, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    shapes: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def predict(self, features: Mapping[str, float]) -> float:
        """The predicted relative barrier of a pair with these features (at least 0)."""
        return max(0.0, math.fsum(c * features[f] / s for f, s, c in zip(self.features, self.scale, self.coef)))

    def covers(self, features: Mapping[str, float]) -> bool:
        """Whether the pair's width and depth lie within those the regression was fitted on, among
        models with a residual stream or among models without, as the pair's.

        Example:
            >>> m = BarrierModel(("distance",), (1.0,), (0.5,), {"1": {"log width": (3.0, 4.0)}})
            >>> [m.covers({"residual stream": 1.0, "log width": w}) for w in (3.5, 5.0)]
            [True, False]
            >>> m.covers({"residual stream": 0.0, "log width": 3.5})
            False
        """
        ranges = self.shapes.get(str(int(features["residual stream"])))
        return ranges is not None and all(lo - 1e-9 <= features[k] <= hi + 1e-9 for k, (lo, hi) in ranges.items())

    def to_dict(self) -> dict:
        return {"features": list(self.features), "scale": list(self.scale), "coef": list(self.coef),
                "shapes": {g: {k: list(v) for k, v in r.items()} for g, r in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> BarrierModel:
        return cls(tuple(d["features"]), tuple(d["scale"]), tuple(d["coef"]),
                   {g: {k: (float(lo), float(hi)) for k, (lo, hi) in r.items()} for g, r in d["shapes"].items()})


@functools.lru_cache(maxsize=4)
def barrier_model(folder: str | os.PathLike = WEIGHTS_DIR) -> BarrierModel:
    """The shipped regression: ``model`` of ``weights/mergeability.json``, written by
    ``python -m merge_graphs.lab.gnn_mergeability`` (the json also records the command, the pairs it
    was fitted on and the held-out figures)."""
    return BarrierModel.from_dict(json.loads((Path(folder) / "mergeability.json").read_text())["model"])


def pair_features(emb_a: Embeddings, emb_b: Embeddings, score: float | None = None) -> dict[str, float]:
    """The permutation-invariant statistics of a pair: the regression's inputs (:data:`FEATURES`) and
    what they are made of (``lineage score``, ``residual stream``, ``log width``, ``log depth``).

    Args:
        emb_a, emb_b: the two models' :func:`~merge_graphs.gnn.embed`.
        score: their :func:`~merge_graphs.gnn.lineage.lineage_score`, when already computed (a
            :class:`~merge_graphs.gnn.lineage.LineagePair` keeps it); else computed here.

    Raises:
        SpecMismatchError: the two models' permuted units do not correspond (different architectures).

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.gnn import embed
        >>> from merge_graphs.gnn.mergeability import pair_features
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> f = pair_features(embed(mlp), embed(mlp))
        >>> round(f["distance"], 4), f["residual stream"], round(f["log width"], 3), f["log depth"]
        (0.0, 0.0, 2.079, 0.0)
    """
    score = lineage_score(emb_a, emb_b) if score is None else score
    permuted = [ns for ns in emb_a.graph.node_sets.values() if not ns.fixed]
    roles = [ns.role for ns in permuted]
    distance = 1.0 - score
    shape = {
        "residual stream": float("residual" in roles),
        # mean units per permuted node set; hidden layers (an MLP's, a transformer block's MLP) count depth
        "log width": math.log(sum(ns.size for ns in permuted) / len(permuted)),
        "log depth": math.log(max(1, sum(r in HIDDEN_ROLES for r in roles))),
    }
    return {"lineage score": score, "distance": distance, "distance squared": distance ** 2, **shape,
            **{f"distance x {k}": distance * v for k, v in shape.items()}}


def predicted_barrier(model_a, model_b, *, encoder: GraphEncoder | None = None, score: float | None = None,
                      model: BarrierModel | None = None) -> float:
    """The predicted barrier of the pair after weight matching, relative to the parents' mean loss.

    0 means the weight-matched line is predicted as good as its parents; 0.3 means a loss about 30%
    above theirs at the worst point of the line. For models wider or deeper than those it was fitted
    on it extrapolates: ``barrier_model().covers(pair_features(emb_a, emb_b))`` says whether it does.

    Args:
        model_a, model_b: ``nn.Module`` s, or their :func:`~merge_graphs.gnn.embed`.
        encoder: embeds the models given as modules; default the pretrained one.
        score: the pair's :func:`~merge_graphs.gnn.lineage.lineage_score`, to match only once.
        model: the regression; default the shipped one (:func:`barrier_model`).

    Raises:
        SpecMismatchError: the two models' permuted units do not correspond (different architectures).

    Example:
        >>> import torch
        >>> from merge_graphs.gnn.mergeability import predicted_barrier
        >>> def mlp(seed):
        ...     torch.manual_seed(seed)
        ...     return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> a = mlp(0)
        >>> predicted_barrier(a, a) < predicted_barrier(a, mlp(1))
        True
    """
    if encoder is None and not (isinstance(model_a, Embeddings) and isinstance(model_b, Embeddings)):
        encoder = default_encoder()
    emb_a, emb_b = (m if isinstance(m, Embeddings) else embed(m, encoder) for m in (model_a, model_b))
    return (model or barrier_model()).predict(pair_features(emb_a, emb_b, score))


__all__ = ["FEATURES", "SHAPES", "BarrierModel", "barrier_model", "pair_features", "predicted_barrier"]
