"""Recipe validation: every error names the field, the bad value and the fix."""

import pytest

from merge_graphs.errors import RecipeError
from merge_graphs.recipe import load_recipe

TWO = [{"model": "org/a"}, {"model": "org/b"}]


@pytest.mark.parametrize("recipe, message", [
    ({"models": []}, r"give exactly one of 'models' \(whole models, e.g. models: \[{model: org/name}\]\), 'slices' "
                     r"\(ranges of layers\) or 'modules'"),
    ({"models": [{"weight": 1}]}, r"'models.0.model': required field is missing"),
    ({"models": TWO, "dtpye": "float32"}, r"'dtpye': unknown field; check the spelling"),
    ({"models": TWO, "dtype": "float8"}, r"'dtype': Input should be 'float32', 'bfloat16' or 'float16' \(got 'float8'\)"),
    ({"models": TWO, "align": {"method": "magic"}}, r"'align.method': .*'weight'.*\(got 'magic'\)"),
    ({"models": TWO, "align": {"solver": "hungarian"}}, r"'align.solver': .*'exact'.*\(got 'hungarian'\)"),
    ({"models": TWO, "align": {"method": "activation"}}, r"'align': method 'activation' needs calibration data"),
    ({"models": TWO, "align": {"method": "activation", "calibration": {}}}, r"exactly one of 'texts'"),
    ({"models": TWO, "merge": {"method": "average"}}, r"'merge.method': unknown merge method 'average'; choose one of"),
    ({"models": TWO, "merge": {"method": "ties"}}, r"merge method 'ties' needs base_model: add base_model"),
    ({"models": TWO, "merge": {"method": "slerp", "parameters": {"t": 0.5}}, "base_model": "org/base"},
     r"slerp merges exactly two models"),
    ({"models": TWO, "merge": {"parameters": {"t": 0.5}}}, r"merge.parameters: linear has no parameter \['t'\]"),
    ({"models": [{"model": "a", "parameters": {"density": 0.5}}]}, r"models\[0\].parameters: linear has no parameter"),
    ({"models": TWO, "output": {"push_to_hub": {"repo_id": "nonamespace"}}},
     r"'output.push_to_hub.repo_id': repo_id must look like 'your-name/model-name', got 'nonamespace'"),
    ({"models": TWO, "tokenizer_source": "union"}, r"'union' needs align: {method: none}"),
    ({"models": TWO, "evaluate": {"data": "x.txt", "max_windows": 0}}, r"'evaluate.max_windows'"),
    ({"models": TWO, "align": {"method": "none", "residual": "rotation"}}, r"residual 'rotation' needs method"),
    ({"models": TWO, "align": {"residual": "orthogonal"}}, r"'align.residual'.*'rotation'.*\(got 'orthogonal'\)"),
])
def test_each_error_names_the_field_and_the_fix(recipe, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_yaml_and_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("models: [a")
    with pytest.raises(RecipeError, match="a YAML mapping"):
        load_recipe("- just\n- a list\n")
    with pytest.raises(RecipeError, match="recipe file .*missing.yaml.* not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_defaults_and_round_trip():
    r = load_recipe({"models": TWO})
    assert (r.align.method, r.align.solver, r.merge.method) == ("weight", "auto", "linear")
    again = load_recipe(r.to_yaml())
    assert again == r


def test_mergekit_recipe_runs_without_alignment():
    r = load_recipe("""
merge_method: ties
base_model: org/base
models:
  - model: org/base
  - model: org/ft-1
    parameters: {weight: 0.6, density: 0.5}
  - model: org/ft-2
    parameters: {weight: 0.4, density: 0.5}
parameters: {normalize: true}
dtype: bfloat16
""")
    assert r.source_format == "mergekit" and r.align.method == "none"
    assert [m.model for m in r.models] == ["org/ft-1", "org/ft-2"]  # the base is the base, not a model
    assert r.models[0].merge_parameters() == {"weight": 0.6, "density": 0.5}
    assert r.merge.parameters == {"normalize": True} and r.dtype == "bfloat16"
    assert r.refs() == ["org/base", "org/ft-1", "org/ft-2"]


def test_a_mergekit_modules_section_is_read_part_by_part():
    r = load_recipe({"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
                     "modules": {"text_decoder": {"models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 1}}],
                                                  "parameters": {"density": [0.2, 0.8]}},
                                 "vision_tower": {"slices": [{"sources": [{"model": "b", "layer_range": [0, 2]},
                                                                          {"model": "base", "layer_range": [0, 2]}]}]}}})
    assert list(r.modules) == ["text_decoder", "vision_tower"] and r.models == []
    # the base is the base of a task-vector method, in a module as at the top
    assert [m.model for m in r.modules["text_decoder"].models] == ["a"]
    assert r.modules["text_decoder"].parameters == {"density": [0.2, 0.8]}
    assert r.refs() == ["base", "a", "b"] and r.first_model == "a"
    assert [m.model for m in r.merged_entries()] == ["a", "b"]


@pytest.mark.parametrize("recipe,message", [
    ({"merge_method": "linear", "modules": {}}, r"'modules' is empty"),
    ({"merge_method": "linear", "models": TWO, "modules": {"text_decoder": {"models": TWO}}},
     r"give exactly one of 'models'"),
    ({"merge_method": "linear", "modules": {"text_decoder": {"models": TWO, "slices": []}}},
     r"a module gives exactly one of 'models' or 'slices'"),
    # strict in merge-graphs' own format (mergekit's ignores what a method does not take, with a warning)
    ({"modules": {"text_decoder": {"models": TWO, "parameters": {"t": 0.5}}}, "align": {"method": "none"}},
     r"modules.text_decoder.parameters: linear has no parameter \['t'\]"),
    ({"merge_method": "ties", "modules": {"text_decoder": {"models": TWO}}}, r"needs base_model"),
    ({"merge_method": "linear", "modules": {"text_decoder": {"models": TWO}}, "align": {"method": "weight"}},
     r"align works on whole models, and this recipe merges modules"),
    ({"merge_method": "linear", "modules": ["text_decoder"]}, r"modules: a mapping from each part's name"),
])
def test_bad_modules_sections_are_refused_with_the_fix(recipe, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_what_mergekit_ignores_is_ignored_and_named(caplog):
    """mergekit's config models ignore unknown keys, and its methods the parameters they do not take: a
    recipe mergekit runs must run here too, saying what has no effect."""
    r = load_recipe({"merge_method": "model_stock", "base_model": "base", "int8_mask": True,
                     "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}],
                     "parameters": {"filter_wise": False, "normalize": True}})
    assert [m.model for m in r.models] == ["a", "b"] and r.models[0].parameters == {}
    assert r.merge.parameters == {"filter_wise": False}
    said = caplog.text
    assert "ignoring int8_mask, models[0].parameters.weight, parameters.normalize" in said
    r = load_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2], "revision": "dpo-v0"}], "residual_weight": 0.5}]})
    assert r.slices[0].sources[0].model == "a" and "slices[0].residual_weight, slices[0].sources[0].revision" in caplog.text
    # a merge-graphs recipe stays strict
    with pytest.raises(RecipeError, match="model_stock has no parameter"):
        load_recipe({"models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}], "base_model": "c",
                     "merge": {"method": "model_stock"}})


def test_relative_folders_resolve_against_the_recipe_file(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "held.txt").write_text("x")
    path = tmp_path / "r.yaml"
    path.write_text("models:\n  - model: models/a\n  - model: org/hub-model\nevaluate: {data: held.txt}\n")
    r = load_recipe(str(path))
    assert r.models[0].model == str(tmp_path / "models" / "a")
    assert r.models[1].model == "org/hub-model"  # not a folder there: a Hub id
    assert r.evaluate.data == str(tmp_path / "held.txt")
