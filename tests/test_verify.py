"""The in-memory function check (``merge_graphs.verify.check_function_preserved``, run by
``align_models`` / ``merge_models``): it passes a right permutation and refuses a wrong one."""

import pytest
import torch
from tiny_models import make

import merge_graphs as mg
from merge_graphs.api import align_models
from merge_graphs.errors import AlignmentError
from merge_graphs.match import Alignment
from merge_graphs.symmetry import permute_state_dict
from merge_graphs.verify import check_function_preserved

# MLP units of layer 1 move in gate/up but not here: a permutation the model does not admit.
LEFT_BEHIND = "model.layers.1.mlp.down_proj.weight"


def test_the_check_passes_a_right_permutation_and_refuses_a_wrong_one():
    model = make("llama-lm")
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=1)
    assert not torch.equal(perms["layers.1.mlp"], torch.arange(len(perms["layers.1.mlp"])))
    assert check_function_preserved(model, mg.permute(model, perms, spec), spec, perms) < 1e-5
    state = permute_state_dict(spec, model.state_dict(), perms)
    state[LEFT_BEHIND] = model.state_dict()[LEFT_BEHIND]
    wrong = mg.permute(model, {}, spec)
    wrong.load_state_dict(state)
    with pytest.raises(AlignmentError, match="changed its output"):
        check_function_preserved(model, wrong, spec, perms)


def test_align_and_merge_models_refuse_an_alignment_that_changes_the_function(monkeypatch):
    a, b = make("llama-lm", seed=0), make("llama-lm", seed=1)
    right = Alignment.tensor

    def one_tensor_left_behind(self, name, source):
        return source[name] if name == LEFT_BEHIND else right(self, name, source)

    monkeypatch.setattr(Alignment, "tensor", one_tensor_left_behind)
    with pytest.raises(AlignmentError, match="changed its output"):
        align_models(a, [b], "weight")
    with pytest.raises(AlignmentError, match="changed its output"):
        mg.merge_models([a, b], align="weight")
    # It is the check that refuses: without it the same alignment goes through.
    (found,) = align_models(a, [b], "weight", verify=False)
    assert not torch.equal(found.permutations["layers.1.mlp"], torch.arange(a.config.intermediate_size))
