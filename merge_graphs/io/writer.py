"""Writing a merged model as a normal Hugging Face folder, atomically.

:func:`write_tensor_folder` writes ``config.json`` (and ``generation_config.json``), safetensors
weights (sharded with ``model.safetensors.index.json`` past ``shard_size``), the tokenizer files
of a reference model and any extra files (the recipe, the model card) from a stream of named
tensors and a config: each tensor goes to disk as it arrives (the safetensors headers are
written first, from the planned shapes), so a merge of models larger than memory holds one
tensor, not one shard. Everything goes into a temporary folder renamed onto the target at the
end (:func:`~merge_graphs.io.atomic.atomic_folder`): after any error or Ctrl-C nothing is at the
target path, and an existing folder is replaced only by a complete one (``overwrite=True``).

:func:`write_model_folder` writes a ``transformers`` model through the same stream: the tensors
``save_pretrained`` would store, its config and generation config.

:func:`parse_size` reads shard sizes the way transformers and mergekit write them.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
import os
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from merge_graphs.errors import CheckpointNotFoundError
from merge_graphs.io.atomic import atomic_folder
from merge_graphs.io.files import CONFIG, GENERATION_CONFIG, SAFE_INDEX, SAFE_WEIGHTS, TOKENIZER_PATTERNS, shard_name
from merge_graphs.tensors import SAFETENSORS_CODES, TensorInfo, infos

logger = logging.getLogger(__name__)

#: Floating dtypes a written model may be cast to (what ``from_pretrained`` loads as is).
SAVE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16", "fp64": "float64", "double": "float64"}

_SIZE_UNITS = {
    "": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    # mergekit's --out-shard-size style: 'K', 'M', 'B' for thousand, million, billion (bytes).
    # ('B' as bytes would mean one shard per tensor, which nobody means.)
    "k": 10**3, "m": 10**6, "b": 10**9,
}
_SIZE_RE = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_EXAMPLE = "e.g. 5GB, 500MB, 2GiB, 5B (mergekit: 5 billion bytes) or a number of bytes"


def parse_size(size: int | float | str) -> int:  # noqa: PYI041 - ints are the usual case
    """A size in bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    Units are case-insensitive: ``KB``/``MB``/``GB``/``TB`` are powers of 1000 (as in
    transformers' ``max_shard_size``), ``KiB``/``MiB``/``GiB``/``TiB`` powers of 1024, and
    mergekit's ``--out-shard-size`` suffixes ``K``/``M``/``B`` mean thousand, million and
    billion bytes (so ``"5B"`` is 5 GB, mergekit's default). A bare number is bytes.
    Fractions and exponents are allowed (``"1.5GB"``, ``"5e9"``, ``5e9``).

    Raises:
        ValueError: not a positive size; the message names the value and gives examples.
        TypeError: neither a number nor a string.

    Example:
        >>> from merge_graphs.io.writer import parse_size
        >>> parse_size("5GB"), parse_size("500MB"), parse_size("2GiB"), parse_size(1024)
        (5000000000, 500000000, 2147483648, 1024)
        >>> parse_size("5B")  # mergekit style
        5000000000
        >>> parse_size("5 gigs")
        Traceback (most recent call last):
        ...
        ValueError: invalid size '5 gigs': expected a number with a unit, e.g. 5GB, ...
    """
    if isinstance(size, bool) or not isinstance(size, (int, float, str)):
        raise TypeError(f"invalid size {size!r}: expected a number of bytes or a string, {_SIZE_EXAMPLE}")
    if isinstance(size, (int, float)):
        if not math.isfinite(size):
            raise ValueError(f"invalid size {size!r}: {_SIZE_EXAMPLE}")
        value = math.floor(size)
    else:
        match = _SIZE_RE.match(size)
        unit = match.group(2).lower() if match else None
        if match is None or (unit not in _SIZE_UNITS):
            raise ValueError(f"invalid size {size!r}: expected a number with a unit, {_SIZE_EXAMPLE}")
        value = math.floor(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"invalid size {size!r}: it must be positive, {_SIZE_EXAMPLE}")
    return int(value)


def _save_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` as one of :data:`SAVE_DTYPES` (accepts ``torch.bfloat16``, ``"bfloat16"``, ``"bf16"``)."""
    if isinstance(dtype, torch.dtype):
        if dtype in SAVE_DTYPES.values():
            return dtype
        name = str(dtype)
    else:
        name = str(dtype).strip().lower().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in SAVE_DTYPES:
            return SAVE_DTYPES[name]
    raise ValueError(f"cannot save a model as dtype {dtype!r}: choose one of {', '.join(SAVE_DTYPES)} (or None to keep "
                     "the model's own dtype)")


def _check_extra_name(name: str) -> PurePosixPath:
    """A safe relative path for an extra file, or ValueError."""
    rel = PurePosixPath(str(name).replace("\\", "/"))
    if not str(name) or rel.is_absolute() or not rel.parts or any(p in ("..", ".", "") for p in rel.parts):
        raise ValueError(f"extra file name {name!r} must be a relative path inside the model folder, "
                         "e.g. 'merge-graphs.yaml' or 'README.md'")
    first = rel.parts[0]
    if len(rel.parts) == 1 and (first in (CONFIG, GENERATION_CONFIG)
                                or fnmatch.fnmatch(first, "model*.safetensors")
                                or fnmatch.fnmatch(first, "*.safetensors.index.json")):
        raise ValueError(f"extra file name {name!r} would replace a file the model itself writes (config or weights); "
                         "choose another name")
    return rel


def tokenizer_files(folder: Path) -> list[Path]:
    """Top-level files of ``folder`` that :data:`~merge_graphs.io.files.TOKENIZER_PATTERNS` match, sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_PATTERNS))


def _copy_tokenizer(source: Any, folder: Path) -> list[str]:
    """Write the tokenizer of ``source`` (a folder, or a tokenizer object) into ``folder``."""
    if hasattr(source, "save_pretrained") and not isinstance(source, (str, os.PathLike)):
        return [os.path.basename(f) for f in source.save_pretrained(folder)]
    src = Path(source).expanduser()
    if not src.is_dir():
        raise CheckpointNotFoundError(f"tokenizer source {str(src)!r} is not a folder: pass the local folder of the model "
                                      "whose tokenizer to copy (a Hub id must be downloaded first, see merge_graphs.io.resolve)")
    files = tokenizer_files(src)
    if not files:
        raise CheckpointNotFoundError(
            f"no tokenizer files in {str(src)!r} (looked for {', '.join(TOKENIZER_PATTERNS)}); choose another "
            "tokenizer source, or pass none to write the model without a tokenizer")
    for file in files:
        shutil.copyfile(file, folder / file.name)  # follows symlinks (HF cache snapshots)
    return [f.name for f in files]


def write_tensor_folder(
    tensors: Iterable[tuple[str, torch.Tensor]],
    layout: Mapping[str, TensorInfo],
    config: Any,
    path: str | os.PathLike[str],
    *,
    shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    generation_config: Any = None,
    tokenizer_from: str | os.PathLike[str] | Any | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a stream of named tensors as a Hugging Face model folder at ``path``, atomically.

    The folder holds ``config.json`` (and ``generation_config.json``), the weights as
    safetensors, the tokenizer files of ``tokenizer_from`` and ``extra_files``. Shards are
    planned from ``layout`` before any tensor arrives (``model.safetensors``, or
    ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json`` past
    ``shard_size``, as transformers names them); each tensor is written to its shard as it
    comes, so at most one tensor (and its cast copy) is held here.

    Everything is written into a hidden temporary folder beside the target (same parent, so
    the final rename is atomic; see :func:`~merge_graphs.io.atomic.atomic_folder`) and renamed
    onto ``path`` at the end. After any exception or KeyboardInterrupt nothing is at ``path``
    and the temporary folder is gone; a run killed outright leaves it, and the next write into
    the same parent folder removes it. An existing folder at ``path`` is an error unless
    ``overwrite``; with ``overwrite`` it is moved aside only once the new folder is complete,
    then deleted (if the final swap fails, the old folder is put back).

    Args:
        tensors: ``(name, tensor)`` pairs in ``layout``'s order, e.g. a generator that merges
            one tensor at a time.
        layout: ``{name: TensorInfo}`` of every tensor to write, in order, with its stored
            dtype (floating-point ones are then cast to ``dtype``).
        config: the model's ``transformers`` config; a copy is written, with ``dtype`` recorded.
        path: the output folder (its parent folders are created).
        shard_size: the largest shard, ``int`` bytes or a string for :func:`parse_size`.
        dtype: cast floating-point tensors (not integer buffers) to this dtype when saving and
            record it in ``config.json``; ``torch.bfloat16`` or ``"bfloat16"``/``"bf16"``,
            ``float16``, ``float32``, ``float64``. ``None`` keeps the tensors' dtypes.
        generation_config: a ``GenerationConfig`` to write as ``generation_config.json``.
        tokenizer_from: a local model folder whose tokenizer files
            (:data:`~merge_graphs.io.files.TOKENIZER_PATTERNS`: ``tokenizer.json``,
            ``tokenizer_config.json``, ``special_tokens_map.json``, ``vocab.txt``,
            ``vocab.json``, ``merges.txt``, sentencepiece ``*.model``, ``added_tokens.json``
            ...) are copied byte for byte, or a tokenizer object (saved with its
            ``save_pretrained``). ``None``: no tokenizer.
        extra_files: ``{relative name: text or bytes}`` written last (text as UTF-8), e.g.
            ``{"README.md": card, "merge-graphs.yaml": recipe}``; they may replace tokenizer
            files but not the config or the weights.
        overwrite: replace an existing folder at ``path``.

    Returns:
        The absolute path of the written folder.

    Raises:
        ValueError: a bad ``shard_size``, ``dtype`` or extra file name; or a tensor arrives
            out of ``layout``'s order or with another shape, or the stream ends early or runs
            long (then nothing is left at ``path``).
        FileExistsError: ``path`` exists and ``overwrite`` is off, or ``path`` is a file.
        CheckpointNotFoundError: ``tokenizer_from`` is not a folder or has no tokenizer files.
        TypeError: an extra file's content is neither str nor bytes.

    Example:
        >>> import tempfile, os, torch, transformers
        >>> from merge_graphs.io.writer import write_tensor_folder
        >>> from merge_graphs.tensors import infos
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=20, hidden_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
        >>> state = model.state_dict()
        >>> with tempfile.TemporaryDirectory() as parent:
        ...     out = write_tensor_folder(state.items(), infos(state), model.config, os.path.join(parent, "m"),
        ...                               shard_size="2KB", dtype="bfloat16")
        ...     loaded = transformers.AutoModel.from_pretrained(out)
        ...     len(os.listdir(out)) > 3, loaded.embeddings.word_embeddings.weight.dtype
        (True, torch.bfloat16)
    """
    max_shard = parse_size(shard_size)
    save_dtype = _save_dtype(dtype) if dtype is not None else None
    extras = _check_extras(extra_files)
    stored = {name: TensorInfo(info.shape, save_dtype if save_dtype is not None and info.dtype.is_floating_point
                               else info.dtype) for name, info in layout.items()}
    unknown = sorted({str(i.dtype) for i in stored.values() if i.dtype not in SAFETENSORS_CODES})
    if unknown:
        raise ValueError(f"cannot write tensors of dtype {', '.join(unknown)} as safetensors")
    what = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    with atomic_folder(path, overwrite, what) as (tmp, target):
        _write_shards(iter(tensors), stored, tmp, max_shard)
        config = copy.deepcopy(config)
        floating = [i.dtype for i in stored.values() if i.dtype.is_floating_point]
        if floating:
            config.dtype = str(floating[0]).removeprefix("torch.")
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        _write_companions(tmp, tokenizer_from, extras)
    return target


def write_model_folder(
    model: Any,
    path: str | os.PathLike[str],
    *,
    shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    tokenizer_from: str | os.PathLike[str] | Any | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face model folder at ``path``, atomically.

    The folder is the one ``model.save_pretrained(path)`` writes, through
    :func:`write_tensor_folder`: ``config.json`` (with ``architectures`` and ``dtype``),
    ``generation_config.json`` for generative models, the weights as safetensors (one
    ``model.safetensors``, or shards and ``model.safetensors.index.json`` past
    ``shard_size``), plus the tokenizer files of ``tokenizer_from`` and ``extra_files``. It
    loads with ``AutoModel.from_pretrained(path)`` (or the ``AutoModelFor*`` class of the model).
    The tensors are those ``save_pretrained`` stores (:func:`stored_state_dict`): tied weights
    once, so that they stay tied on loading.

    Same atomic writing, ``overwrite`` rules, tokenizer and extra files as
    :func:`write_tensor_folder`. Casting to ``dtype`` holds one cast tensor at a time. The
    caller's model is not modified.

    Args:
        model: a ``transformers.PreTrainedModel``.
        path, shard_size, dtype, tokenizer_from, extra_files, overwrite: as for
            :func:`write_tensor_folder`.

    Returns:
        The absolute path of the written folder.

    Raises:
        TypeError: ``model`` is not a ``transformers.PreTrainedModel``, or an extra file's
            content is neither str nor bytes.
        FileExistsError, CheckpointNotFoundError, ValueError: as for :func:`write_tensor_folder`.

    Example:
        >>> import tempfile, os, transformers
        >>> from merge_graphs.io.writer import write_model_folder
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=20, hidden_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
        >>> with tempfile.TemporaryDirectory() as parent:
        ...     out = write_model_folder(model, os.path.join(parent, "merged"),
        ...                              extra_files={"merge-graphs.yaml": "merge:\\n  method: linear\\n"})
        ...     sorted(os.listdir(out)), sorted(os.listdir(parent))
        (['config.json', 'merge-graphs.yaml', 'model.safetensors'], ['merged'])
    """
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"write_model_folder writes transformers models (PreTrainedModel), got {type(model).__name__}; save other "
            "torch modules with safetensors.torch.save_file(module.state_dict(), path)")
    state = stored_state_dict(model)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    code = _code_files(model, config)
    return write_tensor_folder(
        state.items(), infos(state), config, path, shard_size=shard_size, dtype=dtype,
        generation_config=model.generation_config if model.can_generate() else None,
        tokenizer_from=tokenizer_from, extra_files={**code, **(extra_files or {})}, overwrite=overwrite,
    )


def stored_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The tensors ``model.save_pretrained`` stores, by name (views of the model's own, not copies).

    That is the state dict without the model's ``_keys_to_ignore_on_save``, with each set of
    tied weights (tensors that are one tensor in memory) stored once: the names the model
    declares tied (``_tied_weights_keys``, e.g. ``lm_head.weight``) are left out when another
    name holds the same tensor, because ``from_pretrained`` ties them back from it. Tensors that
    share memory without being declared tied are all kept (each loads as a copy). Under
    transformers 5, weights it renames or fuses on loading (e.g. Mixtral's experts) get back
    their checkpoint names and layout, as ``save_pretrained`` writes them.

    Example:
        >>> import transformers
        >>> from merge_graphs.io.writer import stored_state_dict
        >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2))
        >>> model.lm_head.weight is model.transformer.wte.weight
        True
        >>> state = stored_state_dict(model)
        >>> "lm_head.weight" in state, "transformer.wte.weight" in state
        (False, True)
    """
    ignored = set(model._keys_to_ignore_on_save or ())
    state = {name: tensor for name, tensor in model.state_dict().items() if name not in ignored}
    declared = [f"{prefix}.{key}" if prefix else key for prefix, module in model.named_modules()
                for key in getattr(module, "_tied_weights_keys", None) or ()]  # a list (transformers 4) or dict (5)
    aliases: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in state.items():
        aliases[(tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tuple(tensor.stride()), tensor.dtype)].append(name)
    for names in aliases.values():
        # save_pretrained matches the declared names as patterns (re.search), so do we.
        tied = [name for name in names if any(re.search(pattern, name) for pattern in declared)]
        if len(tied) == len(names):  # declared tied among themselves: one must stay
            tied = tied[1:]
        for name in tied:
            del state[name]
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps checkpoint names and layouts in memory
        return state
    return revert_weight_conversion(model, state)


def _code_files(model: Any, config: Any) -> dict[str, bytes]:
    """The Python files that define ``model``'s class when it came from a repository's code
    (``trust_remote_code``): ``save_pretrained`` copies them into the folder and names the class
    in ``config.auto_map``, so that the folder loads again with ``trust_remote_code``."""
    cls = type(model)
    if getattr(cls, "_auto_class", None) is None or cls.__module__ == "__main__":
        return {}
    from transformers.dynamic_module_utils import get_relative_import_files

    source = sys.modules[cls.__module__].__file__
    config.auto_map = {**(getattr(config, "auto_map", None) or {}),
                       cls._auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"}
    return {Path(file).name: Path(file).read_bytes() for file in [source, *get_relative_import_files(source)]}


def _shard_plan(layout: Mapping[str, TensorInfo], max_shard: int) -> list[list[str]]:
    """Tensor names split into shards of at most ``max_shard`` bytes, in order (a larger
    tensor gets a shard of its own), as transformers splits them."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in layout.items():
        nbytes = info.nbytes
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], layout: Mapping[str, TensorInfo], folder: Path,
                  max_shard: int) -> None:
    """Write ``tensors`` into safetensors shards as they arrive (headers first, from ``layout``)."""
    shards = _shard_plan(layout, max_shard)
    files = [SAFE_WEIGHTS] if len(shards) == 1 else [shard_name(i, len(shards)) for i in range(len(shards))]
    for file, names in zip(files, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            info = layout[name]
            header[name] = {"dtype": SAFETENSORS_CODES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
        with open(folder / file, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            f.writelines(_tensor_bytes(name, next(tensors, None), layout[name]) for name in names)
    extra = next(tensors, None)
    if extra is not None:
        raise ValueError(f"got tensor {extra[0]!r} after the last one the layout names; give the layout every tensor")
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(math.prod(i.shape) for i in layout.values()),
                              "total_size": sum(i.nbytes for i in layout.values())},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _tensor_bytes(expected: str, item: tuple[str, torch.Tensor] | None, info: TensorInfo) -> memoryview:
    """The raw little-endian bytes of one arriving tensor, checked against the layout and cast."""
    if item is None:
        raise ValueError(f"the tensor stream ended before {expected!r}; give every tensor the layout names")
    name, tensor = item
    if name != expected or tuple(tensor.shape) != info.shape:
        raise ValueError(f"expected tensor {expected!r} of shape {list(info.shape)}, got {name!r} of shape "
                         f"{list(tensor.shape)}; give the tensors in the layout's order")
    flat = tensor.detach().to("cpu", info.dtype).contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _check_extras(extra_files: Mapping[str, str | bytes] | None) -> dict[PurePosixPath, str | bytes]:
    """Extra files by safe relative path; ValueError / TypeError for bad names or contents."""
    extras = {_check_extra_name(name): content for name, content in (extra_files or {}).items()}
    for name, content in extras.items():
        if not isinstance(content, (str, bytes)):
            raise TypeError(f"extra file {str(name)!r} must be str or bytes, got {type(content).__name__}")
    return extras


def _write_companions(folder: Path, tokenizer_from: Any, extras: Mapping[PurePosixPath, str | bytes]) -> None:
    """Write the tokenizer and the extra files (model card, recipe) into ``folder``."""
    if tokenizer_from is not None:
        copied = _copy_tokenizer(tokenizer_from, folder)
        logger.info("tokenizer files from %s: %s", tokenizer_from, ", ".join(copied))
    for rel, content in extras.items():
        dest = folder.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
