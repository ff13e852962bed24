"""Sparsification of task vectors (deltas from the base), as mergekit's ``sparsify.py``:
magnitude pruning (TIES), random pruning (DARE), magnitude pruning that also drops the largest
outliers (Model Breadcrumbs) and magnitude-ranked random pruning (DELLA), each optionally
rescaled to the delta's L1 norm.

Magnitude and random pruning also come as a *cut* measured on the whole delta read a block of rows
at a time, then applied block by block with the same result (:class:`MagnitudeCut`,
:class:`RandomCut`): what :mod:`merge_graphs.methods.task_arithmetic` streams large tensors with.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from merge_graphs.errors import MergeParameterError


def _l1(x: Tensor) -> Tensor:
    """Per-row (first axis) sums of ``|x|`` in float64: the same whether ``x`` is a whole tensor
    or a block of its rows."""
    rows = max(1, x.shape[0]) if x.dim() else 1
    return x.reshape(rows, -1).abs().sum(1, dtype=torch.float64)


def _l1_scale(before: Tensor, after: Tensor, eps: float = 1e-7) -> float:
    # mergekit's `rescale` restores the L1 norm of the delta; for random pruning the factor
    # concentrates at 1/density on large tensors
    before, after = float(before.sum()), float(after.sum())
    return 1.0 if before < eps or after < eps else before / after


def _rescale_l1(delta: Tensor, pruned: Tensor) -> Tensor:
    scale = _l1_scale(_l1(delta), _l1(pruned))
    return pruned if scale == 1.0 else pruned * scale


def _random_dtype(t: Tensor) -> torch.dtype:
    """The dtype mergekit draws random masks in: float32 on CPU (torch has no float16 bernoulli
    there) unless bfloat16, else the tensor's own."""
    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def _kth_smallest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest (from 0) of a 1-D tensor, which it may reorder."""
    if values.device.type == "cpu" and values.dtype in (torch.float16, torch.float32, torch.float64):
        # In place, no copy and no index tensor (torch's kthvalue makes both).
        array = values.detach().numpy()
        array.partition(k)
        return values[k].clone()
    return values.kthvalue(k + 1).values


# magnitude (TIES)


@dataclass(frozen=True)
class MagnitudeCut:
    """What magnitude pruning keeps of one delta: the entries with ``low < |delta| < high``; of
    those equal to ``low`` (``high``), all if ``low_tied`` (``high_tied``); and those at the flat
    indices ``chosen``. ``scale`` is the L1 rescale factor (1 without ``rescale``)."""

    low: Tensor
    high: Tensor
    low_tied: bool
    high_tied: bool
    chosen: Tensor | None
    scale: float

    def apply(self, block: Tensor, before: int = 0) -> tuple[Tensor, int]:
        """The pruned block of rows, given how many entries the rows before it hold; and how
        many this block holds (add it to ``before`` for the next block)."""
        magnitude = block.abs()
        keep = ((magnitude > self.low) & (magnitude < self.high)).contiguous()
        if self.low_tied:
            keep |= magnitude == self.low
        if self.high_tied:
            keep |= magnitude == self.high
        del magnitude
        if self.chosen is not None:
            n = block.numel()
            keep.view(-1)[self.chosen[(self.chosen >= before) & (self.chosen < before + n)] - before] = True
        pruned = block * keep
        return (pruned if self.scale == 1.0 else pruned * self.scale), block.numel()


_NOTHING = (torch.tensor(float("inf")), torch.tensor(float("-inf")), False, False, None)


def _magnitudes(blocks: Callable[[], Iterable[Tensor]], numel: int) -> Tensor:
    """``|delta|`` flattened, as one float32 tensor (mergekit's sort key on CPU)."""
    magnitudes = torch.empty(numel)
    offset = 0
    for block in blocks():
        magnitudes[offset:offset + block.numel()] = block.abs().flatten()
        offset += block.numel()
    return magnitudes


def window_cut(blocks: Callable[[], Iterable[Tensor]], numel: int, start: int, stop: int, *, descending: bool,
               rescale: bool) -> MagnitudeCut:
    """:class:`MagnitudeCut` keeping the entries at positions ``[start, stop)`` of torch's sort
    (``descending`` or not) of the float32 magnitudes of a delta read as row blocks, in order, by
    ``blocks()``: what mergekit keeps (TIES: the first k of a descending sort; Model Breadcrumbs:
    a window of an ascending one).

    The window's end values come from one float32 copy of ``|delta|``, partitioned in place (no
    sort, no index tensor). Where a nonzero end value is shared by more entries than the window
    holds, which of them are kept is the sort's choice (not stable: not the first by index), so
    that one sort is made then; float32 deltas rarely tie, float16 and bfloat16 ones of large
    tensors usually do. Then, with ``rescale``, the L1 sums block by block.
    """
    start, stop = max(0, start), min(numel, stop)
    if stop <= start:
        return MagnitudeCut(*_NOTHING, 1.0)
    first, last = (numel - stop, numel - 1 - start) if descending else (start, stop - 1)  # ascending positions
    magnitudes = _magnitudes(blocks, numel)
    low, high = _kth_smallest(magnitudes, first), _kth_smallest(magnitudes, last)
    below, at_low = int((magnitudes < low).sum()), int((magnitudes == low).sum())
    above, at_high = int((magnitudes > high).sum()), int((magnitudes == high).sum())
    del magnitudes
    # the entries equal to an end value occupy ascending positions [below, below + at_low) and
    # [numel - above - at_high, numel - above); all of them are kept when those lie in the window
    low_tied = below == first and below + at_low - 1 <= last
    high_tied = numel - above - 1 == last and numel - above - at_high >= first
    chosen = None
    partial = [v for v, whole in ((low, low_tied), (high, high_tied)) if not whole and v > 0]
    if partial:
        magnitudes = _magnitudes(blocks, numel)
        order = torch.sort(magnitudes, descending=descending).indices[start:stop]
        values = magnitudes[order]
        chosen = order[(values == low) | (values == high)].sort().values
        del magnitudes, order, values
    cut = MagnitudeCut(low, high, low_tied, high_tied, chosen, 1.0)
    if not rescale:
        return cut
    before, after, offset = [], [], 0
    for block in blocks():
        pruned, n = cut.apply(block, offset)
        offset += n
        before.append(_l1(block))
        after.append(_l1(pruned))
    return MagnitudeCut(low, high, low_tied, high_tied, chosen, _l1_scale(torch.cat(before), torch.cat(after)))


def magnitude_cut(blocks: Callable[[], Iterable[Tensor]], numel: int, density: float, rescale: bool) -> MagnitudeCut:
    """TIES' :func:`window_cut`: as in mergekit 0.1.5, a positive ``density`` keeps the
    ``max(1, int(density * numel))`` entries of largest magnitude, ``density <= 0`` none."""
    if density <= 0:
        return MagnitudeCut(*_NOTHING, 1.0)
    return window_cut(blocks, numel, 0, max(1, int(density * numel)), descending=True, rescale=rescale)


def outlier_cut(blocks: Callable[[], Iterable[Tensor]], numel: int, density: float, gamma: float,
                rescale: bool) -> MagnitudeCut:
    """Model Breadcrumbs' :func:`window_cut`: the ``int(gamma * numel)`` entries of largest
    magnitude dropped and then the smallest, so that ``int(density * numel)`` remain (fewer
    outliers go when both cannot be met)."""
    keep, top = int(density * numel), int(gamma * numel)
    bottom = max(0, numel - keep - top)
    return window_cut(blocks, numel, bottom, bottom + keep, descending=False, rescale=rescale)


def magnitude_prune(delta: Tensor, density: float, rescale: bool, generator: torch.Generator | None = None) -> Tensor:
    """Keep the ``max(1, int(density * numel))`` entries of largest ``|delta|`` (none if
    ``density <= 0``), as mergekit chooses them (:func:`magnitude_cut`)."""
    if density >= 1:
        return delta
    # The cut without its rescale: the pruned delta is at hand here, so it is measured once.
    pruned = magnitude_cut(lambda: [delta], delta.numel(), density, rescale=False).apply(delta)[0]
    return _rescale_l1(delta, pruned) if rescale else pruned


# random (DARE)


@dataclass(frozen=True)
class RandomCut:
    """DARE's (or DELLA's) pruning of one delta read a block of rows at a time: the masks drawn
    for the blocks in order (as booleans: a quarter of the delta's float32 size, where drawing them
    again would cost as much as the first draw), and the L1 rescale factor ``scale``."""

    masks: deque[Tensor]
    scale: float

    def apply(self, block: Tensor, before: int = 0) -> tuple[Tensor, int]:
        """The pruned next block of rows, and its count of entries (as :meth:`MagnitudeCut.apply`;
        the blocks must come in the order they were drawn)."""
        pruned = block.to(_random_dtype(block)) * self.masks.popleft()
        return (pruned if self.scale == 1.0 else pruned * self.scale).to(block.dtype), block.numel()


def random_cut(blocks: Callable[[], Iterable[Tensor]], density: float, rescale: bool,
               generator: torch.Generator) -> RandomCut:
    """:class:`RandomCut` of a delta read as row blocks by ``blocks()``: each block's mask drawn from
    ``generator`` in order (leaving it where pruning the whole delta would), with the L1 sums."""
    masks, before, after = deque(), [], []
    for block in blocks():
        work = _random_dtype(block)
        mask = torch.bernoulli(torch.full_like(block, density, dtype=work), generator=generator)
        if rescale:
            before.append(_l1(block.to(work)))
            after.append(_l1(block.to(work) * mask))
        masks.append(mask.bool())
    return RandomCut(masks, _l1_scale(torch.cat(before), torch.cat(after)) if rescale else 1.0)


def random_prune(delta: Tensor, density: float, rescale: bool, generator: torch.Generator | None = None) -> Tensor:
    """Keep each entry independently with probability ``density`` (DARE)."""
    if density >= 1:
        return delta
    work = _random_dtype(delta)
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
    pruned = delta.to(work) * mask
    return (_rescale_l1(delta.to(work), pruned) if rescale else pruned).to(delta.dtype)


# magnitude outliers (Model Breadcrumbs)


def outlier_prune(delta: Tensor, density: float, rescale: bool, gamma: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Drop the ``int(gamma * numel)`` entries of largest ``|delta|`` and then the smallest, so
    that ``int(density * numel)`` remain, as mergekit chooses them (:func:`outlier_cut`)."""
    if density >= 1:
        return delta
    pruned = outlier_cut(lambda: [delta], delta.numel(), density, gamma, rescale=False).apply(delta)[0]
    return _rescale_l1(delta, pruned) if rescale else pruned


# magnitude-ranked random pruning (DELLA's MagPrune)


def _della_mask(rows: Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> Tensor:
    """DELLA's mask of ``rows`` (at least 2-D), drawn from ``generator``: each entry kept
    with a probability linear in its magnitude's rank along dim 1, from ``density - epsilon`` to
    ``density + epsilon``. Rows along dim 0 are independent (and their masks drawn in order), so
    blocks of them drawn in turn give the whole's."""
    work = _random_dtype(rows)
    # rank 1 for the smallest magnitude of each row: the inverse of the sorting permutation
    rank = rows.abs().argsort(dim=1).argsort(dim=1).to(work) + 1
    lowest, highest = rank.min(dim=1, keepdim=True).values, rank.max(dim=1, keepdim=True).values
    spread = ((rank - lowest) / (highest - lowest)).clamp(0, 1)
    return torch.bernoulli((density - epsilon) + spread * 2 * epsilon, generator=generator).to(work)


def _della_draw(rows: Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> Tensor:
    """``rows`` pruned by :func:`_della_mask`."""
    mask = _della_mask(rows, density, epsilon, generator)
    return rows.to(mask.dtype) * mask


def _check_della(density: float, epsilon: float) -> None:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeParameterError(
            f"della needs 0 < density - epsilon and density + epsilon < 1, got density {density} and epsilon "
            f"{epsilon}; lower epsilon (default 0.15) or move density away from 0 and 1")


def della_prune(delta: Tensor, density: float, rescale: bool, epsilon: float,
                generator: torch.Generator | None = None) -> Tensor:
    """Keep each entry with a probability from ``density - epsilon`` (smallest ``|delta|`` of
    its row) to ``density + epsilon`` (largest), linear in its magnitude's rank within the row
    (along dim 1; a vector is one row); then, with ``rescale``, restore the L1 norm.

    Raises:
        MergeParameterError: ``density +/- epsilon`` leaves ``(0, 1)``.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    _check_della(density, epsilon)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    pruned = _della_draw(rows, density, epsilon, generator)
    if rescale:
        pruned = _rescale_l1(rows.to(pruned.dtype), pruned)
    return pruned.to(delta.dtype).reshape(delta.shape)


def della_cut(blocks: Callable[[], Iterable[Tensor]], density: float, epsilon: float, rescale: bool,
              generator: torch.Generator) -> RandomCut | MagnitudeCut:
    """DELLA's pruning of a delta (at least 2-D) read as row blocks by ``blocks()``, as a
    :class:`RandomCut` (``density <= 0``: a cut keeping nothing)."""
    if density <= 0:
        return MagnitudeCut(*_NOTHING, 1.0)
    _check_della(density, epsilon)
    masks, before, after = deque(), [], []
    for block in blocks():
        mask = _della_mask(block, density, epsilon, generator)
        if rescale:
            rows = block.to(mask.dtype)
            before.append(_l1(rows))
            after.append(_l1(rows * mask))
        masks.append(mask.bool())
    return RandomCut(masks, _l1_scale(torch.cat(before), torch.cat(after)) if rescale else 1.0)
