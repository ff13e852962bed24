"""Learned alignment: the learned maps keep B's function, and learning lowers the interpolated
models' loss on a real pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import merge_graphs as mg
from merge_graphs.aligners import basis_identity
from merge_graphs.api import aligned_model, merge_aligned
from merge_graphs.errors import RecipeError, UnsupportedArchitectureError
from merge_graphs.lab import trainers
from merge_graphs.lab.quickstart import calibration_inputs, heldout_loss, load_pair
from merge_graphs.learned import learned_alignment
from merge_graphs.recipe import load_recipe
from merge_graphs.sources import StateTensors
from tests.tiny_models import VOCAB, example_input, make, outputs

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


@pytest.mark.parametrize("family", ["gpt2-lm", "llama-lm", "qwen2-lm-tied"])
def test_learned_maps_keep_b_function_and_are_deterministic(family):
    a, b = make(family, seed=0), make(family, seed=1)
    calib = {"input_ids": torch.randint(2, VOCAB, (8, 9), generator=torch.Generator().manual_seed(0))}
    found = learned_alignment(a, b, calib, steps=4, batch_size=4, lr=0.05, heads=True)
    again = learned_alignment(a, b, calib, steps=4, batch_size=4, lr=0.05, heads=True)
    assert found.method == "learned" and len(found.loss_curve) == 4
    assert torch.equal(found.rotation, again.rotation)
    start = mg.rotation.rotation_alignment(a, b)
    assert set(found.head_maps) == {hm.name for hm in found.spec.head_maps}
    assert all(name not in start.head_maps or not torch.allclose(m, start.head_maps[name], atol=1e-4)
               for name, m in found.head_maps.items())
    moved = aligned_model(b, found)  # raises if B's function changed
    inputs = example_input(b)
    want = outputs(b, inputs)["logits"]
    assert torch.allclose(outputs(moved, inputs)["logits"], want, atol=1e-4 * want.abs().max())


def test_learning_lowers_the_midpoint_loss_of_a_real_pair():
    a, b, _ = load_pair(QUICKSTART)
    heldout = QUICKSTART / "heldout.txt"
    calib = calibration_inputs(trainers.load_docstring_corpus("train"), n=64, seq_len=128)
    start = mg.rotation.rotation_alignment(a, b)
    found = learned_alignment(a, b, calib, start=start, steps=40, batch_size=8)
    assert torch.equal(found.permutations["layers.0.mlp"], start.permutations["layers.0.mlp"])

    def midpoint(alignment):
        merged = merge_aligned(a, [a, b], [basis_identity(StateTensors(a), "rotation"), alignment], "linear",
                               model_parameters=[{"weight": 1.0}] * 2)
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
    with pytest.raises(RecipeError, match="drop residual: permutation"):
        load_recipe({"models": [{"model": "a"}, {"model": "b"}],
                     "align": {"method": "learned", "residual": "permutation", "calibration": {"texts": ["x"]}}})
