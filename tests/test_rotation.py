"""Norm folding and residual rotations: function preservation, admissibility, recovery, refusals."""

import dataclasses

import pytest
import torch
import transformers as T
from tiny_models import GPT2, LLAMA, example_input, make, outputs

import merge_graphs as mg
from merge_graphs.api import aligned_model
from merge_graphs.match import objective, weight_matching
from merge_graphs.rotation import (
    RESIDUAL,
    MatchingView,
    check_rotation,
    fit_head_maps,
    fold_norms,
    folded_model,
    permutation_matrix,
    procrustes,
    random_rotation,
    residual_similarity,
    rotate,
    rotate_heads,
    rotate_model,
    rotation_alignment,
    rotation_kind,
)
from merge_graphs.symmetry import permute_state_dict

PRE_NORM = ["gpt2", "gpt2-lm", "llama", "llama-lm", "llama-lm-mha-tied-bias", "mistral-lm", "qwen2-lm",
            "qwen2-lm-tied", "qwen3-lm", "qwen3-lm-tied-bias", "gemma-lm", "phi3-lm", "phi3-lm-tied", "vit", "vit-cls",
            "mixtral", "mixtral-lm", "qwen2-moe-lm", "qwen3-moe-lm-tied"]
# Models with a head behind their final norm: those rotate.
HEADED = [n for n in PRE_NORM if n.endswith(("-lm", "-tied", "-bias", "-cls"))]
POST_NORM = ["bert", "bert-mlm", "bert-seqcls", "roberta", "roberta-mlm"]
FIX_ONES = ("gpt2", "vit")  # LayerNorm families; the others use RMSNorm


def assert_close(a, b, what=""):
    scale = a.abs().max()
    diff = (a - b).abs().max()
    assert diff <= 1e-4 * scale, f"{what}: max abs difference {diff:.3g} vs scale {scale:.3g}"


def assert_same_outputs(model, other, inputs):
    before, after = outputs(model, inputs), outputs(other, inputs)
    assert before.keys() == after.keys()
    for key, a in before.items():
        assert_close(a, after[key], key)


@pytest.mark.parametrize("name", PRE_NORM)
def test_folding_preserves_outputs(name):
    model = make(name)
    folded = folded_model(model)
    assert type(folded) is type(model)
    assert_same_outputs(model, folded, example_input(model))
    spec = mg.symmetry_spec(model)
    state = folded.state_dict()
    for norm in spec.norms:
        if norm.readers:  # a bare model's final norm is its output: kept
            gain = state[norm.weight] + norm.offset  # Gemma scales by 1 + weight
            assert torch.equal(gain, torch.ones_like(gain)), norm.weight
    if spec.tied:
        assert folded.config.tie_word_embeddings is False
        assert folded.lm_head.weight.data_ptr() != folded.get_input_embeddings().weight.data_ptr()
    if spec.rotation == "fix_ones":  # GPT-2, ViT: the writers are centred, the stream is mean-free
        embeddings = [n for n, t in spec.tensors.items() if t.role.startswith("embed")]
        assert embeddings
        for n in embeddings:
            axis = next(a for a, axis in enumerate(spec.tensors[n].axes) if axis and axis[0].name == RESIDUAL)
            assert state[n].mean(axis).abs().max() < 1e-6, n


