"""Our merges of mergekit recipes against what mergekit 0.1.5 itself wrote for the same recipes and
models, stored under ``tests/fixtures/mergekit`` by ``python -m merge_graphs.lab.bench.mergekit_fixtures``.
No network and no mergekit at test time; the live comparison at scale is ``merge-graphs bench scale``."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_graphs.cli import main
from merge_graphs.lab.bench.mergekit_fixtures import CONFIG, MODELS, RECIPES, model_states, recipe, sha256

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
FOLDERS = {name: FIXTURES / "models" / name for name in MODELS}
#: Largest absolute difference allowed from mergekit's tensors. Measured: 0 for all but slerp, whose
#: trigonometry rounds differently (2.4e-7 on entries of size about 1).
TOLERANCE = {"linear": 0.0, "linear-unnormalized": 0.0, "task_arithmetic": 0.0, "ties": 0.0, "slerp": 1e-6}


def mergekits(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "outputs" / f"{name}.safetensors")


def assert_same_tensors(ours, theirs, tolerance):
    assert ours.keys() == theirs.keys()
    for key, want in theirs.items():
        assert ours[key].dtype == want.dtype and ours[key].shape == want.shape, key
        diff = float((ours[key] - want).abs().max())
        assert diff <= tolerance, f"{key}: differs from mergekit's by {diff:.3g} (allowed {tolerance:g})"


def test_the_fixtures_are_what_the_manifest_says_and_small():
    assert MANIFEST["versions"]["mergekit"] == "0.1.5"
    assert MANIFEST["config"] == CONFIG
    # every recipe of the script was run by mergekit, unchanged since
    assert MANIFEST["recipes"] == RECIPES and set(TOLERANCE) == set(RECIPES)
    stored = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file()} - {"manifest.json"}
    assert stored == set(MANIFEST["sha256"])
    for path, digest in MANIFEST["sha256"].items():
        assert sha256(FIXTURES / path) == digest, path
    assert sum((FIXTURES / p).stat().st_size for p in stored) < 300_000


def test_the_script_rebuilds_the_stored_models_bit_for_bit():
    for name, state in model_states().items():
        stored = load_file(FOLDERS[name] / "model.safetensors")
        assert stored.keys() == state.keys(), name
        assert all(torch.equal(stored[k], v) for k, v in state.items()), name


def test_the_stored_outputs_tell_the_recipes_apart():
    """Every output differs from every input and from every other output by far more than any tolerance,
    so a merge that returned an input, or another recipe's result, fails the comparison below."""
    tensors = {f"input {m}": load_file(f / "model.safetensors") for m, f in FOLDERS.items()}
    tensors.update({name: mergekits(name) for name in RECIPES})
    names = sorted(tensors)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            with pytest.raises(AssertionError):
                assert_same_tensors(tensors[a], tensors[b], 1e-3)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_our_merge_of_a_mergekit_recipe_gives_mergekits_tensors(tmp_path, name, capsys):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe(name, FOLDERS)), encoding="utf-8")
    assert main([str(recipe_file), "--out", str(tmp_path / "out")]) == 0
    assert "mergekit recipe: merged without alignment, as mergekit does" in capsys.readouterr().out
    assert_same_tensors(load_file(tmp_path / "out" / "model.safetensors"), mergekits(name), TOLERANCE[name])


def test_linear_weights_are_normalised_like_mergekits():
    """The recipe's weights 0.7 and 0.5 sum to 1.2: mergekit divides by it unless normalize is false."""
    ft1, ft2 = (load_file(FOLDERS[m] / "model.safetensors") for m in ("ft1", "ft2"))
    weighted = {k: 0.7 * ft1[k] + 0.5 * ft2[k] for k in ft1}
    assert_same_tensors({k: v / 1.2 for k, v in weighted.items()}, mergekits("linear"), 1e-6)
    assert_same_tensors(weighted, mergekits("linear-unnormalized"), 1e-6)
