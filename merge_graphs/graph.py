"""Neural graphs: a model's units as nodes, its weights as typed edge blocks.

Every space of the symmetry spec becomes a node set: hidden units that a group permutes, or
fixed units with an identity of their own (tokens, positions, input features, classes).
Every weight matrix becomes one or more dense edge blocks from the units that feed it to the
units it writes, typed by role (``embed``, ``attn.q``, ``mlp.down`` ...). One-dimensional
tensors (biases, norm gains, BatchNorm statistics) become node features. Blocks reference
the model's tensors by name and are oriented on demand, so building a graph copies nothing:
the GNN computes a dense block's messages as matrix products.

A mixture of experts' hidden units are one node set per layer, expert by expert
(:func:`~merge_graphs.symmetry.spec.unit_space`); each expert's weights are a block of their own
into its range of that set, whether the experts are stacked on a tensor axis (the block selects
one expert's slice) or stored one tensor per expert.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merge_graphs.symmetry.spec import Space, SymmetrySpec, TensorSpec, outer_parents, space_index


@dataclass(frozen=True)
class NodeSet:
    """The nodes of one space: ``size`` nodes from ``offset`` in the global node order."""

    name: str
    space: Space
    offset: int
    role: str
    depth: float

    @property
    def size(self) -> int:
        return self.space.size

    @property
    def fixed(self) -> bool:
        """Fixed nodes keep their index under every permutation (tokens, classes)."""
        return not self.space.groups


@dataclass(frozen=True)
class EdgeBlock:
    """A dense block of edges: the slice of ``tensor`` from node set ``src`` to ``dst``.

    ``select`` = ``(axis, index)`` first takes one slice of a stacked tensor (one expert's weights);
    ``src_axis`` counts the axes after it. The block reaches the nodes ``src_nodes`` of ``src`` and
    ``dst_nodes`` of ``dst``: every node, or one expert's range of a mixture's hidden units.
    """

    tensor: str
    src: str
    dst: str
    role: str
    src_axis: int
    src_slice: slice
    dst_slice: slice
    select: tuple[int, int] | None = None
    src_nodes: slice | None = None
    dst_nodes: slice | None = None


@dataclass(frozen=True)
class NodeFeature:
    """A 1-D tensor (or a slice of one) giving one value per node of ``nodes``."""

    tensor: str
    nodes: str
    role: str
    index: slice


class NeuralGraph:
    """The neural graph of one model over its named tensors.

    Attributes:
        spec: the symmetry spec it was built from.
        node_sets: node sets by name, in order of first appearance from inputs to outputs.
        edges: dense edge blocks, one per (weight tensor, concatenated part).
        node_features: per-node values (biases, norm gains, statistics).
        num_nodes: the number of nodes.
        num_edges: the number of edges (a convolution's edge carries its whole kernel).
    """

    def __init__(self, spec: SymmetrySpec, tensors: Mapping[str, torch.Tensor]):
        self.spec = spec
        self.tensors = tensors
        self.edges: list[EdgeBlock] = []
        self.node_features: list[NodeFeature] = []
        order: list[Space] = []

        def visit(space: Space):
            if space not in order:
                order.append(space)

        units = spec.spaces
        for t in spec.tensors.values():
            lead = _lead(t)
            axes = t.axes[lead:]
            if not axes:  # a scalar (CLIP's logit scale) belongs to no unit
                continue
            if len(axes) == 1:
                if t.slot is not None or outer_parents(spec, t, lead):
                    raise NotImplementedError(f"{t.name}: one expert's 1-D tensor is not a node feature yet")
                for s, part in _parts(axes[0]):
                    self.node_features.append(NodeFeature(t.name, s.name, t.role, part))
                continue
            for select, unit, block_axes in _blocks(spec, t, lead):
                src_axis = t.fan_in_axis - lead - (select is not None and select[0] < t.fan_in_axis - lead)
                dst_axis = 1 - src_axis
                roles = t.role.split("|")
                for src, src_part in _parts(block_axes[src_axis]):
                    visit(units[src.name])
                    for k, (dst, dst_part) in enumerate(_parts(block_axes[dst_axis])):
                        visit(units[dst.name])
                        role = roles[k] if len(roles) > 1 else t.role
                        self.edges.append(EdgeBlock(t.name, src.name, dst.name, role, src_axis, src_part, dst_part,
                                                    select, _nodes(src, units, unit), _nodes(dst, units, unit)))
        for f in self.node_features:
            visit(units[f.nodes])

        first_role = {}
        for e in self.edges:
            first_role.setdefault(e.dst, e.role)
        for e in self.edges:
            first_role.setdefault(e.src, e.role)
        # Fixed units first met as an edge's source are the model's inputs, at depth 0; the
        # other sets are ranked by first appearance, which follows the forward pass.
        inputs = {e.src for e in self.edges if not spec.spaces[e.src].groups} - {e.dst for e in self.edges}
        ranked = [s.name for s in order if s.name not in inputs]
        self.node_sets: dict[str, NodeSet] = {}
        offset = 0
        for s in order:
            depth = 0.0 if s.name in inputs else (ranked.index(s.name) + 1) / len(ranked)
            self.node_sets[s.name] = NodeSet(s.name, s, offset, _node_role(s, first_role.get(s.name)), depth)
            offset += s.size
        self.num_nodes = offset
        self.num_edges = sum(
            (e.src_slice.stop - e.src_slice.start) * (e.dst_slice.stop - e.dst_slice.start) for e in self.edges
        )

    def block(self, edge: EdgeBlock, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The edge block as ``(dst, src, *kernel)``: row ``i`` holds the incoming weights of node
        ``i`` of ``edge.dst_nodes``; cut from ``tensor`` (shaped as ``edge.tensor``) when given."""
        w = self._core(edge.tensor, tensor)
        if edge.select is not None:
            w = w.select(*edge.select)
        w = w.narrow(edge.src_axis, edge.src_slice.start, edge.src_slice.stop - edge.src_slice.start)
        dst_axis = 1 - edge.src_axis
        w = w.narrow(dst_axis, edge.dst_slice.start, edge.dst_slice.stop - edge.dst_slice.start)
        return w.transpose(0, 1) if edge.src_axis == 0 else w

    def feature(self, feature: NodeFeature) -> torch.Tensor:
        """The values of one node feature, one per node of its node set."""
        return self._core(feature.tensor)[feature.index]

    def _core(self, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` (or ``tensor`` in its place) without its leading singleton axes (:func:`_lead`)."""
        w = self.tensors[name] if tensor is None else tensor
        return w.reshape(w.shape[_lead(self.spec.tensors[name]):])

    def node_order(self, permutations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Global node index ``idx``: node ``i`` of the permuted model's graph is node ``idx[i]`` here."""
        parts = [ns.offset + space_index(ns.space, self.spec.groups, permutations) for ns in self.node_sets.values()]
        return torch.cat(parts)

    def __repr__(self) -> str:
        return (
            f"NeuralGraph(family={self.spec.family!r}, node_sets={len(self.node_sets)}, "
            f"nodes={self.num_nodes}, edge_blocks={len(self.edges)}, edges={self.num_edges})"
        )


def _lead(t: TensorSpec) -> int:
    """How many unlabelled axes come before the first labelled one: axes of size 1 that hold no units
    (ViT stores its class token as ``(1, 1, d)`` and its position embeddings as ``(1, n, d)``)."""
    for a, axis in enumerate(t.axes):
        if axis:
            return a
    return 0


def _blocks(spec: SymmetrySpec, t: TensorSpec, lead: int):
    """``(select, unit, axes)`` for each block of a weight tensor (its axes from ``lead`` on): the whole
    tensor (unit: its slot's index, or None), or with experts stacked on an axis, each expert's slice
    (that axis dropped)."""
    axes = t.axes[lead:]
    stacked = {p - lead for a in range(len(t.axes)) for p in outer_parents(spec, t, a).values()}
    if not stacked:
        yield None, t.slot.index if t.slot is not None else None, axes
        return
    (axis,) = stacked
    for unit in range(axes[axis][0].size):
        yield (axis, unit), unit, axes[:axis] + axes[axis + 1:]


def _nodes(space: Space, units, unit: int | None) -> slice | None:
    """The nodes of ``space``'s node set that a block of one expert (``unit``) reaches, or None for all."""
    if units[space.name].size == space.size:
        return None
    return slice(unit * space.size, (unit + 1) * space.size)


def _parts(spaces) -> list[tuple[Space, slice]]:
    out, offset = [], 0
    for s in spaces or ():
        out.append((s, slice(offset, offset + s.size)))
        offset += s.size
    return out


def _node_role(space: Space, edge_role: str | None) -> str:
    """Hidden units of one kind share a role across families; fixed units are named.

    ``edge_role`` is the role of the first edge into the set (or out of it, for sets that
    only feed others, like an attention layer's o input).
    """
    if not space.groups:
        return f"fixed.{space.name}"
    if space.name == "residual" or space.name.endswith(".residual"):  # CLIP: text.residual, vision.residual
        return "residual"
    if edge_role == "conv":
        return "conv"
    if edge_role is None or edge_role == "linear":
        return "hidden"
    return "mlp" if edge_role.startswith("mlp") else edge_role