def test_folding_is_idempotent_and_does_not_touch_the_input():
    model = make("gpt2-lm")
    spec = mg.symmetry_spec(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    folded_spec, once = fold_norms(spec, model.state_dict())
    _, twice = fold_norms(folded_spec, once)
    for k, v in once.items():
        assert_close(v, twice[k], k)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    # GPT-2's head has no bias slot: the final norm's bias becomes all ones and carries it.
    assert torch.equal(once["transformer.ln_f.bias"], torch.ones(GPT2["n_embd"]))
    assert torch.equal(once["transformer.h.0.ln_1.bias"], torch.zeros(GPT2["n_embd"]))
    assert any("all ones" in n for n in folded_spec.notes) and any("tie_word_embeddings" in n for n in folded_spec.notes)


@pytest.mark.parametrize("name", ["gpt2-lm", "qwen2-lm-tied"])
def test_folded_model_saves_and_loads_as_its_class(name, tmp_path):
    model = make(name)
    folded = folded_model(model)
    folded.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert_same_outputs(model, loaded, example_input(model))


@pytest.mark.parametrize("name", HEADED)
def test_admissible_rotation_preserves_outputs_and_rotates_the_stream(name):
    model = make(name)
    folded = folded_model(model)
    spec = mg.symmetry_spec(folded)
    kind = rotation_kind(spec)
    assert kind == ("fix_ones" if name.startswith(FIX_ONES) else "free")
    q = random_rotation(spec.groups[RESIDUAL].size, kind, seed=5)
    rotated = rotate_model(model, q)
    inputs = example_input(model)
    assert_same_outputs(model, rotated, inputs)
    # The convention: the residual stream h becomes h @ Q at every block boundary.
    with torch.no_grad():
        h = folded(**inputs, output_hidden_states=True).hidden_states
        h_rot = rotated(**inputs, output_hidden_states=True).hidden_states
    for i, (x, y) in enumerate(zip(h, h_rot)):
        assert_close(x @ q, y, f"hidden state {i}")


def test_a_residual_permutation_is_the_rotation_by_a_permutation_matrix():
    model = make("gpt2-lm")
    spec, state = fold_norms(mg.symmetry_spec(model), model.state_dict())
    perm = torch.randperm(GPT2["n_embd"], generator=torch.Generator().manual_seed(0))
    by_rotation = rotate(spec, state, permutation_matrix(perm))
    by_permutation = permute_state_dict(spec, state, {RESIDUAL: perm})
    for k, v in by_permutation.items():
        assert torch.allclose(v, by_rotation[k], atol=1e-6), k


def test_inadmissible_rotation_is_rejected_under_layernorm():
    model = make("gpt2-lm")
    spec, state = fold_norms(mg.symmetry_spec(model), model.state_dict())
    d = spec.groups[RESIDUAL].size
    free = random_rotation(d, "free", seed=1)
    with pytest.raises(ValueError, match="all-ones direction.*LayerNorm subtracts the mean"):
        check_rotation(free, "fix_ones")
    with pytest.raises(ValueError, match="all-ones"):
        rotate(spec, state, free)
    check_rotation(free, "free")  # fine under RMSNorm
    check_rotation(random_rotation(d, "fix_ones", seed=1), "fix_ones")
    # Why: forcing it through changes what the model computes.
    forced = folded_model(model)
    forced.load_state_dict(rotate(spec, state, free, check=False))
    with pytest.raises(AssertionError):
        assert_same_outputs(model, forced, example_input(model))


def test_non_orthogonal_or_misshapen_maps_and_unfolded_states_are_rejected():
    model = make("llama-lm")
    spec = mg.symmetry_spec(model)
    d = spec.groups[RESIDUAL].size
    with pytest.raises(ValueError, match="not orthogonal"):
        check_rotation(2 * torch.eye(d), "free")
    folded_spec, state = fold_norms(spec, model.state_dict())
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        rotate(folded_spec, state, torch.eye(d + 1))
    with pytest.raises(ValueError, match="fold the norms first"):
        rotate(folded_spec, model.state_dict(), torch.eye(d))


def test_bare_model_folds_but_does_not_rotate():
    model = make("llama")
    spec, state = fold_norms(mg.symmetry_spec(model), model.state_dict())
    with pytest.raises(mg.UnsupportedArchitectureError, match="output is the model's output"):
        rotate(spec, state, torch.eye(spec.groups[RESIDUAL].size))


@pytest.mark.parametrize("name", POST_NORM + ["mlp"])
def test_post_norm_families_refuse_and_say_why(name):
    model = make(name)
    spec = mg.symmetry_spec(model)
    why = "post-LayerNorm.*LayerNorm output is itself the stream.*permutations" if name != "mlp" else "no pre-norm"
    with pytest.raises(mg.UnsupportedArchitectureError, match=why):
        fold_norms(spec, model.state_dict())
    with pytest.raises(mg.UnsupportedArchitectureError, match=why):
        rotation_alignment(model, make(name, seed=1))


@pytest.mark.parametrize("name, why", [
    ("clip", "CLIPModel admits no residual rotation: the vision tower's pre_layrnorm.*per-unit gain.*final_layer_norm"),
    ("clip-vision-proj", "pre_layrnorm writes its output into the stream.*commutes with permutations"),
    ("clip-text-proj", "final_layer_norm output is returned"),
])
def test_clip_refuses_a_residual_rotation_and_says_why(name, why):
    model = make(name)
    spec = mg.symmetry_spec(model)
    assert spec.rotation is None
    with pytest.raises(mg.UnsupportedArchitectureError, match=why):
        fold_norms(spec, model.state_dict())
    with pytest.raises(mg.UnsupportedArchitectureError, match=why + ".*weight or activation matching"):
        rotation_alignment(model, make(name, seed=1))


def _scrambled(model, seed):
    """A folded copy of ``model`` with every group permuted and the residual stream rotated."""
    folded = folded_model(model)
    spec, state = fold_norms(mg.symmetry_spec(model), model.state_dict())
    perms = mg.random_permutations(spec, seed=seed)
    q0 = random_rotation(spec.groups[RESIDUAL].size, rotation_kind(spec), seed=seed)
    state = rotate(spec, permute_state_dict(spec, state, perms), q0)
    folded.load_state_dict(state)
    return folded, permutation_matrix(perms[RESIDUAL]) @ q0


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "llama-lm-mha-tied-bias", "qwen2-lm-tied",
                                  "qwen3-lm-tied-bias", "gemma-lm", "phi3-lm", "vit-cls", "mixtral-lm",
                                  "qwen3-moe-lm-tied"])
