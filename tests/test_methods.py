"""Merge methods against hand-computed results, mergekit's quirks, dtypes and error messages."""

import math

import pytest
import torch

from merge_graphs.methods import METHODS, get_method, merge_tensors, register


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape
    assert torch.allclose(actual.float(), expected, atol=atol), (actual, expected)


def test_registry_defaults_match_mergekit():
    assert set(METHODS) >= {"linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
    assert dict(METHODS["linear"].global_parameters) == {"normalize": True}
    assert dict(METHODS["linear"].model_parameters) == {"weight": None}
    assert dict(METHODS["slerp"].global_parameters) == {"t": None}
    expected = {  # (normalize, rescale) per mergekit's registry.py
        "task_arithmetic": (False, False),
        "ties": (True, False),
        "dare_linear": (False, True),
        "dare_ties": (False, True),
    }
    for name, (normalize, rescale) in expected.items():
        m = get_method(name)
        assert m.needs_base
        assert dict(m.global_parameters) == {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
        assert dict(m.model_parameters) == {"weight": None, "density": 1.0}
    assert not METHODS["linear"].needs_base and METHODS["slerp"].needs_base


# linear


A, B, C = [1.0, 2.0], [3.0, 4.0], [5.0, 0.0]


def test_linear_three_models_normalized():
    out = merge_tensors("linear", [torch.tensor(A), torch.tensor(B), torch.tensor(C)],
                        model_parameters=[{"weight": 1}, {"weight": 2}, {"weight": 1}])
    close(out, [(1 + 6 + 5) / 4, (2 + 8 + 0) / 4])


def test_linear_unnormalized():
    out = merge_tensors("linear", [torch.tensor(A), torch.tensor(B), torch.tensor(C)],
                        model_parameters=[{"weight": 1}, {"weight": 2}, {"weight": 1}],
                        parameters={"normalize": False})
    close(out, [12.0, 10.0])


def test_linear_global_weight_applies_to_models_without_their_own():
    out = merge_tensors("linear", [torch.tensor(A), torch.tensor(B)],
                        model_parameters=[{}, {"weight": 3.0}], parameters={"weight": 1.0})
    close(out, [(1 + 9) / 4, (2 + 12) / 4])


def test_linear_on_matrices():
    a, b = torch.ones(2, 3), torch.full((2, 3), 4.0)
    out = merge_tensors("linear", [a, b], model_parameters=[{"weight": 2.0}, {"weight": 1.0}])
    close(out, [[2.0] * 3] * 2)


# slerp


def slerp(a, b, t):
    return merge_tensors("slerp", [torch.tensor(b)], base=torch.tensor(a), parameters={"t": t})


def test_slerp_endpoints_base_is_t0():
    a, b = [2.0, 0.0], [0.0, 3.0]
    close(slerp(a, b, 0.0), a)
    close(slerp(a, b, 1.0), b)


def test_slerp_orthogonal_closed_form():
    # theta = pi/2, so s0 = cos(t pi/2), s1 = sin(t pi/2)
    close(slerp([1.0, 0.0], [0.0, 1.0], 0.5), [math.sqrt(0.5), math.sqrt(0.5)])
    close(slerp([2.0, 0.0], [0.0, 3.0], 0.5), [math.sqrt(2), 1.5 * math.sqrt(2)])
    close(slerp([2.0, 0.0], [0.0, 3.0], 1 / 3), [math.sqrt(3), 1.5])


def test_slerp_flattens_matrices():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    out = merge_tensors("slerp", [b], base=a, parameters={"t": 0.5})
    close(out, [[math.sqrt(0.5), 0.0], [0.0, math.sqrt(0.5)]])


def test_slerp_colinear_falls_back_to_lerp():
    close(slerp([1.0, 2.0], [3.0, 6.0], 0.5), [2.0, 4.0])
    close(slerp([1.0, 2.0], [-2.0, -4.0], 0.5), [-0.5, -1.0])  # anti-colinear too
    # cos = 1/sqrt(1.0004) = 0.9998 > 0.9995: lerp
    close(slerp([1.0, 0.0], [1.0, 0.02], 0.25), [1.0, 0.005])


def test_slerp_just_below_threshold_is_spherical():
    # cos = 1/sqrt(1.0016) = 0.9992 < 0.9995: slerp
    t = 0.25
    theta = math.acos(1 / math.sqrt(1.0016))
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    close(slerp([1.0, 0.0], [1.0, 0.04], t), [s0 + s1, s1 * 0.04])


def test_slerp_zero_tensor_counts_as_orthogonal():
    # mergekit leaves a zero vector unnormalized, so its cosine is 0 and theta = pi/2
    close(slerp([0.0, 0.0], [2.0, 4.0], 1 / 3), [2 * 0.5, 4 * 0.5])


# task arithmetic

BASE = [1.0, 2.0, 3.0]
T1, T2 = [2.0, 2.0, 2.0], [0.0, 4.0, 3.0]  # deltas [1, 0, -1] and [-1, 2, 0]
W = [{"weight": 0.5}, {"weight": 1.0}]


def ta(**parameters):
    return merge_tensors("task_arithmetic", [torch.tensor(T1), torch.tensor(T2)], base=torch.tensor(BASE),
                         model_parameters=W, parameters=parameters)


def test_task_arithmetic():
    close(ta(), [1 - 0.5, 2 + 2, 3 - 0.5])  # mixed delta [-0.5, 2, -0.5]


def test_task_arithmetic_lambda_and_normalize():
    close(ta(**{"lambda": 2.0}), [0.0, 6.0, 2.0])
    close(ta(normalize=True), [1 - 0.5 / 1.5, 2 + 2 / 1.5, 3 - 0.5 / 1.5])
    close(ta(normalize=True, **{"lambda": 3.0}), [1 - 1.0, 2 + 4.0, 3 - 1.0])


def test_task_arithmetic_ignores_density():
    out = merge_tensors("task_arithmetic", [torch.tensor(T1), torch.tensor(T2)], base=torch.tensor(BASE),
                        model_parameters=[{"weight": 0.5, "density": 0.1}, {"weight": 1.0, "density": 0.1}])
    close(out, [0.5, 4.0, 2.5])


def test_task_arithmetic_without_other_models_returns_base():
    close(merge_tensors("task_arithmetic", [], base=torch.tensor(BASE)), BASE)


# ties: 3 models, hand-worked
#   base 1 everywhere; deltas (weights 1, 0.5, 2; densities 0.6, 0.4, 1):
#   d1 = [ 3, -1,  0.5,  2, -4]  keep int(0.6*5)=3 largest |.|: [3, 0, 0, 2, -4]
#   d2 = [-2, -3,  1,   -1,  0.2] keep 2:                      [-2, -3, 0, 0, 0]
#   d3 = [ 1,  2, -0.1,  4, -1]  keep all
#   weighted: [3,0,0,2,-4], [-1,-1.5,0,0,0], [2,4,-0.2,8,-2]; sum [4, 2.5, -0.2, 10, -6]
#   agreeing (nonzero, sign of sum): {1,3}, {3}, {3}, {1,3}, {1,3}
#   mixed [5, 4, -0.2, 10, -6]; divisor (weights of agreeing) [3, 2, 2, 3, 3]

TIES_BASE = [1.0] * 5
TIES_D = [[3, -1, 0.5, 2, -4], [-2, -3, 1, -1, 0.2], [1, 2, -0.1, 4, -1]]
TIES_P = [{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "density": 0.4}, {"weight": 2.0, "density": 1.0}]


def ties(method="ties", model_parameters=TIES_P, **parameters):
    base = torch.tensor(TIES_BASE)
    return merge_tensors(method, [base + torch.tensor(d) for d in TIES_D], base=base,
                         model_parameters=model_parameters, parameters=parameters)


def test_ties_three_models_hand_worked():
    close(ties(), [1 + 5 / 3, 1 + 4 / 2, 1 - 0.2 / 2, 1 + 10 / 3, 1 - 6 / 3])


def test_ties_unnormalized_and_lambda():
    close(ties(normalize=False), [6.0, 5.0, 0.8, 11.0, -5.0])
    close(ties(**{"lambda": 0.5}), [1 + 2.5 / 3, 1 + 1.0, 1 - 0.05, 1 + 5 / 3, 1 - 1.0])
    close(ties(int8_mask=True), ties())


def test_ties_rescale_restores_l1_norm():
    # d1 pruned keeps |3|+|2|+|-4| = 9 of its 10.5; d2 (kept [-2, -3], scaled) never agrees
    s1 = 10.5 / 9
    out = ties(normalize=False, rescale=True)
    close(out, [1 + 3 * s1 + 2, 1 + 4, 1 - 0.2, 1 + 2 * s1 + 8, 1 - 4 * s1 - 2], atol=1e-5)


def test_ties_zero_sum_counts_as_positive_and_empty_entries_keep_base():
    base = torch.zeros(2)
    out = merge_tensors("ties", [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], base=base,
                        parameters={"weight": 1.0})
    close(out, [1.0, 0.0])


@pytest.mark.parametrize("seed", range(6))
def test_magnitude_pruning_keeps_what_mergekits_descending_argsort_keeps(seed):
    # The pruning selects by threshold (no sort) unless the threshold is tied; then the entries
    # kept among the tied are torch's (unstable) descending argsort's, as in mergekit 0.1.5:
    # not the first by index (integer deltas below tie a lot).
    from merge_graphs.methods import _magnitude_prune

    g = torch.Generator().manual_seed(seed)
    delta = torch.randint(-3, 4, (7, 11), generator=g).float() if seed % 2 else torch.randn(7, 11, generator=g)
    delta = delta.T if seed >= 4 else delta  # not contiguous
    differs_from_stable = False
    for density in (0.05, 0.3, 0.5, 0.77, 0.99):
        k = max(1, int(density * delta.numel()))
        order = torch.argsort(delta.abs().flatten(), descending=True)
        expected = torch.zeros(delta.numel())
        expected[order[:k]] = delta.flatten()[order[:k]]
        assert torch.equal(_magnitude_prune(delta, density, False, None), expected.view_as(delta)), density
        stable = torch.argsort(delta.abs().flatten(), descending=True, stable=True)[:k]
        differs_from_stable |= set(stable.tolist()) != set(order[:k].tolist())
    assert differs_from_stable == (seed % 2 == 1)  # the tied case is exercised


@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_pruning_a_block_of_rows_at_a_time_equals_pruning_the_whole(rescale):
    # How the streamed path prunes a large tensor: many ties at the threshold, split across blocks.
    from merge_graphs.methods import _magnitude_prune, magnitude_cut

    delta = torch.randint(-2, 3, (23, 5), generator=torch.Generator().manual_seed(1)).float()
    for density in (0.1, 0.35, 0.6, 0.9):
        whole = _magnitude_prune(delta, density, rescale, None)
        for step in (1, 3, 7):
            blocks = [slice(i, i + step) for i in range(0, 23, step)]
            cut = magnitude_cut(lambda: (delta[b] for b in blocks), delta.numel(), density, rescale)
            parts, tied = [], 0
            for b in blocks:
                part, count = cut.apply(delta[b], tied)
                parts.append(part)
                tied += count
            assert torch.equal(torch.cat(parts), whole), (density, step)


def test_dare_ties_at_density_one_is_sign_consensus_without_normalize():
    # no pruning; weighted [3,-1,.5,2,-4], [-1,-1.5,.5,-.5,.1], [2,4,-.2,8,-2]; sum [4,1.5,.8,9.5,-5.9]
    full = [{"weight": p["weight"]} for p in TIES_P]
    close(ties("dare_ties", full), [1 + 5, 1 + 4, 1 + 1, 1 + 10, 1 - 6])
    close(ties("dare_linear", full), [1 + 4, 1 + 1.5, 1 + 0.8, 1 + 9.5, 1 - 5.9])


# dare


def test_dare_is_deterministic_given_a_generator():
    base = torch.zeros(1000)
    others = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    kw = dict(base=base, parameters={"weight": 1.0, "density": 0.3})
    for method in ("dare_linear", "dare_ties"):
        a = merge_tensors(method, others, generator=torch.Generator().manual_seed(7), **kw)
        b = merge_tensors(method, others, generator=torch.Generator().manual_seed(7), **kw)
        c = merge_tensors(method, others, generator=torch.Generator().manual_seed(8), **kw)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_dare_rescale_keeps_l1_norm_and_is_unbiased():
    # 3000 copies of one 1000-vector, pruned as one tensor: the L1 rescale factor is ~1/density
    # and the mean over the copies estimates E[dare(delta)] with std |delta| / sqrt(3000 * 0.3/0.7)
    density = 0.3
    g = torch.Generator().manual_seed(0)
    delta = (1 + torch.rand(1000, generator=g)) * torch.randn(1000, generator=g).sign()
    tiled = delta.expand(3000, 1000).contiguous()
    out = merge_tensors("dare_linear", [tiled], base=torch.zeros_like(tiled),
                        parameters={"weight": 1.0, "density": density},
                        generator=torch.Generator().manual_seed(1))
    assert abs(out.abs().sum() / tiled.abs().sum() - 1) < 1e-5
    kept = out != 0
    assert abs(kept.float().mean().item() - density) < 0.005
    assert torch.allclose(out[kept] / tiled[kept], torch.full_like(out[kept], 1 / density), rtol=0.01)
    assert torch.allclose(out.mean(dim=0), delta, rtol=0.15)


def test_dare_without_rescale_keeps_values():
    delta = torch.arange(1.0, 10001.0)
    out = merge_tensors("dare_linear", [delta], base=torch.zeros_like(delta),
                        parameters={"weight": 1.0, "density": 0.5, "rescale": False},
                        generator=torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])
    assert abs(kept.float().mean().item() - 0.5) < 0.03


# dtypes


def test_bf16_round_trip_computes_in_float32():
    g = torch.Generator().manual_seed(0)
    base, x, y = (torch.randn(64, generator=g).bfloat16() for _ in range(3))
    kw = dict(base=base, parameters={"weight": 0.7, "density": 0.5})
    out = merge_tensors("ties", [x, y], **kw)
    assert out.dtype == torch.bfloat16
    ref = merge_tensors("ties", [x.float(), y.float()], base=base.float(), parameters=kw["parameters"])
    assert torch.equal(out, ref.bfloat16())
    out = merge_tensors("slerp", [x], base=base, parameters={"t": 0.3})
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, merge_tensors("slerp", [x.float()], base=base.float(), parameters={"t": 0.3}).bfloat16())


