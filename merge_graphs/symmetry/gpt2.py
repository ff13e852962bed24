"""GPT-2: pre-LayerNorm decoder with ``Conv1D`` weights stored as (in, out) and a fused q|k|v."""

from __future__ import annotations

from merge_graphs.symmetry.builder import SpecBuilder, find_prefix

ARCHITECTURES = ("GPT2Model", "GPT2LMHeadModel")


def build(b: SpecBuilder, config, architecture: str):
    p = find_prefix(b.stored, "transformer", "wte.weight")
    d = config.n_embd
    inner = config.n_inner or 4 * d
    vocab = b.fixed("vocab", config.vocab_size)
    r = b.space("residual", (b.group("residual", d), d))

    def layer_norm(name, *readers):
        b.tensor(f"{name}.weight", r, role="norm")
        b.tensor(f"{name}.bias", r, role="norm.bias")
        b.norm(f"{name}.weight", f"{name}.bias", [(f"{x}.weight", f"{x}.bias") for x in readers])

    b.tensor(f"{p}wte.weight", vocab, r, role="embed", fan_in_axis=0)
    b.tensor(f"{p}wpe.weight", b.fixed("positions", config.n_positions), r, role="embed.position", fan_in_axis=0)
    for i in range(config.n_layer):
        L = f"{p}h.{i}"
        q, k, v, o = b.attention(f"layers.{i}.attn", config.n_head, config.n_head, d // config.n_head, rope=False)
        layer_norm(f"{L}.ln_1", f"{L}.attn.c_attn")
        b.tensor(f"{L}.attn.c_attn.weight", r, (q, k, v), role="attn.q|attn.k|attn.v", fan_in_axis=0)
        b.tensor(f"{L}.attn.c_attn.bias", (q, k, v), role="bias")
        b.tensor(f"{L}.attn.c_proj.weight", o, r, role="attn.o", fan_in_axis=0)
        b.tensor(f"{L}.attn.c_proj.bias", r, role="bias")
        layer_norm(f"{L}.ln_2", f"{L}.mlp.c_fc")
        h = b.space(f"layers.{i}.mlp", (b.group(f"layers.{i}.mlp", inner), inner))
        b.tensor(f"{L}.mlp.c_fc.weight", r, h, role="mlp.up", fan_in_axis=0)
        b.tensor(f"{L}.mlp.c_fc.bias", h, role="bias")
        b.tensor(f"{L}.mlp.c_proj.weight", h, r, role="mlp.down", fan_in_axis=0)
        b.tensor(f"{L}.mlp.c_proj.bias", r, role="bias")
    layer_norm(f"{p}ln_f", "lm_head")
    b.tensor("lm_head.weight", vocab, r, role="unembed")
    if architecture != "GPT2Model" and getattr(config, "tie_word_embeddings", True):
        b.tie("lm_head.weight", f"{p}wte.weight")
    return b.build(
        outputs={"last_hidden_state": "residual"} if architecture == "GPT2Model" else {},
        notes=("pre-LayerNorm: after folding the norms the residual stream also admits rotations "
               "that fix the all-ones direction",),
        rotation="fix_ones",
    )
