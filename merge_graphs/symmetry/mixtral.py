"""Mixtral: Llama's decoder with a mixture of experts in every layer (:mod:`merge_graphs.symmetry.moe`).

Checkpoints store the router as ``block_sparse_moe.gate`` and expert ``j`` as
``block_sparse_moe.experts.{j}.w1`` (gate), ``w3`` (up) and ``w2`` (down).
"""

from __future__ import annotations

from merge_graphs.symmetry.decoder import Decoder
from merge_graphs.symmetry.moe import NOTES, Experts

MIXTRAL = Decoder(
    architectures=("MixtralModel", "MixtralForCausalLM"),
    experts=Experts(block="block_sparse_moe", projections=("w1", "w3", "w2"), experts_key="num_local_experts",
                    hidden_key="intermediate_size"),
    notes=NOTES,
)
ARCHITECTURES, build = MIXTRAL.architectures, MIXTRAL.build
