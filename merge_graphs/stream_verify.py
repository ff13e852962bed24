"""The function-preservation check for streamed merges, on a truncated copy of the model.

:func:`merge_graphs.verify.check_function_preserved` needs the model twice in memory (B and
B permuted), which a streamed merge of a large model must not do. The permutation code is the
same for every layer, so the check runs on a small model of the same class built from a copy
of B's config cut to its first ``layers`` layers (embeddings, those layers, final norm, head)
and to a vocabulary of ``vocab`` tokens, filled with B's own tensors: once as they are, once
permuted by the alignment. Cutting the vocabulary keeps the first rows of every vocabulary
axis; no permutation moves tokens, so this commutes with permuting. Two layers, not one, so
that a permutation applied to the wrong layer shows. Memory: one copy at a time of two layers
and of a ``vocab``-row embedding, in float32, whatever the model's depth and vocabulary (a
70B Llama's two layers: about 7 GB).

Why not layer by layer through the whole depth: that needs each family's layer call (masks,
RoPE, caches) written again here, while a truncated model runs ``transformers``' own forward;
and layers beyond the first two exercise no permutation code the first two do not.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from merge_graphs.errors import CheckpointNotFoundError
from merge_graphs.io.checkpoint import Checkpoint
from merge_graphs.match import Alignment
from merge_graphs.symmetry import permute_tensor, symmetry_spec
from merge_graphs.verify import compare_outputs, forward, random_input

logger = logging.getLogger(__name__)


def truncated_config(config: Any, layers: int = 2, vocab: int = 256) -> Any:
    """A copy of a ``transformers`` config with at most ``layers`` layers and ``vocab`` tokens.

    Example:
        >>> import transformers
        >>> from merge_graphs.stream_verify import truncated_config
        >>> cfg = truncated_config(transformers.LlamaConfig(num_hidden_layers=32, vocab_size=32000))
        >>> cfg.num_hidden_layers, cfg.vocab_size
        (2, 256)
    """
    config = copy.deepcopy(config)
    keep = min(layers, config.num_hidden_layers)
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2 ...)
        config.layer_types = config.layer_types[:keep]
    config.vocab_size = min(vocab, config.vocab_size)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= config.vocab_size:
        # Only the embedding's padding row is affected, the same way in both copies.
        config.pad_token_id = 0
    return config


def truncated_model(ckpt: Checkpoint, alignment: Alignment | None = None, *, layers: int = 2,
                    vocab: int = 256) -> torch.nn.Module:
    """A float32 model of ``ckpt``'s class with its first ``layers`` layers and ``vocab`` tokens,
    holding the checkpoint's tensors, permuted by ``alignment`` if given.

    Raises:
        CheckpointNotFoundError: the model needs a tensor the checkpoint lacks (other than a tied head).
    """
    import transformers

    from merge_graphs.io.model import auto_class

    config = truncated_config(ckpt.config, layers, vocab)
    cls = getattr(transformers, ckpt.architecture or "", None) or auto_class(config)
    model = cls._from_config(config, dtype=torch.float32) if hasattr(cls, "_from_config") else cls(config)
    params = model.state_dict()
    loaded = set()
    for name, param in params.items():
        if name not in ckpt:
            continue
        tensor = ckpt.get(name)
        for axis, (have, size) in enumerate(zip(tensor.shape, param.shape)):
            if have != size:  # a vocabulary axis, cut
                tensor = tensor.narrow(axis, 0, size)
        if alignment is not None:
            tensor = permute_tensor(alignment.spec, name, tensor, alignment.permutations)
        param.copy_(tensor)  # one tensor at a time: nothing but the small model is held
        loaded.add(param.data_ptr())
    # A head tied to the embedding is one tensor under two names, stored once.
    missing = [k for k, v in params.items() if v.data_ptr() not in loaded]
    if missing:
        raise CheckpointNotFoundError(f"{ckpt.path} lacks tensors {missing[:3]} that {cls.__name__} needs; the "
                                      "checkpoint is incomplete: download or save it again")
    return model.eval()


def check_alignment(ckpt: Checkpoint, alignment: Alignment, *, layers: int = 2, vocab: int = 256,
                    tolerance: float = 1e-4) -> float:
    """Raise :class:`~merge_graphs.errors.AlignmentError` unless permuting ``ckpt`` by
    ``alignment`` leaves the function of its truncated copy unchanged on a small random input.

    Returns:
        The largest output difference relative to the output scale.
    """
    model = truncated_model(ckpt, layers=layers, vocab=vocab)
    spec, name, depth = symmetry_spec(model), type(model).__name__, model.config.num_hidden_layers
    inputs = random_input(model)
    before = forward(model, inputs)
    del model  # one truncated copy at a time
    after = forward(truncated_model(ckpt, alignment, layers=layers, vocab=vocab), inputs)
    perms = {g: p for g, p in alignment.permutations.items() if g in spec.groups}
    worst = compare_outputs(name, before, after, spec, perms, tolerance)
    logger.info("alignment of %s preserves its function on %d layers (largest difference %.2g)",
                ckpt.path, depth, worst)
    return worst
