"""Llama-style decoders as data: one table per family, one builder for all of them.

Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3, OLMo 2 and Phi-3 share one block: token embedding;
per layer, RoPE attention with grouped-query heads and a gated MLP, each a branch added to the
residual stream; a final RMSNorm and an LM head. They differ in a few ways, which a family's
:class:`Decoder` table declares and :meth:`Decoder.build` turns into the spec. What each one
does to the symmetry:

* **Norms before a branch** (pre-norm: Llama, Qwen, Gemma, Phi-3) read the stream. Once their
  gains are folded into the projections that read them, the stream admits any rotation, as
  RMSNorm is rotation invariant (``rotation="free"``).
* **Norms after a branch** (post-norm: Gemma 2/3, OLMo 2) sit on the stream's write path: the
  branch adds ``RMSNorm(y) * g``. A rotation ``Q`` of the stream turns that into
  ``RMSNorm(y Q) * g = (RMSNorm(y) Q) * g``, not ``(RMSNorm(y) * g) Q``: a per-unit gain commutes
  only with maps that keep each unit apart (permutations, moving the gain along, and sign
  flips), and it cannot be folded away through the normalization. So such a stream admits
  permutations only (``rotation=None``, ``unrotated`` says why).
* **A gain offset** (Gemma: ``RMSNorm(x) * (1 + w)``): folding reads the gain as ``offset + w``
  and leaves ``w = 1 - offset`` behind (:class:`~merge_graphs.symmetry.spec.Norm`).
* **q/k norms** (Qwen3, Gemma 3: over each head's dims, one gain shared by every head; OLMo 2:
  over the whole projection, one gain per unit of it). Heads still move as blocks: a per-head
  RMS and a shared per-dim gain do not see which head is where; a whole-projection RMS sums
  over every head, and its gain (labelled with the q or k space) moves with its head. The q/k
  dims stay fixed under RoPE anyway. What breaks is the q/k head map: a rotation ``R`` in RoPE's
  planes leaves the RMS alone but ``(x R) * g != (x * g) R`` unless ``g`` is equal on both dims of
  every plane, so these families declare no q/k head map. V is not normalized: the V/O map stays.
* **Partial RoPE** (Phi-3's ``partial_rotary_factor`` below 1, e.g. Phi-4-mini): RoPE rotates the
  planes of the first dims only, not the planes ``(i, i + head_dim / 2)`` that the q/k head map
  rotates, so there is no q/k head map either.
* **Fused projections** (Phi-3): ``qkv_proj`` stores q | k | v and ``gate_up_proj`` gate | up on
  the output axis, like GPT-2's ``c_attn``: both halves of ``gate_up_proj`` are indexed by the
  same MLP units.
* **Mixtures of experts** (Mixtral, Qwen2-MoE, Qwen3-MoE): the MLP of a sparse layer is a router and
  a set of experts, a group whose units each hold a group of hidden units
  (:class:`~merge_graphs.symmetry.moe.Experts` says what that does to the symmetry).

Embedding scales (Gemma's ``sqrt(d)``), logit soft-capping and sliding-window layers act on
whole vectors, scores or logits, which no map moves: they leave the symmetry as it is, and a
table says so in ``notes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from merge_graphs.symmetry.builder import SpecBuilder, find_prefix
from merge_graphs.symmetry.spec import Space, SymmetrySpec

if TYPE_CHECKING:
    from merge_graphs.symmetry.moe import Experts

#: Decoder.qk_norm: what the q/k norms normalize over, and what that leaves of the symmetry.
QK_NORMS = {
    "head": "q/k RMSNorm over each head's dims, one gain shared by every head: heads still move as blocks; "
            "the per-dim gain does not commute with a rotation in RoPE's planes, so there is no q/k head map "
            "(the v/o map stays)",
    "projection": "q/k RMSNorm over the whole projection, every head at once: heads move with their slice of "
                  "the gain; the per-dim gain rules out a q/k head map (the v/o map stays)",
}


@dataclass(frozen=True)
class Decoder:
    """What one decoder family changes about the shared block (see the module docstring).

    Attributes:
        architectures: the transformers classes it describes, bare (``...Model``) and with an LM head.
        attn_pre, mlp_pre: the norm each branch reads the stream through (its module name inside a
            layer), or None where the branch reads the stream as it is (OLMo 2).
        attn_post, mlp_post: the norm between each branch and the stream, or None.
        gain_offset: an RMSNorm scales by ``gain_offset + weight`` (Gemma: 1).
        qk_norm: a key of :data:`QK_NORMS`, or None.
        fused: q | k | v in one ``qkv_proj`` and gate | up in one ``gate_up_proj`` (Phi-3).
        experts: the mixture of experts that replaces the MLP of its sparse layers, or None.
        notes: what the family does that leaves the symmetry as it is.
    """

    architectures: tuple[str, ...]
    attn_pre: str | None = "input_layernorm"
    mlp_pre: str | None = "post_attention_layernorm"
    attn_post: str | None = None
    mlp_post: str | None = None
    gain_offset: float = 0.0
    qk_norm: str | None = None
    fused: bool = False
    experts: Experts | None = None
    notes: tuple[str, ...] = ()

    def build(self, b: SpecBuilder, config, architecture: str) -> SymmetrySpec:
        """The spec of one checkpoint of the family, from its config and stored tensors."""
        p = find_prefix(b.stored, "model", "embed_tokens.weight")
        d = config.hidden_size
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or d // n_heads
        inter = config.intermediate_size
        rotary = rotary_fraction(config)
        vocab = b.fixed("vocab", config.vocab_size)
        r = b.space("residual", (b.group("residual", d), d))

        b.tensor(f"{p}embed_tokens.weight", vocab, r, role="embed", fan_in_axis=0)
        for i in range(config.num_hidden_layers):
            layer, attn, mlp = f"{p}layers.{i}", f"{p}layers.{i}.self_attn", f"{p}layers.{i}.mlp"
            q, k, v, o = b.attention(f"layers.{i}.attn", n_heads, n_kv, head_dim, rope=True,
                                     qk_map=self.qk_norm is None and rotary == 1)
            h = b.space(f"layers.{i}.mlp", (b.group(f"layers.{i}.mlp", inter), inter))
            if self.fused:
                attn_in = {"qkv_proj": ((q, k, v), "attn.q|attn.k|attn.v")}
                mlp_in = {"gate_up_proj": ((h, h), "mlp.gate|mlp.up")}
            else:
                attn_in = {f"{x}_proj": (s, f"attn.{x}") for x, s in zip("qkv", (q, k, v))}
                mlp_in = {f"{x}_proj": (h, f"mlp.{x}") for x in ("gate", "up")}
            self._branch(b, r, layer, attn, self.attn_pre, self.attn_post, attn_in, ("o_proj", o, "attn.o"))
            if self.experts is not None and self.experts.sparse(config, i):
                self.experts.label(b, config, i, layer, r, self.mlp_pre, self.gain_offset)
            else:
                self._branch(b, r, layer, mlp, self.mlp_pre, self.mlp_post, mlp_in, ("down_proj", h, "mlp.down"))
            if self.qk_norm == "head":
                # One gain per head dim, shared by every head: fixed units, as RoPE gives each dim its frequency.
                dims = b.fixed(f"layers.{i}.attn.head_dims", head_dim)
                b.tensor(f"{attn}.q_norm.weight", dims, role="norm")
                b.tensor(f"{attn}.k_norm.weight", dims, role="norm")
            elif self.qk_norm == "projection":
                b.tensor(f"{attn}.q_norm.weight", q, role="norm")
                b.tensor(f"{attn}.k_norm.weight", k, role="norm")
        b.tensor(f"{p}norm.weight", r, role="norm")
        b.norm(f"{p}norm.weight", None, [("lm_head.weight", None)], self.gain_offset)
        b.tensor("lm_head.weight", vocab, r, role="unembed")
        if not architecture.endswith("Model") and getattr(config, "tie_word_embeddings", False):
            b.tie("lm_head.weight", f"{p}embed_tokens.weight")
        b.carry("*rotary_emb.*")

        post = [n for n in (self.attn_post, self.mlp_post) if n]
        unrotated = None if not post else (
            f"{b.family} has norms after attention and the MLP ({', '.join(post)}): they sit on the residual "
            "stream's write path, each branch adding RMSNorm(y) * g to the stream. A rotation Q of the stream "
            "does not commute with that per-unit gain g (RMSNorm(y Q) * g = (RMSNorm(y) Q) * g, not "
            "(RMSNorm(y) * g) Q), and the gain cannot be folded through the normalization, so norm folding and "
            "residual rotation do not apply: the stream admits permutations only (each unit's gain moves with "
            "it). Align it with permutations (weight, activation or learned matching) instead.")
        notes = ["RoPE: q/k dims inside a head stay fixed; heads move as blocks with their key/value head",
                 unrotated or "pre-RMSNorm: after folding the norms the residual stream also admits any rotation"]
        if self.gain_offset:
            notes.append(f"RMSNorm scales by ({self.gain_offset:g} + weight): a folded norm stores weight "
                         f"{1 - self.gain_offset:g}")
        if self.qk_norm:
            notes.append(QK_NORMS[self.qk_norm])
        if rotary != 1:
            notes.append(f"partial RoPE (factor {rotary:g}): RoPE's planes are not the q/k head map's, "
                         "so there is no q/k head map (the v/o map stays)")
        if self.fused:
            notes.append("fused qkv_proj (q | k | v) and gate_up_proj (gate | up, both indexed by the MLP's units)")
        return b.build(
            outputs={"last_hidden_state": "residual"} if architecture.endswith("Model") else {},
            notes=tuple(notes) + self.notes,
            rotation=None if post else "free",
            unrotated=unrotated,
        )

    def _branch(self, b: SpecBuilder, r: Space, layer: str, module: str, pre: str | None, post: str | None,
                reads: Mapping[str, tuple], writes: tuple[str, Space, str]) -> None:
        """One residual branch: its pre-norm (folded into the projections that read it), the projections
        that read the stream (``{name: (output spaces, role)}``), the one that writes it, its post-norm."""
        if pre:
            b.tensor(f"{layer}.{pre}.weight", r, role="norm")
            b.norm(f"{layer}.{pre}.weight", None, [(f"{module}.{n}.weight", f"{module}.{n}.bias") for n in reads],
                   self.gain_offset)
        for name, (spaces, role) in reads.items():
            b.tensor(f"{module}.{name}.weight", spaces, r, role=role)
            b.tensor(f"{module}.{name}.bias", spaces, role="bias")
        name, space, role = writes
        b.tensor(f"{module}.{name}.weight", r, space, role=role)
        b.tensor(f"{module}.{name}.bias", r, role="bias")
        if post:
            b.tensor(f"{layer}.{post}.weight", r, role="norm")


def rotary_fraction(config) -> float:
    """The share of each head's q/k dims that RoPE rotates (``partial_rotary_factor``; the smallest
    over a config's layer types)."""
    params = getattr(config, "rope_parameters", None) or {}
    per_type = [v for v in params.values() if isinstance(v, Mapping)] or [params]
    return min(float(v.get("partial_rotary_factor", 1.0)) for v in per_type)
