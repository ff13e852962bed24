"""Linear interpolation between two models and loss barriers.

The loss barrier of a pair (the number merge-graphs is judged by) is the largest amount by
which the loss along the straight line between the two models' weights rises above the
straight line between their two losses::

    barrier = max_alpha  loss((1 - alpha) * A + alpha * B) - ((1 - alpha) * loss(A) + alpha * loss(B))

Two networks trained from different seeds have a large barrier when averaged unaligned; a
good alignment of B's hidden units to A's brings it near zero.

Example:
    >>> import torch
    >>> from merge_graphs.evaluate import interpolation_curve
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> x = torch.randn(16, 2)
    >>> curve = interpolation_curve(a, b, lambda m: float(m(x).pow(2).mean()), points=5)
    >>> curve.alphas
    [0.0, 0.25, 0.5, 0.75, 1.0]
    >>> curve.barrier >= 0
    True
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from merge_graphs.errors import SpecMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "InterpolationCurve", "accuracy", "cross_entropy", "interpolate_state_dicts", "interpolation_curve",
]

Keep = Collection[str] | Callable[[str], bool] | None


def _keeper(keep: Keep) -> Callable[[str], bool]:
    if keep is None:
        return lambda name: False
    if callable(keep):
        return keep
    names = frozenset(keep)
    return names.__contains__


def _check_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys():
        only_a = sorted(set(a) - set(b))[:5]
        only_b = sorted(set(b) - set(a))[:5]
        raise SpecMismatchError(
            f"the two state dicts hold different tensors (only in the first: {only_a}, only in the "
            f"second: {only_b}); interpolate models of the same architecture")
    for name, t in a.items():
        if t.shape != b[name].shape:
            raise SpecMismatchError(
                f"tensor {name} has shape {tuple(t.shape)} in the first state dict and "
                f"{tuple(b[name].shape)} in the second; interpolate models of the same size")


def _lerp(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * x + alpha * y``, exact at alpha 0 and 1, computed in float32 at least."""
    y = y.to(x.device)
    if alpha == 0.0:
        return x.clone()
    if alpha == 1.0:
        return y.to(x.dtype, copy=True)
    wide = torch.promote_types(x.dtype, torch.float32)
    return torch.lerp(x.to(wide), y.to(wide), alpha).to(x.dtype)


def interpolate_state_dicts(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    alpha: float,
    *,
    keep: Keep = None,
) -> dict[str, torch.Tensor]:
    """The state dict ``(1 - alpha) * a + alpha * b``, tensor by tensor.

    Floating-point tensors are interpolated (half-precision ones in float32, then cast back);
    integer and boolean tensors (position ids, BatchNorm's ``num_batches_tracked``) and the
    tensors named by ``keep`` are copied from ``a``. ``alpha`` 0 and 1 give exact copies of
    ``a`` and ``b``; values outside [0, 1] extrapolate. The inputs are not modified and the
    result shares no storage with them.

    Args:
        a, b: state dicts of the same architecture (same names and shapes).
        alpha: weight of ``b``.
        keep: names (or a predicate on names) of tensors to copy from ``a`` unchanged.

    Raises:
        SpecMismatchError: the names or shapes differ.

    Example:
        >>> import torch
        >>> a = {"w": torch.zeros(2), "step": torch.tensor(3)}
        >>> b = {"w": torch.ones(2), "step": torch.tensor(7)}
        >>> interpolate_state_dicts(a, b, 0.25)
        {'w': tensor([0.2500, 0.2500]), 'step': tensor(3)}
    """
    _check_keys(a, b)
    kept = _keeper(keep)
    out = {}
    for name, x in a.items():
        if x.is_floating_point() and not kept(name):
            out[name] = _lerp(x, b[name], alpha)
        else:
            out[name] = x.clone()
    return out


