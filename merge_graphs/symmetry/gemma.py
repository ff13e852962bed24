"""Gemma (1): Llama's decoder with RMSNorm gains of ``1 + weight``, embeddings scaled by sqrt(d), a
tied head and a head_dim of its own (GQA, or MQA with one key/value head).

The offset is declared on every norm, so folding leaves ``weight = 0`` (gain 1); the embedding
scale is a constant. After folding the residual stream admits any rotation; q/k and v/o head maps.
"""

from __future__ import annotations

from merge_graphs.symmetry.decoder import Decoder

GEMMA = Decoder(
    architectures=("GemmaModel", "GemmaForCausalLM"),
    gain_offset=1.0,
    notes=("embeddings scaled by sqrt(hidden_size) in the forward pass: a constant, which every map commutes with",),
)
ARCHITECTURES, build = GEMMA.architectures, GEMMA.build
