"""ViT: a pre-LayerNorm encoder over image patches.

The patch embedding, a convolution, reads the fixed pixel channels and writes the residual stream,
beside the class token and the position embeddings (stored with a leading axis of 1); every layer
is the pre-LN encoder layer of :mod:`merge_graphs.symmetry.encoder`; a final LayerNorm feeds the
classifier (or, in a bare ``ViTModel``, is the output and feeds the pooler). Every reader of the
stream sits behind a LayerNorm, so as in GPT-2 the folded stream admits rotations that fix the
all-ones direction.
"""

from __future__ import annotations

from merge_graphs.symmetry.builder import SpecBuilder, find_prefix
from merge_graphs.symmetry.encoder import LayerNames, encoder_layer, layer_norm, patch_positions

ARCHITECTURES = ("ViTModel", "ViTForImageClassification")

# transformers 5 names; checkpoints stored under the older names (encoder.layer.N.attention.attention.query
# ...) are read under these (merge_graphs.sources.ModelTensors).
LAYER = LayerNames(norm1="layernorm_before", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                   o="attention.o_proj", norm2="layernorm_after", fc1="mlp.fc1", fc2="mlp.fc2")


def build(b: SpecBuilder, config, architecture: str):
    p = find_prefix(b.stored, "vit", "embeddings.cls_token")
    d = config.hidden_size
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    r = b.space("residual", (b.group("residual", d), d))

    e = f"{p}embeddings"
    b.tensor(f"{e}.patch_embeddings.projection.weight", r, b.fixed("channels", config.num_channels), None, None,
             role="embed.patch")
    b.tensor(f"{e}.patch_embeddings.projection.bias", r, role="bias")
    b.tensor(f"{e}.cls_token", None, None, r, role="embed.cls")
    b.tensor(f"{e}.position_embeddings", None, b.fixed("positions", patch_positions(config)), r,
             role="embed.position", fan_in_axis=1)
    for i in range(config.num_hidden_layers):
        encoder_layer(b, f"{p}layers.{i}", f"layers.{i}", r, LAYER, n_heads, head_dim, config.intermediate_size)
    layer_norm(b, f"{p}layernorm", r, ["classifier"])

    # The pooler reads the final norm's output, which a bare ViTModel also returns: that norm is kept.
    pooled = b.fixed("pooled", getattr(config, "pooler_output_size", None) or d)
    b.tensor(f"{p}pooler.dense.weight", pooled, r, role="linear")
    b.tensor(f"{p}pooler.dense.bias", pooled, role="bias")
    labels = b.fixed("labels", getattr(config, "num_labels", 2))
    b.tensor("classifier.weight", labels, r, role="linear")
    b.tensor("classifier.bias", labels, role="bias")
    bare = architecture == "ViTModel"
    return b.build(
        outputs={"last_hidden_state": "residual"} if bare else {},
        notes=("pre-LayerNorm: after folding the norms the residual stream also admits rotations "
               "that fix the all-ones direction",
               *(["a bare ViTModel returns its final norm's output: it rotates only with a classifier; its "
                  "pooler_output is fixed"] if bare else [])),
        rotation="fix_ones",
    )
