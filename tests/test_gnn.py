"""The graph encoder: equivariant for every family, not trivially constant, fast on MiniLM."""

import time

import pytest
import torch
import transformers as T
from tiny_models import FACTORIES, make, minilm_path

import merge_graphs as mg
from merge_graphs.gnn import GraphEncoder, embed, group_embeddings, pooled_embedding, structural_links
from merge_graphs.gnn import scatter as scatter_mod


def encoder(seed: int = 0, **kw) -> GraphEncoder:
    torch.manual_seed(seed)
    return GraphEncoder(**kw).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_permuting_the_model_permutes_the_embeddings(name):
    model = make(name)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=3)
    enc = encoder()
    a, b = embed(model, enc), embed(mg.permute(model, perms, spec), enc)
    order = a.graph.node_order(perms)
    nodes_a = torch.cat([a.nodes[n] for n in a.graph.node_sets])
    nodes_b = torch.cat([b.nodes[n] for n in b.graph.node_sets])
    assert rel(nodes_b, nodes_a[order]) < 1e-5
    for g, group in spec.groups.items():
        old, new = a.groups[g], b.groups[g]
        if group.parent is None:
            expected = old[perms[g]]
        else:
            parent = perms.get(group.parent, torch.arange(old.shape[0]))
            expected = torch.stack([old[parent[r]][perms[g][r]] for r in range(old.shape[0])])
        assert rel(new, expected) < 1e-5, g
    assert rel(b.pooled, a.pooled) < 1e-5


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2-lm", "llama-lm"])
def test_hidden_units_get_different_embeddings(name):
    out = embed(make(name), encoder())
    for ns in out.graph.node_sets.values():
        x = out.nodes[ns.name]
        if ns.fixed or ns.size < 2:
            continue
        d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") + torch.eye(ns.size) * 1e9
        assert d.min() > 1e-3 * x.norm(dim=1).mean(), ns.name
    # Different models get different pooled embeddings.
    assert rel(embed(make(name, seed=1), encoder()).pooled, out.pooled) > 1e-3