def test_output_takes_the_reference_dtype():
    out = merge_tensors("linear", [torch.ones(2, dtype=torch.float16), torch.zeros(2)],
                        parameters={"weight": 1.0})
    assert out.dtype == torch.float16
    close(out, [0.5, 0.5])


def test_non_float_tensors_come_back_unchanged():
    ids = torch.arange(5)
    assert merge_tensors("linear", [ids, ids + 1], parameters={"weight": 1.0}) is ids
    assert merge_tensors("ties", [ids + 1], base=ids, parameters={"weight": 1.0}) is ids


def test_inputs_are_not_modified():
    base, x = torch.zeros(4), torch.tensor([1.0, -2.0, 3.0, -4.0])
    merge_tensors("ties", [x], base=base, parameters={"weight": 2.0, "density": 0.5, "rescale": True})
    assert torch.equal(base, torch.zeros(4)) and torch.equal(x, torch.tensor([1.0, -2.0, 3.0, -4.0]))


# errors


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'; known methods: arcee_fusion, .*, dare_ties, della, .*, linear, .*, slerp, task_arithmetic, ties$"):
        merge_tensors("tie", [torch.ones(2)])


def test_unknown_global_parameter():
    with pytest.raises(ValueError, match=r"unknown parameter 'dens' for merge method 'ties'; allowed: density, int8_mask"):
        merge_tensors("ties", [torch.ones(2)], base=torch.zeros(2), parameters={"weight": 1, "dens": 0.5})