@pytest.mark.parametrize("data", ["data-free", "calibration"])
def test_rotation_and_permutations_are_recovered(name, data):
    model = make(name)
    scrambled, q_total = _scrambled(model, seed=3)
    assert_same_outputs(model, scrambled, example_input(model))
    calibration = None
    if data == "calibration" and name.startswith("vit"):
        calibration = {"pixel_values": example_input(model, seed=1)["pixel_values"]}
    elif data == "calibration":
        ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
        calibration = {"input_ids": ids}
    alignment = rotation_alignment(model, scrambled, calibration=calibration)
    # B's stream is A's times q_total: the alignment rotates it back.
    assert torch.allclose(alignment.rotation, q_total.T, atol=1e-4)
    aligned = aligned_model(scrambled, alignment)
    reference = folded_model(model)
    ref_state = reference.state_dict()
    for k, v in aligned.state_dict().items():
        assert_close(ref_state[k], v, k)
    assert alignment.fit_error < 1e-4 < alignment.fit_error_before
    assert alignment.objective_after > alignment.objective_before
    # Merging the folded A with the aligned B by plain averaging gives A back.
    merged = reference.__class__(reference.config)
    merged.load_state_dict({k: (v + aligned.state_dict()[k]) / 2 for k, v in ref_state.items()})
    assert_same_outputs(model, merged.eval(), example_input(model))


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "qwen3-lm-tied-bias", "gemma-lm", "phi3-lm", "vit-cls",
                                  "mixtral-lm"])
