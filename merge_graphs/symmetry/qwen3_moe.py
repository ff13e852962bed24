"""Qwen3-MoE: Qwen3's decoder (q/k RMSNorm over each head's dims: no q/k head map) with a mixture of
experts (:mod:`merge_graphs.symmetry.moe`); ``mlp_only_layers`` stay dense.
"""

from __future__ import annotations

import dataclasses

from merge_graphs.symmetry.moe import NOTES, Experts
from merge_graphs.symmetry.qwen3 import QWEN3

QWEN3_MOE = dataclasses.replace(
    QWEN3,
    architectures=("Qwen3MoeModel", "Qwen3MoeForCausalLM"),
    experts=Experts(block="mlp", projections=("gate_proj", "up_proj", "down_proj"), experts_key="num_experts",
                    hidden_key="moe_intermediate_size"),
    notes=QWEN3.notes + NOTES,
)
ARCHITECTURES, build = QWEN3_MOE.architectures, QWEN3_MOE.build
