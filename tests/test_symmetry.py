"""Symmetry specs: permuting every group leaves each supported model's function unchanged."""

import pytest
import torch
import transformers as T
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny_models import FACTORIES, example_input, make, minilm_path, outputs, randomize
from torch import nn

import merge_graphs as mg
from merge_graphs.symmetry import identity_permutations, permute_state_dict, spec_from_config
from merge_graphs.tensors import TensorInfo


def assert_same_function(model, permuted, spec, perms, inputs):
    before, after = outputs(model, inputs), outputs(permuted, inputs)
    assert before.keys() == after.keys()
    for key, a in before.items():
        if key in spec.outputs:
            a = a[..., perms[spec.outputs[key]]]
        scale = a.abs().max()
        diff = (a - after[key]).abs().max()
        assert diff <= 1e-4 * scale, f"{key}: max abs difference {diff:.3g} vs output scale {scale:.3g}"


def assert_one_tensor_left_behind_changes_the_function(model, spec, perms, inputs, group=None):
    """Negative control: the check of :func:`assert_same_function` can fail. Leaving one tensor that a
    hidden group touches unpermuted (the group's units all moved) must change the outputs."""
    # By default the first hidden root group that can move (multi-query attention's one key/value head cannot).
    movable = [g for g, grp in spec.groups.items() if g != "residual" and grp.parent is None and grp.size >= 2]
    group = group or next(g for g in movable if any(len(spec.tensors[t].axes) > 1 for t, _ in spec.touching(g)))
    size = spec.groups[group].size
    assert size >= 2, f"group {group} of size {size} cannot move"
    perms = {**perms, group: torch.roll(torch.arange(size), 1)}  # every unit moves
    state = permute_state_dict(spec, model.state_dict(), perms)
    original = model.state_dict()
    shared = {v.data_ptr() for k, v in original.items() for j, w in original.items() if j != k and w.data_ptr() == v.data_ptr()}
    # not a tied tensor: loading its twin would permute it after all
    name = next(t for t, _ in spec.touching(group) if len(spec.tensors[t].axes) > 1 and original[t].data_ptr() not in shared)
    state[name] = original[name]
    broken = mg.permute(model, {}, spec)
    broken.load_state_dict(state)
    with pytest.raises(AssertionError):
        assert_same_function(model, broken, spec, perms, inputs)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_random_permutation_preserves_function(name):
    model = make(name)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=1)
    permuted = mg.permute(model, perms, spec)
    assert_same_function(model, permuted, spec, perms, example_input(model))
    assert_one_tensor_left_behind_changes_the_function(model, spec, perms, example_input(model))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inverse_restores_identical_tensors_and_carried_tensors_are_untouched(name):
    model = make(name)
    spec = mg.symmetry_spec(model)
    state = model.state_dict()
    perms = mg.random_permutations(spec, seed=2)
    permuted = permute_state_dict(spec, state, perms)
    restored = permute_state_dict(spec, permuted, mg.invert_permutations(spec, perms))
    for k, v in state.items():
        assert torch.equal(restored[k], v), k
    for k in spec.carried:
        assert torch.equal(permuted[k], state[k]), k
    identity = mg.compose_permutations(spec, perms, mg.invert_permutations(spec, perms))
    for k, p in identity_permutations(spec).items():
        assert torch.equal(identity[k], p), k


def test_every_float_tensor_is_labelled_and_integer_tensors_are_carried():
    model = make("cnn")
    spec = mg.symmetry_spec(model)
    state = model.state_dict()
    assert set(spec.tensors) == {k for k, v in state.items() if v.is_floating_point()}
    assert set(spec.carried) == {k for k, v in state.items() if not v.is_floating_point()}


def test_groups_follow_the_architecture():
    spec = mg.symmetry_spec(make("llama-lm"))
    # GQA 8:2 with RoPE: key/value heads, query heads inside each, v/o dims; q/k dims fixed.
    assert spec.groups["layers.0.attn.heads"].size == 2
    assert spec.groups["layers.0.attn.query_heads"].size == 4
    assert spec.groups["layers.0.attn.vo"].parent == "layers.0.attn.heads"
    assert "layers.0.attn.qk" not in spec.groups
    gpt2 = mg.symmetry_spec(make("gpt2-lm"))
    assert gpt2.groups["layers.1.attn.qk"].size == 6 and "layers.0.attn.query_heads" not in gpt2.groups
    # One residual group reaches every layer and the tied head.
    touched = {name for name, _ in gpt2.touching("residual")}
    assert {"transformer.wte.weight", "transformer.h.1.mlp.c_proj.weight", "lm_head.weight"} <= touched