def test_gnn_start_then_orthogonal_weight_matching_recovers_a_scrambled_model(name):
    """``align(..., "gnn", residual="rotation")``: the GNN matches every group but the stream, orthogonal weight
    matching starts there; on a permuted and rotated copy it finds the rotation and A's tensors again."""
    model = make(name)
    scrambled, q_total = _scrambled(model, seed=3)
    alignment = mg.align(model, scrambled, "gnn", residual="rotation")
    assert alignment.method == "gnn+rotation" and alignment.basis == "rotation"
    assert torch.allclose(alignment.rotation, q_total.T, atol=1e-4)
    ref_state = folded_model(model).state_dict()
    for k, v in aligned_model(scrambled, alignment).state_dict().items():
        assert_close(ref_state[k], v, k)
    assert set(alignment.stage_seconds) == {"embed", "match", "refine"}
    assert alignment.seconds == pytest.approx(sum(alignment.stage_seconds.values()), rel=0.05, abs=0.05)


def test_init_is_where_the_first_weight_matching_starts():
    """Started at its own fixed point, orthogonal weight matching stays there after one confirming sweep;
    the residual stream in ``init`` is not a permutation group here (the rotation maps it) and is ignored."""
    a, b = make("llama-lm", seed=0), make("llama-lm", seed=1)
    first = rotation_alignment(a, b, fit="embeddings")
    assert first.iterations > 1
    start = {**first.permutations, RESIDUAL: torch.randperm(LLAMA["hidden_size"])}
    again = rotation_alignment(a, b, fit="embeddings", init=start)
    assert again.iterations == 1
    for group, perm in first.permutations.items():
        assert torch.equal(again.permutations[group], perm), group
    assert again.permutations[RESIDUAL].equal(torch.arange(LLAMA["hidden_size"]))


def test_alignment_of_unrelated_models_preserves_b_and_never_lowers_the_objective():
    a, b = make("gpt2-lm", seed=0), make("gpt2-lm", seed=1)
    found = {fit: rotation_alignment(a, b, fit=fit) for fit in ("embeddings", "alternate")}
    for alignment in found.values():
        assert alignment.objective_after >= alignment.objective_before
        assert alignment.fit_error <= alignment.fit_error_before
        aligned = aligned_model(b, alignment)  # verified: computes what b computes
        assert_same_outputs(b, aligned, example_input(b))
        assert alignment.permutations[RESIDUAL].equal(torch.arange(GPT2["n_embd"]))
    # Alternating starts from the embedding fit and only accepts rounds that improve the objective.
    assert found["alternate"].objective_after >= found["embeddings"].objective_after - 1e-6


def _views(a, b):
    """A's and B's folded matching views: what orthogonal weight matching compares."""
    spec_a, spec_b = mg.symmetry_spec(a), mg.symmetry_spec(b)
    spec, fa = fold_norms(spec_a, MatchingView(spec_a, a.state_dict()))
    _, fb = fold_norms(spec_b, MatchingView(spec_b, b.state_dict()))
    return spec, fa, fb


