"""The symmetry spec: which tensor axes move together under a hidden-unit permutation.

A model's symmetries are described as data, in the spirit of Git Re-Basin's PermutationSpec:

* a :class:`Group` is a set of interchangeable units (an MLP hidden layer, the residual
  stream, the key/value heads of one attention layer, the dims inside each head). A group
  with a ``parent`` is permuted independently inside every unit of its parent: the dims of
  each head, or the query heads that share one key/value head under grouped-query attention.
* a :class:`Space` is a set of units that some tensor axis indexes, written as a row-major
  product of factors, each permuted by one group or by nothing. The query projection's
  output space of a grouped-query layer is ``heads x query_heads x qk``; a vocabulary is a
  space with one fixed factor. Spaces are also the node sets of the neural graph.
* a :class:`TensorSpec` labels every axis of one named tensor with the spaces it
  concatenates (GPT-2's fused ``c_attn`` output is ``q | k | v``), or ``None`` for axes that
  no permutation touches (a convolution's kernel).

Mixture-of-experts layers store one unit of a parent group per slice of a tensor, or per tensor:
the experts' weights are stacked on a leading axis (``experts.gate_up_proj``: experts x hidden x
residual), or stored as one tensor per expert (``experts.3.gate_proj.weight``). A space may then
hold a child group without its parent (an expert's hidden units): the parent unit is the index on
the tensor's axis labelled with the parent group, or the tensor's :class:`Slot`. Permuting the
parent moves stacked slices, or whole tensors between the names of a slot's stack
(:func:`source_name`); as a set of units, such a space is ``parent x space`` (:func:`unit_space`).

Permutations are dicts ``{group name: LongTensor}``. A root group's permutation has shape
``(size,)`` and a child group's ``(parent size, size)``; row ``r`` of a child applies inside
the parent unit placed at position ``r``. Applying ``perm`` means ``new = old[perm]`` on every
axis the group touches, so the permuted model's unit ``i`` is the original unit ``perm[i]``.
Everything here works on named tensors, one at a time, so models never need to be whole in
memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

Permutations = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Group:
    """A set of ``size`` interchangeable units; with ``parent``, one such set per parent unit."""

    name: str
    size: int
    parent: str | None = None


@dataclass(frozen=True)
class Space:
    """Units indexed by a tensor axis: a row-major product of ``(group or None, size)`` factors."""

    name: str
    factors: tuple[tuple[str | None, int], ...]

    @property
    def size(self) -> int:
        n = 1
        for _, k in self.factors:
            n *= k
        return n

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(g for g, _ in self.factors if g is not None)


@dataclass(frozen=True)
class Slot:
    """A tensor that holds one unit of a group as a tensor of its own: ``names[index]`` of a stack
    of ``names``, one per unit of ``group`` (expert ``j``'s weights in a per-expert checkpoint).

    Permuting ``group`` moves whole tensors between these names; a child group of ``group`` on an
    axis of the tensor applies its permutation for unit ``index``.
    """

    group: str
    names: tuple[str, ...]
    index: int


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: per axis, the spaces it concatenates (or None), its role, which axis
    indexes the units that feed it (the neural graph's edges point away from them), and, for one
    unit of a group stored on its own, its :class:`Slot`."""

    name: str
    axes: tuple[tuple[Space, ...] | None, ...]
    role: str
    fan_in_axis: int = 1
    slot: Slot | None = None

    def spaces(self, axis: int) -> tuple[Space, ...]:
        return self.axes[axis] or ()


@dataclass(frozen=True)
class Norm:
    """A normalization that reads the residual stream, and the linear maps that read its output.

    Folding (:mod:`merge_graphs.rotation`) moves the norm's gain (and a LayerNorm's bias) into
    its readers, which is what lets the residual stream rotate.

    Attributes:
        weight: the gain tensor.
        bias: the bias tensor (LayerNorm), or None (RMSNorm).
        readers: ``(weight, bias or None)`` of every linear map that reads the norm's output.
            Empty when the norm's output is the model's output (a bare model's final norm):
            such a norm cannot be folded.
        offset: the gain is ``offset + weight`` (Gemma's RMSNorm scales by ``1 + weight``), so a
            folded norm, whose gain is 1, stores ``1 - offset``.
    """

    weight: str
    bias: str | None
    readers: tuple[tuple[str, str | None], ...]
    offset: float = 0.0


#: HeadMap.kind: which maps of one head's dims commute with what the attention computes (a map ``M``
#: acts as ``x M`` on the writing side's dims and ``x M^-T`` on the reading side's, so ``q k^T`` and
#: ``softmax(.) v W_o`` are unchanged).
HEAD_MAP_KINDS = {
    "invertible": "any invertible map of the head dims (V/O; Q/K without RoPE)",
    "rope_pairs": "in each plane RoPE rotates, dims (i, i + head_dim / 2), a rotation times a positive scale "
                  "(Q/K with RoPE: the 2-D maps that commute with every position's rotation)",
}


@dataclass(frozen=True)
class HeadMap:
    """Maps of the dims inside each attention head, beyond permutations.

    One ``head_dim x head_dim`` map ``M`` per key/value head multiplies, on every tensor axis that
    indexes one of ``spaces``, that head's dims (and those of the query heads that share it): by
    ``M`` on the writing side (q, v) and by ``M^-T`` on the reading side (``readers``: k, o), so
    scores ``(q M) (k M^-T)^T = q k^T`` and outputs ``(a M) (W_o M^-T)^T = a W_o^T`` are unchanged
    (for an orthogonal ``M`` both sides take ``M``). Q and K share one map, V and O another. With
    RoPE only the maps that commute with the position rotation are admitted (``kind="rope_pairs"``).

    Attributes:
        name: ``"{layer}.qk"`` or ``"{layer}.vo"``.
        heads: the key/value heads group (the map of position ``i`` goes with the head placed there).
        spaces: the spaces whose head dims it maps, e.g. ``("layers.0.attn.q", "layers.0.attn.k")``;
            each is ``heads x [query heads] x head dims``.
        head_dim: the dims per head (the last factor of each space).
        kind: a key of :data:`HEAD_MAP_KINDS`.
        readers: the spaces among ``spaces`` on the reading side, whose dims take ``M^-T``.
    """

    name: str
    heads: str
    spaces: tuple[str, ...]
    head_dim: int
    kind: str
    readers: tuple[str, ...] = ()


# SymmetrySpec.rotation: which orthogonal maps of the residual stream the folded model admits.
ROTATION_KINDS = {
    "free": "any orthogonal map (RMSNorm is rotation invariant)",
    "fix_ones": "orthogonal maps that fix the all-ones direction (LayerNorm subtracts the mean)",
}


@dataclass
class SymmetrySpec:
    """The permutation symmetries of one model, over its named tensors.

    Attributes:
        family: the architecture family (``"llama"``, ``"bert"``, ``"mlp"`` ...).
        groups: the permutation groups, by name.
        tensors: every floating-point tensor of the model, with its axis labels.
        carried: tensors that are copied as they are (integer ids, masks, counters).
        outputs: output fields whose last axis is permuted by a group (a bare encoder's
            ``last_hidden_state`` lives in the residual stream); all other outputs are
            invariant under every permutation.
        notes: facts about the family that users should know (e.g. RoPE fixes q/k dims).
        norms: the pre-norms of a pre-norm family, with the tensors that read them (folding).
        rotation: after folding, the orthogonal maps the residual stream admits: ``"free"``,
            ``"fix_ones"`` (see :data:`ROTATION_KINDS`) or None (permutations only).
        unrotated: for a transformer whose residual stream admits permutations only
            (``rotation`` None), why: what norm folding and residual rotation say when they refuse.
        tied: tensors that may be stored as another tensor (an LM head tied to the embedding):
            ``{name: source}``.
        head_maps: the maps of the dims inside each attention head that the family admits beyond
            permutations (:class:`HeadMap`).
        unaligned: for an architecture without a spec of its own, why it has none: then the
            spec has no groups, and merging matches its tensors by name, without alignment.
    """

    family: str
    groups: dict[str, Group]
    tensors: dict[str, TensorSpec]
    carried: tuple[str, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    norms: tuple[Norm, ...] = ()
    rotation: str | None = None
    tied: dict[str, str] = field(default_factory=dict)
    head_maps: tuple[HeadMap, ...] = ()
    unaligned: str | None = None
    unrotated: str | None = None

    @property
    def spaces(self) -> dict[str, Space]:
        """Every set of units that some tensor axis indexes, by name, in tensor order: a space
        that holds a child group without its parent as ``parent x space`` (:func:`unit_space`)."""
        found: dict[str, Space] = {}
        for t in self.tensors.values():
            for axis in t.axes:
                for s in axis or ():
                    if s.name not in found:
                        found[s.name] = unit_space(s, self.groups)
        return found

    def touching(self, group: str) -> list[tuple[str, int]]:
        """``(tensor name, axis)`` pairs whose axis is moved by ``group`` (not the tensors of a
        :class:`Slot` stack, which it moves whole)."""
        return [
            (t.name, a)
            for t in self.tensors.values()
            for a, axis in enumerate(t.axes)
            if any(group in s.groups for s in axis or ())
        ]

    def __repr__(self) -> str:
        return (
            f"SymmetrySpec(family={self.family!r}, groups={len(self.groups)}, "
            f"tensors={len(self.tensors)}, carried={len(self.carried)})"
        )


def unit_space(space: Space, groups: Mapping[str, Group]) -> Space:
    """``space`` as a set of units: a child group whose parent is not among its factors (an
    expert's hidden units) has one such set per parent unit, so the parent's factor comes first."""
    outer = [groups[g].parent for g in space.groups if groups[g].parent and groups[g].parent not in space.groups]
    outer = list(dict.fromkeys(outer))
    return Space(space.name, tuple((p, groups[p].size) for p in outer) + space.factors) if outer else space


def space_index(
    space: Space, groups: Mapping[str, Group], perms: Mapping[str, torch.Tensor], at: Mapping[str, int] | None = None
) -> torch.Tensor:
    """Flat index ``idx`` with ``new_axis = old_axis[idx]`` for one space.

    A factor whose group is missing from ``perms`` stays in place. A child group whose parent is
    not a factor of the space uses its permutation inside the parent unit at (new) position
    ``at[parent]``.
    """
    sizes = [k for _, k in space.factors]
    position = {g: i for i, (g, _) in enumerate(space.factors) if g is not None}
    coords = []
    for i, (g, k) in enumerate(space.factors):
        shape = [1] * len(sizes)
        shape[i] = k
        if g is None or g not in perms:
            coords.append(torch.arange(k).view(shape))
            continue
        p = perms[g].cpu()
        parent = groups[g].parent
        if parent is None:
            coords.append(p.view(shape))
        elif parent not in position:
            if at is None or parent not in at:
                raise ValueError(f"space {space.name}: group {g} permutes units inside each unit of {parent}, "
                                 f"which neither the space nor the tensor says")
            coords.append(p[at[parent]].view(shape))
        else:
            # A child's permutation is chosen by the parent unit at the *new* position.
            j = position[parent]
            shape[j] = sizes[j]
            view = p if j < i else p.T
            coords.append(view.reshape(shape))
    flat = torch.zeros(sizes, dtype=torch.long)
    stride = 1
    for i in reversed(range(len(sizes))):
        flat = flat + coords[i] * stride
        stride *= sizes[i]
    return flat.reshape(-1)


def axis_index(
    spaces: tuple[Space, ...], groups: Mapping[str, Group], perms: Mapping[str, torch.Tensor],
    at: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """Flat index for an axis that concatenates ``spaces`` (``at`` as for :func:`space_index`)."""
    parts, offset = [], 0
    for s in spaces:
        parts.append(space_index(s, groups, perms, at) + offset)
        offset += s.size
    return torch.cat(parts)


def outer_parents(spec: SymmetrySpec, t: TensorSpec, axis: int) -> dict[str, int]:
    """``{parent group: the axis of t that indexes it}`` for every child group on ``axis`` whose
    parent is neither in its space nor ``t``'s slot (the experts of a stacked expert tensor)."""
    found = {}
    for s in t.axes[axis] or ():
        for g in s.groups:
            parent = spec.groups[g].parent
            if parent is None or parent in s.groups or (t.slot is not None and t.slot.group == parent):
                continue
            where = [a for a, spaces in enumerate(t.axes) if spaces and [x.groups for x in spaces] == [(parent,)]]
            if len(where) != 1:
                raise ValueError(f"{t.name}: axis {axis} holds {g}, one permutation per unit of {parent}, but no "
                                 f"axis of the tensor indexes {parent} alone and the tensor is not one of its units")
            found[parent] = where[0]
    return found


def source_name(spec: SymmetrySpec, name: str, perms: Mapping[str, torch.Tensor]) -> str:
    """The name whose tensor, permuted, becomes ``name``'s: ``name`` itself, or for one unit of a
    group stored on its own (a :class:`Slot`) the name of the unit that ``perms`` moves there."""
    t = spec.tensors.get(name)
    if t is None or t.slot is None or t.slot.group not in perms:
        return name
    return t.slot.names[int(perms[t.slot.group][t.slot.index])]


def permute_tensor(
    spec: SymmetrySpec, name: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Apply ``perms`` to one named tensor; tensors the spec does not label come back as they are.

    For one unit of a group stored on its own (:class:`Slot`), ``tensor`` is the one stored under
    :func:`source_name` (see :func:`permuted`).
    """
    t = spec.tensors.get(name)
    if t is None:
        return tensor
    at = {t.slot.group: t.slot.index} if t.slot is not None else {}
    out = tensor
    moved = [a for a, axis in enumerate(t.axes) if axis and any(g in perms for s in axis for g in s.groups)]
    outer = {a: outer_parents(spec, t, a) for a in moved}
    # A child's permutation is chosen by the parent unit at the new position: parents first.
    for a in sorted(moved, key=lambda a: bool(outer[a])):
        if not outer[a]:
            out = out.index_select(a, axis_index(t.axes[a], spec.groups, perms, at).to(out.device))
            continue
        (parent, p), = outer[a].items()
        rows = torch.stack([axis_index(t.axes[a], spec.groups, perms, {**at, parent: r}) for r in range(out.shape[p])])
        shape = [1] * out.dim()
        shape[p], shape[a] = rows.shape
        out = out.gather(a, rows.view(shape).expand(out.shape).to(out.device))
    return out


def permuted(
    spec: SymmetrySpec, name: str, source: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The tensor ``name`` of the model ``source`` holds, after ``perms``: read from :func:`source_name`."""
    return permute_tensor(spec, name, source[source_name(spec, name, perms)], perms)


def permute_state_dict(
    spec: SymmetrySpec, state: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply ``perms`` to every tensor of ``state``, one tensor at a time."""
    check_permutations(spec, perms)
    return {k: permuted(spec, k, state, perms) for k in state}


def identity_permutations(spec: SymmetrySpec, device: torch.device | str = "cpu") -> Permutations:
    """The identity permutation of every group."""
    return {name: _arange(spec, g, device) for name, g in spec.groups.items()}


def random_permutations(
    spec: SymmetrySpec, seed: int = 0, fixed: Iterable[str] = ()
) -> Permutations:
    """A uniformly random permutation of every group, deterministic given ``seed``.

    Args:
        spec: the model's symmetry spec.
        seed: seed of the random generator.
        fixed: groups to leave as the identity (e.g. ``spec.outputs.values()`` to keep a
            bare encoder's output features in place).

    Example:
        >>> import torch, merge_graphs
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = merge_graphs.symmetry_spec(mlp)
        >>> perms = merge_graphs.random_permutations(spec, seed=0)
        >>> sorted(perms), perms["mlp.0"].shape
        (['mlp.0'], torch.Size([8]))
    """
    fixed = set(fixed)
    unknown = fixed - set(spec.groups)
    if unknown:
        raise KeyError(f"fixed names unknown groups {sorted(unknown)}; the spec has {sorted(spec.groups)}")
    gen = torch.Generator().manual_seed(seed)
    perms: Permutations = {}
    for name, g in spec.groups.items():
        if name in fixed:
            perms[name] = _arange(spec, g, "cpu")
        elif g.parent is None:
            perms[name] = torch.randperm(g.size, generator=gen)
        else:
            n = spec.groups[g.parent].size
            perms[name] = torch.stack([torch.randperm(g.size, generator=gen) for _ in range(n)])
    return perms


def invert_permutations(spec: SymmetrySpec, perms: Mapping[str, torch.Tensor]) -> Permutations:
    """Permutations that undo ``perms``: applying both, in either order, is the identity."""
    inverse = {}
    for name, p in perms.items():
        g = spec.groups[name]
        if g.parent is None:
            inverse[name] = torch.argsort(p)
        else:
            # Row r of the inverse serves original parent unit r, which sits at the
            # position q with parent_perm[q] == r after the forward permutation.
            pp = perms.get(g.parent)
            rows = p if pp is None else p[torch.argsort(pp)]
            inverse[name] = torch.argsort(rows, dim=1)
    return inverse


def compose_permutations(
    spec: SymmetrySpec, first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]
) -> Permutations:
    """Permutations equal to applying ``first`` and then ``then``."""
    out = {}
    for name in set(first) | set(then):
        g = spec.groups[name]
        a = first.get(name, _arange(spec, g, "cpu"))
        b = then.get(name, _arange(spec, g, "cpu"))
        if g.parent is None:
            out[name] = a[b]
        else:
            pb = then.get(g.parent, torch.arange(spec.groups[g.parent].size))
            out[name] = torch.gather(a[pb], 1, b)
    return out


def check_permutations(spec: SymmetrySpec, perms: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``perms`` names known groups with valid permutations."""
    for name, p in perms.items():
        g = spec.groups.get(name)
        if g is None:
            raise ValueError(f"unknown group {name!r}; this {spec.family} spec has {sorted(spec.groups)}")
        shape = (g.size,) if g.parent is None else (spec.groups[g.parent].size, g.size)
        if tuple(p.shape) != shape:
            raise ValueError(f"permutation of group {name!r} has shape {tuple(p.shape)}, expected {shape}")
        if p.dtype not in (torch.int64, torch.int32) or not torch.equal(
            torch.sort(p, dim=-1).values.cpu(), torch.arange(g.size).expand(shape)
        ):
            raise ValueError(f"permutation of group {name!r} is not a permutation of 0..{g.size - 1}")


def _arange(spec: SymmetrySpec, g: Group, device) -> torch.Tensor:
    if g.parent is None:
        return torch.arange(g.size, device=device)
    return torch.arange(g.size, device=device).repeat(spec.groups[g.parent].size, 1)
