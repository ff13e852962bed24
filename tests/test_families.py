"""The decoder families of issue #18 (Qwen3, Gemma 1/2/3, OLMo 2, Phi-3): what each spec says about the
symmetry is checked on the real transformers models, and two seeds of each merge from a recipe.

Permutation invariance, put-back, neural graphs and the GNN run on these families through
``tiny_models.FACTORIES``; norm folding and residual rotations through ``test_rotation``'s lists.
"""

import copy
import dataclasses

import pytest
import torch
import transformers as T
from tiny_models import VOCAB, example_input, make, outputs

import merge_graphs as mg
from merge_graphs.activations import activation_matching
from merge_graphs.api import aligned_model
from merge_graphs.learned import learned_alignment
from merge_graphs.rotation import (
    fold_norms,
    folded_model,
    random_rotation,
    rope_plane_rotations,
    rotate,
    rotate_heads,
    rotation_alignment,
)
from merge_graphs.run import run_recipe
from merge_graphs.symmetry import permute_state_dict
from merge_graphs.symmetry.spec import HeadMap

ROTATING = ["qwen3-lm", "gemma-lm", "phi3-lm"]
POST_NORM = ["gemma2-lm", "gemma3-lm", "olmo2-lm"]
WHY_NOT = "post_attention_layernorm, post_feedforward_layernorm.*write path.*permutations only"


def same_outputs(model, other) -> bool:
    """Whether two models compute the same outputs on the example input (to float32 round-off)."""
    inputs = example_input(model)
    before, after = outputs(model, inputs), outputs(other, inputs)
    return all((a - after[k]).abs().max() <= 1e-4 * a.abs().max() for k, a in before.items())


def holding(model, state):
    """A model of ``model``'s class and config holding ``state``, its head untied (a folded head is not the
    embedding)."""
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    out = type(model)(config).eval()
    out.load_state_dict(state)
    return out