def _mapped(spec, fb, perms, q, maps):
    """B's folded tensors permuted, rotated by ``q`` (unless None) and mapped within heads."""
    moved = permute_state_dict(spec, fb, perms)
    return rotate_heads(spec, moved if q is None else rotate(spec, moved, q, check=False), maps)


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "qwen2-lm-tied"])
def test_alternation_ends_at_a_fixed_point_above_the_embedding_start(name):
    """Orthogonal weight matching: Q is the Procrustes answer to the final permutations and head maps,
    one more round (weight matching, head maps, Procrustes) does not improve the objective, and it
    is never below the embeddings-only start (whose permutations and head maps are fitted too)."""
    from merge_graphs.rotation import DEFAULT_HEAD_MAPS

    for seed in (0, 1):
        a, b = make(name, seed=2 * seed), make(name, seed=2 * seed + 1)
        found = rotation_alignment(a, b, max_iter=100)
        start = rotation_alignment(a, b, fit="embeddings")
        assert found.fit == "alternate" and found.head_maps
        assert found.objective_after >= start.objective_after - 1e-6 * abs(start.objective_after)
        spec, fa, fb = _views(a, b)
        identity = mg.identity_permutations(spec)
        mapped = _mapped(spec, fb, found.permutations, found.rotation, found.head_maps)
        assert objective(spec, fa, mapped, identity)[0] == pytest.approx(found.objective_after, rel=1e-5)
        # Q is the Procrustes step on the final permutations and head maps ...
        q = procrustes(residual_similarity(spec, fa, _mapped(spec, fb, found.permutations, None, found.head_maps)),
                       found.kind)
        assert torch.allclose(q, found.rotation, atol=1e-5)
        check_rotation(found.rotation, found.kind)
        # ... and one more round improves the objective by less than the stopping tolerance.
        from merge_graphs.rotation import ROUND_TOLERANCE

        roots = [g for g, grp in spec.groups.items() if grp.parent is None and g != RESIDUAL]
        perms = weight_matching(spec, fa, rotate(spec, fb, found.rotation, check=False), init=found.permutations,
                                groups=roots).permutations
        maps = fit_head_maps(spec, fa, _mapped(spec, fb, perms, found.rotation, {}), DEFAULT_HEAD_MAPS[spec.family])
        q = procrustes(residual_similarity(spec, fa, _mapped(spec, fb, perms, None, maps)), found.kind)
        again = objective(spec, fa, _mapped(spec, fb, perms, q, maps), identity)[0]
        assert again <= found.objective_after + ROUND_TOLERANCE * abs(found.objective_after)


