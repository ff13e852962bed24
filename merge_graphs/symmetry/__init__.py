"""Symmetry specs: one small declarative module per architecture family."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from merge_graphs.errors import UnsupportedArchitectureError
from merge_graphs.symmetry import (
    bert,
    clip,
    gemma,
    gemma2,
    gemma3,
    gpt2,
    llama,
    mixtral,
    olmo2,
    phi3,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    sequential,
    vit,
)
from merge_graphs.symmetry.builder import SpecBuilder
from merge_graphs.symmetry.spec import (
    Group,
    Permutations,
    Space,
    SymmetrySpec,
    TensorSpec,
    compose_permutations,
    identity_permutations,
    invert_permutations,
    permute_state_dict,
    permute_tensor,
    permuted,
    random_permutations,
    source_name,
)
from merge_graphs.tensors import TensorInfo, infos

# config.model_type -> family module
FAMILIES = {
    "bert": bert, "roberta": bert, "gpt2": gpt2, "llama": llama, "mistral": llama, "qwen2": llama, "qwen3": qwen3,
    "gemma": gemma, "gemma2": gemma2, "gemma3_text": gemma3, "olmo2": olmo2, "phi3": phi3,
    "vit": vit, "clip": clip, "clip_text_model": clip, "clip_vision_model": clip,
    "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe,
}
SUPPORTED = tuple(a for m in dict.fromkeys(FAMILIES.values()) for a in m.ARCHITECTURES) + (
    "torch.nn.Sequential (MLP, CNN)",)


def spec_from_config(config, tensors: Mapping[str, TensorInfo], architecture: str | None = None) -> SymmetrySpec:
    """The spec of a Hugging Face checkpoint from its config and its tensors' shapes.

    Needs no weights, so it works on lazily opened safetensors shards.
    """
    model_type = getattr(config, "model_type", None)
    architecture = architecture or (getattr(config, "architectures", None) or [None])[0]
    if not has_spec(config, architecture):
        what = architecture or model_type or type(config).__name__
        raise UnsupportedArchitectureError(
            f"no symmetry spec for {what!r}. Supported: {', '.join(SUPPORTED)}. "
            "If config.json lacks 'architectures', load the model with its class and pass it in."
        )
    return FAMILIES[model_type].build(SpecBuilder(model_type, tensors), config, architecture)


def has_spec(config, architecture: str | None = None) -> bool:
    """Whether a checkpoint of ``config`` (loaded as ``architecture``, default its config's) has a
    symmetry spec of its own.

    Example:
        >>> import transformers
        >>> has_spec(transformers.LlamaConfig(), "LlamaForCausalLM"), has_spec(transformers.GPTNeoXConfig(), "GPTNeoXForCausalLM")
        (True, False)
    """
    family = FAMILIES.get(getattr(config, "model_type", None))
    architecture = architecture or (getattr(config, "architectures", None) or [None])[0]
    return family is not None and architecture in family.ARCHITECTURES


def unaligned_spec(tensors: Mapping[str, TensorInfo], why: str, family: str = "unaligned") -> SymmetrySpec:
    """The spec of an architecture without one of its own: no symmetry groups, every floating
    tensor labelled as it is, so that a merge without alignment matches tensors by name (as
    mergekit does) and every aligner refuses with ``why``.

    Example:
        >>> import torch
        >>> from merge_graphs.tensors import infos
        >>> spec = unaligned_spec(infos({"w": torch.zeros(2, 3), "ids": torch.zeros(3, dtype=torch.long)}), "no spec")
        >>> sorted(spec.tensors), spec.carried, spec.groups
        (['w'], ('ids',), {})
    """
    return SymmetrySpec(
        family=family, groups={},
        tensors={n: TensorSpec(n, (None,) * len(i.shape), "unaligned") for n, i in tensors.items()
                 if i.dtype.is_floating_point},
        carried=tuple(n for n, i in tensors.items() if not i.dtype.is_floating_point),
        unaligned=why,
    )


def symmetry_spec(model: nn.Module) -> SymmetrySpec:
    """The permutation symmetries of a model: groups, and the label of every tensor axis.

    Args:
        model: a supported transformers model, or an ``nn.Sequential`` MLP / CNN.

    Raises:
        UnsupportedArchitectureError: the architecture has no spec; the message lists those that do.

    Example:
        >>> import transformers, merge_graphs
        >>> cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
        ...                               num_attention_heads=4, intermediate_size=64)
        >>> spec = merge_graphs.symmetry_spec(transformers.BertModel(cfg))
        >>> spec.groups["layers.0.mlp"].size, spec.groups["layers.0.attn.qk"].parent
        (64, 'layers.0.attn.heads')
    """
    if isinstance(model, nn.Sequential):
        return sequential.build(model)
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"no symmetry spec for {type(model).__name__}. Supported: {', '.join(SUPPORTED)}.")
    return spec_from_config(config, infos(model.state_dict()), type(model).__name__)


__all__ = [
    "FAMILIES", "SUPPORTED", "Group", "Permutations", "Space", "SymmetrySpec", "TensorSpec",
    "compose_permutations", "has_spec", "identity_permutations", "invert_permutations", "permute_state_dict",
    "permute_tensor", "permuted", "random_permutations", "source_name", "spec_from_config", "symmetry_spec",
    "unaligned_spec",
]
