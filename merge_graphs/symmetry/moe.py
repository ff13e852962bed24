"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE.

Llama's block (pre-RMSNorm, RoPE, grouped-query attention) whose MLP is a sparse mixture of
SwiGLU experts: a router (``gate``, experts x residual) scores the experts, each token goes
through its top-k and gets their outputs weighted by the softmax of the scores. What that adds
to the symmetry:

* **Experts are a group** (``layers.{i}.experts``). Permuting them permutes the router's rows
  and the experts' weights alike: softmax, top-k and the weighting follow each expert wherever it
  sits, so the output is unchanged (``num_experts_per_tok``, ``norm_topk_prob`` and Mixtral's
  training-time router jitter do not matter).
* **Each expert's hidden units are a group of their own** (``layers.{i}.experts.mlp``, a child
  of the experts: one permutation per expert, chosen by the expert placed at each position).
* **Two storage layouts.** transformers 5 holds the experts stacked, ``mlp.experts.gate_up_proj``
  (experts x (gate | up) x residual) and ``mlp.experts.down_proj`` (experts x residual x hidden),
  where the expert is the leading axis. ``save_pretrained`` and published checkpoints store one
  tensor per expert and projection instead (Mixtral: ``block_sparse_moe.experts.{j}.w1/w3/w2``,
  router ``block_sparse_moe.gate``; Qwen: ``mlp.experts.{j}.gate_proj/up_proj/down_proj``), which a
  :class:`~merge_graphs.symmetry.spec.Slot` labels: permuting the experts moves whole tensors
  between those names. The spec labels whichever names the checkpoint has.
