"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): experts and their hidden units move as the spec
says, in both storage layouts (stacked in memory, one tensor per expert in checkpoints)."""

import copy
import json

import pytest
import torch
import transformers as T
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_symmetry import assert_one_tensor_left_behind_changes_the_function, assert_same_function
from tiny_models import VOCAB, example_input, make, randomize

import merge_graphs as mg
from merge_graphs.api import load_state
from merge_graphs.cli import main
from merge_graphs.errors import SpecMismatchError, UnsupportedArchitectureError
from merge_graphs.gnn import GraphEncoder, embed
from merge_graphs.gnn.lineage import lineage_score
from merge_graphs.graph import NeuralGraph
from merge_graphs.io import Checkpoint
from merge_graphs.match import weight_matching
from merge_graphs.run import run_recipe
from merge_graphs.sources import ModelTensors, StateTensors, module_tensors
from merge_graphs.symmetry import permute_state_dict

MOE = ["mixtral-lm", "qwen2-moe-lm", "qwen3-moe-lm-tied"]
EXPERTS = "layers.0.mlp.experts"


def saved(model, folder, layout: str) -> ModelTensors:
    """``model`` as a checkpoint: as ``save_pretrained`` writes it (one tensor per expert), or with the
    experts stacked as the model holds them."""
    if layout == "per-expert":
        model.save_pretrained(folder)
    else:
        folder.mkdir()
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        tied = StateTensors(model).aliases
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
    return ModelTensors(Checkpoint(folder))


def loaded(model, tensors):
    """A copy of ``model`` holding ``tensors`` (named either way)."""
    return load_state(model, tensors)


@pytest.mark.parametrize("name", MOE)
def test_the_spec_labels_the_names_either_layout_stores(tmp_path, name):
    model = make(name)
    n = model.config.num_local_experts if name.startswith("mixtral") else model.config.num_experts
    per_expert = saved(model, tmp_path / "per-expert", "per-expert")
    stacked = saved(model, tmp_path / "stacked", "stacked")
    a, b, own = per_expert.spec(), stacked.spec(), mg.symmetry_spec(model)
    assert a.groups == b.groups == own.groups
    assert a.groups[f"{EXPERTS}.mlp"].parent == EXPERTS and a.groups[EXPERTS].size == n
    # Every stored tensor is labelled (the builder refuses any other); experts' weights by slot or stacked axis.
    assert set(a.tensors) == set(per_expert) and set(b.tensors) == set(stacked)
    slots = [t for t in a.tensors.values() if t.slot is not None]
    assert len(slots) == 3 * n * sum("mlp.experts" in g and g.endswith(".experts") for g in a.groups)
    assert not any(t.slot for t in b.tensors.values()) and any(k.endswith("experts.gate_up_proj") for k in b.tensors)
    # A model in memory is a source of the names its checkpoint stores.
    assert list(StateTensors(model)) == list(per_expert)


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
@pytest.mark.parametrize("name", MOE)
def test_permuting_a_checkpoint_in_either_layout_preserves_the_function(tmp_path, name, layout):
    model = make(name)
    source = saved(model, tmp_path / "m", layout)
    spec = source.spec()
    perms = mg.random_permutations(spec, seed=1)
    state = permute_state_dict(spec, dict(source), perms)
    inputs = example_input(model)
    assert_same_function(model, loaded(model, state), spec, perms, inputs)
    router = next(k for k, t in spec.tensors.items() if t.role == "moe.router" and "layers.0." in k)
    assert torch.equal(state[router], source[router][perms[EXPERTS]][:, perms["residual"]])
    # Negative control: one expert's weights left where they were, every expert moved.
    roll = {EXPERTS: torch.roll(torch.arange(spec.groups[EXPERTS].size), 1)}
    broken = permute_state_dict(spec, dict(source), roll)
    down = next(k for k, t in spec.tensors.items() if "layers.0." in k and ".experts." in k and t.role == "mlp.down")
    broken[down] = source[down]
    with pytest.raises(AssertionError):
        assert_same_function(model, loaded(model, broken), spec, roll, inputs)


@pytest.mark.parametrize("name", MOE)
def test_weight_matching_puts_a_permuted_copy_back_in_either_layout(tmp_path, name):
    model = make(name)
    found = {}
    for layout in ("per-expert", "stacked"):
        source = saved(model, tmp_path / layout, layout)
        spec = source.spec()
        perms = mg.random_permutations(spec, seed=5)
        shuffled = permute_state_dict(spec, dict(source), perms)
        found[layout] = weight_matching(spec, source, shuffled)
        for group, p in mg.invert_permutations(spec, perms).items():
            assert torch.equal(found[layout].permutations[group], p), (layout, group)
        aligned = found[layout].apply(shuffled)
        assert all(torch.equal(aligned[k], source[k]) for k in source.stored()), layout
    assert found["per-expert"].objective_after == pytest.approx(found["stacked"].objective_after, rel=1e-6)


def test_an_alignment_refuses_tensors_named_otherwise_than_its_spec():
    model = make("mixtral-lm")
    found = mg.align(model, make("mixtral-lm", seed=1))
    with pytest.raises(SpecMismatchError, match="StateTensors"):
        found.apply(model.state_dict())  # stacked experts, for an alignment over per-expert names
    assert set(found.apply(StateTensors(model))) == set(StateTensors(model))


def test_module_tensors_undo_the_stored_layout_exactly():
    model = make("qwen2-moe-lm")
    back = dict(module_tensors(model, StateTensors(model)))
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_families_declare_what_they_change():
    qwen2 = mg.symmetry_spec(make("qwen2-moe-lm"))
    # Qwen2-MoE: a shared expert with its own hidden group and a gate on one fixed unit; layer 1 is dense.
    assert qwen2.groups["layers.0.shared_expert"].size == 18
    assert qwen2.tensors["model.layers.0.mlp.shared_expert_gate.weight"].axes[0][0].groups == ()
    assert "layers.1.mlp" in qwen2.groups and "layers.1.mlp.experts" not in qwen2.groups
    readers = {w for w, _ in qwen2.norms[1].readers}
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.shared_expert_gate.weight"} <= readers
    # Qwen3-MoE's q/k norms: heads move as blocks, but no q/k head map.
    qwen3 = mg.symmetry_spec(make("qwen3-moe-lm-tied"))
    assert [hm.name for hm in qwen3.head_maps] == ["layers.0.attn.vo", "layers.1.attn.vo"]
    assert qwen3.rotation == "free" and qwen3.tied == {"lm_head.weight": "model.embed_tokens.weight"}


@settings(max_examples=10, deadline=None)
@given(family=st.sampled_from(["mixtral", "qwen2_moe", "qwen3_moe"]), experts=st.integers(2, 4),
       top_k=st.integers(1, 2), hidden=st.sampled_from([4, 8, 12]), layers=st.integers(1, 2), tied=st.booleans(),
       seed=st.integers(0, 99))
def test_moe_property(family, experts, top_k, hidden, layers, tied, seed):
    base = dict(vocab_size=23, hidden_size=16, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, num_experts_per_tok=min(top_k, experts), tie_word_embeddings=tied)
    if family == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(**base, intermediate_size=hidden, num_local_experts=experts))
    elif family == "qwen2_moe":
        model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**base, moe_intermediate_size=hidden, num_experts=experts,
                                                       shared_expert_intermediate_size=8))
    else:
        model = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**base, moe_intermediate_size=hidden, num_experts=experts))
    torch.manual_seed(seed)
    model = randomize(model)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=seed)
    ids = {"input_ids": torch.randint(0, 23, (2, 5))}
    assert_same_function(model, mg.permute(model, perms, spec), spec, perms, ids)
    assert_one_tensor_left_behind_changes_the_function(model, spec, perms, ids, EXPERTS)
    # Negative control of the experts' own units: every expert's units moved, its down projection not.
    child = f"{EXPERTS}.mlp"
    inside = {child: torch.roll(torch.arange(hidden), 1).repeat(experts, 1)}
    state = permute_state_dict(spec, model.state_dict(), inside)
    state["model.layers.0.mlp.experts.down_proj"] = model.state_dict()["model.layers.0.mlp.experts.down_proj"]
    with pytest.raises(AssertionError):
        assert_same_function(model, loaded(model, state), spec, inside, ids)


def test_the_graph_of_a_per_expert_checkpoint_is_equivariant(tmp_path):
    model = make("mixtral-lm")
    source = saved(model, tmp_path / "m", "per-expert")
    spec = source.spec()
    perms = mg.random_permutations(spec, seed=2)
    state = dict(source)
    graph, moved = NeuralGraph(spec, state), NeuralGraph(spec, permute_state_dict(spec, state, perms))
    assert graph.num_edges == sum(state[k].numel() for k, t in spec.tensors.items() if len(t.axes) == 2)
    assert graph.node_sets[f"{EXPERTS}.mlp"].size == 4 * 20
    torch.manual_seed(0)
    encoder = GraphEncoder(dim=16, layers=2).eval()
    a, b = embed(graph, encoder), embed(moved, encoder)
    order = graph.node_order(perms)
    nodes_a = torch.cat([a.nodes[n] for n in graph.node_sets])
    nodes_b = torch.cat([b.nodes[n] for n in graph.node_sets])
    assert torch.allclose(nodes_b, nodes_a[order], atol=1e-5)


def test_activation_matching_is_refused_with_the_reason():
    a, b = make("mixtral-lm"), make("mixtral-lm", seed=1)
    with pytest.raises(UnsupportedArchitectureError, match="mixture of experts"):
        mg.align(a, b, "activation", calibration={"input_ids": torch.randint(0, VOCAB, (4, 8))})


def test_inspect_a_saved_tiny_moe(tmp_path, capsys):
    make("qwen2-moe-lm").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "qwen2_moe"
    assert report["groups"][f"{EXPERTS}.mlp"] == {"size": 12, "parent": EXPERTS}
    assert report["groups"]["layers.0.shared_expert"]["size"] == 18


def test_recipe_merges_a_permuted_copy_back_and_two_seeds_into_a_loadable_folder(tmp_path, capsys):
    a = make("mixtral-lm")
    spec = mg.symmetry_spec(a)
    a.save_pretrained(tmp_path / "a")
    mg.permute(a, mg.random_permutations(spec, seed=3), spec).save_pretrained(tmp_path / "b")
    make("mixtral-lm", seed=1).save_pretrained(tmp_path / "c")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"models:\n  - model: {tmp_path / 'a'}\n  - model: {tmp_path / 'b'}\n"
                      f"align: {{method: weight}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    assert main([str(recipe)]) == 0
    assert "layers.0.mlp.experts" in capsys.readouterr().out
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for k, v in a.state_dict().items():
        assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), k
    # Written as save_pretrained writes it: one tensor per expert.
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in header
    # Different seeds, aligned data-free with a rotation of the stream: the folder loads and holds the
    # average of A and the aligned B (folded), expert by expert.
    result = run_recipe({"models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "c")}],
                         "align": {"method": "weight", "residual": "rotation"},
                         "output": {"path": str(tmp_path / "ac")}}, progress=False)
    merged = StateTensors(T.AutoModelForCausalLM.from_pretrained(tmp_path / "ac"))
    c = make("mixtral-lm", seed=1)
    want_a, want_c = (al.apply(StateTensors(m)) for al, m in zip(result.alignments, (a, c)))
    assert set(merged) == set(want_a)
    for key in merged:
        assert torch.allclose(merged[key], (want_a[key] + want_c[key]) / 2, atol=1e-6), key
    assert not torch.equal(result.alignments[1].permutations[EXPERTS], torch.arange(4))


@pytest.mark.parametrize("name", ["mixtral-lm", "qwen2-moe-lm", "llama-lm-mha-tied-bias"])
def test_blocks_matched_one_pair_of_units_at_a_time_give_the_same_answer(name, monkeypatch):
    """A large expert block's all-pairs Gram matrix is never built (a Mixtral layer's would take 53 GB):
    matched pair by pair, two different models get the same matching as from the whole Gram."""
    a, b = make(name, seed=0), make(name, seed=1)
    spec = mg.symmetry_spec(a)
    whole = weight_matching(spec, a.state_dict(), b.state_dict())
    monkeypatch.setattr(mg.match, "PAIRWISE_GRAM", 0)
    pairwise = weight_matching(spec, a.state_dict(), b.state_dict())
    assert pairwise.objective_after == pytest.approx(whole.objective_after, rel=1e-5)
    for group, p in whole.permutations.items():
        assert torch.equal(pairwise.permutations[group], p), group


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
@pytest.mark.parametrize("name", MOE)
def test_a_mixture_embeds_alike_in_memory_and_in_either_checkpoint_layout(tmp_path, name, layout):
    # The GNN scales each weight block by its tensor's std, and lineage averages one correlation per tensor: one
    # expert's slice of a stacked tensor must count as the tensor it is in the per-expert layout, or
    # `merge-graphs embed` and `embed(model)` disagree (they did, by up to 0.21 on the bench Mixtral, before).
    encoder = GraphEncoder(dim=16)
    a, b = make(name, seed=0), make(name, seed=1)
    on_disk = [embed(saved(m, tmp_path / f"m{i}", layout), encoder) for i, m in enumerate((a, b))]
    in_memory = [embed(m, encoder) for m in (a, b)]
    for disk, memory in zip(on_disk, in_memory):
        assert disk.nodes.keys() == memory.nodes.keys()
        assert all(torch.allclose(disk.nodes[k], memory.nodes[k], atol=1e-5) for k in memory.nodes)
    assert lineage_score(*on_disk) == pytest.approx(lineage_score(*in_memory), abs=1e-5)
