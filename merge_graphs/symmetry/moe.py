"""Mixtures of experts: the sparse MLP of Mixtral, Qwen2-MoE and Qwen3-MoE, as a decoder table declares it.

A sparse layer's MLP is a router (``gate``, experts x residual) that scores the experts, and the
experts, SwiGLU MLPs of their own: each token goes through its top-k experts and gets their
outputs weighted by the softmax of the scores. What that adds to the symmetry:

* **Experts are a group** (``layers.{i}.mlp.experts``). Permuting them permutes the router's rows
  and the experts' weights alike: softmax, top-k and the weighting follow each expert wherever it
  sits, so the output is unchanged (``num_experts_per_tok``, ``norm_topk_prob`` and Mixtral's
  training-time router jitter do not matter).
* **Each expert's hidden units are a group of their own** (``layers.{i}.mlp.experts.mlp``, a
  child of the experts: one permutation per expert, chosen by the expert placed at each position).
* **Two storage layouts.** transformers 5 holds the experts stacked, ``mlp.experts.gate_up_proj``
  (experts x (gate | up) x residual) and ``mlp.experts.down_proj`` (experts x residual x hidden),
  the expert on the leading axis. ``save_pretrained`` and published checkpoints store one tensor
  per expert and projection instead (Mixtral: ``block_sparse_moe.experts.{j}.w1/w3/w2``, router
  ``block_sparse_moe.gate``; Qwen: ``mlp.experts.{j}.gate_proj/up_proj/down_proj``), each labelled
  with a :class:`~merge_graphs.symmetry.spec.Slot`: permuting the experts moves whole tensors
  between those names. The spec labels whichever names the checkpoint has.
* **Qwen2-MoE's shared expert** is an ordinary SwiGLU MLP beside the experts, with a hidden group
  of its own (``layers.{i}.shared_expert``); its gate ``shared_expert_gate`` (1 x residual) reads
  the stream and writes one fixed unit (the sigmoid that scales the shared expert's output).
* **Dense layers** (Qwen's ``mlp_only_layers`` and ``decoder_sparse_step``) keep the decoder's MLP.

The router, the experts, the shared expert and its gate all read the stream through the layer's
pre-norm, so folding it into them leaves the residual stream free to rotate, as in Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

from merge_graphs.symmetry.builder import SpecBuilder
from merge_graphs.symmetry.spec import Slot, Space

#: What every mixture of experts notes in its spec.
NOTES = ("experts move as blocks (router rows and expert weights); each expert's hidden units move inside it; "
         "top-k routing follows the experts",)


@dataclass(frozen=True)
class Experts:
    """One family's mixture of experts: its names and config keys.

    Attributes:
        block: the sparse block's module name in checkpoints (in memory it is always ``mlp``).
        projections: the per-expert tensors' names for the gate, up and down projections.
        experts_key, hidden_key: the config's number of experts and expert hidden size.
        shared: a shared expert and its gate (Qwen2-MoE).
    """

    block: str
    projections: tuple[str, str, str]
    experts_key: str
    hidden_key: str
    shared: bool = False

    def sparse(self, config, layer: int) -> bool:
        """Whether ``layer`` has experts (Qwen keeps a dense MLP in ``mlp_only_layers`` and between
        every ``decoder_sparse_step``-th layer)."""
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return layer not in (getattr(config, "mlp_only_layers", None) or ()) and (layer + 1) % step == 0

    def label(self, b: SpecBuilder, config, i: int, layer: str, r: Space, pre: str, gain_offset: float) -> None:
        """Label layer ``i``'s sparse block, stacked and per-expert names alike, and its pre-norm, which
        everything in the block reads."""
        n, hidden = getattr(config, self.experts_key), getattr(config, self.hidden_key)
        experts, h = b.experts(f"layers.{i}.mlp", n, hidden)
        group = experts.groups[0]
        routers = list(dict.fromkeys([f"{layer}.mlp.gate.weight", f"{layer}.{self.block}.gate.weight"]))
        for router in routers:
            b.tensor(router, experts, r, role="moe.router")
        stacked = f"{layer}.mlp.experts"
        b.tensor(f"{stacked}.gate_up_proj", experts, (h, h), r, role="mlp.gate|mlp.up", fan_in_axis=2)
        b.tensor(f"{stacked}.down_proj", experts, r, h, role="mlp.down", fan_in_axis=2)
        gate, up, down = (tuple(f"{layer}.{self.block}.experts.{j}.{x}.weight" for j in range(n))
                          for x in self.projections)
        for j in range(n):
            b.tensor(gate[j], h, r, role="mlp.gate", slot=Slot(group, gate, j))
            b.tensor(up[j], h, r, role="mlp.up", slot=Slot(group, up, j))
            b.tensor(down[j], r, h, role="mlp.down", slot=Slot(group, down, j))
        readers = [*routers, f"{stacked}.gate_up_proj", *gate, *up]
        if self.shared:
            shared = f"{layer}.mlp.shared_expert"
            size = config.shared_expert_intermediate_size
            s = b.space(f"layers.{i}.shared_expert", (b.group(f"layers.{i}.shared_expert", size), size))
            for proj in ("gate", "up"):
                b.tensor(f"{shared}.{proj}_proj.weight", s, r, role=f"mlp.{proj}")
            b.tensor(f"{shared}.down_proj.weight", r, s, role="mlp.down")
            # One fixed unit: the sigmoid that scales the shared expert's output.
            b.tensor(f"{shared}_gate.weight", b.fixed(f"layers.{i}.shared_expert_gate", 1), r, role="moe.shared_gate")
            readers += [f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight", f"{shared}_gate.weight"]
        b.tensor(f"{layer}.{pre}.weight", r, role="norm")
        b.norm(f"{layer}.{pre}.weight", None, [(w, None) for w in readers], gain_offset)