* **Qwen2-MoE's shared expert** is an ordinary SwiGLU MLP beside the experts, with a hidden group
  of its own (``layers.{i}.shared_expert``); its gate ``shared_expert_gate`` (1 x residual) reads
  the stream and writes one fixed unit (the sigmoid that scales the shared expert's output).
* **Dense layers** (Qwen's ``mlp_only_layers`` and ``decoder_sparse_step``) keep Llama's MLP.
* **Qwen3-MoE's q/k norms** (RMSNorm over each head's dims, one gain shared by every head) leave
  heads moving as blocks, but their per-dim gain does not commute with a rotation in RoPE's
  planes: no q/k head map (the v/o map stays).

Every reader of the stream sits behind an RMSNorm (the router, the experts, the shared expert and
its gate all read the post-attention norm), so after folding the residual stream admits any
rotation, as Llama's does.
"""

from __future__ import annotations

from dataclasses import dataclass

from merge_graphs.symmetry.builder import SpecBuilder, find_prefix
from merge_graphs.symmetry.spec import Slot, Space, SymmetrySpec


@dataclass(frozen=True)
class MoE:
    """One family's names and config keys (see the module docstring).

    Attributes:
        architectures: the transformers classes it describes.
        block: the sparse block's module name on disk (in memory it is always ``mlp``).
        projections: the per-expert tensors' names for the gate, up and down projections.
        experts_key, hidden_key: the config's number of experts and expert hidden size.
        shared: a shared expert and its gate (Qwen2-MoE).
        qk_norm: RMSNorm on each head's q and k (Qwen3-MoE).
    """

    architectures: tuple[str, ...]
    block: str
    projections: tuple[str, str, str]
    experts_key: str
    hidden_key: str
    shared: bool = False
    qk_norm: bool = False

    def build(self, b: SpecBuilder, config, architecture: str) -> SymmetrySpec:
        """The spec of one checkpoint of the family, from its config and stored tensors."""
        p = find_prefix(b.stored, "model", "embed_tokens.weight")
        d = config.hidden_size
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or d // n_heads
        vocab = b.fixed("vocab", config.vocab_size)
        r = b.space("residual", (b.group("residual", d), d))

        b.tensor(f"{p}embed_tokens.weight", vocab, r, role="embed", fan_in_axis=0)
        for i in range(config.num_hidden_layers):
            L = f"{p}layers.{i}"
            q, k, v, o = b.attention(f"layers.{i}.attn", n_heads, n_kv, head_dim, rope=True, qk_map=not self.qk_norm)
            b.tensor(f"{L}.input_layernorm.weight", r, role="norm")
            b.norm(f"{L}.input_layernorm.weight", None,
                   [(f"{L}.self_attn.{x}_proj.weight", f"{L}.self_attn.{x}_proj.bias") for x in "qkv"])
            for proj, space in (("q", q), ("k", k), ("v", v)):
                b.tensor(f"{L}.self_attn.{proj}_proj.weight", space, r, role=f"attn.{proj}")
                b.tensor(f"{L}.self_attn.{proj}_proj.bias", space, role="bias")
            b.tensor(f"{L}.self_attn.o_proj.weight", r, o, role="attn.o")
            b.tensor(f"{L}.self_attn.o_proj.bias", r, role="bias")
            if self.qk_norm:
                # One gain per head dim, shared by every head: fixed units, as RoPE gives each dim its frequency.
                dims = b.fixed(f"layers.{i}.attn.head_dims", head_dim)
                b.tensor(f"{L}.self_attn.q_norm.weight", dims, role="norm")
                b.tensor(f"{L}.self_attn.k_norm.weight", dims, role="norm")
            b.tensor(f"{L}.post_attention_layernorm.weight", r, role="norm")
            if self.sparse(config, i):
                readers = self._experts(b, config, i, L, r)
            else:
                readers = _mlp(b, f"layers.{i}.mlp", f"{L}.mlp", config.intermediate_size, r)
            b.norm(f"{L}.post_attention_layernorm.weight", None, [(w, None) for w in readers])
        b.tensor(f"{p}norm.weight", r, role="norm")
        b.norm(f"{p}norm.weight", None, [("lm_head.weight", None)])
        b.tensor("lm_head.weight", vocab, r, role="unembed")
        if not architecture.endswith("Model") and getattr(config, "tie_word_embeddings", False):
            b.tie("lm_head.weight", f"{p}embed_tokens.weight")
        b.carry("*rotary_emb.*")
        notes = ["RoPE: q/k dims inside a head stay fixed; heads move as blocks with their key/value head",
                 "experts move as blocks (router rows and expert weights); each expert's hidden units move "
                 "inside it; top-k routing follows the experts",
                 "pre-RMSNorm: after folding the norms the residual stream also admits any rotation"]
        if self.qk_norm:
            notes.append("q/k RMSNorm over each head's dims: no q/k head map (the v/o map stays)")
        return b.build(outputs={"last_hidden_state": "residual"} if architecture.endswith("Model") else {},
                       notes=tuple(notes), rotation="free")

    def sparse(self, config, layer: int) -> bool:
        """Whether ``layer`` has experts (Qwen keeps a dense MLP in ``mlp_only_layers`` and between
        every ``decoder_sparse_step``-th layer)."""
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return layer not in (getattr(config, "mlp_only_layers", None) or ()) and (layer + 1) % step == 0

    def _experts(self, b: SpecBuilder, config, i: int, L: str, r: Space) -> list[str]:
        """Label one sparse block, stacked and per-expert names alike; returns the tensors that read the stream."""
        n, hidden = getattr(config, self.experts_key), getattr(config, self.hidden_key)
        experts, h = b.experts(f"layers.{i}.mlp", n, hidden)
        routers = [f"{L}.mlp.gate.weight", f"{L}.{self.block}.gate.weight"]
        for router in dict.fromkeys(routers):
            b.tensor(router, experts, r, role="moe.router")
        stacked = f"{L}.mlp.experts"
        b.tensor(f"{stacked}.gate_up_proj", experts, (h, h), r, role="mlp.gate|mlp.up", fan_in_axis=2)
        b.tensor(f"{stacked}.down_proj", experts, r, h, role="mlp.down", fan_in_axis=2)
        gate, up, down = ([f"{L}.{self.block}.experts.{j}.{x}.weight" for j in range(n)] for x in self.projections)
        for j in range(n):
            b.tensor(gate[j], h, r, role="mlp.gate", slot=Slot(experts.groups[0], tuple(gate), j))
            b.tensor(up[j], h, r, role="mlp.up", slot=Slot(experts.groups[0], tuple(up), j))
            b.tensor(down[j], r, h, role="mlp.down", slot=Slot(experts.groups[0], tuple(down), j))
        readers = [*routers, f"{stacked}.gate_up_proj", *gate, *up]
        if self.shared:
            readers += _mlp(b, f"layers.{i}.shared_expert", f"{L}.mlp.shared_expert",
                            config.shared_expert_intermediate_size, r)
            # One fixed unit: the sigmoid that scales the shared expert's output.
            b.tensor(f"{L}.mlp.shared_expert_gate.weight", b.fixed(f"layers.{i}.shared_expert_gate", 1), r,
                     role="moe.shared_gate")
            readers.append(f"{L}.mlp.shared_expert_gate.weight")
        return readers


def _mlp(b: SpecBuilder, group: str, module: str, size: int, r: Space) -> list[str]:
    """A dense SwiGLU MLP with its own hidden group; returns the tensors that read the stream."""
    h = b.space(group, (b.group(group, size), size))
    for proj in ("gate", "up"):
        b.tensor(f"{module}.{proj}_proj.weight", h, r, role=f"mlp.{proj}")
    b.tensor(f"{module}.down_proj.weight", r, h, role="mlp.down")
    return [f"{module}.{proj}_proj.weight" for proj in ("gate", "up")]


MIXTRAL = MoE(architectures=("MixtralModel", "MixtralForCausalLM"), block="block_sparse_moe",
              projections=("w1", "w3", "w2"), experts_key="num_local_experts", hidden_key="intermediate_size")
QWEN2_MOE = MoE(architectures=("Qwen2MoeModel", "Qwen2MoeForCausalLM"), block="mlp",
                projections=("gate_proj", "up_proj", "down_proj"), experts_key="num_experts",
                hidden_key="moe_intermediate_size", shared=True)
QWEN3_MOE = MoE(architectures=("Qwen3MoeModel", "Qwen3MoeForCausalLM"), block="mlp",
                projections=("gate_proj", "up_proj", "down_proj"), experts_key="num_experts",
                hidden_key="moe_intermediate_size", qk_norm=True)

#: config.model_type -> family table
TABLES = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "qwen3_moe": QWEN3_MOE}
ARCHITECTURES = tuple(a for t in TABLES.values() for a in t.architectures)


def build(b: SpecBuilder, config, architecture: str) -> SymmetrySpec:
    """The spec of a mixture-of-experts checkpoint (the family is ``config.model_type``)."""
    return TABLES[config.model_type].build(b, config, architecture)
