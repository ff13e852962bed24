"""Learned alignment: within-head maps keep every family's function, the learned maps keep B's
function, and learning lowers the interpolated models' loss on a real pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import merge_graphs as mg
from merge_graphs import zoo
from merge_graphs.api import identity_alignment, merge_aligned
from merge_graphs.errors import RecipeError, UnsupportedArchitectureError
from merge_graphs.learned import learned_alignment
from merge_graphs.quickstart import calibration_inputs, heldout_loss, load_pair
from merge_graphs.recipe import load_recipe
from merge_graphs.rotation import fold_norms, folded_model, head_map_groups, random_rotation, rotate_heads
from merge_graphs.symmetry import symmetry_spec
from tests.tiny_models import VOCAB, example_input, make, outputs

HEAD_FAMILIES = ["gpt2-lm", "llama-lm", "llama-lm-mha-tied-bias", "mistral-lm", "qwen2-lm", "qwen2-lm-tied"]
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


def _random_head_maps(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    maps = {}
    for i, (group, heads) in enumerate(head_map_groups(spec).items()):
        dim = spec.groups[group].size
        maps[group] = torch.stack([random_rotation(dim, "free", seed=seed + 100 * i + h) for h in range(heads)])
    return maps


def _folded(model):
    spec = symmetry_spec(model)
    folded_spec, _ = fold_norms(spec, model.state_dict())
    return folded_spec, folded_model(model)


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_within_head_orthogonal_maps_keep_the_function(family):
    spec, model = _folded(make(family))
    groups = head_map_groups(spec)
    assert groups and all(g.endswith(".vo") or g.endswith(".qk") for g in groups)
    assert any(g.endswith(".qk") for g in groups) == (family == "gpt2-lm")  # RoPE fixes q/k dims
    moved = mg.api._with_state(model, rotate_heads(spec, model.state_dict(), _random_head_maps(spec)))
    inputs = example_input(model)
    want, got = outputs(model, inputs)["logits"], outputs(moved, inputs)["logits"]
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max())
    assert not torch.equal(moved.state_dict()[next(n for n in spec.tensors if "o_proj" in n or "c_proj" in n)],
                           model.state_dict()[next(n for n in spec.tensors if "o_proj" in n or "c_proj" in n)])


@pytest.mark.parametrize("family", ["gpt2-lm", "llama-lm"])
def test_a_non_orthogonal_head_map_changes_the_function(family):
    """Negative control: the test above would fail if the maps were not admissible."""
    spec, model = _folded(make(family))
    maps = {g: m * 1.5 for g, m in _random_head_maps(spec).items()}
    moved = mg.api._with_state(model, rotate_heads(spec, model.state_dict(), maps))
    inputs = example_input(model)
    want, got = outputs(model, inputs)["logits"], outputs(moved, inputs)["logits"]
    assert not torch.allclose(got, want, atol=1e-2 * want.abs().max())


@pytest.mark.parametrize("family", ["gpt2-lm", "llama-lm", "qwen2-lm-tied"])
def test_learned_maps_keep_b_function_and_are_deterministic(family):
    a, b = make(family, seed=0), make(family, seed=1)
    calib = {"input_ids": torch.randint(2, VOCAB, (8, 9), generator=torch.Generator().manual_seed(0))}
    found = learned_alignment(a, b, calib, steps=4, batch_size=4, lr=0.05, heads=True)
    again = learned_alignment(a, b, calib, steps=4, batch_size=4, lr=0.05, heads=True)
    assert found.method == "learned" and len(found.loss_curve) == 4
    assert torch.equal(found.rotation, again.rotation)
    assert found.head_maps and all(not torch.allclose(m, torch.eye(m.shape[-1]).expand_as(m), atol=1e-4)
                                   for m in found.head_maps.values())
    moved = found.apply(b, verify=True)  # raises if B's function changed
    inputs = example_input(b)
    want = outputs(b, inputs)["logits"]
    assert torch.allclose(outputs(moved, inputs)["logits"], want, atol=1e-4 * want.abs().max())


def test_learning_lowers_the_midpoint_loss_of_a_real_pair():
    a, b, _ = load_pair(QUICKSTART)
    heldout = QUICKSTART / "heldout.txt"
    calib = calibration_inputs(zoo.load_docstring_corpus("train"), n=64, seq_len=128)
    start = mg.rotation.rotation_alignment(a, b)
    found = learned_alignment(a, b, calib, start=start, steps=40, batch_size=8)
    assert torch.equal(found.permutations["layers.0.mlp"], start.permutations["layers.0.mlp"])

    def midpoint(alignment):
        merged = merge_aligned(a, [a, b], [identity_alignment(a, "rotation"), alignment], "linear",
                               residual="rotation", model_parameters=[{"weight": 1.0}] * 2)
        return heldout_loss(merged, None, heldout, max_windows=32)

    before, after = midpoint(start), midpoint(found)
    assert after < before - 0.02, (before, after)


def test_learned_alignment_refuses_post_layernorm_encoders():
    a, b = make("bert-mlm", 0), make("bert-mlm", 1)
    with pytest.raises(UnsupportedArchitectureError, match="post-LayerNorm"):
        mg.align(a, b, "learned", calibration={"input_ids": torch.randint(2, VOCAB, (4, 8))})


def test_recipe_learned_needs_calibration_and_merges_in_the_folded_basis():
    with pytest.raises(RecipeError, match="calibration"):
        load_recipe({"models": [{"model": "a"}, {"model": "b"}], "align": {"method": "learned"}})
    recipe = load_recipe({"models": [{"model": "a"}, {"model": "b"}],
                          "align": {"method": "learned", "calibration": {"texts": ["x"]}, "learn": {"steps": 7}}})
    assert recipe.align.residual == "rotation" and recipe.align.learn.steps == 7