def test_unknown_model_parameter():
    with pytest.raises(ValueError, match=r"unknown per-model parameter 'density' for merge method 'linear'; allowed: weight"):
        merge_tensors("linear", [torch.ones(2)], model_parameters=[{"weight": 1, "density": 0.5}])
    with pytest.raises(ValueError, match=r"unknown per-model parameter 'weight' for merge method 'slerp'; allowed: none"):
        merge_tensors("slerp", [torch.ones(2)], base=torch.zeros(2), model_parameters=[{"weight": 0.5}], parameters={"t": 0.5})


def test_global_parameter_given_per_model():
    with pytest.raises(ValueError, match=r"'normalize' is a global parameter of merge method 'ties'"):
        merge_tensors("ties", [torch.ones(2)], base=torch.zeros(2), model_parameters=[{"weight": 1, "normalize": True}])


@pytest.mark.parametrize("method", ["slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_missing_base(method):
    with pytest.raises(ValueError, match=rf"merge method '{method}' needs a base model: set base_model"):
        merge_tensors(method, [torch.ones(2), torch.zeros(2)], parameters={"t": 0.5} if method == "slerp" else {"weight": 1})


def test_base_given_to_linear():
    with pytest.raises(ValueError, match=r"'linear' takes no separate base.*pass its tensor in tensors"):
        merge_tensors("linear", [torch.ones(2)], base=torch.zeros(2), parameters={"weight": 1})


@pytest.mark.parametrize("n", [0, 2])
def test_slerp_needs_exactly_two_models(n):
    with pytest.raises(ValueError, match=rf"slerp merges exactly two models.*got {n + 1}"):
        merge_tensors("slerp", [torch.ones(2)] * n, base=torch.zeros(2), parameters={"t": 0.5})


def test_missing_required_parameters():
    with pytest.raises(ValueError, match=r"merge method 'slerp' needs parameter 't'; set it"):
        merge_tensors("slerp", [torch.ones(2)], base=torch.zeros(2))
    with pytest.raises(ValueError, match=r"merge method 'linear' needs parameter 'weight' for model 1"):
        merge_tensors("linear", [torch.ones(2), torch.ones(2)], model_parameters=[{"weight": 1}, {}])


def test_model_parameters_count_must_match():
    with pytest.raises(ValueError, match=r"got 1 model_parameters entries for 2 tensors"):
        merge_tensors("linear", [torch.ones(2), torch.ones(2)], model_parameters=[{"weight": 1}])


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"different shapes \[\(2,\), \(3,\)\]"):
        merge_tensors("ties", [torch.ones(3)], base=torch.zeros(2), parameters={"weight": 1})


def test_no_tensors():
    with pytest.raises(ValueError, match=r"got no tensors to merge"):
        merge_tensors("linear", [])


def test_linear_zero_weight_sum():
    with pytest.raises(ValueError, match=r"weights that do not sum to 0"):
        merge_tensors("linear", [torch.ones(2), torch.ones(2)], model_parameters=[{"weight": 1}, {"weight": -1}])


def test_ties_density_keeps_at_least_one_entry_as_mergekit_0_1_5():
    # int(0.1 * 5) = 0, but a positive density keeps max(1, ...) entries; density 0 keeps none
    x = torch.tensor([1.0, -5.0, 3.0, 0.5, 2.0])
    close(merge_tensors("ties", [x], base=torch.zeros(5), parameters={"weight": 1, "density": 0.1}),
          [0.0, -5.0, 0.0, 0.0, 0.0])
    close(merge_tensors("ties", [x], base=torch.zeros(5), parameters={"weight": 1, "density": 0.0}), [0.0] * 5)


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match=r"merge method 'ties' is already registered"):
        register("ties", needs_base=False, global_parameters={}, model_parameters={})(lambda *a: None)