def _is_a_permutation(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether every row of b has an (almost) identical row in a."""
    nearest = torch.cdist(b, a, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    return bool((nearest <= 1e-4 * a.abs().max()).all())


@pytest.mark.parametrize("name, tensor, axis", [
    ("mlp", "0.weight", 0),
    ("gpt2-lm", "transformer.h.0.mlp.c_fc.weight", 1),
    ("llama-lm", "model.layers.1.self_attn.v_proj.weight", 0),
])
def test_inconsistent_permutation_is_not_a_permutation_of_the_embeddings(name, tensor, axis):
    model = make(name)
    enc = encoder()
    a = embed(model, enc)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = state[tensor].shape[axis]
    state[tensor] = state[tensor].roll(1, axis)  # moves one axis of one tensor only
    broken = embed(mg.NeuralGraph(a.graph.spec, state), enc)
    moved = next(e.dst if axis == 1 - e.src_axis else e.src for e in a.graph.edges if e.tensor == tensor)
    assert a.graph.node_sets[moved].size == n
    assert not _is_a_permutation(a.nodes[moved], broken.nodes[moved])
    # A consistent permutation of the same units is one (control of the control).
    spec = a.graph.spec
    perms = mg.random_permutations(spec, seed=1)
    fine = embed(mg.permute(model, perms, spec), enc)
    assert _is_a_permutation(a.nodes[moved], fine.nodes[moved])


def test_structural_links_follow_the_factors():
    g = mg.neural_graph(make("llama-lm"))  # grouped-query attention with RoPE
    links = {(link.role, link.many, link.one): link for link in structural_links(g)}
    score = links[("attn.score", "layers.0.attn.q", "layers.0.attn.k")]
    value = links[("attn.value", "layers.0.attn.o", "layers.0.attn.v")]
    # q (kv head, query head, dim) -> k (kv head, dim); o (kv head, query head, vo) -> v (kv head, vo).
    kv, qh, d = 2, 4, 4
    q = torch.arange(kv * qh * d)
    assert torch.equal(score.index, (q // (qh * d)) * d + q % d)
    assert torch.equal(value.index, (q // (qh * d)) * d + q % d)
    assert len(links) == 4
    cnn = structural_links(mg.neural_graph(make("cnn")))
    assert [(link.role, link.many, link.one) for link in cnn] == [("unit.view", "conv.1.flat", "conv.1")]
    assert torch.equal(cnn[0].index, torch.arange(24) // 4)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_scatter_matches_a_loop(reduce):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(50, 3, generator=g)
    index = torch.randint(0, 7, (50,), generator=g)
    index[index == 5] = 4  # row 5 receives nothing
    expected = torch.zeros(8, 3)
    for r in range(8):
        rows = src[index == r]
        if len(rows):
            expected[r] = {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0).values}[reduce]
    assert torch.allclose(scatter_mod.scatter(src, index, 8, reduce, backend="native"), expected, atol=1e-6)


@pytest.mark.skipif("torch_scatter" not in scatter_mod.backends(), reason="torch-scatter is not installed")
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_scatter_backends_agree(reduce):
    g = torch.Generator().manual_seed(1)
    src = torch.randn(200, 5, generator=g)
    index = torch.randint(0, 30, (200,), generator=g)
    native = scatter_mod.scatter(src, index, 33, reduce, backend="native")
    assert torch.allclose(scatter_mod.scatter(src, index, 33, reduce, backend="torch_scatter"), native, atol=1e-6)


def test_torch_scatter_backend_is_picked_when_installed_and_called_as_documented(monkeypatch):
    """CI does not build torch-scatter (a 10-minute source build; the test above runs where it is
    installed). A stand-in with torch_scatter.scatter's documented signature (``scatter(src, index,
    dim=-1, out=None, dim_size=None, reduce="sum")``, zeros where nothing arrives) checks that the
    package is the default when present and is called with the arguments it takes."""
    calls = []

    class StandIn:
        @staticmethod
        def scatter(src, index, dim=-1, out=None, dim_size=None, reduce="sum"):
            assert dim == 0 and out is None and reduce in ("sum", "mean", "max")
            calls.append((dim_size, reduce))
            return scatter_mod.scatter(src, index, dim_size, reduce, backend="native")

    monkeypatch.setattr(scatter_mod, "torch_scatter", StandIn)
    assert scatter_mod.backends() == ("native", "torch_scatter") and scatter_mod.default_backend() == "torch_scatter"
    src, index = torch.randn(6, 2), torch.tensor([0, 0, 1, 3, 3, 3])
    for reduce in ("sum", "mean", "max"):
        assert torch.equal(scatter_mod.scatter(src, index, 5, reduce),
                           scatter_mod.scatter(src, index, 5, reduce, backend="native"))
    assert calls == [(5, "sum"), (5, "mean"), (5, "max")]
    monkeypatch.setattr(scatter_mod, "torch_scatter", None)
    assert scatter_mod.default_backend() == "native"
    with pytest.raises(ImportError, match="pip install torch-scatter"):
        scatter_mod.scatter(src, index, 5, backend="torch_scatter")


def test_gradients_reach_every_parameter():
    enc = encoder(dim=16, layers=2).train()
    loss = 0
    for name in ("cnn", "llama-lm", "bert-mlm"):  # conv kernels, GQA links, every feature role
        graph = mg.neural_graph(make(name))
        nodes = enc(graph)
        groups = group_embeddings(graph, nodes)
        loss = loss + pooled_embedding(graph, nodes).square().sum() + sum(v.sin().sum() for v in groups.values())
    loss.backward()
    for n, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_embed_real_minilm():
    model = T.AutoModel.from_pretrained(minilm_path())
    start = time.perf_counter()
    out = embed(model)
    seconds = time.perf_counter() - start
    print(f"MiniLM-L6: {out.graph.num_edges / 1e6:.1f}M edges embedded in {seconds:.2f} s")
    dim = out.pooled.shape[0]  # the shipped encoder's width
    assert out.nodes["vocab"].shape == (30522, dim) and out.groups["layers.5.mlp"].shape == (1536, dim)
    assert out.groups["layers.0.attn.qk"].shape == (12, 32, dim)
    assert all(torch.isfinite(v).all() for v in out.nodes.values())


@pytest.mark.parametrize("name", ["llama-lm", "cnn", "mixtral-lm"])
def test_embedding_without_gradients_reuses_buffers_and_gives_the_training_result(name):
    enc = encoder(dim=16, layers=2).eval()
    graph = mg.neural_graph(make(name))
    with torch.no_grad():
        inferred = enc(graph)
    trained = enc(graph)  # gradients on: every block and basis a tensor of its own
    assert any(v.requires_grad for v in trained.values())
    for k, v in inferred.items():
        assert torch.equal(v, trained[k].detach()), k