def test_qk_dims_move_in_families_without_rope():
    model = make("bert-seqcls")
    spec = mg.symmetry_spec(model)
    perms = mg.identity_permutations(spec)
    perms["layers.0.attn.qk"] = mg.random_permutations(spec, seed=3)["layers.0.attn.qk"]
    assert_same_function(model, mg.permute(model, perms, spec), spec, perms, example_input(model))
    q = model.state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(mg.permute(model, perms, spec).state_dict()["bert.encoder.layer.0.attention.self.query.weight"], q)


# The property tests draw shapes, not weights: every model gets the O(1) weights of tiny_models
# (transformers' init, std 0.02, hides axis mistakes), every group at least 2 units and the residual
# stream at least 4 (a LayerNorm over 2 units outputs only +-1: a BERT of hidden size 2 hides any
# mistake), and each draw has its negative control.


@settings(max_examples=12, deadline=None)
@given(
    kv_heads=st.integers(1, 3), per_kv=st.integers(1, 3), head_dim=st.sampled_from([2, 4, 6]),
    layers=st.integers(1, 3), inter=st.integers(3, 20), tied=st.booleans(), seed=st.integers(0, 99),
)
def test_llama_property(kv_heads, per_kv, head_dim, layers, inter, tied, seed):
    heads = kv_heads * per_kv
    assume(heads * head_dim >= 4)
    cfg = T.LlamaConfig(vocab_size=23, hidden_size=heads * head_dim, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter,
                        tie_word_embeddings=tied, head_dim=head_dim)
    torch.manual_seed(seed)
    assert_random_decoder_is_permutation_invariant(randomize(T.LlamaForCausalLM(cfg)), seed)


def assert_random_decoder_is_permutation_invariant(model, seed):
    """A random permutation of every group keeps a causal LM's function, and leaving the MLP's or
    the residual stream's tensors behind one at a time changes it."""
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=seed)
    ids = {"input_ids": torch.randint(0, 23, (2, 5))}
    assert_same_function(model, mg.permute(model, perms, spec), spec, perms, ids)
    assert_one_tensor_left_behind_changes_the_function(model, spec, perms, ids, "layers.0.mlp")
    assert_one_tensor_left_behind_changes_the_function(model, spec, perms, ids, "residual")


DECODERS = {
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM), "gemma": (T.GemmaConfig, T.GemmaForCausalLM),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM), "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM), "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
}


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from(sorted(DECODERS)), kv_heads=st.integers(1, 3), per_kv=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4, 6]), per_head=st.integers(1, 5), layers=st.integers(1, 2),
    inter=st.integers(3, 20), tied=st.booleans(), seed=st.integers(0, 99),
)
def test_decoder_families_property(family, kv_heads, per_kv, head_dim, per_head, layers, inter, tied, seed):
    """Issue #18's decoders: MQA to GQA, tied or not, a head_dim set apart from the width (which Gemma 2/3's
    configs want a multiple of the heads)."""
    heads = kv_heads * per_kv
    assume(heads * per_head >= 4)
    config_class, model_class = DECODERS[family]
    cfg = config_class(vocab_size=23, hidden_size=heads * per_head, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=inter,
                       tie_word_embeddings=tied, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                       eos_token_id=1)
    torch.manual_seed(seed)
    assert_random_decoder_is_permutation_invariant(randomize(model_class(cfg)), seed)


@settings(max_examples=12, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(2, 5), layers=st.integers(1, 3),
       inter=st.integers(2, 17), seed=st.integers(0, 99))
