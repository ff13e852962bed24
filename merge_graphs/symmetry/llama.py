"""Llama-family decoders: Llama, Mistral, Qwen2 (pre-RMSNorm, SwiGLU, RoPE, grouped-query attention).

The plain decoder of :mod:`merge_graphs.symmetry.decoder`: after folding the norms the residual
stream admits any rotation; q/k (RoPE planes) and v/o head maps.
"""

from __future__ import annotations

from merge_graphs.symmetry.decoder import Decoder

LLAMA = Decoder(architectures=(
    "LlamaModel", "LlamaForCausalLM", "MistralModel", "MistralForCausalLM", "Qwen2Model", "Qwen2ForCausalLM",
))
ARCHITECTURES, build = LLAMA.architectures, LLAMA.build
