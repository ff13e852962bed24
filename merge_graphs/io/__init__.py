"""Reading models: references (folder or Hub id), Hub downloads, lazy checkpoints, whole models.

- :func:`parse_model_ref` / :class:`ModelRef`: ``path/to/folder``, ``org/name``, ``org/name@revision``;
- :func:`resolve`: a reference -> a local folder (Hub ids downloaded into the HF cache);
- :class:`Checkpoint`: a lazy view of a folder's named tensors (shapes without data, one tensor at a time);
- :func:`load_model`: a whole ``transformers`` model, for models that fit in memory;
- :func:`write_model_folder` / :func:`model_card`: a complete Hugging Face output folder, written atomically.
"""

from merge_graphs.io.card import model_card
from merge_graphs.io.checkpoint import Checkpoint
from merge_graphs.io.hub import resolve
from merge_graphs.io.model import load_model
from merge_graphs.io.refs import ModelRef, parse_model_ref
from merge_graphs.io.writer import parse_size, write_model_folder

__all__ = [
    "Checkpoint", "ModelRef", "load_model", "model_card", "parse_model_ref", "parse_size", "resolve",
    "write_model_folder",
]
