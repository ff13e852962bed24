"""Qwen2-MoE: Qwen2's decoder (q/k/v biases) with a mixture of experts and a shared expert beside it,
scaled by a sigmoid gate (:mod:`merge_graphs.symmetry.moe`); ``mlp_only_layers`` stay dense.
"""

from __future__ import annotations

from merge_graphs.symmetry.decoder import Decoder
from merge_graphs.symmetry.moe import NOTES, Experts

QWEN2_MOE = Decoder(
    architectures=("Qwen2MoeModel", "Qwen2MoeForCausalLM"),
    experts=Experts(block="mlp", projections=("gate_proj", "up_proj", "down_proj"), experts_key="num_experts",
                    hidden_key="moe_intermediate_size", shared=True),
    notes=NOTES + ("a shared expert (its own hidden group) and its gate (one fixed unit) beside the experts",),
)
ARCHITECTURES, build = QWEN2_MOE.architectures, QWEN2_MOE.build