def _rescaled_heads(model, seed):
    """A copy of ``model`` with every attention head's V side scaled by c and O side by 1 / c, and Q by d
    and K by 1 / d (random per head): the same function, other weights."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model.config
    if cfg.model_type == "gpt2":
        d, heads = cfg.n_embd, cfg.n_head
        hd = d // heads
        for layer in range(cfg.n_layer):
            w, bias = (state[f"transformer.h.{layer}.attn.c_attn.{x}"] for x in ("weight", "bias"))
            o = state[f"transformer.h.{layer}.attn.c_proj.weight"]
            for h in range(heads):
                c, e = 0.2 + 3 * torch.rand(2, generator=g)
                q, k, v = (slice(part * d + h * hd, part * d + (h + 1) * hd) for part in range(3))
                for t in (w[:, q], bias[q]):
                    t.mul_(e)
                for t in (w[:, k], bias[k]):
                    t.div_(e)
                for t in (w[:, v], bias[v]):
                    t.mul_(c)
                o[h * hd:(h + 1) * hd].div_(c)
    else:
        hd, kv = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads
        group = cfg.num_attention_heads // kv
        for layer in range(cfg.num_hidden_layers):
            prefix = f"model.layers.{layer}.self_attn."
            q, k, v, o = (state[f"{prefix}{x}_proj.weight"] for x in "qkvo")
            bq, bk, bv = (state.get(f"{prefix}{x}_proj.bias", torch.zeros(t.shape[0])) for x, t in zip("qkv", (q, k, v)))
            for h in range(kv):
                c, e = 0.2 + 3 * torch.rand(2, generator=g)
                rows, queries = slice(h * hd, (h + 1) * hd), slice(h * group * hd, (h + 1) * group * hd)
                for t in (v[rows], bv[rows]):
                    t.mul_(c)
                o[:, queries].div_(c)
                for t in (q[queries], bq[queries]):
                    t.mul_(e)
                for t in (k[rows], bk[rows]):
                    t.div_(e)
    out = type(model)(model.config)
    out.load_state_dict(state)
    return out.eval()


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "qwen2-lm-tied"])
def test_matching_views_balance_heads_and_scale_the_embeddings_to_the_head(name):
    a, b = make(name, seed=0), make(name, seed=1)
    rescaled = _rescaled_heads(b, seed=2)
    assert_same_outputs(b, rescaled, example_input(b))
    # Scaling one side of a head and unscaling the other moves no output, and matching does not see it.
    spec, _, fb = _views(a, b)
    _, _, fr = _views(a, rescaled)
    assert any(not torch.allclose(v, rescaled.state_dict()[k]) for k, v in b.state_dict().items())
    for k, v in fb.items():
        assert_close(v, fr[k], k)
    found, again = rotation_alignment(a, b), rotation_alignment(a, rescaled)
    assert torch.allclose(found.rotation, again.rotation, atol=1e-4)
    assert all(torch.equal(p, again.permutations[g]) for g, p in found.permutations.items())
    assert_same_outputs(rescaled, aligned_model(rescaled, again), example_input(b))  # B's maps, B's function
    # The embeddings count as much as the LM head.
    embeds = [n for n, t in spec.tensors.items() if t.role.startswith("embed")]
    assert sum(float(fb[n].norm() ** 2) for n in embeds) == pytest.approx(float(fb["lm_head.weight"].norm() ** 2),
                                                                           rel=1e-4)
    _, plain = fold_norms(mg.symmetry_spec(b), b.state_dict())  # where they did not
    assert sum(float(plain[n].norm() ** 2) for n in embeds) != pytest.approx(float(plain["lm_head.weight"].norm() ** 2),
                                                                              rel=1e-2)


def test_a_tied_head_missing_from_the_state_is_not_scaled_with_the_embedding():
    model = make("gpt2-lm")
    spec = mg.symmetry_spec(model)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    view = MatchingView(spec, state)
    assert "lm_head.weight" in view and len(view) == len(list(view)) == len(state) + 1
    assert torch.equal(view["lm_head.weight"], state["transformer.wte.weight"])
    assert not torch.allclose(view["transformer.wte.weight"], state["transformer.wte.weight"])
    _, full = fold_norms(spec, MatchingView(spec, model.state_dict()))
    _, missing = fold_norms(spec, view)
    for k, v in full.items():
        assert_close(v, missing[k], k)


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "qwen2-lm-tied"])
def test_one_unrotated_read_scores_every_rotation(name):
    """The alternation scores each round as ``<M, Q> + const`` from one read of B, unrotated: it must be
    the objective of B rotated by that Q, for any Q (the tensors off the stream and the norms in the const)."""
    from merge_graphs.rotation import _objective_parts

    spec, fa, fb = _views(make(name, seed=0), make(name, seed=1))
    perms = mg.random_permutations(spec, seed=4, fixed=[RESIDUAL])
    m, rest = _objective_parts(spec, fa, fb, perms)
    assert torch.equal(m, residual_similarity(spec, fa, fb, perms))
    d = spec.groups[RESIDUAL].size
    for seed in (5, 6):
        q = random_rotation(d, rotation_kind(spec), seed=seed)
        value = objective(spec, fa, _mapped(spec, fb, perms, q, {}), mg.identity_permutations(spec))[0]
        assert float((m * q.double()).sum()) + rest == pytest.approx(value, rel=1e-5)
    assert rest != 0.0 and abs(rest) < abs(value)


def test_the_rotation_step_streams_the_permutations_tensor_by_tensor():
    a, b = make("gpt2-lm", seed=0), make("gpt2-lm", seed=1)
    spec, fa = fold_norms(mg.symmetry_spec(a), a.state_dict())
    _, fb = fold_norms(mg.symmetry_spec(b), b.state_dict())
    perms = mg.random_permutations(spec, seed=4, fixed=[RESIDUAL])
    m = residual_similarity(spec, fa, fb, perms)
    assert torch.allclose(m, residual_similarity(spec, fa, permute_state_dict(spec, fb, perms)), atol=1e-9)
    # <A, rotate(perms(B), Q)> is linear in Q with coefficient M: Procrustes maximizes the objective.
    q = random_rotation(GPT2["n_embd"], "fix_ones", seed=5)
    moved = permute_state_dict(spec, fb, perms)
    values = [objective(spec, fa, rotate(spec, moved, x, check=False), mg.identity_permutations(spec))[0]
              for x in (q, torch.eye(GPT2["n_embd"]))]
    assert values[0] - values[1] == pytest.approx(float((m * (q.double() - torch.eye(GPT2["n_embd"]))).sum()), rel=1e-4)
    best = procrustes(m, "fix_ones")
    assert objective(spec, fa, rotate(spec, moved, best, check=False), mg.identity_permutations(spec))[0] >= max(values)


def _random_head_maps(spec, seed, angle=3.14, scale=0.0):
    """One admissible map per key/value head of every head map of ``spec`` (RoPE planes rotated
    by angles in ``[-angle, angle]``); orthogonal, or with ``scale`` times random factors in
    ``[exp(-scale), exp(scale)]`` (per RoPE plane; per column of an invertible map)."""
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for hm in spec.head_maps:
        n, h = spec.groups[hm.heads].size, hm.head_dim
        if hm.kind == "rope_pairs":
            theta = (2 * torch.rand(n, h // 2, generator=g, dtype=torch.float64) - 1) * angle
            factor = ((2 * torch.rand(n, h // 2, generator=g, dtype=torch.float64) - 1) * scale).exp()
            i = torch.arange(h // 2)
            r = torch.zeros(n, h, h, dtype=torch.float64)
            r[:, i, i], r[:, i + h // 2, i + h // 2] = theta.cos() * factor, theta.cos() * factor
            r[:, i, i + h // 2], r[:, i + h // 2, i] = -theta.sin() * factor, theta.sin() * factor
        else:
            assert hm.kind == "invertible"
            r = torch.linalg.qr(torch.randn(n, h, h, generator=g, dtype=torch.float64))[0]
            r = r * ((2 * torch.rand(n, 1, h, generator=g, dtype=torch.float64) - 1) * scale).exp()
        maps[hm.name] = r.float()
    return maps


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "llama-lm-mha-tied-bias", "qwen2-lm-tied", "vit-cls",
                                  "qwen2-moe-lm"])
def test_within_head_maps_preserve_outputs(name):
    model = make(name)
    spec, state = fold_norms(mg.symmetry_spec(model), model.state_dict())
    kinds = {hm.name.rsplit(".", 1)[1]: hm.kind for hm in spec.head_maps}
    assert kinds == {"qk": "invertible" if name.startswith(FIX_ONES) else "rope_pairs", "vo": "invertible"}
    assert len(spec.head_maps) == 2 * (GPT2["n_layer"] if name.startswith("gpt2") else model.config.num_hidden_layers)
    moved = folded_model(model)
    for scale in (0.0, 0.7):  # orthogonal maps, and maps that scale (the reading side takes M^-T)
        moved.load_state_dict(rotate_heads(spec, state, _random_head_maps(spec, seed=1, scale=scale)))
        assert_same_outputs(model, moved, example_input(model))
    # Scaling maps applied as they are on both sides (as if they were orthogonal) change the outputs.
    as_orthogonal = dataclasses.replace(spec, head_maps=tuple(dataclasses.replace(hm, readers=()) for hm in spec.head_maps))
    moved.load_state_dict(rotate_heads(as_orthogonal, state, _random_head_maps(spec, seed=1, scale=0.7)))
    with pytest.raises(AssertionError):
        assert_same_outputs(model, moved, example_input(model))
    # A map that breaks the symmetry changes the outputs: rotating q alone (not k).
    broken = {}
    for hm in spec.head_maps[:1]:
        broken[hm.name] = _random_head_maps(spec, seed=2)[hm.name]
        q_only = dataclasses.replace(hm, spaces=hm.spaces[:1])
        off = dataclasses.replace(spec, head_maps=(q_only,))
    moved.load_state_dict(rotate_heads(off, state, broken))
    with pytest.raises(AssertionError):
        assert_same_outputs(model, moved, example_input(model))


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "qwen2-lm-tied"])
def test_within_head_maps_are_recovered(name):
    model = make(name)
    scrambled, q_total = _scrambled(model, seed=3)
    spec, state = fold_norms(mg.symmetry_spec(scrambled), scrambled.state_dict())
    # Heads are matched before their maps are fitted: query heads rotated by more than about a
    # radian per RoPE plane no longer look like themselves.
    scrambled.load_state_dict(rotate_heads(spec, state, _random_head_maps(spec, seed=4, angle=1.0)))
    assert_same_outputs(model, scrambled, example_input(model))
    # Head maps are fitted after the alternation; with the embedding fit nothing else moves Q.
    alignment = rotation_alignment(model, scrambled, fit="embeddings", head_maps=("qk", "vo"))
    assert sorted(alignment.head_maps) == sorted(hm.name for hm in spec.head_maps)
    assert torch.allclose(alignment.rotation, q_total.T, atol=1e-4)
    aligned = aligned_model(scrambled, alignment).state_dict()  # verified: computes what B computes
    for k, v in folded_model(model).state_dict().items():
        assert_close(v, aligned[k], k)
    # Without head maps the within-head rotations stay: B is not A.
    plain = rotation_alignment(model, scrambled, fit="embeddings", head_maps=())
    assert any((plain.apply(scrambled.state_dict())[k] - aligned[k]).abs().max() > 1e-2 for k in aligned if "attn" in k)
    assert alignment.objective_after > plain.objective_after


def test_head_maps_default_per_family_and_unknown_names_refused():
    from merge_graphs.rotation import DEFAULT_HEAD_MAPS

    a, b = make("gpt2-lm", seed=0), make("gpt2-lm", seed=1)
    found = rotation_alignment(a, b)
    assert sorted(found.head_maps) == sorted(hm.name for hm in found.spec.head_maps
                                             if hm.name.endswith(tuple("." + w for w in DEFAULT_HEAD_MAPS["gpt2"])))
    assert rotation_alignment(a, b, head_maps=()).head_maps == {}
    with pytest.raises(ValueError, match="unknown head maps"):
        rotation_alignment(a, b, head_maps=("qv",))


def test_different_vocabularies_are_refused():
    a = make("gpt2-lm")
    torch.manual_seed(0)
    b = T.GPT2LMHeadModel(T.GPT2Config(**{**GPT2, "vocab_size": 64})).eval()
    with pytest.raises(mg.SpecMismatchError, match="vocabularies differ.*tokenizers differ"):
        rotation_alignment(a, b)


def test_procrustes_under_the_all_ones_constraint():
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(50, 6, generator=g)
    xa = xa - xa.mean(1, keepdim=True)
    q0 = random_rotation(6, "fix_ones", seed=2)
    q = procrustes((xa @ q0).T @ xa, "fix_ones")
    assert torch.allclose(q, q0.T, atol=1e-5)
    check_rotation(q, "fix_ones")
    free = procrustes(torch.randn(6, 6, generator=g), "free")
    check_rotation(free, "free")


def test_specs_declare_their_norms_and_rotation_kind():
    gpt2 = mg.symmetry_spec(make("gpt2-lm"))
    assert gpt2.rotation == "fix_ones" and gpt2.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert [n.readers for n in gpt2.norms][:2] == [
        (("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"),),
        (("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias"),),
    ]
    llama = mg.symmetry_spec(make("llama-lm"))
    assert llama.rotation == "free" and not llama.tied
    assert llama.norms[0].bias is None and [w for w, _ in llama.norms[0].readers] == [
        f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    assert llama.norms[-1].readers == (("lm_head.weight", None),)
    assert mg.symmetry_spec(make("llama")).norms[-1].readers == ()
    assert mg.symmetry_spec(make("bert-mlm")).rotation is None
