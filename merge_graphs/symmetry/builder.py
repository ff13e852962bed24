"""Assemble a :class:`SymmetrySpec` from a family's table and a checkpoint's tensor shapes.

Family modules declare groups, spaces and tensor labels; the builder keeps the labelled
tensors that the checkpoint actually has (optional biases, an untied head), checks every
labelled axis against the stored shape, and refuses floating-point tensors that the family
does not describe: an unknown tensor could touch a permuted axis and silently break the
model, so it is an error, not something to copy.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from merge_graphs.errors import SpecMismatchError, UnsupportedTensorError
from merge_graphs.symmetry.spec import (
    ROTATION_KINDS,
    Group,
    HeadMap,
    Norm,
    Slot,
    Space,
    SymmetrySpec,
    TensorSpec,
    outer_parents,
)
from merge_graphs.tensors import TensorInfo

Axis = Space | Sequence[Space] | None


class SpecBuilder:
    """Collects one family's declarations, then :meth:`build` checks them against a checkpoint."""

    def __init__(self, family: str, tensors: Mapping[str, TensorInfo]):
        self.family = family
        self.stored = dict(tensors)
        self.groups: dict[str, Group] = {}
        self.labels: dict[str, TensorSpec] = {}
        self.carry_patterns: list[str] = []
        self.norm_table: list[Norm] = []
        self.ties: dict[str, str] = {}
        self.head_map_table: list[HeadMap] = []

    def group(self, name: str, size: int, parent: str | None = None) -> str:
        self.groups[name] = Group(name, size, parent)
        return name

    def space(self, name: str, *factors: tuple[str | None, int]) -> Space:
        return Space(name, tuple(factors))

    def fixed(self, name: str, size: int) -> Space:
        """Units with an identity of their own (tokens, input features, classes)."""
        return Space(name, ((None, size),))

    def attention(
        self, layer: str, n_heads: int, n_kv_heads: int, head_dim: int, rope: bool, qk_map: bool = True
    ) -> tuple[Space, Space, Space, Space]:
        """Groups and spaces of one attention layer: the q, k, v outputs and the o input.

        Key/value heads move as blocks (group ``{layer}.heads``); under grouped-query
        attention the query heads that share a key/value head may swap among themselves
        (``{layer}.query_heads``, one permutation per key/value head). Within each head, the
        q/k dims share one permutation (``{layer}.qk``) and the v/o dims another
        (``{layer}.vo``). RoPE rotates fixed pairs of q/k dims, so with RoPE the q/k dims stay put.
        if qk_map:
            self.head_map_table.append(HeadMap(f"{layer}.qk", heads[0], (f"{layer}.q", f"{layer}.k"), head_dim,
                                               "rope_pairs" if rope else "invertible", readers=(f"{layer}.k",)))
        self.head_map_table.append(HeadMap(f"{layer}.vo", heads[0], (f"{layer}.v", f"{layer}.o"), head_dim,
                                           "invertible", readers=(f"{layer}.o",)))
        """
        if n_heads % n_kv_heads:
            raise SpecMismatchError(f"{layer}: {n_heads} query heads do not divide into {n_kv_heads} key/value heads")
        per_kv = n_heads // n_kv_heads
        heads = (self.group(f"{layer}.heads", n_kv_heads), n_kv_heads)
        qk = (None if rope else self.group(f"{layer}.qk", head_dim, parent=heads[0]), head_dim)
        vo = (self.group(f"{layer}.vo", head_dim, parent=heads[0]), head_dim)
        query = (heads,) if per_kv == 1 else (heads, (self.group(f"{layer}.query_heads", per_kv, parent=heads[0]), per_kv))
        if qk_map:
            self.head_map_table.append(HeadMap(f"{layer}.qk", heads[0], (f"{layer}.q", f"{layer}.k"), head_dim,
                                               "rope_pairs" if rope else "invertible", readers=(f"{layer}.k",)))
        self.head_map_table.append(HeadMap(f"{layer}.vo", heads[0], (f"{layer}.v", f"{layer}.o"), head_dim,
                                           "invertible", readers=(f"{layer}.o",)))
        return (
            self.space(f"{layer}.q", *query, qk),
            self.space(f"{layer}.k", heads, qk),
            self.space(f"{layer}.v", heads, vo),
            self.space(f"{layer}.o", *query, vo),
        )

    def experts(self, layer: str, n_experts: int, hidden: int) -> tuple[Space, Space]:
        """Groups and spaces of one mixture-of-experts layer: the experts (group ``{layer}.experts``,
        which orders the router's rows and the experts' weights) and, inside each expert, its hidden
        units (``{layer}.experts.mlp``, one permutation per expert).

        The hidden space holds the child group alone: a tensor that reads or writes it says which
        expert it belongs to, by an axis labelled with the experts space (stacked weights) or by a
        :class:`~merge_graphs.symmetry.spec.Slot` (one tensor per expert, :meth:`tensor`).
        """
        experts = self.group(f"{layer}.experts", n_experts)
        units = self.group(f"{layer}.experts.mlp", hidden, parent=experts)
        return self.space(f"{layer}.experts", (experts, n_experts)), self.space(f"{layer}.experts.mlp", (units, hidden))

    def tensor(self, name: str, *axes: Axis, role: str, fan_in_axis: int | None = None,
               slot: Slot | None = None) -> None:
        """Label tensor ``name``; it is kept only if the checkpoint has it.

        ``fan_in_axis`` is the axis that indexes input units: 1 for ``nn.Linear`` and
        convolutions (the default for 2-D and larger tensors), 0 for GPT-2's ``Conv1D`` and
        for embeddings, whose rows are indexed by the token that goes in. ``slot``: the tensor is
        one unit of a group, stored on its own (an expert's weights in a per-expert checkpoint).
        """
        norm = tuple(None if a is None else ((a,) if isinstance(a, Space) else tuple(a)) for a in axes)
        if fan_in_axis is None:
            fan_in_axis = 1 if len(norm) > 1 else 0
        self.labels[name] = TensorSpec(name, norm, role, fan_in_axis, slot)

    def carry(self, pattern: str) -> None:
        """Copy floating-point tensors matching ``pattern`` (e.g. RoPE's frequencies) as they are."""
        self.carry_patterns.append(pattern)

    def norm(self, weight: str, bias: str | None, readers: Sequence[tuple[str, str | None]],
             offset: float = 0.0) -> None:
        """Declare a pre-norm: its gain and bias tensors, the ``(weight, bias)`` pairs that read
        its output, and the gain's offset (:class:`Norm`). Entries the checkpoint lacks are
        dropped at :meth:`build`."""
        self.norm_table.append(Norm(weight, bias, tuple(readers), offset))

    def tie(self, name: str, source: str) -> None:
        """``name`` (an LM head) is tied to ``source`` and may be stored only as ``source``."""
        self.ties[name] = source

    def build(
        self, outputs: Mapping[str, str] | None = None, notes: Sequence[str] = (), rotation: str | None = None,
        unrotated: str | None = None,
    ) -> SymmetrySpec:
        tensors: dict[str, TensorSpec] = {}
        carried: list[str] = []
        unlabelled: list[str] = []
        for name, info in self.stored.items():
            label = self.labels.get(name)
            if not info.dtype.is_floating_point or any(fnmatch.fnmatchcase(name, p) for p in self.carry_patterns):
                carried.append(name)
            elif label is None:
                unlabelled.append(name)
            else:
                self._check_shape(label, info)
                tensors[name] = label
        if unlabelled:
            shown = ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
            raise UnsupportedTensorError(
                f"the {self.family} symmetry spec does not describe {len(unlabelled)} tensor(s): {shown}. "
                "This checkpoint has layers the family does not know, so permuting it could change "
                "what it computes. Open an issue with the model's config, or merge it with a tool "
                "that does not align units."
            )
        used = {g for t in tensors.values() for axis in t.axes for s in axis or () for g in s.groups}
        used |= {t.slot.group for t in tensors.values() if t.slot is not None}
        used |= {self.groups[g].parent for g in used if self.groups[g].parent}
        groups = {n: g for n, g in self.groups.items() if n in used}
        outputs = {k: v for k, v in (outputs or {}).items() if v in groups}
        if rotation is not None and rotation not in ROTATION_KINDS:
            raise ValueError(f"unknown rotation kind {rotation!r}; choose one of {sorted(ROTATION_KINDS)}")
        tied = {k: v for k, v in self.ties.items() if v in tensors}
        present = set(tensors) | set(tied)
        norms = tuple(
            Norm(n.weight, n.bias if n.bias in tensors else None,
                 tuple((w, bias if bias in tensors else None) for w, bias in n.readers if w in present), n.offset)
            for n in self.norm_table if n.weight in tensors
        )
        spaces = {s.name for t in tensors.values() for axis in t.axes for s in axis or ()}
        head_maps = tuple(m for m in self.head_map_table if m.heads in groups and set(m.spaces) <= spaces)
        spec = SymmetrySpec(self.family, groups, tensors, tuple(carried), outputs, tuple(notes),
                            norms, rotation, tied, head_maps, unrotated=unrotated)
        for t in tensors.values():
            self._check_units(spec, t)
        return spec

    def _check_units(self, spec: SymmetrySpec, t: TensorSpec) -> None:
        """Every child group on an axis of ``t`` knows its parent unit: in its space, on another axis,
        or from the slot; and a slot's stack is whole."""
        for axis in range(len(t.axes)):
            try:
                outer_parents(spec, t, axis)
            except ValueError as e:
                raise SpecMismatchError(f"the {self.family} spec is inconsistent: {e}") from None
        if t.slot is not None:
            missing = [n for n in t.slot.names if n not in spec.tensors]
            if missing or len(t.slot.names) != spec.groups[t.slot.group].size:
                raise SpecMismatchError(
                    f"{t.name} is unit {t.slot.index} of {t.slot.group} ({spec.groups[t.slot.group].size} units), but "
                    f"the checkpoint lacks {', '.join(missing[:3]) or 'some of its siblings'}: it is incomplete; "
                    "download or save it again")

    def _check_shape(self, label: TensorSpec, info: TensorInfo) -> None:
        if len(label.axes) != len(info.shape):
            raise SpecMismatchError(
                f"{label.name}: the {self.family} spec expects {len(label.axes)} axes, "
                f"the checkpoint has shape {info.shape}"
            )
        for a, axis in enumerate(label.axes):
            if axis is None:
                continue
            expected = sum(s.size for s in axis)
            if expected != info.shape[a]:
                spaces = " + ".join(f"{s.name}[{s.size}]" for s in axis)
                raise SpecMismatchError(
                    f"{label.name}: axis {a} has {info.shape[a]} entries but the config implies "
                    f"{expected} ({spaces}). The config.json does not match the weights; "
                    "check that both come from the same checkpoint."
                )


def find_prefix(tensors: Mapping[str, TensorInfo], prefix: str, probe: str) -> str:
    """``prefix + '.'`` if the base model's tensors are nested under it, else ``''``."""
    if f"{prefix}.{probe}" in tensors:
        return f"{prefix}."
    if probe in tensors:
        return ""
    raise UnsupportedTensorError(
        f"found neither {prefix}.{probe} nor {probe} among the checkpoint's tensors; "
        "is this the architecture its config says?"
    )
