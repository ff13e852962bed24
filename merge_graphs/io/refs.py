"""Model references: a local folder, or a Hugging Face Hub id with an optional revision."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from merge_graphs.errors import CheckpointNotFoundError

HUB_ID_HELP = (
    "A Hub id looks like 'org/name' or 'org/name@revision' (a branch, tag or commit), "
    "e.g. 'sentence-transformers/all-MiniLM-L6-v2'"
)


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives: exactly one of ``path`` (a local folder) or ``repo_id`` (the Hub) is set.

    ``revision`` is the Hub revision asked for (``None``: the default branch); it is always
    ``None`` for a local folder.
    """

    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        """True for a local folder, False for a Hub id."""
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)


def _hub_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a valid ``org/name`` Hub id, or None when it is one."""
    if repo_id.count("/") != 1:
        return "it is not of the form 'org/name'"
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except ValueError as err:  # HFValidationError
        return str(err).split(". Use ")[0]
    return None


def parse_model_ref(ref: str | os.PathLike[str] | ModelRef) -> ModelRef:
    """Parse a model reference.

    A string naming something that exists on disk is a local folder (even if it also looks
    like a Hub id); otherwise a string of the form ``org/name`` or ``org/name@revision`` is a
    Hub id. A :class:`~pathlib.Path` is always a local folder. Nothing is downloaded or read.

    Raises:
        CheckpointNotFoundError: ``ref`` is neither an existing path nor a valid Hub id; the
            message says the folder does not exist and what a Hub id looks like.

    Example:
        >>> from merge_graphs.io import parse_model_ref
        >>> ref = parse_model_ref("openai-community/gpt2@main")
        >>> ref.repo_id, ref.revision, ref.is_local
        ('openai-community/gpt2', 'main', False)
        >>> parse_model_ref(".").is_local
        True
    """
    if isinstance(ref, ModelRef):
        return ref
    if isinstance(ref, os.PathLike):
        return ModelRef(path=Path(ref).expanduser())
    if not isinstance(ref, str):
        raise TypeError(f"a model reference is a folder path or a Hub id string, got {type(ref).__name__}")
    text = ref.strip()
    if not text:
        raise CheckpointNotFoundError(f"empty model reference. Pass a local model folder or a Hub id. {HUB_ID_HELP}.")
    path = Path(text).expanduser()
    if path.exists():
        return ModelRef(path=path)
    repo_id, sep, revision = text.partition("@")
    problem = _hub_id_problem(repo_id)
    if sep and not revision.strip():
        problem = "the revision after '@' is empty"
    elif sep and any(c.isspace() for c in revision):
        problem = f"the revision {revision!r} contains whitespace"
    if problem is None:
        return ModelRef(repo_id=repo_id, revision=revision or None)
    hint = ""
    if "/" not in text and not text.startswith((".", "~")):
        hint = " Hub ids need their organization, e.g. 'openai-community/gpt2' rather than 'gpt2'."
    raise CheckpointNotFoundError(
        f"model {text!r} not found: the folder {str(path.absolute())!r} does not exist, and {text!r} is not a "
        f"Hub id ({problem}). {HUB_ID_HELP}.{hint}"
    )
