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
from merge_graphs.lab.bench.mergekit_fixtures import CONFIG, MODELS, RANDOM, RECIPES, model_states, recipe, sha256
from merge_graphs.methods import get_method, merge_tensors

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
FOLDERS = {name: FIXTURES / "models" / name for name in MODELS}
#: Largest absolute difference allowed from mergekit's tensors. Measured: 0 for all but slerp, whose
#: trigonometry rounds differently (2.4e-7 on entries of size about 1); None for the random recipes
#: (:data:`RANDOM`), compared by statistics instead.
TOLERANCE = {"linear": 0.0, "linear-unnormalized": 0.0, "task_arithmetic": 0.0, "ties": 0.0, "slerp": 1e-6,
             "ties-float16": 0.0, "nuslerp": 0.0, "nuslerp-base-rows": 0.0, "multislerp": 0.0, "karcher": 0.0,
             "breadcrumbs": 0.0, "breadcrumbs_ties": 0.0, "sce": 0.0, "model_stock": 0.0, "nearswap": 0.0,
             "arcee_fusion": 0.0, "ram": 0.0, "ramplus_tl": 0.0, "passthrough": 0.0, "della_linear": None}
DETERMINISTIC = sorted(set(RECIPES) - RANDOM)


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
    # the corpus beside them (corpus/, corpus-outputs/) has a manifest of its own: test_mergekit_corpus.py
    stored = {str(p.relative_to(FIXTURES)) for folder in ("models", "outputs") for p in (FIXTURES / folder).rglob("*")
              if p.is_file()}
    assert stored == set(MANIFEST["sha256"])
    for path, digest in MANIFEST["sha256"].items():
        assert sha256(FIXTURES / path) == digest, path
    assert sum((FIXTURES / p).stat().st_size for p in stored) < 600_000  # 20 recipes: 503 KB


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


@pytest.mark.parametrize("name", DETERMINISTIC)
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


def merge_directly(name: str, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Recipe ``name`` merged tensor by tensor with :func:`merge_tensors`, as mergekit reads it: the
    base model passed as ``base`` to a method that takes one (and dropped from its models), the
    arithmetic in the recipe's ``dtype``."""
    spec = RECIPES[name]
    method = get_method(spec["merge_method"])
    dtype = getattr(torch, spec["dtype"])
    states = {m: load_file(FOLDERS[m] / "model.safetensors") for m in MODELS}
    base = spec.get("base_model") if method.base != "none" else None
    entries = [e for e in spec["models"] if e["model"] != base]
    merged = {}
    for key in sorted(states["base"]):
        merged[key] = merge_tensors(
            spec["merge_method"], [states[e["model"]][key] for e in entries],
            base=None if base is None else states[base][key],
            model_parameters=[e.get("parameters", {}) for e in entries], parameters=spec.get("parameters", {}),
            dtype=dtype, generator=generator,
        ).to(dtype)
    return merged


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_merge_tensors_gives_mergekits_tensors(name):
    """Each method, in the recipe's dtype, on mergekit's inputs: its tensors (whatever the recipe loader
    does, see NEEDS_RECIPE_WIRING)."""
    assert_same_tensors(merge_directly(name), mergekits(name), TOLERANCE[name])


def test_della_keeps_what_mergekits_della_keeps_by_statistics():
    """della_linear draws its masks from a generator (mergekit: torch's global one, unseeded), so the
    stored output is compared by what it keeps: names, shapes, dtypes; about density of each tensor's
    entries, each changed by the tensor's one L1 rescale factor; more of the larger deltas."""
    base, ft1 = (load_file(FOLDERS[m] / "model.safetensors") for m in ("base", "ft1"))
    theirs = mergekits("della_linear")
    ours = merge_directly("della_linear", torch.Generator().manual_seed(0))
    assert ours.keys() == theirs.keys()
    stats = {}
    for who, merged in (("ours", ours), ("mergekit", theirs)):
        kept = large = small = 0
        for key, out in merged.items():
            assert out.dtype == theirs[key].dtype and out.shape == theirs[key].shape, key
            delta, change = ft1[key] - base[key], out - base[key]
            keep = change != 0
            scale = (change[keep] / delta[keep]).median()  # one L1 rescale factor per tensor
            assert scale > 1 and torch.allclose(change[keep], scale * delta[keep], atol=1e-6), (who, key)
            kept += int(keep.sum())
            above = delta.abs() >= delta.abs().median()
            large += int((keep & above).sum()) / int(above.sum())
            small += int((keep & ~above).sum()) / int((~above).sum())
        stats[who] = (kept / sum(t.numel() for t in merged.values()), large / len(merged), small / len(merged))
    for who, (fraction, large, small) in stats.items():
        # keep probability 0.5 +/- 0.2 linear in the magnitude's rank: 0.6 above the median, 0.4 below
        assert abs(fraction - 0.5) < 0.03 and abs(large - 0.6) < 0.05 and abs(small - 0.4) < 0.05, (who, stats)
