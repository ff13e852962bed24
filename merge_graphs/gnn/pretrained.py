"""Saving and loading encoder weights: safetensors (float16) plus a json that describes them.

The pretrained weights ship in ``merge_graphs/gnn/weights/`` (``encoder.safetensors`` and
``encoder.json``: version, dims, the command that made them, seed, zoo, held-out figures).

Example:
    >>> import tempfile, torch
    >>> from merge_graphs.gnn import GraphEncoder
    >>> from merge_graphs.gnn.pretrained import load_encoder, save_encoder
    >>> enc = GraphEncoder(dim=8, layers=1)
    >>> folder = tempfile.mkdtemp()
    >>> save_encoder(enc, folder, {"seed": 0})
    >>> load_encoder(folder).dim
    8
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from merge_graphs.errors import CheckpointNotFoundError
from merge_graphs.gnn.encoder import GraphEncoder

WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT_VERSION = 1


def save_encoder(encoder: GraphEncoder, folder: str | os.PathLike, info: dict | None = None) -> None:
    """Write ``encoder.safetensors`` (float16) and ``encoder.json`` (dims and ``info``) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "encoder.safetensors"
    save_file({k: v.detach().half().contiguous().cpu() for k, v in encoder.state_dict().items()}, weights)
    weights.chmod(0o644)  # safetensors writes 0600; shipped package data must be readable by everyone
    meta = {"format_version": FORMAT_VERSION, "dim": encoder.dim, "layers": len(encoder.layers), **(info or {})}
    (folder / "encoder.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_encoder(folder: str | os.PathLike = WEIGHTS_DIR) -> GraphEncoder:
    """The encoder saved in ``folder`` (default: the shipped weights), in float32 and eval mode.

    Raises:
        CheckpointNotFoundError: the folder has no ``encoder.safetensors`` / ``encoder.json``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, meta = folder / "encoder.safetensors", folder / "encoder.json"
    if not weights.is_file() or not meta.is_file():
        raise CheckpointNotFoundError(
            f"no GNN weights in {folder} (encoder.safetensors and encoder.json); reinstall merge-graphs, or "
            "train them with `merge-graphs pretrain-gnn --out merge_graphs/gnn/weights`")
    info = json.loads(meta.read_text())
    encoder = GraphEncoder(dim=info["dim"], layers=info["layers"])
    encoder.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return encoder.eval()


def encoder_info(folder: str | os.PathLike = WEIGHTS_DIR) -> dict:
    """The json that describes the weights in ``folder``."""
    return json.loads((Path(folder) / "encoder.json").read_text())
