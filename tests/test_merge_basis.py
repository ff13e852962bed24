"""Merging in the folded basis: a model merged with a rotated, permuted copy of itself computes what
it computed, whatever ties its head had. (The tied-head fault of 0cb208e overwrote the folded,
untied head with the merged embedding.)"""

from __future__ import annotations

import pytest
import torch

import merge_graphs as mg
from merge_graphs.aligners import basis_identity
from merge_graphs.api import merge_aligned
from merge_graphs.rotation import random_rotation, rotate_model, rotation_kind
from merge_graphs.sources import StateTensors
from merge_graphs.symmetry import symmetry_spec
from tests.tiny_models import example_input, make, outputs

LM_FAMILIES = ["gpt2-lm", "llama-lm", "llama-lm-mha-tied-bias", "qwen2-lm", "qwen2-lm-tied", "mistral-lm",
               "qwen3-lm-tied-bias", "gemma-lm", "phi3-lm-tied"]


def _copy_of(model, seed: int):
    """The same function in another basis: units permuted, residual stream rotated."""
    spec = symmetry_spec(model)
    permuted = mg.permute(model, mg.random_permutations(spec, seed=seed))
    q = random_rotation(spec.groups["residual"].size, rotation_kind(spec), seed=seed).to(torch.float32)
    return rotate_model(permuted, q)


CASES = [(f, "linear") for f in LM_FAMILIES] + [(f, m) for f in ("gpt2-lm", "qwen2-lm-tied") for m in ("slerp", "dare_linear")]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_merging_a_model_with_an_aligned_copy_of_itself_keeps_its_function(family, method):
    model = make(family)
    other = _copy_of(model, seed=1)
    params = {"t": 0.5} if method == "slerp" else None
    per_model = {"linear": [{"weight": 0.5}] * 2, "slerp": None, "dare_linear": [{"weight": 0.5, "density": 1.0}] * 2}[method]
    base = model if method in ("slerp", "dare_linear") else None
    merged = mg.merge_models([model, other], method=method, align="weight", residual="rotation",
                             base_model=base, parameters=params, model_parameters=per_model)
    inputs = example_input(model)
    want, got = outputs(model, inputs)["logits"], outputs(merged, inputs)["logits"]
    assert torch.allclose(got, want, atol=1e-3 * want.abs().max()), float((got - want).abs().max())


def test_folded_head_is_merged_on_its_own_not_as_the_embedding():
    model = make("gpt2-lm")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    alignment = basis_identity(StateTensors(model), "rotation")
    merged = merge_aligned(model, [model], [alignment], "linear", model_parameters=[{"weight": 1.0}])
    assert not merged.config.tie_word_embeddings
    assert not torch.allclose(merged.lm_head.weight, merged.transformer.wte.weight)
    inputs = example_input(model)
    want = outputs(model, inputs)["logits"]
    assert torch.allclose(outputs(merged, inputs)["logits"], want, atol=1e-4 * want.abs().max())
