"""mergekit's parameter settings (gradients over layers, filters on tensor names) and merges of
architectures without a symmetry spec, by tensor name, as mergekit merges them."""

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from merge_graphs.aligners import basis_identity
from merge_graphs.cli import main
from merge_graphs.engine import plan_merge
from merge_graphs.errors import MergeParameterError, RecipeError, UnsupportedArchitectureError
from merge_graphs.parameters import check_setting, evaluate
from merge_graphs.recipe import load_recipe
from merge_graphs.slices import layer_positions
from merge_graphs.sources import StateTensors
from tests.tiny_models import LLAMA, randomize

# mergekit/config.py's evaluate_setting, read off its definition: gradients interpolate linearly between
# evenly spread points, lists of non-numbers pick, conditions take the first matching filter.


@pytest.mark.parametrize("t, want", [(0.0, 0.0), (0.25, 1.0), (0.5, 0.5), (0.6, 0.42), (0.75, 0.3), (0.9, 0.72),
                                     (1.0, 1.0)])
def test_a_gradient_interpolates_between_evenly_spread_points(t, want):
    # points at t = 0, 0.25, 0.5, 0.75, 1
    assert evaluate([0, 1, 0.5, 0.3, 1], "x", t) == pytest.approx(want)
    assert evaluate([0, 0.5], "x", t) == pytest.approx(0.5 * t)


def test_a_one_point_gradient_is_constant_and_non_numbers_are_picked():
    assert evaluate([2.0], "x", 0.7) == 2.0
    assert evaluate([True, False], "x", 0.4) is True and evaluate([True, False], "x", 1.0) is False


def test_conditions_take_the_first_matching_filter_and_fall_through_when_none_matches():
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.7}]
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.7
    assert evaluate(setting, "model.norm.weight", 0.0) is None
    assert evaluate(setting + [{"value": 0.1}], "model.norm.weight", 0.0) == 0.1
    assert evaluate([{"filter": "*", "value": 3}], "anything", 0.0) == 3
    assert evaluate({"filter": "mlp", "value": 2}, "model.layers.0.mlp.w", 0.0) == 2
    assert evaluate([], "x", 0.0) is None


