"""Plots of interpolation curves: the PNG files the benchmarks write beside their json."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from merge_graphs.evaluate import InterpolationCurve

logger = logging.getLogger(__name__)


def plot_curves(
    curves: Mapping[str, InterpolationCurve] | Sequence[InterpolationCurve],
    path: str | os.PathLike,
    title: str | None = None,
    *,
    ylabel: str = "loss",
    show_line: bool = True,
) -> str:
    """Draw interpolation curves into one PNG file and return its path.

    Each curve is labelled with its name and barrier. ``show_line`` adds, dotted, the
    straight line between each curve's endpoints (what the barrier is measured from). No global
    pyplot state or backend is touched (the figure renders with the Agg canvas).

    Args:
        curves: ``{name: curve}``, or a sequence of curves named by their ``label``.
        path: the PNG to write; missing parent folders are created.
        title: figure title.
        ylabel: y-axis label.
        show_line: also draw the endpoint lines.

    Example:
        >>> import tempfile, os
        >>> from merge_graphs.evaluate import InterpolationCurve
        >>> c = InterpolationCurve([0.0, 0.5, 1.0], [0.1, 0.9, 0.1])
        >>> p = plot_curves({"naive": c}, os.path.join(tempfile.mkdtemp(), "curve.png"))
        >>> os.path.getsize(p) > 0
        True
    """
    if not isinstance(curves, Mapping):
        curves = {c.label or f"curve {i}": c for i, c in enumerate(curves)}
    if not curves:
        raise ValueError("plot_curves needs at least one curve")
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, c in curves.items():
        (drawn,) = ax.plot(c.alphas, c.losses, marker="o", markersize=3,
                           label=f"{name} (barrier {c.barrier:.3g})")
        if show_line:
            ax.plot([0.0, 1.0], [c.losses[0], c.losses[-1]], linestyle=":", color=drawn.get_color(), linewidth=1)
    ax.set_xlabel("alpha (0 = model A, 1 = model B)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0.0, 1.0)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    logger.info("wrote interpolation plot %s", path)
    return path