def random_head_maps(spec, head_maps, seed):
    """One admissible map per key/value head for each of ``head_maps``."""
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for hm in head_maps:
        n = spec.groups[hm.heads].size
        if hm.kind == "rope_pairs":
            maps[hm.name] = rope_plane_rotations(6.0 * torch.rand(n, hm.head_dim // 2, generator=g))
        else:
            maps[hm.name] = torch.linalg.qr(torch.randn(n, hm.head_dim, hm.head_dim, generator=g))[0]
    return maps


HEAD_MAPS = {"llama-lm": {"qk", "vo"}, "qwen3-lm": {"vo"}, "gemma-lm": {"qk", "vo"}, "gemma2-lm": {"qk", "vo"},
             "gemma3-lm": {"vo"}, "olmo2-lm": {"vo"}, "phi3-lm": {"qk", "vo"}, "phi3-lm-tied": {"vo"},
             "mixtral-lm": {"qk", "vo"}, "qwen3-moe-lm-tied": {"vo"}}


@pytest.mark.parametrize("name", sorted(HEAD_MAPS))
def test_declared_head_maps_keep_the_function_and_a_dropped_qk_map_would_not(name):
    """q/k norms (a per-dim gain) and partial RoPE rule out the q/k map that Llama admits: applied
    anyway, it changes what the model computes, while the maps the spec declares do not."""
    model = make(name)
    spec = mg.symmetry_spec(model)
    assert {hm.name.rsplit(".", 1)[1] for hm in spec.head_maps} == HEAD_MAPS[name]
    assert same_outputs(model, holding(model, rotate_heads(spec, model.state_dict(),
                                                           random_head_maps(spec, spec.head_maps, seed=1))))
    if "qk" in HEAD_MAPS[name]:
        return
    layer = spec.head_maps[0].name.rsplit(".", 1)[0]
    qk = HeadMap(f"{layer}.qk", f"{layer}.heads", (f"{layer}.q", f"{layer}.k"), spec.head_maps[0].head_dim,
                 "rope_pairs")
    forced = dataclasses.replace(spec, head_maps=(qk,))
    moved = rotate_heads(forced, model.state_dict(), random_head_maps(forced, [qk], seed=2))
    assert not same_outputs(model, holding(model, moved))


@pytest.mark.parametrize("name", POST_NORM)
def test_post_norms_leave_permutations_only_and_rotation_is_refused_saying_why(name):
    model, other = make(name), make(name, seed=1)
    spec = mg.symmetry_spec(model)
    assert spec.rotation is None and spec.unrotated in spec.notes
    calibration = {"input_ids": torch.randint(2, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))}
    for refused in (lambda: fold_norms(spec, model.state_dict()), lambda: rotation_alignment(model, other),
                    lambda: learned_alignment(model, other, calibration, steps=1)):
        with pytest.raises(mg.UnsupportedArchitectureError, match=WHY_NOT):
            refused()
    # Why: told that it may, folding the pre-norms and rotating the stream (every tensor that reads or
    # writes it; a norm's gain stays a gain) changes the outputs ...
    forced = dataclasses.replace(spec, rotation="free")
    q = random_rotation(spec.groups["residual"].size, "free", seed=3)
    post = [n for n in spec.tensors if n.endswith(("post_attention_layernorm.weight",
                                                   "post_feedforward_layernorm.weight"))]
    assert len(post) == 2 * model.config.num_hidden_layers

    def rotated(m):
        folded_spec, state = fold_norms(forced, m.state_dict())
        return holding(m, {**rotate(folded_spec, state, q), **{n: state[n] for n in post}})

    assert not same_outputs(model, rotated(model))
    # ... and only because of the post-norms' gains: with every one of them at 1, the same rotation is exact.
    offset = spec.norms[-1].offset
    plain = holding(model, {k: torch.full_like(v, 1 - offset) if k in post else v
                            for k, v in model.state_dict().items()})
    assert same_outputs(plain, rotated(plain))


@pytest.mark.parametrize("name", POST_NORM)
def test_post_norm_decoders_learn_their_permutations_on_the_next_token_loss(name):
    """Without a residual rotation, learned alignment learns permutations (straight-through) on the causal-LM
    loss of the interpolated models: B's function is kept and the result is deterministic."""
    a, b = make(name), make(name, seed=1)
    calibration = {"input_ids": torch.randint(2, VOCAB, (8, 9), generator=torch.Generator().manual_seed(0))}
    found = [mg.align(a, b, "learned", calibration=calibration, learn={"steps": 3, "batch_size": 4}) for _ in range(2)]
    assert found[0].method == "learned" and found[0].basis == "permutation" and len(found[0].loss_curve) == 3
    assert all(torch.equal(p, found[1].permutations[g]) for g, p in found[0].permutations.items())
    assert same_outputs(b, aligned_model(b, found[0]))
    with pytest.raises(mg.UnsupportedArchitectureError, match=WHY_NOT):  # insisting on a rotation
        mg.align(a, b, "learned", calibration=calibration, residual="rotation")


def test_gemma_folding_reads_the_gain_as_one_plus_weight():
    model = make("gemma-lm")
    spec = mg.symmetry_spec(model)
    assert {n.offset for n in spec.norms} == {1.0} and len(spec.norms) == 2 * model.config.num_hidden_layers + 1
    folded = folded_model(model).state_dict()
    assert all(torch.equal(folded[n.weight], torch.zeros_like(folded[n.weight])) for n in spec.norms)
    # Read as a plain gain, the same weights fold into a different function.
    plain = dataclasses.replace(spec, norms=tuple(dataclasses.replace(n, offset=0.0) for n in spec.norms))
    assert not same_outputs(model, holding(model, fold_norms(plain, model.state_dict())[1]))


@pytest.mark.parametrize("name", ["gemma2-lm", "gemma3-lm"])
def test_the_tiny_models_exercise_sliding_windows_and_soft_capping(name):
    """The invariance tests on these models mean something: the window is shorter than the input and
    changes the outputs, and soft-capping is on (Gemma 2)."""
    model = make(name)
    config = model.config
    assert config.layer_types == ["sliding_attention", "full_attention"]
    assert config.sliding_window < example_input(model)["input_ids"].shape[1]
    wide = copy.deepcopy(config)
    wide.sliding_window = 64
    unwindowed = type(model)(wide).eval()
    unwindowed.load_state_dict(model.state_dict())
    assert not same_outputs(model, unwindowed)
    if name == "gemma2-lm":
        assert config.attn_logit_softcapping and config.final_logit_softcapping


def test_specs_label_what_each_family_changes():
    qwen3 = mg.symmetry_spec(make("qwen3-lm"))
    q_norm = qwen3.tensors["model.layers.0.self_attn.q_norm.weight"].axes[0][0]
    assert q_norm.name == "layers.0.attn.head_dims" and q_norm.groups == ()  # fixed dims, shared by every head
    olmo2 = mg.symmetry_spec(make("olmo2-lm"))
    assert olmo2.tensors["model.layers.0.self_attn.q_norm.weight"].axes[0][0].name == "layers.0.attn.q"
    assert olmo2.tensors["model.layers.0.self_attn.k_norm.weight"].axes[0][0].name == "layers.0.attn.k"
    assert [n.weight for n in olmo2.norms] == ["model.norm.weight"]  # its branches read the stream as it is
    gemma2 = mg.symmetry_spec(make("gemma2-lm"))
    assert [n.weight.split(".")[-2] for n in gemma2.norms[:2]] == ["input_layernorm", "pre_feedforward_layernorm"]
    phi3 = mg.symmetry_spec(make("phi3-lm"))
    qkv, gate_up = (phi3.tensors[f"model.layers.0.{t}.weight"].axes[0]
                    for t in ("self_attn.qkv_proj", "mlp.gate_up_proj"))
    assert [s.name for s in qkv] == ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"]
    assert [s.name for s in gate_up] == ["layers.0.mlp", "layers.0.mlp"]
    gemma = mg.symmetry_spec(make("gemma-lm"))  # multi-query: one key/value head, its 6 query heads move
    assert gemma.groups["layers.0.attn.heads"].size == 1 and gemma.groups["layers.0.attn.query_heads"].size == 6
    assert any("partial RoPE" in n for n in mg.symmetry_spec(make("phi3-lm-tied")).notes)


def test_olmo2_q_norm_gain_must_move_with_its_head():
    """The whole-projection q norm has one gain per q unit: permuting heads without it changes the model."""
    model = make("olmo2-lm")
    spec = mg.symmetry_spec(model)
    perms = {g: p for g, p in mg.random_permutations(spec, seed=1).items() if ".attn." in g}
    perms["layers.0.attn.heads"] = torch.tensor([1, 0])  # both key/value heads move
    state = permute_state_dict(spec, model.state_dict(), perms)
    assert same_outputs(model, holding(model, state))
    for norm in ("q_norm", "k_norm"):
        name = f"model.layers.0.self_attn.{norm}.weight"
        assert not same_outputs(model, holding(model, {**state, name: model.state_dict()[name]})), norm


@pytest.mark.parametrize("name", ROTATING + POST_NORM)
def test_activation_matching_puts_a_permuted_copy_back(name):
    """Every space is observed where a module reads or writes it, fused projections' parts included."""
    model = make(name)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=5)
    calibration = {"input_ids": torch.randint(2, VOCAB, (8, 9), generator=torch.Generator().manual_seed(0))}
    found = activation_matching(spec, model, mg.permute(model, perms, spec), calibration)
    for group, p in mg.invert_permutations(spec, perms).items():
        assert torch.equal(found.permutations[group], p), group


