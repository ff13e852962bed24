"""Gemma 3 (text: Gemma3ForCausalLM, Gemma3TextModel): Gemma 2 with Qwen3's q/k norms (over each
head's dims, gain ``1 + weight`` shared by every head) and RoPE bases of its own for local layers.

Permutations only (the post-norms), and no q/k head map (the q/k norms' gain); v/o maps stay.
"""

from __future__ import annotations

import dataclasses

from merge_graphs.symmetry.decoder import Decoder
from merge_graphs.symmetry.gemma2 import GEMMA2

GEMMA3: Decoder = dataclasses.replace(
    GEMMA2, architectures=("Gemma3TextModel", "Gemma3ForCausalLM"), qk_norm="head",
)
ARCHITECTURES, build = GEMMA3.architectures, GEMMA3.build
