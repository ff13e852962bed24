"""The public Python API. The CLI is a thin layer over these functions; nothing here prints."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from merge_graphs.graph import NeuralGraph
from merge_graphs.symmetry import SymmetrySpec, permute_state_dict, symmetry_spec


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
    state = permute_state_dict(spec, model.state_dict(), permutations)
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


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
