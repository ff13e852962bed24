"""Our merges of mergekit ``modules:`` recipes (a vision-language model merged part by part) against
what mergekit 0.1.5 wrote for the same recipes and tiny Mistral3 models, stored under
``tests/fixtures/mergekit/modules`` by ``python -m merge_graphs.lab.bench.mergekit_modules``.
No network and no mergekit at test time."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_graphs.cli import main
from merge_graphs.lab.bench import mergekit_modules as script
from merge_graphs.lab.bench.mergekit_fixtures import sha256
from merge_graphs.lab.bench.mergekit_modules import MODELS, RECIPES, TOLERANCE, model_states, recipe

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit" / "modules"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
FOLDERS = {name: FIXTURES / "models" / name for name in MODELS}
LAYER_COUNTS = ("text_config", "vision_config")


def mergekits(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "outputs" / f"{name}.safetensors")


def mergekits_config(name: str) -> dict:
    return json.loads((FIXTURES / "outputs" / f"{name}.config.json").read_text(encoding="utf-8"))


def layer_counts(config: dict) -> dict[str, int]:
    return {part: config[part]["num_hidden_layers"] for part in LAYER_COUNTS}


def assert_same_tensors(ours, theirs, tolerance):
    assert sorted(ours) == sorted(theirs)
    for key, want in theirs.items():
        assert ours[key].dtype == want.dtype and ours[key].shape == want.shape, key
        if tolerance == 0:
            assert torch.equal(ours[key], want), f"{key}: differs from mergekit's by " \
                                                 f"{float((ours[key].float() - want.float()).abs().max()):.3g}"
        else:
            diff = float((ours[key].float() - want.float()).abs().max())
            assert diff <= tolerance, f"{key}: differs from mergekit's by {diff:.3g} (allowed {tolerance:g})"


def run_ours(tmp_path: Path, spec: dict, name: str = "recipe") -> tuple[int, Path]:
    recipe_file = tmp_path / f"{name}.yaml"
    recipe_file.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    out = tmp_path / f"{name}-out"
    return main([str(recipe_file), "--out", str(out), "--quiet"]), out


def test_the_fixtures_are_what_the_manifest_says_and_small():
    assert MANIFEST["versions"]["mergekit"] == "0.1.5"
    assert MANIFEST["config"] == script.CONFIG and MANIFEST["recipes"] == RECIPES
    stored = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert stored == set(MANIFEST["sha256"])
    assert stored == ({f"models/{m}/{f}" for m in MODELS for f in ("config.json", "model.safetensors")}
                      | {f"outputs/{n}.{ext}" for n in RECIPES for ext in ("safetensors", "config.json")})
    for path, digest in MANIFEST["sha256"].items():
        assert sha256(FIXTURES / path) == digest, path
    assert sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()) < 300_000  # 6 recipes: 267 KB


def test_the_script_rebuilds_the_stored_models_bit_for_bit():
    for name, state in model_states().items():
        stored = load_file(FOLDERS[name] / "model.safetensors")
        assert sorted(stored) == sorted(state), name
        assert all(stored[k].dtype == v.dtype and torch.equal(stored[k], v) for k, v in state.items()), name


def test_the_stored_names_are_those_transformers_writes_for_mistral3():
    assert set(script.checkpoint_shapes()) == script.saved_names()
    names = set(load_file(FOLDERS["a"] / "model.safetensors"))
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_tower", "multi_modal_projector"}


def test_the_stored_outputs_tell_the_recipes_apart():
    """Each output differs from the others, and each merge from every input, by far more than any tolerance."""
    inputs = {m: load_file(f / "model.safetensors") for m, f in FOLDERS.items()}
    outputs = {name: mergekits(name) for name in RECIPES}

    def far(x, y):
        shared = set(x) & set(y)
        return shared and any(x[k].shape == y[k].shape and (x[k].float() - y[k].float()).abs().max() > 1e-3
                              for k in shared)

    for name, merged in outputs.items():
        assert all(far(merged, other) for o, other in outputs.items() if o != name), name
        if RECIPES[name]["merge_method"] != "passthrough":
            assert all(far(merged, x) for x in inputs.values()), name


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_our_merge_of_a_modules_recipe_gives_mergekits_tensors_and_layer_counts(tmp_path, name):
    code, out = run_ours(tmp_path, recipe(name, FOLDERS))
    assert code == 0
    assert_same_tensors(load_file(out / "model.safetensors"), mergekits(name), TOLERANCE.get(name, 0.0))
    ours = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert layer_counts(ours) == layer_counts(mergekits_config(name))


def test_the_frankenmerge_stacks_the_layers_it_names():
    """passthrough-frankenmerge: a's text layers 0-1, then b's 1-2, b's vision tower, a's projector."""
    a, b = (load_file(FOLDERS[m] / "model.safetensors") for m in ("a", "b"))
    merged = mergekits("passthrough-frankenmerge")
    layer = "language_model.model.layers.{}.mlp.up_proj.weight"
    for out, (model, i) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        assert torch.equal(merged[layer.format(out)], model[layer.format(i)])
    assert torch.equal(merged["vision_tower.patch_conv.weight"], b["vision_tower.patch_conv.weight"])
    assert torch.equal(merged["multi_modal_projector.linear_1.weight"], a["multi_modal_projector.linear_1.weight"])


def refused(tmp_path, capsys, spec: dict) -> str:
    code, out = run_ours(tmp_path, spec, "refused")
    assert code == 1
    assert not out.exists()
    return capsys.readouterr().err


def base_recipe() -> dict:
    return copy.deepcopy(recipe("ties-per-module", FOLDERS))


def test_a_modules_recipe_that_leaves_out_a_part_is_refused(tmp_path, capsys):
    spec = base_recipe()
    del spec["modules"]["vision_tower"]
    err = refused(tmp_path, capsys, spec)
    assert "vision_tower" in err and "give each part its models" in err


def test_an_unknown_module_is_refused(tmp_path, capsys):
    spec = base_recipe()
    spec["modules"]["vision_model"] = spec["modules"].pop("vision_tower")
    err = refused(tmp_path, capsys, spec)
    assert "['vision_model'] are not parts of a mistral3 model" in err
    assert "vision_tower" in err  # the names to use instead


def test_a_module_slice_beyond_the_layers_is_refused(tmp_path, capsys):
    spec = copy.deepcopy(recipe("passthrough-frankenmerge", FOLDERS))
    spec["modules"]["text_decoder"]["slices"][1]["sources"][0]["layer_range"] = [1, 4]
    err = refused(tmp_path, capsys, spec)
    assert "modules.text_decoder.slices[1]: layer_range [1, 4]" in err
    assert "out of bounds: it has layers 0 to 2" in err and "stop at most 3" in err


def test_a_module_filter_that_matches_no_tensor_is_refused(tmp_path, capsys):
    spec = base_recipe()
    spec["modules"]["vision_tower"]["parameters"]["density"] = [{"filter": "feed_forwrd", "value": 0.3},
                                                               {"value": 0.6}]
    err = refused(tmp_path, capsys, spec)
    assert "filter 'feed_forwrd' of parameter 'density' matches no tensor" in err
    assert "fix the filter or remove that entry" in err


def test_a_module_filter_that_matches_only_another_modules_tensors_is_refused(tmp_path, capsys):
    # self_attn names the text decoder's attention (the vision tower's is "attention."): in the
    # vision tower's parameters it would silently do nothing
    spec = base_recipe()
    spec["modules"]["vision_tower"]["parameters"]["density"] = [{"filter": "self_attn", "value": 0.3},
                                                               {"value": 0.6}]
    err = refused(tmp_path, capsys, spec)
    assert "filter 'self_attn' of parameter 'density' matches no tensor of the vision_tower of" in err