def test_numbers_written_as_yaml_strings_are_numbers():
    # PyYAML reads 1e-3 as the string "1e-3"; mergekit validates it into a float
    assert evaluate("1e-3", "x", 0.0) == pytest.approx(1e-3)
    assert evaluate(["0", "1e0"], "x", 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("bad, says", [
    ({"fliter": "mlp", "value": 1}, "'fliter'"),
    ([{"filter": "mlp"}], "has no 'value'"),
    ([{"filter": 3, "value": 1}], "substring"),
    ([[1, 2]], "got [[1, 2]]"),
    ({"a": 1}, "'a'"),
])
def test_malformed_settings_are_named(bad, says):
    with pytest.raises(ValueError) as e:
        check_setting(bad)
    assert says in str(e.value)


def test_layer_positions_follow_each_stack_of_layers():
    names = ["model.embed_tokens.weight", *[f"model.layers.{i}.mlp.experts.{e}.w1.weight" for i in range(5) for e in (0, 7)],
             "model.norm.weight", "lm_head.weight", "vision.blocks.0.w", "vision.blocks.1.w", "solo.layers.0.w"]
    t = layer_positions(names)
    assert [t[f"model.layers.{i}.mlp.experts.7.w1.weight"] for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert t["model.layers.2.mlp.experts.0.w1.weight"] == 0.5  # an expert's index is not a layer
    assert t["model.embed_tokens.weight"] == t["model.norm.weight"] == t["lm_head.weight"] == 0
    assert (t["vision.blocks.0.w"], t["vision.blocks.1.w"]) == (0, 1)
    assert t["solo.layers.0.w"] == 1  # mergekit: t = 1 in a one-layer stack


# The engine resolves them per tensor


def llama(seed, layers=3):
    torch.manual_seed(seed)
    return randomize(T.LlamaForCausalLM(T.LlamaConfig(**{**LLAMA, "num_hidden_layers": layers})))


def test_a_merge_applies_gradients_and_filters_tensor_by_tensor():
    a, b = StateTensors(llama(0)), StateTensors(llama(1))
    weight_b = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": [1.0, 0.5, 0.0]}]
    plan = plan_merge(a, [a, b], [basis_identity(a), basis_identity(b)], "linear",
                      model_parameters=[{"weight": 1.0}, {"weight": weight_b + [{"value": 0.0}]}],
                      parameters={"normalize": False})
    merged = dict(plan.tensors())
    assert torch.equal(merged["model.norm.weight"], a["model.norm.weight"])
    for i, (attn, mlp) in enumerate([(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]):
        q, up = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"
        assert torch.allclose(merged[q], a[q] + attn * b[q], atol=1e-6), q
        assert torch.allclose(merged[up], a[up] + mlp * b[up], atol=1e-6), up
    # neither filter matches the norms or embeddings, and no lower level sets weight: mergekit's error
    with pytest.raises(MergeParameterError, match="needs parameter 'weight'"):
        dict(plan_merge(a, [a, b], [basis_identity(a), basis_identity(b)], "linear",
                        model_parameters=[{"weight": 1.0}, {"weight": weight_b}]).tensors())


def test_a_model_setting_that_matches_nothing_falls_back_to_the_merges_setting():
    a, b = StateTensors(llama(0)), StateTensors(llama(1))
    plan = plan_merge(a, [a, b], [basis_identity(a), basis_identity(b)], "linear",
                      model_parameters=[{}, {"weight": [{"filter": "mlp", "value": 3.0}]}],
                      parameters={"weight": 1.0, "normalize": False})
    merged = dict(plan.tensors())
    up, norm = "model.layers.1.mlp.up_proj.weight", "model.norm.weight"
    assert torch.allclose(merged[up], a[up] + 3 * b[up]) and torch.allclose(merged[norm], a[norm] + b[norm])


def test_a_filter_that_matches_no_tensor_is_refused_with_the_names_it_could_match():
    a, b = StateTensors(llama(0)), StateTensors(llama(1))
    with pytest.raises(MergeParameterError, match="filter 'self_atn' of parameter 't' matches no tensor"):
        plan_merge(a, [b], [basis_identity(b)], "slerp", base=a,
                   parameters={"t": [{"filter": "self_atn", "value": 0.3}, {"value": 0.5}]})


# From a recipe file, through the CLI


def save(model, folder):
    model.save_pretrained(folder)
    return str(folder)


def test_a_mergekit_gradient_recipe_runs_and_a_bad_filter_exits_1_writing_nothing(tmp_path, capsys):
    a, b = save(llama(0), tmp_path / "a"), save(llama(1), tmp_path / "b")
    recipe = {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}], "dtype": "float32",
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                   {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]}}
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(recipe))
    assert main([str(good), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    sa, sb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    # t = 0 and t = 1 give the ends exactly: layer 0's attention is a's, its MLP is b's; the last layer the reverse
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], sa["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(out["model.layers.0.mlp.down_proj.weight"], sb["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(out["model.layers.2.self_attn.k_proj.weight"], sb["model.layers.2.self_attn.k_proj.weight"])
    assert torch.equal(out["model.layers.2.mlp.down_proj.weight"], sa["model.layers.2.mlp.down_proj.weight"])

    recipe["parameters"]["t"][0]["filter"] = "self_atn"
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(recipe))
    capsys.readouterr()
    assert main([str(bad), "--out", str(tmp_path / "bad-out"), "--quiet"]) == 1
    assert "filter 'self_atn'" in capsys.readouterr().err
    assert not (tmp_path / "bad-out").exists()


def test_a_malformed_setting_fails_when_the_recipe_is_read():
    with pytest.raises(RecipeError, match=r"models\[0\].parameters.weight: a conditional setting"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"fliter": "x"}}},
                                                          {"model": "b"}]})


# Architectures without a symmetry spec merge by name, and refuse alignment


UNALIGNED = {
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=40)),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=40)),
}


@pytest.mark.parametrize("family", sorted(UNALIGNED))
def test_an_architecture_without_a_spec_merges_by_name_and_refuses_alignment(tmp_path, capsys, family):
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders.append(save(UNALIGNED[family]().eval(), tmp_path / f"m{seed}"))
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(json.dumps({"merge_method": "linear", "dtype": "float32",
                                  "models": [{"model": folders[0], "parameters": {"weight": 0.25}},
                                             {"model": folders[1], "parameters": {"weight": 0.75}}]}))
    assert main([str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    ins = [load_file(f"{f}/model.safetensors") for f in folders]
    assert out.keys() == ins[0].keys()
    for name, v in out.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.25 * ins[0][name] + 0.75 * ins[1][name], atol=1e-6), name
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded).__name__ == type(UNALIGNED[family]()).__name__

    aligned = tmp_path / "aligned.yaml"
    aligned.write_text(json.dumps({"models": [{"model": f} for f in folders], "align": {"method": "weight"}}))
    capsys.readouterr()
    for extra in ([], ["--dry-run"]):
        assert main([str(aligned), "--out", str(tmp_path / "aligned-out"), "--quiet", *extra]) == 1
        err = capsys.readouterr().err
        assert "no symmetry spec" in err and "Alignment is unavailable" in err and "align: {method: none}" in err
        assert not (tmp_path / "aligned-out").exists()


def test_the_api_refuses_to_align_an_architecture_without_a_spec():
    import merge_graphs

    torch.manual_seed(0)
    a, b = UNALIGNED["phi"]().eval(), UNALIGNED["phi"]().eval()
    with pytest.raises(UnsupportedArchitectureError, match="Alignment is unavailable for PhiForCausalLM"):
        merge_graphs.align(a, b)
    merged = merge_graphs.merge_models([a, b], align="none")
    name = "model.layers.1.mlp.fc1.weight"
    assert torch.allclose(merged.state_dict()[name], (a.state_dict()[name] + b.state_dict()[name]) / 2)