# the methods added for mergekit 0.1.5's full list


def test_all_mergekit_methods_with_their_defaults():
    """Per method: base policy, (min, max) models besides the base, global and per-model defaults,
    as mergekit 0.1.5 declares them (None: required; NOT_SET: optional without a default)."""
    from merge_graphs.methods import NOT_SET

    gta = {"int8_mask": False, "lambda": 1.0}
    expected = {
        "linear": ("none", (1, None), {"normalize": True}, {"weight": None}),
        "slerp": ("required", (1, 1), {"t": None}, {}),
        "nuslerp": ("optional", (2, 2), {"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": None}),
        "multislerp": ("optional", (1, None), {"normalize_weights": True, "eps": 1e-8}, {"weight": None}),
        "karcher": ("none", (1, None), {"max_iter": 10, "tol": 1e-5}, {}),
        "task_arithmetic": ("required", (0, None), {**gta, "normalize": False, "rescale": False},
                            {"weight": None, "density": 1.0}),
        "ties": ("required", (0, None), {**gta, "normalize": True, "rescale": False}, {"weight": None, "density": 1.0}),
        "dare_linear": ("required", (0, None), {**gta, "normalize": False, "rescale": True},
                        {"weight": None, "density": 1.0}),
        "dare_ties": ("required", (0, None), {**gta, "normalize": False, "rescale": True},
                      {"weight": None, "density": 1.0}),
        "breadcrumbs": ("required", (0, None), {**gta, "normalize": False, "rescale": False},
                        {"weight": None, "density": 1.0, "gamma": 0.01}),
        "breadcrumbs_ties": ("required", (0, None), {**gta, "normalize": False, "rescale": False},
                             {"weight": None, "density": 1.0, "gamma": 0.01}),
        "della": ("required", (0, None), {**gta, "normalize": True, "rescale": True},
                  {"weight": None, "density": 1.0, "epsilon": 0.15}),
        "della_linear": ("required", (0, None), {**gta, "normalize": False, "rescale": True},
                         {"weight": None, "density": 1.0, "epsilon": 0.15}),
        "sce": ("required", (0, None), {"int8_mask": False, "select_topk": 1.0}, {}),
        "model_stock": ("required", (2, None), {"filter_wise": False}, {}),
        "nearswap": ("required", (1, 1), {"t": None}, {}),
        "arcee_fusion": ("required", (1, 1), {}, {}),
        "ram": ("required", (0, None), {"epsilon": 1e-5}, {}),
        "ramplus_tl": ("required", (0, None), {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}),
        "passthrough": ("none", (1, 1), {}, {"scale": NOT_SET}),
    }
    assert set(METHODS) == set(expected)
    for name, (base, models, global_parameters, model_parameters) in expected.items():
        m = get_method(name)
        assert (m.base, m.needs_base, m.models) == (base, base == "required", models), name
        assert dict(m.global_parameters) == global_parameters, name
        assert dict(m.model_parameters) == model_parameters, name
    assert {n for n, m in METHODS.items() if m.random} == {"dare_linear", "dare_ties", "della", "della_linear",
                                                          "arcee_fusion"}


