"""The permutation-equivariant encoder of neural graphs.

A :class:`~merge_graphs.graph.NeuralGraph` has one node set per space of the symmetry spec
and one dense edge block per weight matrix. The encoder gives every node a ``dim``-vector
such that permuting the model's hidden units permutes the vectors the same way. This holds
by construction:

* **Initial state.** A node's state depends only on what a permutation carries along with
  it: the learned embedding of its node set's role (every hidden unit of a role shares it),
  the node set's depth, and its own bias / norm values (standardized per tensor). Only
  fixed nodes (tokens, positions, input features, classes), which no permutation moves,
  get an identity of their own: sinusoidal features of their index, projected by a learned
  linear map. Nothing depends on how many there are.
* **Dense blocks as matrix products.** A weight block ``W`` (dst x src), divided by its
  tensor's std, is expanded into ``K`` elementwise functions ``A_k = f_k(W)`` (``w``,
  ``tanh w``, ``|w|``). Destinations receive ``sum_k A_k @ (H_src @ E_k[role])`` and sources
  receive ``sum_k A_k.T @ (H_dst @ E'_k[role])``, with ``E`` learned per edge role and
  direction. Signed bases are scaled by ``1/sqrt(n)`` and the nonnegative one by ``1/n``
  (``n`` the number of senders), so both stay O(1) whatever the width. No per-edge vector
  is ever built. A convolution's kernel is first reduced to one scalar per basis by a
  learned function of the kernel position (so any kernel size works).
* **Structural links.** Query and key units are not joined by any weight, nor are value and
  output units, yet they belong together: links ``q (head, j, d) <-> k (head, d)``
  (``attn.score``) and ``v (head, d) <-> o (head, j, d)`` (``attn.value``) are derived from
  the spaces' factors, and so is a conv channel's link to its flattened positions
  (``unit.view``). They are irregular edges, reduced by :func:`~merge_graphs.gnn.scatter.scatter`.
* **Update.** ``h <- LayerNorm(h + MLP([h, from sources, from destinations, from links]))``
  with one MLP per layer shared by all node sets. Every message is a mean over a
  structural count, so it is invariant to the order of the senders.

Example:
    >>> import torch, merge_graphs
    >>> from merge_graphs.gnn import GraphEncoder, embed
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> out = embed(mlp, GraphEncoder(dim=16))
    >>> out.nodes["mlp.0"].shape, out.groups["mlp.0"].shape, out.pooled.shape
    (torch.Size([8, 16]), torch.Size([8, 16]), torch.Size([16]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import nn

from merge_graphs.gnn.scatter import scatter
from merge_graphs.graph import NeuralGraph, NodeSet
from merge_graphs.symmetry.spec import Space

# Role vocabularies, shared by every family so one network serves MLPs, CNNs, BERT, GPT-2 and
# Llama-style models. Index 0 stands for any role not listed (a new family still embeds).
NODE_ROLES = ("<other>", "residual", "hidden", "mlp", "conv", "attn.q", "attn.k", "attn.v", "attn.o",
              "fixed.vocab", "fixed.positions", "fixed.token_types", "fixed.inputs", "fixed.outputs",
              "fixed.labels")
EDGE_ROLES = ("<other>", "embed", "embed.position", "embed.token_type", "attn.q", "attn.k", "attn.v",
              "attn.o", "mlp.up", "mlp.gate", "mlp.down", "linear", "conv", "unembed")
FEATURE_ROLES = ("<other>", "bias", "norm", "norm.bias", "norm.mean", "norm.var")
LINK_ROLES = ("<other>", "attn.score", "attn.value", "unit.view")

BASES = ("w", "tanh", "abs")  # elementwise functions of a standardized weight
SIGNED = (True, True, False)
INDEX_FEATURES = 32  # sinusoidal features of a fixed node's index
ORDER_FEATURES = 8  # cosine features of a node feature's rank among its node set's features
KERNEL_FEATURES = 7  # 1, coordinates and squared coordinates of a kernel position (up to 3-D)


def _role(vocab: tuple[str, ...], role: str) -> int:
    return vocab.index(role) if role in vocab else 0


# --------------------------------------------------------------------------- fixed features


def index_features(n: int, dim: int = INDEX_FEATURES, device=None) -> torch.Tensor:
    """``(n, dim)`` sinusoidal features of the indices ``0..n-1``; row ``i`` does not depend on ``n``."""
    i = torch.arange(n, dtype=torch.float64, device=device)
    freq = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64, device=device) / (dim // 2))
    angle = i[:, None] * freq
    return torch.cat([angle.sin(), angle.cos()], 1).float()


def order_features(t: float, dim: int = ORDER_FEATURES) -> torch.Tensor:
    """Cosine features of a position ``t`` in [0, 1]."""
    return torch.cos(math.pi * torch.arange(dim, dtype=torch.float32) * t)


def kernel_features(shape: tuple[int, ...]) -> torch.Tensor:
    """``(prod(shape), 7)`` features of every kernel position: 1, coordinates in [-1, 1], squares."""
    if len(shape) > 3:
        raise ValueError(f"kernels of up to 3 dimensions are supported, got shape {shape}")
    axes = [torch.linspace(-1, 1, s) if s > 1 else torch.zeros(1) for s in shape]
    grids = torch.meshgrid(*axes, indexing="ij") if axes else []
    coords = [g.reshape(-1) for g in grids]
    p = coords[0].numel() if coords else 1
    coords += [torch.zeros(p)] * (3 - len(coords))
    c = torch.stack(coords, 1)
    return torch.cat([torch.ones(p, 1), c, c * c], 1)


# --------------------------------------------------------------------------- structural links


@dataclass(frozen=True)
class Link:
    """Irregular edges: node ``i`` of ``many`` is linked to node ``index[i]`` of ``one``.

    ``many_first`` says whether ``many`` is the shallower end (q of q/k, v of v/o), so that a
    link's two directions mean the same thing in every family.
    """

    role: str
    many: str
    one: str
    index: torch.Tensor
    many_first: bool


def _sub_index(big: Space, small: Space) -> torch.Tensor | None:
    """For every node of ``big``, the node of ``small`` with the same coordinates, or None.

    Every factor of ``small`` must appear in ``big``: a group factor by its name, the ``k``-th
    unpermuted (None) factor as ``big``'s ``k``-th, with the same size. Such a map commutes with
    every permutation, because a group moves the coordinate it names in both spaces alike.
    """
    big_nones = [i for i, (g, _) in enumerate(big.factors) if g is None]
    big_groups = {g: i for i, (g, _) in enumerate(big.factors) if g is not None}
    where, nones = [], 0
    for g, k in small.factors:
        if g is None:
            if nones >= len(big_nones):
                return None
            i = big_nones[nones]
            nones += 1
        elif g in big_groups:
            i = big_groups[g]
        else:
            return None
        if big.factors[i][1] != k:
            return None
        where.append(i)
    coords = torch.unravel_index(torch.arange(big.size), tuple(k for _, k in big.factors))
    index, stride = torch.zeros(big.size, dtype=torch.long), 1
    for (_, k), i in zip(reversed(small.factors), reversed(where)):
        index += coords[i] * stride
        stride *= k
    return index


def _link_role(a: NodeSet, b: NodeSet) -> str:
    roles = {a.role, b.role}
    if roles == {"attn.q", "attn.k"}:
        return "attn.score"
    if roles == {"attn.v", "attn.o"}:
        return "attn.value"
    return "unit.view"


def structural_links(graph: NeuralGraph) -> list[Link]:
    """Links between permuted node sets that index the same units through different spaces:
    an attention layer's q and k units (``q (head, j, d) -> k (head, d)``), its v and o units,
    a conv channel and its flattened positions."""
    links = []
    sets = [ns for ns in graph.node_sets.values() if not ns.fixed]
    for a, b in combinations(sets, 2):
        for many, one in ((a, b), (b, a)):
            index = _sub_index(many.space, one.space)
            if index is not None:
                first = many.depth <= one.depth
                links.append(Link(_link_role(many, one), many.name, one.name, index, first))
                break
    return links


# --------------------------------------------------------------------------- the network


class MessageLayer(nn.Module):
    """One round of message passing over every edge block and link of a graph."""

    def __init__(self, dim: int):
        super().__init__()
        K, R = len(BASES), len(EDGE_ROLES)
        self.dim = dim
        # What a source sends its destinations (per basis), and what a destination sends back.
        self.to_dst = nn.Parameter(torch.randn(R, dim, K * dim) / math.sqrt(dim))
        self.to_src = nn.Parameter(torch.randn(R, dim, K * dim) / math.sqrt(dim))
        # Over a link, what the deeper end sends the shallower one ([0]) and back ([1]).
        self.link = nn.Parameter(torch.randn(2, len(LINK_ROLES), dim, dim) / math.sqrt(dim))
        mix = torch.zeros(KERNEL_FEATURES, K)
        mix[0] = 1.0
        self.kernel_mix = nn.Parameter(mix + 0.1 * torch.randn(KERNEL_FEATURES, K))
        self.mlp = nn.Sequential(nn.Linear(4 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)

    def bases(self, block: torch.Tensor, scratch: _Scratch | None = None):
        """The ``(dst, src)`` matrices ``A_k`` of a standardized block, built one at a time (each in
        ``scratch``'s second buffer, overwritten by the next)."""
        if block.dim() == 2:
            yield block
            yield torch.tanh(block, out=scratch.like(1, block) if scratch else None)
            yield torch.abs(block, out=scratch.like(1, block) if scratch else None)
            return
        # A convolution: reduce each edge's kernel to one scalar per basis with weights that
        # are a learned function of the kernel position.
        w = block.flatten(2)
        p = w.shape[-1]
        mix = kernel_features(tuple(block.shape[2:])).to(w) @ self.kernel_mix
        for k, (f, signed) in enumerate(zip((lambda x: x, torch.tanh, torch.abs), SIGNED)):
            yield f(w) @ mix[:, k] / (math.sqrt(p) if signed else p)

    def forward(
        self, graph: NeuralGraph, h: dict[str, torch.Tensor], links: list[Link], scales: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        K, d = len(BASES), self.dim
        inbox = {name: [torch.zeros_like(x) for _ in range(3)] for name, x in h.items()}
        counts = {name: [0.0, 0.0, 0.0] for name in h}
        whole = slice(None)
        scratch = _Scratch()
        for e, scale in zip(graph.edges, scales):
            r = _role(EDGE_ROLES, e.role)
            src_nodes, dst_nodes = e.src_nodes or whole, e.dst_nodes or whole
            src, dst = h[e.src][src_nodes], h[e.dst][dst_nodes]
            raw = graph.block(e).to(device=src.device, dtype=src.dtype)
            if torch.is_grad_enabled():  # training: autograd keeps each basis for the backward pass
                block, buffers = raw / scale, None
            else:
                block, buffers = torch.div(raw, scale, out=scratch.like(0, raw)), scratch
            n_dst, n_src = block.shape[:2]
            # What each source sends its destinations, and each destination its sources, per basis.
            x = (src @ self.to_dst[r]).view(-1, K, d) * _basis_scale(n_src, src)
            y = (dst @ self.to_src[r]).view(-1, K, d) * _basis_scale(n_dst, dst)
            to_dst, to_src = inbox[e.dst][0][dst_nodes], inbox[e.src][1][src_nodes]
            for k, a in enumerate(self.bases(block, buffers)):
                to_dst.addmm_(a, x[:, k])
                to_src.addmm_(a.T, y[:, k])
            # A block into one expert's range of a node set counts as that share of a block.
            counts[e.dst][0] += n_dst / h[e.dst].shape[0]
            counts[e.src][1] += n_src / h[e.src].shape[0]
        for link in links:
            r = _role(LINK_ROLES, link.role)
            index = link.index.to(h[link.many].device)
            to_many, to_one = self.link[:, r] if link.many_first else self.link[:, r].flip(0)
            inbox[link.many][2] = inbox[link.many][2] + h[link.one][index] @ to_many
            sent = h[link.many] @ to_one
            inbox[link.one][2] = inbox[link.one][2] + scatter(sent, index, h[link.one].shape[0], "mean")
            counts[link.many][2] += 1
            counts[link.one][2] += 1
        names = list(h)
        states = torch.cat([h[n] for n in names])
        messages = torch.cat(
            [torch.cat([m / max(c, 1) for m, c in zip(inbox[n], counts[n])], 1) for n in names]
        )
        out = self.norm(states + self.mlp(torch.cat([states, messages], 1)))
        return dict(zip(names, out.split([h[n].shape[0] for n in names])))


class _Scratch:
    """Two buffers that grow to the largest block of a message-passing round: a fresh tensor per block
    and basis costs page faults (about as long again as the elementwise operation itself at LLM widths),
    so each block is standardized into the first and its bases are built in the second."""

    def __init__(self) -> None:
        self.flat = [torch.empty(0), torch.empty(0)]

    def like(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """Buffer ``i`` as an uninitialized tensor of ``t``'s shape, dtype and device."""
        f = self.flat[i]
        if f.numel() < t.numel() or f.dtype != t.dtype or f.device != t.device:
            f = self.flat[i] = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
        return f[:t.numel()].view(t.shape)


def _basis_scale(n: int, like: torch.Tensor) -> torch.Tensor:
    """``(K, 1)`` factors that keep a sum over ``n`` senders O(1): ``1/sqrt(n)`` for signed
    bases (their terms cancel like a random walk), ``1/n`` for nonnegative ones."""
    return torch.tensor([1 / math.sqrt(n) if signed else 1 / n for signed in SIGNED], device=like.device).view(-1, 1)


class GraphEncoder(nn.Module):
    """Permutation-equivariant node embeddings of a :class:`~merge_graphs.graph.NeuralGraph`.

    Args:
        dim: width of every node state.
        layers: rounds of message passing.

    ``forward(graph)`` returns ``{node set name: (size, dim)}``: permuting the model's units
    with ``perms`` permutes the rows as ``graph.node_order(perms)`` says.
    """

    def __init__(self, dim: int = 64, layers: int = 3):
        super().__init__()
        self.dim = dim
        self.node_role = nn.Parameter(torch.randn(len(NODE_ROLES), dim))
        self.depth = nn.Parameter(torch.randn(dim))
        self.feature_role = nn.Parameter(torch.randn(len(FEATURE_ROLES), dim))
        self.feature_order = nn.Linear(ORDER_FEATURES, dim, bias=False)
        self.fixed_index = nn.Linear(INDEX_FEATURES, dim, bias=False)
        self.input_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(MessageLayer(dim) for _ in range(layers))

    def initial_state(self, graph: NeuralGraph, stats: Mapping[str, tuple[float, float]]) -> dict[str, torch.Tensor]:
        """Each node set's ``(size, dim)`` states before message passing."""
        device = self.depth.device
        features: dict[str, list] = {name: [] for name in graph.node_sets}
        for f in graph.node_features:
            features[f.nodes].append(f)
        h = {}
        for name, ns in graph.node_sets.items():
            x = self.node_role[_role(NODE_ROLES, ns.role)] + ns.depth * self.depth
            x = x.expand(ns.size, self.dim)
            if ns.fixed:
                x = x + self.fixed_index(index_features(ns.size, device=device))
            own = features[name]
            for i, f in enumerate(own):
                mean, std = stats[f.tensor]
                z = (graph.feature(f).detach().to(device=device, dtype=torch.float32) - mean) / std
                # The feature's rank among its node set's features tells the residual stream's
                # many norms apart (layer 0's from layer 5's).
                rank = order_features(i / max(len(own) - 1, 1)).to(device)
                x = x + z[:, None] * (self.feature_role[_role(FEATURE_ROLES, f.role)] + self.feature_order(rank))
            h[name] = self.input_norm(x)
        return h

    def forward(self, graph: NeuralGraph) -> dict[str, torch.Tensor]:
        scales = edge_scales(graph)
        stats = {}
        for name in {f.tensor for f in graph.node_features}:
            t = graph.tensors[name].detach().float()
            stats[name] = (t.mean().item(), _std(t))
        links = structural_links(graph)
        h = self.initial_state(graph, stats)
        for layer in self.layers:
            h = layer(graph, h, links, scales)
        return h


def edge_scales(graph: NeuralGraph) -> list[float]:
    """What each edge block of ``graph`` is divided by: its weight tensor's std, as a checkpoint stores
    the tensor. One expert's slice of experts stacked in one tensor (``select``; the layout a model holds
    in memory) is a tensor of its own in the per-expert layout ``save_pretrained`` writes, and a fused
    gate/up projection two: such a block gets its own std, so either layout embeds alike."""
    whole = {name: _std(graph.tensors[name]) for name in {e.tensor for e in graph.edges if e.select is None}}
    return [whole[e.tensor] if e.select is None else _std(graph.block(e)) for e in graph.edges]


def _std(t: torch.Tensor) -> float:
    """A tensor's std, or 1 where it is zero or undefined (a constant gets all-zero features)."""
    s = t.detach().float().std().item() if t.numel() > 1 else 0.0
    return s if math.isfinite(s) and s > 0 else 1.0


# --------------------------------------------------------------------------- outputs


def group_embeddings(graph: NeuralGraph, nodes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embeddings per permutation group, averaged over the node sets whose space it permutes.

    A root group's are ``(size, dim)``; a child group's are ``(parent size, size, dim)``,
    indexed by (parent unit, unit). Within a node set, every other factor is averaged out.
    """
    out = {}
    for name, group in graph.spec.groups.items():
        parts = []
        for ns in graph.node_sets.values():
            names = [g for g, _ in ns.space.factors]
            if name not in names:
                continue
            keep = ([names.index(group.parent)] if group.parent else []) + [names.index(name)]
            x = nodes[ns.name].reshape(*(k for _, k in ns.space.factors), -1)
            rest = [i for i in range(len(names)) if i not in keep]
            x = x.permute(*keep, *rest, len(names))
            parts.append(x.reshape(*x.shape[:len(keep)], -1, x.shape[-1]).mean(-2))
        if parts:
            out[name] = torch.stack(parts).mean(0)
    return out


def pooled_embedding(graph: NeuralGraph, nodes: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A permutation-invariant ``(dim,)`` embedding of the whole model: the mean over permuted nodes."""
    permuted = [nodes[name] for name, ns in graph.node_sets.items() if not ns.fixed]
    if not permuted:
        return torch.cat(list(nodes.values())).mean(0)
    return torch.cat(permuted).mean(0)
