"""OLMo 2: a decoder whose branches read the residual stream as it is and write it through a norm
(post_attention_layernorm, post_feedforward_layernorm), with q/k RMSNorms over the whole projection.

The post-norms leave the stream permutations only. The q/k norms' RMS runs over every head at once
and their gain is one value per unit of the projection (labelled with the q and k spaces, so it moves
with its head): heads and query heads permute, but no q/k head map; the v/o map stays.
"""

from __future__ import annotations

from merge_graphs.symmetry.decoder import Decoder

OLMO2 = Decoder(
    architectures=("Olmo2Model", "Olmo2ForCausalLM"),
    attn_pre=None,
    mlp_pre=None,
    attn_post="post_attention_layernorm",
    mlp_post="post_feedforward_layernorm",
    qk_norm="projection",
)
ARCHITECTURES, build = OLMO2.architectures, OLMO2.build
