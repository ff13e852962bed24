"""Gemma 2: Gemma with a norm before *and after* attention and the MLP, logit soft-capping and
alternating sliding-window / global layers.

The post-norms sit on the residual stream's write path, so the stream admits permutations only
(no folding, no rotation; :mod:`merge_graphs.symmetry.decoder` says why). Soft-capping and
sliding windows act on scores and logits, which no map moves.
"""

from __future__ import annotations

import dataclasses

from merge_graphs.symmetry.decoder import Decoder
from merge_graphs.symmetry.gemma import GEMMA

GEMMA2: Decoder = dataclasses.replace(
    GEMMA,
    architectures=("Gemma2Model", "Gemma2ForCausalLM"),
    mlp_pre="pre_feedforward_layernorm",
    attn_post="post_attention_layernorm",
    mlp_post="post_feedforward_layernorm",
    notes=GEMMA.notes + (
        "attention logit and final logit soft-capping act on scores and logits, which no map moves",
        "sliding-window and global layers differ only in which positions attend, which no map moves",
    ),
)
ARCHITECTURES, build = GEMMA2.architectures, GEMMA2.build
