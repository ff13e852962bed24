"""mergekit's slices: outputs stacked from ranges of layers (frankenmerges), merged layer by layer,
with gradients running across each slice, and every malformed slice refused before anything is written."""

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from merge_graphs.aligners import basis_identity
from merge_graphs.cli import main
from merge_graphs.engine import plan_merge
from merge_graphs.errors import MergeParameterError
from merge_graphs.slices import OutputSlice, SliceSource, layer_stack
from merge_graphs.sources import StateTensors
from tests.tiny_models import LLAMA, randomize


def llama(seed, layers=4):
    torch.manual_seed(seed)
    return randomize(T.LlamaForCausalLM(T.LlamaConfig(**{**LLAMA, "num_hidden_layers": layers})))


def layer(state, i):
    return {k.split(f"layers.{i}.", 1)[1]: v for k, v in state.items() if f"layers.{i}." in k}


@pytest.fixture
def folders(tmp_path):
    out = []
    for seed in (0, 1):
        llama(seed).save_pretrained(tmp_path / f"m{seed}")
        out.append(str(tmp_path / f"m{seed}"))
    return out


def run(tmp_path, recipe, name="out"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return main([str(path), "--out", str(tmp_path / name), "--quiet"])


def test_a_frankenmerge_stacks_the_layers_it_names_and_the_model_runs(tmp_path, folders):
    a, b = folders
    recipe = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
              "slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]},
                         {"sources": [{"model": b, "layer_range": [1, 4]}]}]}
    assert run(tmp_path, recipe) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    sa, sb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    taken = [(sa, 0), (sa, 1), (sa, 2), (sb, 1), (sb, 2), (sb, 3)]
    for j, (state, i) in enumerate(taken):
        got, want = layer(out, j), layer(state, i)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), j
    # outside the layers: the first slice's sources before them, the last slice's after
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], sb["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.config.num_hidden_layers == 6
    assert torch.isfinite(merged(torch.tensor([[1, 2, 3]])).logits).all()


def test_a_sliced_merge_loads_into_a_model_of_its_own_depth():
    model = llama(0)
    m = StateTensors(model)
    plan = plan_merge(m, [m], [basis_identity(m)], "linear", parameters={"weight": 1.0},
                      slices=[OutputSlice([SliceSource(m, (0, 4))]), OutputSlice([SliceSource(m, (2, 4))])])
    out = plan.into(model)
    assert out.config.num_hidden_layers == 6 and model.config.num_hidden_layers == 4
    assert torch.equal(out.model.layers[5].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)


def test_a_gradient_runs_from_0_to_1_across_each_slice():
    a, b = StateTensors(llama(0)), StateTensors(llama(1))
    slices = [OutputSlice([SliceSource(a, (0, 3)), SliceSource(b, (1, 4))], base=a, parameters={"t": [0.0, 1.0]}),
              OutputSlice([SliceSource(a, (3, 4)), SliceSource(b, (0, 1))], base=a)]
    plan = plan_merge(a, [b], [basis_identity(b)], "slerp", base=a, parameters={"t": 0.25}, slices=slices)
    assert plan.names.count("model.layers.3.mlp.up_proj.weight") == 1 and plan.config.num_hidden_layers == 4
    assert [plan.tasks[f"model.layers.{j}.mlp.up_proj.weight"].t for j in range(4)] == [0, 0.5, 1, 1]
    merged = dict(plan.tensors())
    w = "mlp.up_proj.weight"
    assert torch.equal(merged[f"model.layers.0.{w}"], a[f"model.layers.0.{w}"])  # t = 0: the base
    assert torch.equal(merged[f"model.layers.2.{w}"], b[f"model.layers.3.{w}"])  # t = 1: the other end
    # the last slice has no setting of its own: the merge's t = 0.25 applies, between a's layer 3 and b's layer 0
    mid = merged[f"model.layers.3.{w}"]
    assert not torch.equal(mid, a[f"model.layers.3.{w}"]) and not torch.equal(mid, b[f"model.layers.0.{w}"])


def test_the_config_follows_the_layers_it_stacks():
    torch.manual_seed(0)
    cfg = T.Gemma2Config(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8)
    m = StateTensors(T.Gemma2ForCausalLM(cfg).eval())
    assert m.config.layer_types == ["sliding_attention", "full_attention"] * 2
    plan = plan_merge(m, [m], [basis_identity(m)], "linear", model_parameters=[{"weight": 1.0}],
                      slices=[OutputSlice([SliceSource(m, (1, 4))]), OutputSlice([SliceSource(m, (1, 2))])])
    assert plan.config.num_hidden_layers == 4
    assert plan.config.layer_types == ["full_attention", "sliding_attention", "full_attention", "full_attention"]


@pytest.mark.parametrize("slices, says", [
    ([{"sources": [{"model": "A", "layer_range": [2, 5]}]}], "layer_range [2, 5] of"),
    ([{"sources": [{"model": "A", "layer_range": [2, 2]}]}], "out of bounds"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}],
     "different lengths"),
])
def test_slices_that_do_not_line_up_exit_1_and_write_nothing(tmp_path, folders, capsys, slices, says):
    a, b = folders
    for s in slices:
        for src in s["sources"]:
            src["model"] = {"A": a, "B": b}[src["model"]]
    assert run(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": slices}) == 1
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_task_vector_slice_needs_its_base_among_its_sources(tmp_path, folders, capsys):
    a, b = folders
    recipe = {"merge_method": "task_arithmetic", "base_model": a,
              "slices": [{"sources": [{"model": b, "layer_range": [0, 4]}]}]}
    assert run(tmp_path, recipe) == 1
    assert "the base model" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_recipe_gives_models_or_slices_not_both():
    from merge_graphs.errors import RecipeError
    from merge_graphs.recipe import load_recipe

    with pytest.raises(RecipeError, match="exactly one of 'models'"):
        load_recipe({"models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]})


def test_slices_address_one_stack_of_layers():
    names = ["text.layers.0.w", "text.layers.1.w", "vision.layers.0.w"]
    with pytest.raises(MergeParameterError, match="several: text.layers .2 layers., vision.layers .1 layers."):
        layer_stack(names, "clip")
    assert layer_stack(names[:2], "text").rename("text.layers.1.w", 7) == "text.layers.7.w"
