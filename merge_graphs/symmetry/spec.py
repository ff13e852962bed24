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
class TensorSpec:
    """One named tensor: per axis, the spaces it concatenates (or None), its role, and which
    axis indexes the units that feed it (the neural graph's edges point away from them)."""

    name: str
    axes: tuple[tuple[Space, ...] | None, ...]
    role: str
    fan_in_axis: int = 1

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
    """

    weight: str
    bias: str | None
    readers: tuple[tuple[str, str | None], ...]


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

    @property
    def spaces(self) -> dict[str, Space]:
        """Every space that some tensor axis indexes, by name, in tensor order."""
        found: dict[str, Space] = {}
        for t in self.tensors.values():
            for axis in t.axes:
                for s in axis or ():
                    found.setdefault(s.name, s)
        return found

    def touching(self, group: str) -> list[tuple[str, int]]:
        """``(tensor name, axis)`` pairs whose axis is moved by ``group``."""
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


def space_index(space: Space, groups: Mapping[str, Group], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Flat index ``idx`` with ``new_axis = old_axis[idx]`` for one space.

    A factor whose group is missing from ``perms`` stays in place.
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


def axis_index(spaces: tuple[Space, ...], groups: Mapping[str, Group], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Flat index for an axis that concatenates ``spaces``."""
    parts, offset = [], 0
    for s in spaces:
        parts.append(space_index(s, groups, perms) + offset)
        offset += s.size
    return torch.cat(parts)


def permute_tensor(
    spec: SymmetrySpec, name: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Apply ``perms`` to one named tensor; tensors the spec does not label come back as they are."""
    t = spec.tensors.get(name)
    if t is None:
        return tensor
    out = tensor
    for a, axis in enumerate(t.axes):
        if axis and any(g in perms for s in axis for g in s.groups):
            idx = axis_index(axis, spec.groups, perms).to(out.device)
            out = out.index_select(a, idx)
    return out


def permute_state_dict(
    spec: SymmetrySpec, state: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply ``perms`` to every tensor of ``state``, one tensor at a time."""
    check_permutations(spec, perms)
    return {k: permute_tensor(spec, k, v, perms) for k, v in state.items()}


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
