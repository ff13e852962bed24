"""The external ``rebasin`` package (PyPI ``rebasin``, by snimu) as a weight-matching baseline.

``rebasin`` is not a dependency of merge-graphs: a suite adds its row only when the package
imports in this process (``pip install rebasin``; it pulls ``torchview`` and ``graphviz``), and
says why otherwise. It traces a model with torchview on example inputs, infers which axes a
permutation moves, and runs Git Re-Basin weight matching (``PermutationCoordinateDescent``),
permuting model B in place. Its permutation is checked to leave B's outputs unchanged: where it
does not, the model is reported as unsupported rather than merged.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Largest relative change of B's outputs that still counts as the same function.
TOLERANCE = 1e-4


def unavailable() -> str | None:
    """Why ``rebasin`` cannot run here (``"not installed: ..."``), or None when it imports."""
    try:
        import rebasin  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an ImportError, or a dependency that fails on import
        return f"not installed ({type(e).__name__}: {e}); pip install rebasin to add this row"
    return None


def _outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return getattr(out, "logits", out)


def align_state(model_a: nn.Module, model_b: nn.Module, inputs: Any) -> tuple[dict[str, torch.Tensor], float] | str:
    """``rebasin``'s weight matching of ``model_b`` to ``model_a``: ``(B's permuted state dict, seconds)``, or
    a string saying why the model is unsupported (its tracing failed, or its permutation changed B's outputs).

    ``inputs`` are example inputs for tracing: a tensor, or a tuple of positional arguments.
    """
    from rebasin import PermutationCoordinateDescent

    b = copy.deepcopy(model_b)
    start = time.perf_counter()
    try:
        PermutationCoordinateDescent(model_a, b, inputs).rebasin()
    except Exception as e:  # noqa: BLE001 - any failure inside the package means: model unsupported
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        logger.warning("rebasin failed: %s: %s", type(e).__name__, first)
        return f"unsupported: rebasin raised {type(e).__name__}: {first[:200]}"
    seconds = time.perf_counter() - start
    before, after = _outputs(model_b, inputs), _outputs(b, inputs)
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if change > TOLERANCE:
        return (f"unsupported: rebasin's permutation changed model B's outputs by {change:.2g} (relative), "
                "so it is not a re-basin of this architecture")
    return b.state_dict(), seconds
