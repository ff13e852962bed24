"""CLIP: a text tower and a vision tower, pre-LayerNorm encoders projected into one embedding space.

Each tower's residual stream is a group of its own (``text.residual``, ``vision.residual``), and so
are its heads and MLPs (``text.layers.N.*``, ``vision.layers.N.*``); the layers are the encoder
layers of :mod:`merge_graphs.symmetry.encoder`. The text tower embeds tokens and positions and ends
in ``final_layer_norm``; the vision tower embeds patches (a convolution over the fixed pixel
channels), a class embedding and positions, normalizes that with ``pre_layrnorm`` *into* the
stream, and normalizes the pooled class token with ``post_layernorm``. ``text_projection`` and
``visual_projection`` read the towers and write the shared embedding space, which no group moves:
image and text embeddings must stay comparable. ``logit_scale`` is a scalar, merged as it is.

No residual rotation (see :data:`WHY_NOT`): ``pre_layrnorm``'s per-unit gain sits on the vision stream
itself, and every class with the text tower returns its final norm's output.
"""

from __future__ import annotations

from merge_graphs.symmetry.builder import SpecBuilder, find_prefix
from merge_graphs.symmetry.encoder import LayerNames, encoder_layer, layer_norm, patch_positions
from merge_graphs.symmetry.spec import Space

# architecture: {tower: its outputs in that tower's residual stream}. A tower's last_hidden_state is its
# final norm's output (text) or its last layer's (vision); its pooler_output, where not projected, is its
# final norm's output at the pooled token.
CLASSES = {
    "CLIPModel": {"text": ("text_model_output.last_hidden_state",),
                  "vision": ("vision_model_output.last_hidden_state",)},
    "CLIPTextModel": {"text": ("last_hidden_state", "pooler_output")},
    "CLIPTextModelWithProjection": {"text": ("last_hidden_state",)},
    "CLIPVisionModel": {"vision": ("last_hidden_state", "pooler_output")},
    "CLIPVisionModelWithProjection": {"vision": ("last_hidden_state",)},
}
ARCHITECTURES = tuple(CLASSES)

LAYER = LayerNames(norm1="layer_norm1", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                   o="self_attn.out_proj", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")

WHY_NOT = {
    "vision": "the vision tower's pre_layrnorm writes its output into the stream (h = g * LayerNorm(x) + b), so "
              "its per-unit gain g acts on the stream itself: it commutes with permutations of the stream, not "
              "with rotations, and there is no reader to fold it into",
    "text": "the text tower's final_layer_norm output is returned (last_hidden_state), in the stream's basis "
            "with a per-unit gain that does not commute with a rotation",
}


def build(b: SpecBuilder, config, architecture: str):
    towers = CLASSES[architecture]
    both = len(towers) == 2
    embedding = b.fixed("embedding", config.projection_dim)
    outputs = {}
    if "vision" in towers:
        fields = towers["vision"]
        r = _vision_tower(b, config.vision_config if both else config, embedding,
                          any(f.endswith("pooler_output") for f in fields))
        outputs.update(dict.fromkeys(fields, r.name))
    if "text" in towers:
        fields = towers["text"]
        r = _text_tower(b, config.text_config if both else config, embedding, bool(fields))
        outputs.update(dict.fromkeys(fields, r.name))
    if both:
        b.tensor("logit_scale", role="scale")
    why = "; ".join(WHY_NOT[t] for t in ("vision", "text") if t in towers)
    return b.build(
        outputs=outputs,
        notes=("text and vision residual streams are separate groups; the projections write the shared "
               "embedding space, which stays fixed",
               "no residual rotation: the vision tower's pre_layrnorm sits in the stream, the text tower "
               "returns its final norm's output"),
        unrotated=f"{architecture} admits no residual rotation: {why}. Align it with permutations (weight or "
                    "activation matching) instead.",
    )


def _layers(b: SpecBuilder, p: str, tower: str, r: Space, config) -> None:
    head_dim = config.hidden_size // config.num_attention_heads
    for i in range(config.num_hidden_layers):
        encoder_layer(b, f"{p}encoder.layers.{i}", f"{tower}.layers.{i}", r, LAYER, config.num_attention_heads,
                      head_dim, config.intermediate_size)


def _residual(b: SpecBuilder, tower: str, d: int) -> Space:
    return b.space(f"{tower}.residual", (b.group(f"{tower}.residual", d), d))


def _text_tower(b: SpecBuilder, config, embedding: Space, norm_is_output: bool) -> Space:
    p = find_prefix(b.stored, "text_model", "embeddings.token_embedding.weight")
    r = _residual(b, "text", config.hidden_size)
    e = f"{p}embeddings"
    b.tensor(f"{e}.token_embedding.weight", b.fixed("vocab", config.vocab_size), r, role="embed", fan_in_axis=0)
    b.tensor(f"{e}.position_embedding.weight", b.fixed("text.positions", config.max_position_embeddings), r,
             role="embed.position", fan_in_axis=0)
    _layers(b, p, "text", r, config)
    # Pooled at the end-of-text token, then projected.
    layer_norm(b, f"{p}final_layer_norm", r, [] if norm_is_output else ["text_projection"])
    b.tensor("text_projection.weight", embedding, r, role="linear")
    return r


def _vision_tower(b: SpecBuilder, config, embedding: Space, norm_is_output: bool) -> Space:
    p = find_prefix(b.stored, "vision_model", "embeddings.class_embedding")
    r = _residual(b, "vision", config.hidden_size)
    e = f"{p}embeddings"
    b.tensor(f"{e}.class_embedding", r, role="embed.cls")
    b.tensor(f"{e}.patch_embedding.weight", r, b.fixed("channels", config.num_channels), None, None,
             role="embed.patch")
    b.tensor(f"{e}.position_embedding.weight", b.fixed("vision.positions", patch_positions(config)), r,
             role="embed.position", fan_in_axis=0)
    layer_norm(b, f"{p}pre_layrnorm", r, readers=None)
    _layers(b, p, "vision", r, config)
    # Applied to the pooled class token only, then projected.
    layer_norm(b, f"{p}post_layernorm", r, [] if norm_is_output else ["visual_projection"])
    b.tensor("visual_projection.weight", embedding, r, role="linear")
    return r
