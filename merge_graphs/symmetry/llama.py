"""Llama-family decoders: Llama, Mistral, Qwen2 (RMSNorm, SwiGLU, RoPE, grouped-query attention)."""

from __future__ import annotations

from merge_graphs.symmetry.builder import SpecBuilder, find_prefix

ARCHITECTURES = (
    "LlamaModel", "LlamaForCausalLM", "MistralModel", "MistralForCausalLM", "Qwen2Model", "Qwen2ForCausalLM",
)


def build(b: SpecBuilder, config, architecture: str):
    p = find_prefix(b.stored, "model", "embed_tokens.weight")
    d = config.hidden_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    vocab = b.fixed("vocab", config.vocab_size)
    r = b.space("residual", (b.group("residual", d), d))

    b.tensor(f"{p}embed_tokens.weight", vocab, r, role="embed", fan_in_axis=0)
    for i in range(config.num_hidden_layers):
        L = f"{p}layers.{i}"
        q, k, v, o = b.attention(f"layers.{i}.attn", n_heads, n_kv, head_dim, rope=True)
        b.tensor(f"{L}.input_layernorm.weight", r, role="norm")
        b.norm(f"{L}.input_layernorm.weight", None,
               [(f"{L}.self_attn.{x}_proj.weight", f"{L}.self_attn.{x}_proj.bias") for x in "qkv"])
        for proj, space in (("q", q), ("k", k), ("v", v)):
            b.tensor(f"{L}.self_attn.{proj}_proj.weight", space, r, role=f"attn.{proj}")
            b.tensor(f"{L}.self_attn.{proj}_proj.bias", space, role="bias")
        b.tensor(f"{L}.self_attn.o_proj.weight", r, o, role="attn.o")
        b.tensor(f"{L}.self_attn.o_proj.bias", r, role="bias")
        b.tensor(f"{L}.post_attention_layernorm.weight", r, role="norm")
        b.norm(f"{L}.post_attention_layernorm.weight", None,
               [(f"{L}.mlp.{x}_proj.weight", f"{L}.mlp.{x}_proj.bias") for x in ("gate", "up")])
        inter = config.intermediate_size
        h = b.space(f"layers.{i}.mlp", (b.group(f"layers.{i}.mlp", inter), inter))
        for proj in ("gate", "up"):
            b.tensor(f"{L}.mlp.{proj}_proj.weight", h, r, role=f"mlp.{proj}")
            b.tensor(f"{L}.mlp.{proj}_proj.bias", h, role="bias")
        b.tensor(f"{L}.mlp.down_proj.weight", r, h, role="mlp.down")
        b.tensor(f"{L}.mlp.down_proj.bias", r, role="bias")
    b.tensor(f"{p}norm.weight", r, role="norm")
    b.norm(f"{p}norm.weight", None, [("lm_head.weight", None)])
    b.tensor("lm_head.weight", vocab, r, role="unembed")
    if not architecture.endswith("Model") and getattr(config, "tie_word_embeddings", False):
        b.tie("lm_head.weight", f"{p}embed_tokens.weight")
    b.carry("*rotary_emb.*")
    return b.build(
        outputs={"last_hidden_state": "residual"} if architecture.endswith("Model") else {},
        notes=("RoPE: q/k dims inside a head stay fixed; heads move as blocks with their key/value head",
               "pre-RMSNorm: after folding the norms the residual stream also admits any rotation"),
        rotation="free",
    )