def test_linear_in_float16_accumulates_in_float32_like_mergekit():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    out = merge_tensors("linear", [a, b], model_parameters=[{"weight": 0.7}, {"weight": 0.5}], dtype=torch.float16)
    assert out.dtype == torch.float32  # the reference's dtype
    want = ((0.7 * a.half().float() + 0.5 * b.half().float()) / 1.2).half()
    assert torch.equal(out, want.float())


def test_dtype_must_be_floating():
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype"):
        merge_tensors("linear", [torch.ones(2)], parameters={"weight": 1}, dtype=torch.int8)


def test_float16_ties_prunes_the_float16_deltas():
    # in float32 the deltas are 1e-4 apart; rounded to float16 (base 1000) they all tie at 0 or 0.5
    base = torch.full((4,), 1000.0)
    x = base + torch.tensor([0.3001, 0.3002, 0.3003, 0.3004])
    out32 = merge_tensors("ties", [x], base=base, parameters={"weight": 1, "density": 0.5})
    close(out32 - base, [0, 0, 0.3003, 0.3004], atol=1e-4)
    out16 = merge_tensors("ties", [x], base=base, parameters={"weight": 1, "density": 0.5}, dtype=torch.float16)
    assert sorted((out16 - base).tolist()) == [0.0, 0.0, 0.5, 0.5]


def test_nuslerp_interpolates_by_weights():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    close(merge_tensors("nuslerp", [a, b], model_parameters=mp), [math.sqrt(0.5)] * 2)
    # t = w2 / (w1 + w2) = 1/3 of the way from a; 0.5 where the weights sum to 0
    close(merge_tensors("nuslerp", [a, b], model_parameters=[{"weight": 2.0}, {"weight": 1.0}]),
          [math.cos(math.pi / 6), math.sin(math.pi / 6)])
    close(merge_tensors("nuslerp", [a, b], model_parameters=[{"weight": 1.0}, {"weight": -1.0}]), [math.sqrt(0.5)] * 2)
    # with a base, its deltas are interpolated
    base = torch.tensor([1.0, 1.0])
    close(merge_tensors("nuslerp", [a + base, b + base], base=base, model_parameters=mp), [1 + math.sqrt(0.5)] * 2)


