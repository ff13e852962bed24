import math

import pytest
import torch
from tiny_models import example_input, make
from torch import nn

import merge_graphs as mg
from merge_graphs.evaluate import accuracy, cross_entropy
from merge_graphs.fusion import fuse
from merge_graphs.lab.trainers import load_digits_split, make_mlp, train_digits_mlp


def cnn(c1=8, c2=6, h=12):
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3), nn.BatchNorm2d(c2), nn.ReLU(), nn.Flatten(),
        nn.Linear(c2 * 2 * 2, h), nn.ReLU(), nn.Linear(h, 4),
    )


def fuse_models(a, b, **kw):
    return fuse(mg.symmetry_spec(a), a.state_dict(), mg.symmetry_spec(b), b.state_dict(), **kw)


def assert_states_close(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v, atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_permuted_copy_fuses_back_to_a(family):
    a = make(family, seed=0)
    spec = mg.symmetry_spec(a)
    b = mg.permute(a, mg.random_permutations(spec, seed=3), spec)
    result = fuse(spec, a.state_dict(), spec, b.state_dict())
    assert_states_close(result.state, a.state_dict())
    for g, plan in result.plans.items():
        n = spec.groups[g].size
        assert plan.shape == (n, n)
        assert torch.equal((plan > 0).sum(0), torch.ones(n, dtype=torch.long)), g  # a permutation


def doubled_state(spec, state):
    """Every hidden unit duplicated, its outgoing weights halved: the same function, twice as wide."""
    out = dict(state)
    for name, t in spec.tensors.items():
        x = state[name]
        for axis, spaces in enumerate(t.axes):
            if not spaces or not any(s.groups for s in spaces):
                continue
            (s,) = spaces
            new = [2 * k if g else k for g, k in s.factors]
            coords = torch.meshgrid(*[torch.arange(n) % k for n, (_, k) in zip(new, s.factors)], indexing="ij")
            strides = [math.prod(k for _, k in s.factors[i + 1:]) for i in range(len(new))]
            idx = sum(c * st for c, st in zip(coords, strides)).reshape(-1)
            x = x.index_select(axis, idx)
            if len(t.axes) > 1 and axis == t.fan_in_axis:
                x = x / 2
        out[name] = x
    return out


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_duplicated_units_fuse_to_the_same_function(family):
    a = make(family, seed=1)
    wide = make_mlp([10, 64, 32, 3]) if family == "mlp" else cnn(16, 12, 24)
    if family == "mlp":  # tiny_models' MLP uses GELU after the second layer
        wide[3] = nn.GELU()
    wide.load_state_dict(doubled_state(mg.symmetry_spec(a), a.state_dict()))
    wide.eval()
    x = example_input(a)["input"]
    assert (wide(x) - a(x)).abs().max() < 1e-4  # the construction is right
    spec_w = mg.symmetry_spec(wide)
    b = mg.permute(wide, mg.random_permutations(spec_w, seed=5), spec_w)

    result = fuse_models(a, b)
    fused = make(family, seed=1)
    fused.load_state_dict(result.state)
    with torch.no_grad():
        assert (fused(x) - a(x)).abs().max() < 1e-4
    assert_states_close(result.state, a.state_dict(), atol=1e-4)
    for g, plan in result.plans.items():
        n = mg.symmetry_spec(a).groups[g].size
        assert plan.shape == (n, 2 * n)
        assert torch.equal((plan > 0).sum(1), torch.full((n,), 2)), g  # two copies per unit


@pytest.fixture(scope="module")
def digits_pair():
    a = train_digits_mlp(seed=0, widths=(64, 32, 32, 10))
    b = train_digits_mlp(seed=1, widths=(64, 64, 64, 10))
    return a, b


def test_wider_into_narrower_on_digits(digits_pair):
    a, b = digits_pair
    _, _, x, y = load_digits_split()
    result = fuse_models(a, b)
    for g, plan in result.plans.items():
        torch.testing.assert_close(plan.sum(1), torch.full((32,), 1 / 32))
        torch.testing.assert_close(plan.sum(0), torch.full((64,), 1 / 64))

    def model(state):
        m = make_mlp((64, 32, 32, 10))
        m.load_state_dict(state)
        return m.eval()

    sa, sb = a.state_dict(), b.state_dict()
    # Naive baseline: keep B's first 32 units of each hidden layer.
    truncated = {"0.weight": sb["0.weight"][:32], "0.bias": sb["0.bias"][:32],
                 "2.weight": sb["2.weight"][:32, :32], "2.bias": sb["2.bias"][:32],
                 "4.weight": sb["4.weight"][:, :32], "4.bias": sb["4.bias"]}
    fused_b = model(result.state)
    merged = model({k: (sa[k] + result.state[k]) / 2 for k in sa})
    naive = model({k: (sa[k] + truncated[k]) / 2 for k in sa})
    # Measured (seeds 0/1): A 0.961, B 0.969, fused B 0.925, A + fused B 0.953 (loss 0.21),
    # A + truncated B 0.819 (loss 1.24).
    assert accuracy(fused_b, x, y) > 0.90
    assert accuracy(merged, x, y) > 0.93
    assert cross_entropy(merged, x, y) < cross_entropy(naive, x, y)


def test_entropic_plan_has_uniform_marginals(digits_pair):
    a, b = digits_pair
    result = fuse_models(a, b, reg=0.05)
    plan = result.plans["mlp.1"]
    assert plan.shape == (32, 64)
    torch.testing.assert_close(plan.sum(0), torch.full((64,), 1 / 64), atol=1e-4, rtol=0)
    assert result.state["4.weight"].shape == (10, 32)


def test_transformers_are_refused():
    gpt2 = make("gpt2")
    spec = mg.symmetry_spec(gpt2)
    with pytest.raises(NotImplementedError, match="transformers need equal widths"):
        fuse(spec, gpt2.state_dict(), spec, gpt2.state_dict())


def test_mismatched_models_are_refused():
    a = make_mlp([10, 16, 3], seed=0)
    with pytest.raises(ValueError, match="fixed space 'inputs' has 10 units in A and 12 in B"):
        fuse_models(a, make_mlp([12, 16, 3], seed=0))
    with pytest.raises(ValueError, match="fixed space 'outputs'"):
        fuse_models(a, make_mlp([10, 16, 4], seed=0))
    with pytest.raises(ValueError, match="different groups"):
        fuse_models(a, make_mlp([10, 16, 16, 3], seed=0))
    with pytest.raises(ValueError, match="tensor 0.weight"):  # same widths, different kernels
        fuse_models(cnn(), nn.Sequential(*[nn.Conv2d(3, 8, 5, padding=2), *list(cnn())[1:]]))