def test_bert_property(heads, head_dim, layers, inter, seed):
    assume(heads * head_dim >= 4)
    cfg = T.BertConfig(vocab_size=19, hidden_size=heads * head_dim, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=8)
    torch.manual_seed(seed)
    model = randomize(T.BertForSequenceClassification(cfg))
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=seed)
    ids = {"input_ids": torch.randint(0, 19, (2, 6))}
    assert_same_function(model, mg.permute(model, perms, spec), spec, perms, ids)
    assert_one_tensor_left_behind_changes_the_function(model, spec, perms, ids, "layers.0.mlp")
    assert_one_tensor_left_behind_changes_the_function(model, spec, perms, ids, "residual")


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(2, 12), min_size=3, max_size=6), seed=st.integers(0, 99))
def test_mlp_property(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = randomize(nn.Sequential(*layers[:-1]))
    spec = mg.symmetry_spec(model)
    assert len(spec.groups) == len(widths) - 2
    perms = mg.random_permutations(spec, seed=seed)
    x = {"input": torch.randn(3, widths[0])}
    assert_same_function(model, mg.permute(model, perms, spec), spec, perms, x)
    for group in spec.groups:
        assert_one_tensor_left_behind_changes_the_function(model, spec, perms, x, group)


def sentence_embeddings(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    return T.AutoModel.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)


SENTENCES = ["A cat sits on the mat.", "Merging models needs aligned units.", "The weather is nice today."]


def test_minilm_permuted_keeps_sentence_embeddings(minilm):
    model, tokenizer = minilm
    spec = mg.symmetry_spec(model)
    assert spec.family == "bert" and spec.groups["residual"].size == 384
    before = sentence_embeddings(model, tokenizer, SENTENCES)
    # Hidden units only: the output features stay where the user reads them.
    perms = mg.random_permutations(spec, seed=0, fixed=spec.outputs.values())
    permuted = mg.permute(model, perms, spec)
    after = sentence_embeddings(permuted, tokenizer, SENTENCES)
    assert (after - before).abs().max() < 1e-5
    # Every group, the residual stream included: the features come out permuted, the
    # similarities between sentences are unchanged.
    perms = mg.random_permutations(spec, seed=1)
    after = sentence_embeddings(mg.permute(model, perms, spec), tokenizer, SENTENCES)
    assert (after - before[:, perms["residual"]]).abs().max() < 1e-5
    assert torch.allclose(after @ after.T, before @ before.T, atol=1e-5)


def test_minilm_safetensors_has_an_integer_buffer_that_is_carried():
    from safetensors.torch import load_file

    state = load_file(f"{minilm_path()}/model.safetensors")
    config = T.AutoConfig.from_pretrained(minilm_path())
    spec = spec_from_config(config, {k: TensorInfo.of(v) for k, v in state.items()})
    assert spec.carried == ("embeddings.position_ids",)
    perms = mg.random_permutations(spec, seed=0)
    permuted = permute_state_dict(spec, state, perms)
    assert torch.equal(permuted["embeddings.position_ids"], state["embeddings.position_ids"])


def test_unsupported_architecture_lists_the_supported_ones():
    model = T.T5Model(T.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(mg.UnsupportedArchitectureError, match="Supported: .*BertModel.*LlamaForCausalLM"):
        mg.symmetry_spec(model)
    with pytest.raises(mg.UnsupportedArchitectureError, match="Supported"):
        mg.symmetry_spec(nn.Linear(3, 4))


def test_sequential_with_a_unit_mixing_layer_is_refused():
    with pytest.raises(mg.UnsupportedArchitectureError, match="MultiheadAttention"):
        mg.symmetry_spec(nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 2)))


def test_unknown_float_tensor_is_refused():
    model = make("llama-lm")
    infos = {k: TensorInfo.of(v) for k, v in model.state_dict().items()}
    infos["model.layers.0.self_attn.q_norm.weight"] = TensorInfo((4,), torch.float32)
    with pytest.raises(mg.UnsupportedTensorError, match="q_norm"):
        spec_from_config(model.config, infos, "LlamaForCausalLM")


def test_config_that_disagrees_with_the_weights_is_refused():
    model = make("bert")
    infos = {k: TensorInfo.of(v) for k, v in model.state_dict().items()}
    config = T.BertConfig(**{**model.config.to_dict(), "intermediate_size": 41})
    with pytest.raises(mg.SpecMismatchError, match="intermediate.dense.weight.*41"):
        spec_from_config(config, infos, "BertModel")


def test_bad_permutation_is_refused():
    model = make("mlp")
    spec = mg.symmetry_spec(model)
    with pytest.raises(ValueError, match="not a permutation"):
        mg.permute(model, {"mlp.0": torch.zeros(32, dtype=torch.long)}, spec)
    with pytest.raises(ValueError, match="unknown group"):
        mg.permute(model, {"residual": torch.arange(32)}, spec)