def test_nuslerp_by_rows_and_columns():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    r = math.sqrt(0.5)
    # along the last axis: row 0 is a quarter turn, row 1 colinear (lerp)
    close(merge_tensors("nuslerp", [a, b], model_parameters=mp, parameters={"nuslerp_flatten": False}),
          [[r, r], [0.0, 2.0]])
    # along the first axis (columns): column 0 a vs (0, 0): the zero vector's unit is 0, theta pi/2
    out = merge_tensors("nuslerp", [a, b], model_parameters=mp,
                        parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True})
    cos = 2 / math.sqrt(5)  # column 1: (0, 2) vs (1, 2)
    theta = math.acos(cos)
    s = math.sin(theta / 2) / math.sin(theta)
    close(out, [[r, s * 1], [0.0, s * 4]], atol=1e-5)


def test_nuslerp_takes_exactly_two_models():
    with pytest.raises(ValueError, match=r"nuslerp merges exactly two models besides base_model .*but got 3"):
        merge_tensors("nuslerp", [torch.ones(2)] * 3, parameters={"weight": 1})


def test_multislerp():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    # the mean direction (1, 1)/sqrt 2, scaled to the mean norm 2
    close(merge_tensors("multislerp", [a, b], model_parameters=mp), [math.sqrt(2)] * 2, atol=1e-5)
    close(merge_tensors("multislerp", [a], model_parameters=mp[:1]), a)
    base = torch.tensor([5.0, 5.0])
    close(merge_tensors("multislerp", [a + base, b + base], base=base, model_parameters=mp),
          [5 + math.sqrt(2)] * 2, atol=1e-5)
    with pytest.raises(ValueError, match=r"weighted mean of the normalized models is zero"):
        merge_tensors("multislerp", [a, -a, a], model_parameters=[{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])


def test_karcher():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    # the geodesic midpoint of the directions, times the mean norm 3
    close(merge_tensors("karcher", [a, b]), [3 * math.sqrt(0.5)] * 2, atol=1e-5)
    close(merge_tensors("karcher", [a, a, a]), a)
    # a zero tensor has no direction but counts in the norm: mean norm (2 + 0) / 2
    close(merge_tensors("karcher", [a, torch.zeros(2)]), [1.0, 0.0])


def test_model_stock():
    base = torch.tensor([1.0, 1.0, 1.0])
    ft = base + torch.tensor([0.5, -1.0, 2.0])
    # identical fine-tunes: cos 1, t = 2/(1 + 1) = 1, their average
    close(merge_tensors("model_stock", [ft, ft.clone()], base=base), ft)
    # orthogonal deltas: cos 0, t 0, the base
    close(merge_tensors("model_stock", [base + torch.tensor([1.0, 0, 0]), base + torch.tensor([0, 1.0, 0])],
                        base=base), base)
    # cos 0.5 (60 degrees): t = 2 * 0.5 / 1.5 = 2/3 of the way to the average (0.5, sqrt 3/4, 0)
    d1, d2 = torch.tensor([1.0, 0, 0]), torch.tensor([0.5, math.sqrt(3) / 2, 0])
    close(merge_tensors("model_stock", [base + d1, base + d2], base=base), base + (d1 + d2) / 2 * (2 / 3))
    # opposite deltas: 1 + (k-1) cos = 0, the base
    close(merge_tensors("model_stock", [base + d1, base - d1], base=base), base)
    with pytest.raises(ValueError, match=r"model_stock merges at least three models \(base_model and the others\), "
                                         r"but got 2"):
        merge_tensors("model_stock", [ft], base=base)


def test_model_stock_filter_wise():
    base = torch.zeros(2, 2)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [2.0, 0.0]])  # row 0 orthogonal to x's, row 1 colinear
    out = merge_tensors("model_stock", [x, y], base=base, parameters={"filter_wise": True})
    close(out, [[0.0, 0.0], [1.5, 0.0]])


