"""Writing a merged model as a normal Hugging Face folder, atomically.

:func:`write_model_folder` writes ``config.json`` (and ``generation_config.json``), safetensors
weights (sharded with ``model.safetensors.index.json`` past ``shard_size``), the tokenizer files
of a reference model and any extra files (the recipe, the model card) into a temporary folder
beside the target, and renames it onto the target only once everything is written. After any
error or Ctrl-C nothing is at the target path, and an existing folder is replaced only by a
complete one (``overwrite=True``).

:func:`write_tensor_folder` writes the same folder from a stream of named tensors and a config,
without a model object: each tensor goes to disk as it arrives (the safetensors headers are
written first, from the planned shapes), so a merge of models larger than memory holds one
tensor, not one shard.

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
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from merge_graphs.errors import CheckpointNotFoundError
from merge_graphs.symmetry.builder import TensorInfo

logger = logging.getLogger(__name__)

#: Tokenizer files copied from ``tokenizer_from`` (top-level files matching these patterns):
#: ``tokenizer.json``, ``tokenizer_config.json``, ``tokenizer.model``, ``vocab.txt``,
#: ``vocab.json``, ``merges.txt``, sentencepiece ``*.model``, tiktoken files, chat templates ...
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
)

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


def _cast_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors cast to ``dtype``; integer buffers unchanged.

    Tensors that share memory in the model (tied weights) share it in the result too, so that
    ``save_pretrained`` still recognizes and drops the tied copies.
    """
    cast: dict[tuple, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key not in cast:
            cast[key] = tensor.detach().to(dtype)
        out[name] = cast[key]
    return out


def _check_extra_name(name: str) -> PurePosixPath:
    """A safe relative path for an extra file, or ValueError."""
    rel = PurePosixPath(str(name).replace("\\", "/"))
    if not str(name) or rel.is_absolute() or not rel.parts or any(p in ("..", ".", "") for p in rel.parts):
        raise ValueError(f"extra file name {name!r} must be a relative path inside the model folder, "
                         "e.g. 'merge-graphs.yaml' or 'README.md'")
    first = rel.parts[0]
    if len(rel.parts) == 1 and (first in ("config.json", "generation_config.json")
                                or fnmatch.fnmatch(first, "model*.safetensors")
                                or fnmatch.fnmatch(first, "*.safetensors.index.json")):
        raise ValueError(f"extra file name {name!r} would replace a file the model itself writes (config or weights); "
                         "choose another name")
    return rel


def tokenizer_files(folder: Path) -> list[Path]:
    """Top-level files of ``folder`` that :data:`TOKENIZER_PATTERNS` match, sorted."""
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


def _make_sibling_dir(target: Path, kind: str) -> Path:
    """Create an empty hidden folder ``.{name}.{kind}-XXXXXXXX`` beside ``target`` (mode per umask)."""
    for _ in range(100):
        candidate = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary folder beside {target}")  # pragma: no cover


def _sibling_name(target: Path, kind: str) -> Path:
    """An unused path ``.{name}.{kind}-XXXXXXXX`` beside ``target`` (not created)."""
    while True:
        candidate = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        if not os.path.lexists(candidate):
            return candidate


def _remove(path: Path) -> None:
    """Remove a folder tree, or a symlink / file, ignoring errors (logged)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError as err:  # pragma: no cover - depends on the file system
        logger.warning("could not remove %s: %s; delete it by hand", path, err)


def _exists_message(target: Path) -> str:
    return (f"output folder {str(target)!r} already exists; pass overwrite=True (CLI: --force) to replace it, "
            "or choose another path")


def _check_target(target: Path, overwrite: bool) -> None:
    """Raise before anything is written when ``target`` cannot be written."""
    if os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(f"{str(target)!r} exists and is not a folder; the model is written as a folder: "
                              "choose another path (or remove the file)")
    if target.is_dir() and not overwrite:
        raise FileExistsError(_exists_message(target))


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

    The folder holds ``config.json`` (and ``generation_config.json`` for generative models),
    the weights as safetensors (one ``model.safetensors``, or shards and
    ``model.safetensors.index.json`` past ``shard_size``; tied weights are stored once and stay
    tied on loading), the tokenizer files of ``tokenizer_from`` and ``extra_files``. It loads
    with ``AutoModel.from_pretrained(path)`` (or the ``AutoModelFor*`` class of the model).

    Everything is written into a hidden temporary folder beside the target
    (``.{name}.tmp-XXXXXXXX``, same parent, so the final rename is atomic) and renamed onto
    ``path`` at the end. After any exception or KeyboardInterrupt nothing is at ``path`` and the
    temporary folder is gone. An existing folder at ``path`` is an error unless ``overwrite``;
    with ``overwrite`` it is moved aside only once the new folder is complete, then deleted
    (if the final swap fails, the old folder is put back).

    The caller's model is not modified (``save_pretrained`` writes ``dtype`` and
    ``architectures`` into a copy of its config).

    Args:
        model: a ``transformers.PreTrainedModel``.
        path: the output folder (its parent folders are created).
        shard_size: the largest shard, ``int`` bytes or a string for :func:`parse_size`.
        dtype: cast floating-point tensors (not integer buffers) to this dtype when saving and
            record it in ``config.json``; ``torch.bfloat16`` or ``"bfloat16"``/``"bf16"``,
            ``float16``, ``float32``, ``float64``. ``None`` keeps the model's dtypes. Casting
            holds one cast copy of the weights in memory while saving.
        tokenizer_from: a local model folder whose tokenizer files (:data:`TOKENIZER_PATTERNS`:
            ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
            ``vocab.txt``, ``vocab.json``, ``merges.txt``, sentencepiece ``*.model``,
            ``added_tokens.json`` ...) are copied byte for byte, or a tokenizer object (saved
            with its ``save_pretrained``). ``None``: no tokenizer.
        extra_files: ``{relative name: text or bytes}`` written last (text as UTF-8), e.g.
            ``{"README.md": card, "merge-graphs.yaml": recipe}``; they may replace tokenizer
            files but not the config or the weights.
        overwrite: replace an existing folder at ``path``.

    Returns:
        The absolute path of the written folder.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is off, or ``path`` is a file.
        CheckpointNotFoundError: ``tokenizer_from`` is not a folder or has no tokenizer files.
        ValueError: a bad ``shard_size``, ``dtype`` or extra file name.
        TypeError: ``model`` is not a ``transformers.PreTrainedModel``, or an extra file's
            content is neither str nor bytes.

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
    max_shard = parse_size(shard_size)
    save_dtype = _save_dtype(dtype) if dtype is not None else None
    extras = _check_extras(extra_files)
    with _atomic_folder(path, overwrite, type(model).__name__) as (tmp, target):
        _write_model(model, tmp, max_shard=max_shard, dtype=save_dtype)
        _write_companions(tmp, tokenizer_from, extras)
    return target


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

    The folder is the one :func:`write_model_folder` writes (same atomic temporary folder and
    rename, same ``overwrite`` rules, tokenizer and extra files), built from ``config`` and the
    tensors instead of a model object. Shards are planned from ``layout`` before any tensor
    arrives (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` and
    ``model.safetensors.index.json`` past ``shard_size``, as transformers names them); each
    tensor is written to its shard as it comes, so at most one tensor (and its cast copy) is
    held here.

    Args:
        tensors: ``(name, tensor)`` pairs in ``layout``'s order, e.g. a generator that merges
            one tensor at a time.
        layout: ``{name: TensorInfo}`` of every tensor to write, in order, with its stored
            dtype (floating-point ones are then cast to ``dtype``).
        config: the model's ``transformers`` config; a copy is written, with ``dtype`` recorded.
        path, shard_size, dtype, tokenizer_from, extra_files, overwrite: as for
            :func:`write_model_folder`.
        generation_config: a ``GenerationConfig`` to write as ``generation_config.json``.

    Returns:
        The absolute path of the written folder.

    Raises:
        ValueError: a tensor arrives out of ``layout``'s order or with another shape, or the
            stream ends early or runs long; nothing is left at ``path``.
        FileExistsError, CheckpointNotFoundError, TypeError: as for :func:`write_model_folder`.

    Example:
        >>> import tempfile, os, torch, transformers
        >>> from merge_graphs.io.writer import write_tensor_folder
        >>> from merge_graphs.symmetry.builder import TensorInfo
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=20, hidden_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
        >>> state = model.state_dict()
        >>> layout = {k: TensorInfo.of(v) for k, v in state.items()}
        >>> with tempfile.TemporaryDirectory() as parent:
        ...     out = write_tensor_folder(state.items(), layout, model.config, os.path.join(parent, "m"),
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
    unknown = sorted({str(i.dtype) for i in stored.values() if i.dtype not in _safetensors_codes()})
    if unknown:
        raise ValueError(f"cannot write tensors of dtype {', '.join(unknown)} as safetensors")
    with _atomic_folder(path, overwrite, type(config).__name__) as (tmp, target):
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


def _safetensors_codes() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype code (the reader's table, inverted)."""
    from merge_graphs.io.checkpoint import _SAFETENSORS_DTYPES  # io.hub imports this module

    return {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


def _shard_plan(layout: Mapping[str, TensorInfo], max_shard: int) -> list[list[str]]:
    """Tensor names split into shards of at most ``max_shard`` bytes, in order (a larger
    tensor gets a shard of its own), as transformers splits them."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in layout.items():
        nbytes = _nbytes(info)
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * info.dtype.itemsize


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], layout: Mapping[str, TensorInfo], folder: Path,
                  max_shard: int) -> None:
    """Write ``tensors`` into safetensors shards as they arrive (headers first, from ``layout``)."""
    from merge_graphs.io.hub import SAFE_INDEX, SAFE_WEIGHTS  # io.hub imports this module

    codes = _safetensors_codes()
    shards = _shard_plan(layout, max_shard)
    files = ([SAFE_WEIGHTS] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, names in zip(files, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            info = layout[name]
            header[name] = {"dtype": codes[info.dtype], "shape": list(info.shape),
                            "data_offsets": [offset, offset + _nbytes(info)]}
            offset += _nbytes(info)
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
                              "total_size": sum(_nbytes(i) for i in layout.values())},
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


@contextmanager
def _atomic_folder(path: str | os.PathLike[str], overwrite: bool, what: str) -> Iterator[tuple[Path, Path]]:
    """Yield ``(temporary folder, target)``; the folder is renamed onto the target when the
    block ends, and removed (nothing at the target) when it raises, Ctrl-C included."""
    target = Path(os.path.abspath(os.fspath(Path(path).expanduser())))
    if not target.name or target.parent == target:
        raise ValueError(f"cannot write a model folder at {str(target)!r}: choose a folder path such as 'merged-model'")
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_sibling_dir(target, "tmp")
    logger.info("writing %s to %s (via %s)", what, target, tmp.name)
    try:
        yield tmp, target
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    logger.info("wrote %s: %s", target, ", ".join(sorted(os.listdir(target))))


def _write_model(model: Any, folder: Path, *, max_shard: int, dtype: torch.dtype | None) -> None:
    """Write a model's config (and generation config) and weights into the (temporary) ``folder``."""
    state_dict = _cast_state_dict(model, dtype) if dtype is not None else None
    # save_pretrained writes dtype and architectures into model.config: give it a copy.
    original_config = model.config
    config = copy.deepcopy(original_config)
    model.config = config
    try:
        model.save_pretrained(folder, state_dict=state_dict, max_shard_size=max_shard)
    finally:
        model.config = original_config
    del state_dict
    if dtype is not None:
        # save_pretrained recorded the in-memory model's dtype; record the saved one.
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(folder)


def _write_companions(folder: Path, tokenizer_from: Any, extras: Mapping[PurePosixPath, str | bytes]) -> None:
    """Write the tokenizer and the extra files (model card, recipe) into ``folder``."""
    if tokenizer_from is not None:
        copied = _copy_tokenizer(tokenizer_from, folder)
        logger.info("tokenizer files from %s: %s", tokenizer_from, ", ".join(copied))
    for rel, content in extras.items():
        dest = folder.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` onto ``target``; an old folder is replaced only now."""
    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)
        except OSError as err:
            if os.path.lexists(target):  # created meanwhile by someone else
                raise FileExistsError(_exists_message(target)) from err
            raise
        return
    _check_target(target, overwrite)  # appeared while writing, or is no longer a folder
    aside = _sibling_name(target, "old")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        try:
            os.rename(aside, target)
        except OSError as err:  # pragma: no cover - depends on the file system
            logger.error("could not put the old folder back at %s (%s); it is at %s", target, err, aside)
        raise
    _remove(aside)
