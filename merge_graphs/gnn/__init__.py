"""The permutation-equivariant graph neural network over neural graphs.

``GraphEncoder`` turns a :class:`~merge_graphs.graph.NeuralGraph` into node embeddings that
permute exactly as the model's units do; ``group_embeddings`` and ``pooled_embedding`` read
per-group and whole-model (invariant) embeddings from them; ``embed``
(:mod:`merge_graphs.gnn.embedding`) does all three for a model. Irregular edges are reduced by :mod:`merge_graphs.gnn.scatter`.

The encoder is pretrained in the lab (:mod:`merge_graphs.lab.pretrain_gnn`) on a zoo of small
models (:mod:`merge_graphs.lab.pretraining_zoo`); the weights ship in ``weights/``
(:mod:`merge_graphs.gnn.pretrained`).
:mod:`merge_graphs.gnn.alignment` matches two models' units on their embeddings
(``merge_graphs.align(a, b, method="gnn")``); :mod:`merge_graphs.gnn.lineage` scores whether two
models share a base (fine-tunes of one model) or were trained independently, and
:mod:`merge_graphs.gnn.mergeability` predicts a pair's barrier after weight matching from them.
"""

from merge_graphs.gnn.embedding import Embeddings, default_encoder, embed
from merge_graphs.gnn.encoder import GraphEncoder, group_embeddings, pooled_embedding, structural_links

__all__ = [
    "Embeddings", "GraphEncoder", "default_encoder", "embed", "group_embeddings", "pooled_embedding",
    "structural_links",
]
