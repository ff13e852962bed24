"""Neural graphs: counts match the spec, and permuting a model permutes its graph's nodes."""

import math

import pytest
import torch
import transformers as T
from tiny_models import FACTORIES, make, minilm_path

import merge_graphs as mg
from merge_graphs.symmetry.spec import outer_parents


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_graph_of_permuted_model_is_the_graph_with_nodes_permuted(name):
    model = make(name)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=4)
    g, gp = mg.neural_graph(model, spec), mg.neural_graph(mg.permute(model, perms, spec), spec)
    assert list(g.node_sets) == list(gp.node_sets) and len(g.edges) == len(gp.edges)
    order = g.node_order(perms)
    assert sorted(order.tolist()) == list(range(g.num_nodes))
    for e in g.edges:
        src, dst = g.node_sets[e.src], g.node_sets[e.dst]
        rows = order[dst.offset:dst.offset + dst.size] - dst.offset
        cols = order[src.offset:src.offset + src.size] - src.offset
        if e.src_nodes is None and e.dst_nodes is None:
            assert torch.equal(gp.block(e), g.block(e)[rows][:, cols]), e
    # A block into one expert's nodes: permuting experts hands it another expert's weights, so
    # compare the node sets' whole adjacency, put together from every such block.
    for key in {(e.src, e.dst, e.role) for e in g.edges if e.src_nodes is not None or e.dst_nodes is not None}:
        src, dst = g.node_sets[key[0]], g.node_sets[key[1]]
        rows = order[dst.offset:dst.offset + dst.size] - dst.offset
        cols = order[src.offset:src.offset + src.size] - src.offset
        assert torch.equal(adjacency(gp, *key), adjacency(g, *key)[rows][:, cols]), key
    for f in g.node_features:
        ns = g.node_sets[f.nodes]
        idx = order[ns.offset:ns.offset + ns.size] - ns.offset
        assert torch.equal(gp.feature(f), g.feature(f)[idx]), f
    # Fixed nodes (tokens, inputs, classes) never move.
    for ns in g.node_sets.values():
        if ns.fixed:
            assert torch.equal(order[ns.offset:ns.offset + ns.size], torch.arange(ns.offset, ns.offset + ns.size))


def adjacency(g, src: str, dst: str, role: str) -> torch.Tensor:
    """The ``(dst, src)`` weights of every edge block of ``role`` between two node sets, in place."""
    out = torch.zeros(g.node_sets[dst].size, g.node_sets[src].size)
    whole = slice(None)
    for e in g.edges:
        if (e.src, e.dst, e.role) == (src, dst, role):
            out[e.dst_nodes or whole, e.src_nodes or whole] += g.block(e)
    return out


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_graph_counts_match_the_spec(name):
    model = make(name)
    g = mg.neural_graph(model)
    state = model.state_dict()
    spec = g.spec
    # A weight has an edge per pair of units of its two labelled axes (a convolution's kernel rides on
    # one edge), per expert when experts are stacked on a third; a tensor with one labelled axis gives one
    # feature per unit; a scalar (CLIP's logit scale) neither. ViT's class token (1, 1, d) is a vector, its
    # position embeddings (1, n, d) a weight.
    labelled = {k: [a for a, axis in enumerate(t.axes) if axis] for k, t in spec.tensors.items()}
    weights = sum(math.prod(state[k].shape[i] for i in a) for k, a in labelled.items() if len(a) >= 2)
    assert g.num_edges == weights
    assert g.num_nodes == sum(s.size for s in spec.spaces.values())
    vectors = sum(state[k].numel() for k, a in labelled.items() if len(a) == 1)
    assert sum(g.feature(f).numel() for f in g.node_features) == vectors
    # Three labelled axes only where experts are stacked on one of them.
    stacked = {k for k, t in spec.tensors.items() for a in range(len(t.axes)) if outer_parents(spec, t, a)}
    assert all(len(a) <= 2 or (len(a) == 3 and k in stacked) for k, a in labelled.items())


def test_graph_roles_and_orientation():
    g = mg.neural_graph(make("gpt2-lm"))
    roles = {e.role for e in g.edges}
    assert {"embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "unembed"} <= roles
    qkv = [e for e in g.edges if e.tensor.endswith("h.0.attn.c_attn.weight")]
    assert [e.dst for e in qkv] == ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"]
    # Conv1D stores (in, out); the block is oriented (dst, src) like nn.Linear.
    assert g.block(qkv[0]).shape == (24, 24) and g.node_sets["residual"].role == "residual"
    assert g.node_sets["vocab"].fixed and g.node_sets["positions"].depth == 0.0
    llama = mg.neural_graph(make("llama-lm"))
    assert llama.node_sets["layers.0.mlp"].role == "mlp"
    assert llama.node_sets["layers.0.attn.q"].size == 32 and llama.node_sets["layers.0.attn.k"].size == 8


def test_graph_references_the_weights_without_copying():
    model = make("mlp")
    g = mg.neural_graph(model)
    assert g.block(g.edges[0]).data_ptr() == model[0].weight.data_ptr()


def test_minilm_graph_covers_every_weight():
    model = T.AutoModel.from_pretrained(minilm_path())
    g = mg.neural_graph(model)
    assert g.num_edges == sum(v.numel() for v in model.state_dict().values() if v.ndim >= 2)
    assert g.node_sets["layers.5.mlp"].size == 1536 and g.node_sets["vocab"].size == 30522