@dataclass
class InterpolationCurve:
    """Losses along the straight line from model A (``alpha = 0``) to model B (``alpha = 1``).

    Attributes:
        alphas: increasing interpolation weights, starting at 0 and ending at 1.
        losses: the loss at each alpha (lower is better; to get an accuracy barrier, record
            the error rate ``1 - accuracy``).
        label: an optional name, used by :func:`merge_graphs.lab.plots.plot_curves` when given a list.

    Example:
        >>> c = InterpolationCurve([0.0, 0.5, 1.0], [1.0, 3.0, 2.0])
        >>> c.barrier, c.midpoint
        (1.5, 3.0)
    """

    alphas: list[float]
    losses: list[float]
    label: str | None = field(default=None)

    def __post_init__(self) -> None:
        self.alphas = [float(a) for a in self.alphas]
        self.losses = [float(v) for v in self.losses]
        if len(self.alphas) != len(self.losses) or len(self.alphas) < 2:
            raise ValueError(
                f"an interpolation curve needs at least 2 points and one loss per alpha; got "
                f"{len(self.alphas)} alphas and {len(self.losses)} losses")
        if self.alphas[0] != 0.0 or self.alphas[-1] != 1.0 or any(
                x >= y for x, y in zip(self.alphas, self.alphas[1:])):
            raise ValueError(f"alphas must increase from 0 to 1; got {self.alphas}")

    @property
    def line(self) -> list[float]:
        """The straight line between the endpoint losses, at each alpha."""
        l0, l1 = self.losses[0], self.losses[-1]
        return [(1 - a) * l0 + a * l1 for a in self.alphas]

    @property
    def excess(self) -> list[float]:
        """How far each loss lies above :attr:`line` (negative where below)."""
        return [v - s for v, s in zip(self.losses, self.line)]

    @property
    def barrier(self) -> float:
        """The largest excess of the loss over the straight line between the endpoints.

        The raw maximum, not clamped: since both endpoints lie on the line (excess exactly 0),
        it is never negative; 0 means the whole path lies on or below the line. It is only as
        fine as the grid of alphas.
        """
        return max(self.excess)

    @property
    def barrier_alpha(self) -> float:
        """The alpha at which :attr:`barrier` is reached (the first, on ties)."""
        ex = self.excess
        return self.alphas[ex.index(max(ex))]

    @property
    def midpoint(self) -> float:
        """The loss at ``alpha = 0.5`` (linearly interpolated between points when 0.5 is not one)."""
        for (a0, v0), (a1, v1) in zip(zip(self.alphas, self.losses), zip(self.alphas[1:], self.losses[1:])):
            if a0 <= 0.5 <= a1:
                if a0 == 0.5:
                    return v0
                if a1 == 0.5:
                    return v1
                t = (0.5 - a0) / (a1 - a0)
                return (1 - t) * v0 + t * v1
        raise AssertionError("unreachable: alphas span [0, 1]")

    def to_dict(self) -> dict:
        """A JSON-ready summary: the points and the derived numbers."""
        return {
            "label": self.label,
            "alphas": list(self.alphas),
            "losses": list(self.losses),
            "barrier": self.barrier,
            "barrier_alpha": self.barrier_alpha,
            "midpoint": self.midpoint,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> InterpolationCurve:
        """Rebuild a curve from :meth:`to_dict`'s output (derived numbers are recomputed)."""
        return cls(list(d["alphas"]), list(d["losses"]), d.get("label"))


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable[[nn.Module], float],
    *,
    points: int = 11,
    keep: Keep = None,
    label: str | None = None,
) -> InterpolationCurve:
    """Evaluate ``loss_fn`` along the straight line between two models' weights.

    One scratch copy of ``model_a`` is made; for each of ``points`` equally spaced alphas in
    [0, 1] its tensors are overwritten in place with the interpolation of the two models'
    state dicts (see :func:`interpolate_state_dicts`) and ``loss_fn(scratch)`` is called.
    Neither model is modified. Works for any ``nn.Module`` whose two instances have the same
    state-dict names and shapes (MLPs, CNNs, transformers models).

    The whole state dict is interpolated, buffers included: BatchNorm running statistics
    are averaged like weights, which is not the statistics of the averaged network. REPAIR-
    style renormalization is out of scope here; recompute the statistics inside ``loss_fn``
    if you need them. ``loss_fn`` runs under ``torch.no_grad()``; the scratch copy keeps
    ``model_a``'s train/eval mode, so ``loss_fn`` decides the mode (:func:`cross_entropy`
    and :func:`accuracy` switch to eval mode).

    Args:
        model_a, model_b: the endpoints (``model_b`` is usually already aligned to ``model_a``).
        loss_fn: ``loss_fn(model) -> float``, e.g. the mean test loss.
        points: number of alphas, at least 2 (odd numbers include the midpoint).
        keep: tensors copied from ``model_a`` rather than interpolated (names or a predicate).
        label: a name stored on the curve.

    Example:
        >>> import torch
        >>> from merge_graphs.evaluate import interpolation_curve, cross_entropy
        >>> _ = torch.manual_seed(0)
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> c = interpolation_curve(a, b, lambda m: cross_entropy(m, x, y), points=3)
        >>> len(c.losses), c.losses[0] == cross_entropy(a, x, y)
        (3, True)
    """
    if points < 2:
        raise ValueError(f"points must be at least 2 (the two endpoints); got {points}")
    alphas = [i / (points - 1) for i in range(points)]
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    _check_keys(sd_a, sd_b)
    kept = _keeper(keep)
    scratch = copy.deepcopy(model_a)
    target = scratch.state_dict()  # references to the scratch model's own tensors
    losses = []
    for alpha in alphas:
        with torch.no_grad():
            for name, t in target.items():
                if t.is_floating_point() and not kept(name):
                    t.copy_(_lerp(sd_a[name], sd_b[name], alpha))
        with torch.no_grad():
            loss = float(loss_fn(scratch))
        logger.debug("interpolation alpha=%.3f loss=%.6g", alpha, loss)
        losses.append(loss)
    curve = InterpolationCurve(alphas, losses, label)
    logger.info("interpolation curve%s: barrier %.4g at alpha %.2f, midpoint %.4g",
                f" {label}" if label else "", curve.barrier, curve.barrier_alpha, curve.midpoint)
    return curve


