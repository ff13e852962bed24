"""Qwen3: Llama's decoder with an RMSNorm on each head's q and k (over head_dim, one gain shared by
every head).

Heads and GQA query heads still move as blocks, and the residual stream still rotates after
folding; the q/k norm's per-dim gain rules out the q/k head map (the v/o map stays).
"""

from __future__ import annotations

from merge_graphs.symmetry.decoder import Decoder

QWEN3 = Decoder(architectures=("Qwen3Model", "Qwen3ForCausalLM"), qk_norm="head")
ARCHITECTURES, build = QWEN3.architectures, QWEN3.build
