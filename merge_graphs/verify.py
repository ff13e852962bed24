"""The function-preservation check run before a merged model is written.

A map that the spec gets wrong would silently ruin a merge, so every alignment is checked on a
small random input: model B and B mapped by its alignment must compute the same outputs (those
in a permuted group, like a bare encoder's hidden states, after undoing the permutation).

:func:`check_alignment` is the one check, for any alignment and any tensor source. A
``transformers`` model is checked on a truncated copy (:func:`truncated_model`): its class built
from a copy of its config cut to its first ``layers`` layers (embeddings, those layers, final
norm, head) and to a vocabulary of ``vocab`` tokens, filled with B's own tensors, once as they
are and once mapped. The maps are the same for every layer, so two layers show a map applied
to the wrong layer, and memory stays at two layers and a ``vocab``-row embedding (a 70B
Llama's two layers: about 7 GB) whatever the model's depth, streamed or in memory. Cutting the
vocabulary keeps the first rows of every vocabulary axis; no map moves tokens, so this commutes
with mapping. A plain torch module (an MLP) is checked whole.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from merge_graphs.errors import AlignmentError, CheckpointNotFoundError
from merge_graphs.io.model import auto_class
from merge_graphs.match import Alignment
from merge_graphs.sources import StateTensors, TensorSource, module_tensors
from merge_graphs.symmetry.spec import SymmetrySpec

logger = logging.getLogger(__name__)


def random_input(model: nn.Module, batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random input for ``model``: token ids, images (``pixel_values``, sized from the config) or
    both (CLIP) for transformers; features or images for an ``nn.Sequential``."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if isinstance(model, nn.Sequential):
        first = next(m for m in model if isinstance(m, (nn.Linear, nn.Conv2d)))
        if isinstance(first, nn.Linear):
            return {"input": torch.randn(batch, first.in_features, generator=g).to(device)}
        # A CNN's image size is fixed by its flattening Linear, not recorded anywhere: try the usual ones.
        for side in (32, 28, 16, 8, 64, 224):
            x = torch.randn(batch, first.in_channels, side, side, generator=g).to(device)
            try:
                forward(model, {"input": x})
            except RuntimeError:
                continue
            return {"input": x}
        raise ValueError(f"found no image size that {type(model).__name__} accepts; pass verify=False")
    inputs = {}
    text, vision = _towers(model.config)
    if text is not None:
        ids = torch.randint(0, text.vocab_size, (batch, length), generator=g).to(device)
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    if vision is not None:
        side = vision.image_size
        h, w = side if isinstance(side, (list, tuple)) else (side, side)
        inputs["pixel_values"] = torch.randn(batch, vision.num_channels, h, w, generator=g).to(device)
    return inputs


def _towers(config: Any) -> tuple[Any, Any]:
    """The configs that say what a model reads: ``(text config or None, vision config or None)``;
    a two-tower model (CLIP) keeps them in ``text_config`` and ``vision_config``."""
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None) or config
    return (text if hasattr(text, "vocab_size") else None), (vision if hasattr(vision, "image_size") else None)


def forward(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named floating-point outputs of one forward pass in eval mode; those of a nested output by
    dotted names (CLIP's ``text_model_output.last_hidden_state``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs["input"]) if set(inputs) == {"input"} else model(**inputs)
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return _float_tensors(out)


def _float_tensors(out: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    found = {}
    for k, v in out.items():
        if isinstance(v, Mapping):
            found.update(_float_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            found[prefix + k] = v
    return found


def check_function_preserved(
    model: nn.Module,
    permuted: nn.Module,
    spec: SymmetrySpec,
    permutations: Mapping[str, torch.Tensor],
    tolerance: float = 1e-4,
) -> float:
    """Raise :class:`AlignmentError` unless ``permuted`` computes what ``model`` computes.

    Returns the largest difference relative to the output scale.
    """
    inputs = random_input(model)
    return compare_outputs(type(model).__name__, forward(model, inputs), forward(permuted, inputs), spec,
                           permutations, tolerance)


def compare_outputs(
    name: str,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    spec: SymmetrySpec,
    permutations: Mapping[str, torch.Tensor],
    tolerance: float = 1e-4,
) -> float:
    """:func:`check_function_preserved` on outputs already computed (``name``: the model's class),
    so that the two models need not be in memory together."""
    worst = 0.0
    for key, a in before.items():
        if key in spec.outputs:
            a = a[..., permutations[spec.outputs[key]].to(a.device)]
        diff = float((a.float() - after[key].float()).abs().max() / a.float().abs().max().clamp_min(1e-12))
        worst = max(worst, diff)
        if diff > tolerance:
            raise AlignmentError(
                f"aligning {name} changed its output {key!r} by {diff:.2g} of its scale "
                f"(tolerance {tolerance:g}). The {spec.family} symmetry spec does not fit this model; "
                "nothing was written. Please report it with the model's config."
            )
    return worst


def truncated_config(config: Any, layers: int = 2, vocab: int = 256) -> Any:
    """A copy of a ``transformers`` config with at most ``layers`` layers and ``vocab`` tokens
    (in each tower of a two-tower model: CLIP's ``text_config`` and ``vision_config``).

    Example:
        >>> import transformers
        >>> from merge_graphs.verify import truncated_config
        >>> cfg = truncated_config(transformers.LlamaConfig(num_hidden_layers=32, vocab_size=32000))
        >>> cfg.num_hidden_layers, cfg.vocab_size
        (2, 256)
    """
    config = copy.deepcopy(config)
    for part in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if part is not None:
            _truncate(part, layers, vocab)
    return config


def _truncate(config: Any, layers: int, vocab: int) -> None:
    """Cut ``config`` in place to ``layers`` layers and ``vocab`` tokens, where it has either."""
    if hasattr(config, "num_hidden_layers"):
        keep = min(layers, config.num_hidden_layers)
        config.num_hidden_layers = keep
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2 ...)
            config.layer_types = config.layer_types[:keep]
    if hasattr(config, "vocab_size"):
        config.vocab_size = min(vocab, config.vocab_size)
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int) and pad >= config.vocab_size:
            # Only the embedding's padding row is affected, the same way in both copies.
            config.pad_token_id = 0


def truncated_model(source: TensorSource, alignment: Alignment | None = None, *, layers: int = 2,
                    vocab: int = 256) -> nn.Module:
    """A float32 model of ``source``'s class with its first ``layers`` layers and ``vocab`` tokens,
    holding the source's tensors, mapped by ``alignment`` if given (in its basis: folded norms
    untie the head).

    Raises:
        CheckpointNotFoundError: the model needs a tensor the source lacks (other than a tied head).
    """
    import transformers

    config = truncated_config(source.config, layers, vocab)
    tensors: Mapping[str, torch.Tensor] = source
    if alignment is not None:
        tensors = alignment.tensors(source)
        if alignment.basis == "rotation" and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    cls = getattr(transformers, source.architecture or "", None) or auto_class(config)
    model = cls._from_config(config, dtype=torch.float32) if hasattr(cls, "_from_config") else cls(config)
    params = model.state_dict()
    loaded = set()
    # By the module's names: a weight transformers fuses on loading (stacked experts) is put together
    # from the checkpoint's pieces, one at a time.
    for name, tensor in module_tensors(model, tensors):
        param = params[name]
        for axis, (have, size) in enumerate(zip(tensor.shape, param.shape)):
            if have != size:  # a vocabulary axis, cut
                tensor = tensor.narrow(axis, 0, size)
        param.copy_(tensor)  # one tensor at a time: nothing but the small model is held
        loaded.add(param.data_ptr())
    # A head tied to the embedding is one tensor under two names, stored once.
    missing = [k for k, v in params.items() if v.data_ptr() not in loaded]
    if missing:
        raise CheckpointNotFoundError(f"{source.label} lacks tensors {missing[:3]} that {cls.__name__} needs; the "
                                      "checkpoint is incomplete: download or save it again")
    return model.eval()


def check_alignment(source: TensorSource, alignment: Alignment, *, layers: int = 2, vocab: int = 256,
                    tolerance: float = 1e-4) -> float:
    """Raise :class:`~merge_graphs.errors.AlignmentError` unless mapping ``source`` by ``alignment``
    leaves its function unchanged on a small random input (see the module docstring).

    Returns:
        The largest output difference relative to the output scale.
    """
    if source.config is None:
        if not isinstance(source, StateTensors):
            raise TypeError(f"{source.label} has no config: check it as a model in memory (StateTensors)")
        model, spec = source.model, alignment.spec
        aligned = copy.deepcopy(model)
        aligned.load_state_dict(alignment.apply(source.state))
        return check_function_preserved(model, aligned, spec, alignment.permutations, tolerance)
    model = truncated_model(source, layers=layers, vocab=vocab)
    name, depth = type(model).__name__, min(layers, _depth(source.config))
    inputs = random_input(model)
    before = forward(model, inputs)
    del model  # one truncated copy at a time
    mapped = truncated_model(source, alignment, layers=layers, vocab=vocab)
    after = forward(mapped, inputs)
    spec = alignment.spec
    perms = {g: p for g, p in alignment.permutations.items() if g in spec.groups}
    worst = compare_outputs(name, before, after, spec, perms, tolerance)
    logger.info("alignment of %s preserves its function on %d layers (largest difference %.2g)",
                source.label, depth, worst)
    return worst


def _depth(config: Any) -> int:
    """The most layers of any tower."""
    towers = (config, getattr(config, "text_config", None), getattr(config, "vision_config", None))
    return max(getattr(c, "num_hidden_layers", 0) for c in towers if c is not None)