def test_nearswap():
    base, other = torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([0.5, 2.0, -1.0, 1.0])
    nearswap = lambda t: merge_tensors("nearswap", [other], base=base, parameters={"t": t})  # noqa: E731
    close(nearswap(0.0), base)
    close(nearswap(1.0), [0.5, 1.0, -1.0, 1.0])  # w = min(1, 1 / |distance|): 1, 0.5, 1, 1
    close(nearswap(100.0), other)
    with pytest.raises(ValueError, match=r"nearswap merges exactly two models \(base_model and one other\), but got 3"):
        merge_tensors("nearswap", [other, other], base=base, parameters={"t": 1.0})


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    base = torch.zeros(10)
    delta = torch.tensor([3.0, -1.0, 10.0, 6.0, -2.0, 8.0, 5.0, -9.0, 4.0, 7.0])
    # keep int(0.5 * 10) = 5; drop the int(0.2 * 10) = 2 largest (10, -9) and the 3 smallest
    out = merge_tensors("breadcrumbs", [delta], base=base,
                        parameters={"weight": 1.0, "density": 0.5, "gamma": 0.2})
    close(out, [0, 0, 0, 6, 0, 8, 5, 0, 4, 7])
    # default gamma 0.01 drops int(0.1) = 0 outliers: the 5 largest
    out = merge_tensors("breadcrumbs", [delta], base=base, parameters={"weight": 1.0, "density": 0.5})
    close(out, [0, 0, 10, 6, 0, 8, 0, -9, 0, 7])
    # density + gamma above 1: fewer outliers go (one, not three), so that 9 entries are kept
    out = merge_tensors("breadcrumbs", [delta], base=base,
                        parameters={"weight": 1.0, "density": 0.9, "gamma": 0.3})
    close(out, [3, -1, 0, 6, -2, 8, 5, -9, 4, 7])


def test_breadcrumbs_ties_uses_sign_consensus():
    base = torch.zeros(4)
    x, y = torch.tensor([1.0, -2.0, 3.0, 4.0]), torch.tensor([-1.5, -1.0, 1.0, 0.5])
    out = merge_tensors("breadcrumbs_ties", [x, y], base=base, parameters={"weight": 1.0, "gamma": 0.0})
    close(out, [-1.5, -3.0, 4.0, 4.5])  # entry 0: sum -0.5 < 0, only y agrees


def test_della_keep_statistics():
    # keep probability from density - epsilon (smallest |delta| of a row) to density + epsilon (largest)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(200, 1000, generator=g)
    out = merge_tensors("della_linear", [delta], base=torch.zeros_like(delta),
                        parameters={"weight": 1.0, "density": 0.4, "epsilon": 0.2, "rescale": False},
                        generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])
    assert abs(kept.float().mean().item() - 0.4) < 0.005
    rank = delta.abs().argsort(dim=1).argsort(dim=1)
    low, high = kept[rank < 100].float().mean().item(), kept[rank >= 900].float().mean().item()
    # the mean probabilities of those deciles: 0.2 + 0.4 * mean rank / 999
    assert abs(low - (0.2 + 0.4 * 49.5 / 999)) < 0.01 and abs(high - (0.2 + 0.4 * 949.5 / 999)) < 0.01
    again = merge_tensors("della_linear", [delta], base=torch.zeros_like(delta),
                          parameters={"weight": 1.0, "density": 0.4, "epsilon": 0.2, "rescale": False},
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_della_rescales_and_defaults():
    delta = torch.randn(50, 400, generator=torch.Generator().manual_seed(0))
    out = merge_tensors("della", [delta], base=torch.zeros_like(delta),
                        parameters={"weight": 1.0, "density": 0.5}, generator=torch.Generator().manual_seed(2))
    assert abs(out.abs().sum() / delta.abs().sum() - 1) < 1e-5  # rescale is della's default
    assert abs((out != 0).float().mean().item() - 0.5) < 0.01
    # density 1 (the default) keeps everything
    close(merge_tensors("della", [delta[0]], base=torch.zeros(400), parameters={"weight": 1.0}), delta[0])


@pytest.mark.parametrize("density,epsilon", [(0.9, 0.15), (0.1, 0.1), (0.5, 0.5)])
def test_della_epsilon_must_keep_probabilities_inside_0_1(density, epsilon):
    with pytest.raises(ValueError, match=r"della needs 0 < density - epsilon and density \+ epsilon < 1"):
        merge_tensors("della", [torch.ones(4)], base=torch.zeros(4),
                      parameters={"weight": 1.0, "density": density, "epsilon": epsilon})


def test_sce_hand_worked():
    # deltas d1 = (1, -1), d2 = (3, 1): mean squares 1 and 5, weights 1/6 and 5/6; signs of the
    # sum (4, 0) are (+, +), so d1's -1 is erased
    base = torch.zeros(2)
    out = merge_tensors("sce", [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])], base=base)
    close(out, [(1 / 6 + 15 / 6) / 1, (5 / 6) / (5 / 6)], atol=1e-6)


def test_sce_select_topk_keeps_the_entries_of_largest_variance():
    base = torch.zeros(4)
    x, y = torch.tensor([1.0, 1.0, 4.0, 0.0]), torch.tensor([1.0, 3.0, -4.0, 2.0])
    # variances 0, 1, 16, 1 (3 nonzero): int(3 * 0.4) = 1 entry kept, the third
    out = merge_tensors("sce", [x, y], base=base, parameters={"select_topk": 0.4})
    # kept deltas (0, 0, 4, 0) and (0, 0, -4, 0): sum 0 counts as positive, only x agrees
    close(out, [0.0, 0.0, 4.0, 0.0])


