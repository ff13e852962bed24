"""Scatter reductions for the neural graph's irregular edges.

Dense weight blocks never need these: their messages are matrix products. Irregular edges
(the structural links between an attention layer's query and key units, or its value and
output units) send one message per edge, and each receiving node reduces what it gets.

Two backends compute the same thing: ``torch_scatter`` when that package is installed,
and torch's own ``index_add_`` / ``scatter_reduce_`` otherwise. Nodes that receive
nothing get zeros with either backend.

Example:
    >>> import torch
    >>> from merge_graphs.gnn.scatter import scatter
    >>> scatter(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([0, 0, 2]), 3, "mean")
    tensor([[1.5000],
            [0.0000],
            [4.0000]])
"""

from __future__ import annotations

import torch

try:  # optional, faster on some machines: pip install merge-graphs[scatter]
    import torch_scatter
except ImportError:  # pragma: no cover - depends on the environment
    torch_scatter = None

REDUCTIONS = ("sum", "mean", "max")


def backends() -> tuple[str, ...]:
    """The backends available here: always ``"native"``, plus ``"torch_scatter"`` when installed."""
    return ("native",) if torch_scatter is None else ("native", "torch_scatter")


def default_backend() -> str:
    return "torch_scatter" if torch_scatter is not None else "native"


def scatter(
    src: torch.Tensor, index: torch.Tensor, dim_size: int, reduce: str = "sum", backend: str | None = None
) -> torch.Tensor:
    """Reduce the rows of ``src`` into ``dim_size`` rows: row ``index[i]`` receives ``src[i]``.

    Args:
        src: ``(n, ...)`` values, one row per edge.
        index: ``(n,)`` receiving row of each edge.
        dim_size: the number of receiving rows.
        reduce: ``"sum"``, ``"mean"`` or ``"max"``; rows that receive nothing are zero.
        backend: ``"native"`` or ``"torch_scatter"``; by default torch_scatter when installed.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    backend = backend or default_backend()
    index = index.to(src.device)
    if backend == "torch_scatter":
        if torch_scatter is None:
            raise ImportError("backend 'torch_scatter' needs the torch-scatter package: pip install torch-scatter")
        return torch_scatter.scatter(src, index, dim=0, dim_size=dim_size, reduce=reduce)
    if backend != "native":
        raise ValueError(f"unknown scatter backend {backend!r}; available: {backends()}")
    out = src.new_zeros((dim_size, *src.shape[1:]))
    if reduce == "max":
        expanded = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
        out = out.scatter_reduce(0, expanded, src, "amax", include_self=False)
        return out
    out = out.index_add(0, index, src)
    if reduce == "mean":
        count = torch.bincount(index, minlength=dim_size).clamp(min=1).to(src.dtype)
        out = out / count.view(-1, *([1] * (src.dim() - 1)))
    return out