@pytest.mark.parametrize("name", ROTATING + POST_NORM)
def test_two_seeds_merge_from_a_recipe_into_a_folder_that_loads(tmp_path, name):
    models = [make(name, seed) for seed in (0, 1)]
    folders = []
    for seed, model in enumerate(models):
        model.save_pretrained(tmp_path / f"m{seed}")
        folders.append(str(tmp_path / f"m{seed}"))
    aligns = [{"method": "weight"}] + ([{"method": "weight", "residual": "rotation"}] if name in ROTATING else [])
    for k, align in enumerate(aligns):
        out = tmp_path / f"out{k}"
        result = run_recipe({"models": [{"model": f} for f in folders], "align": align, "output": {"path": str(out)}},
                            progress=False)
        merged = T.AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(merged) is type(models[0])
        # The folder holds the average of A and the aligned B, in the basis the alignment maps into.
        a, b = (al.apply(m.state_dict()) for al, m in zip(result.alignments, models))
        for key, tensor in merged.state_dict().items():
            if key in a:
                assert torch.allclose(tensor, (a[key] + b[key]) / 2, atol=1e-6), key
        assert not same_outputs(models[0], merged) and not same_outputs(models[1], merged)
    if name in POST_NORM:
        with pytest.raises(mg.UnsupportedArchitectureError, match=WHY_NOT):
            run_recipe({"models": [{"model": f} for f in folders],
                        "align": {"method": "weight", "residual": "rotation"}}, dry_run=True)