def _eval_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 4096) -> float:
    """Mean cross-entropy of a classifier's logits ``model(x)`` against labels ``y``.

    Runs in eval mode without gradients and restores the model's mode afterwards.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> round(cross_entropy(m, torch.zeros(1, 2), torch.tensor([0])), 4) >= 0
        True
    """
    logits = _eval_logits(model, x, batch_size)
    return float(nn.functional.cross_entropy(logits, y.to(logits.device)))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 4096) -> float:
    """Fraction of inputs whose arg-max logit is the label (eval mode, no gradients).

    Example:
        >>> import torch
        >>> m = torch.nn.Identity()
        >>> accuracy(m, torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        0.5
    """
    logits = _eval_logits(model, x, batch_size)
    return float((logits.argmax(-1) == y.to(logits.device)).float().mean())


def text_loss(
    model: nn.Module,
    tokenizer: Any,
    text: str | os.PathLike,
    *,
    window: int | None = None,
    max_windows: int | None = 64,
    batch_size: int = 16,
) -> float:
    """Mean next-token cross-entropy of a causal LM on held-out text (nats per token).

    The text (a file path, or the text itself) is tokenized once and cut into consecutive
    windows of ``window`` tokens (default: the model's context, at most 128); the first
    ``max_windows`` windows (all with None) are scored, so the figure is deterministic.

    Example:
        >>> import transformers
        >>> from merge_graphs.evaluate import text_loss
        >>> cfg = transformers.GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=32)
        >>> model = transformers.GPT2LMHeadModel(cfg)
        >>> class Bytes:  # a tokenizer stand-in: one token per byte
        ...     def __call__(self, text, verbose=True):
        ...         return {"input_ids": list(text.encode())}
        >>> round(text_loss(model, Bytes(), "hello world " * 20, window=16), 1)  # about log(300)
        5.7
    """
    if isinstance(text, os.PathLike) or ("\n" not in text and len(text) < 4096 and Path(text).is_file()):
        text = Path(text).read_text(encoding="utf-8")
    # The whole text is longer than the model's context on purpose: it is cut into windows below.
    ids = torch.as_tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long).flatten()
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 128)
    window = window or min(context, 128)
    n = len(ids) // window if max_windows is None else min(max_windows, len(ids) // window)
    if n == 0:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {window}")
    windows = ids[: n * window].view(n, window)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum").item()
                count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count