def test_ram_and_ramplus_tl():
    base = torch.zeros(3)
    x, y = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 0.0])
    close(merge_tensors("ram", [x, y], base=base), [2.0, 0.0, 2.0])  # shared entries averaged, unique summed
    close(merge_tensors("ram", [x, y], base=base, parameters={"epsilon": 1.5}), [3.0, 0.0, 2.0])
    # x: 1 shared, 1 unique entry: 1 + 0.1 * min(1, 0.2); y has no unique entry
    close(merge_tensors("ramplus_tl", [x, y], base=base), [2.0, 0.0, 2 * 1.02])
    close(merge_tensors("ramplus_tl", [x, y], base=base, parameters={"r": 1.0, "alpha": 0.5}), [2.0, 0.0, 3.0])
    close(merge_tensors("ram", [], base=base), base)


def test_arcee_fusion_takes_the_important_changes():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 32, generator=g)
    other = base + 0.01 * torch.randn(16, 32, generator=g)
    other[3, 5] += 3.0  # one large change in a row whose softmax it moves
    out = merge_tensors("arcee_fusion", [other], base=base)
    took = out != base  # each entry is the base's, or base + (other - base)
    assert torch.equal(out[~took], base[~took]) and torch.allclose(out[took], other[took])
    assert took[3, 5] and 0 < took.sum() < other.numel() / 4
    close(merge_tensors("arcee_fusion", [base.clone()], base=base), base)


def test_passthrough():
    x = torch.tensor([1.0, -2.0])
    close(merge_tensors("passthrough", [x]), x)
    close(merge_tensors("passthrough", [x], model_parameters=[{"scale": 0.5}]), [0.5, -1.0])
    with pytest.raises(ValueError, match=r"passthrough merges exactly one model, but got 2; change the recipe's models"):
        merge_tensors("passthrough", [x, x])


SPLITS = [("ram", {}), ("ramplus_tl", {"epsilon": 0.3}), ("nearswap", {"t": 0.5}), ("passthrough", {"scale": 2.0}),
          ("ties", {"density": 0.3}), ("ties", {"density": 0.3, "rescale": True}),
          ("breadcrumbs", {"density": 0.5, "gamma": 0.1}), ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.2}),
          ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale": True}), ("dare_ties", {"density": 0.3}),
          ("della", {"density": 0.5}), ("della_linear", {"density": 0.4, "epsilon": 0.3}), ("arcee_fusion", {})]


@pytest.mark.parametrize("method,parameters", SPLITS)
@pytest.mark.parametrize("shape", [(23, 7), (31,), (6, 5, 4)])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_methods_that_split_merge_row_blocks_as_the_whole(method, parameters, shape, dtype):
    # rounded deltas: many ties at the pruning thresholds, whose choice spans blocks
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    others = [base + torch.randn(shape, generator=g).round() for _ in range(1 if METHODS[method].models[1] == 1 else 3)]
    kw = {"base": None if method == "passthrough" else base, "parameters": {**parameters}, "dtype": dtype}
    if "weight" in METHODS[method].model_parameters:
        kw["parameters"]["weight"] = 1.0
    whole = merge_tensors(method, others, generator=torch.Generator().manual_seed(1), **kw)
    for block in (5, 20, 50):
        parts = merge_tensors(method, others, block=block, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(parts, whole), block


def test_register_with_a_base_policy_and_a_model_count():
    @register("halfway", base="optional", models=(1, 1), global_parameters={}, model_parameters={})
    def halfway(tensors, base, model_parameters, parameters, generator):
        return tensors[0] if base is None else (tensors[0] + base) / 2

    try:
        m = get_method("halfway")
        assert (m.base, m.needs_base, m.models, m.random) == ("optional", False, (1, 1), False)
        close(merge_tensors("halfway", [torch.ones(2)]), [1.0, 1.0])
        close(merge_tensors("halfway", [torch.ones(2)], base=torch.zeros(2)), [0.5, 0.5])
        with pytest.raises(ValueError, match=r"halfway merges exactly one model besides base_model \(which is "
                                             r"optional\), but got 2"):
            merge_tensors("halfway", [torch.ones(2)] * 2)
    finally:
        del METHODS["halfway"]
    with pytest.raises(ValueError, match=r"needs_base=True contradicts base='optional'"):
        register("other", needs_base=True, base="optional", global_parameters={}, model_parameters={})
    with pytest.raises(ValueError, match=r"give base"):
        register("other", global_parameters={}, model_parameters={})


@pytest.mark.parametrize("method", ["karcher", "passthrough"])
def test_methods_without_a_base_refuse_one(method):
    with pytest.raises(ValueError, match=rf"'{method}' takes no separate base"):
        merge_tensors(method, [torch.ones(2)], base=torch.zeros(2))


def test_an_unset_optional_parameter_reaches_the_method_as_none():
    x = torch.tensor([1.0, 2.0])
    close(merge_tensors("passthrough", [x], model_parameters=[{"scale": None}]), x)  # None: unset, as in mergekit
    close(merge_tensors("passthrough", [x], model_parameters=[{"scale": None}], parameters={"scale": 3.0}), [3.0, 6.0])
