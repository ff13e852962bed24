"""Phi-3 (and Phi-4-mini, which shares its model type): Llama's decoder with fused projections,
``qkv_proj`` (q | k | v) and ``gate_up_proj`` (gate | up, both halves indexed by the MLP's units).

Pre-RMSNorm: after folding the residual stream admits any rotation. With partial RoPE
(``partial_rotary_factor`` below 1) there is no q/k head map.
"""

from __future__ import annotations

from merge_graphs.symmetry.decoder import Decoder

PHI3 = Decoder(architectures=("Phi3Model", "Phi3ForCausalLM"), fused=True)
ARCHITECTURES, build = PHI3.architectures, PHI3.build
