"""The assignment problem in torch, on whatever device the similarity is on.

scipy's ``linear_sum_assignment`` is exact but runs on one CPU core and takes tens of seconds
at LLM widths (an MLP group of 14336 units). :func:`auction` solves the same problem with
Bertsekas' auction algorithm, every unassigned unit bidding at once (the Jacobi form, a few
tensor operations a round), with epsilon scaling: each phase ends in a permutation whose
objective is within ``n * eps`` of the optimum, so the last phase's ``eps`` (relative to the
similarity's range) bounds how far the result may fall short of scipy's optimum; it is scipy's
permutation whenever the best one is clear by more than that. It always returns a permutation.

On a CPU scipy is faster (n = 4096 random costs, one thread: about 3 s against 4.6 s), so
:func:`merge_graphs.match.solve`'s ``"auto"`` keeps scipy there and takes the auction for
similarities on a GPU, where a round is a few kernel launches whatever ``n``.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: Each epsilon-scaling phase divides eps by this.
EPS_FACTOR = 10.0
#: The first phase's eps, relative to the similarity's range (the fastest of a few tried on
#: random n = 1024-4096 costs on CPU).
EPS_START = 0.003
#: float32 resolves a bid increment of a few ulps on prices near 1, not less: below it a bid
#: could leave a price unchanged and two rows would outbid each other forever.
EPS_FLOOR = 4 * torch.finfo(torch.float32).eps


def auction(similarity: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The permutation ``perm`` maximizing ``sum_i similarity[i, perm[i]]``, to within ``n * eps * range``.

    Runs on ``similarity``'s device, in float32 whatever its dtype (float16 and bfloat16 inputs
    are accumulated in float32).

    Args:
        similarity: ``(n, n)`` similarities between A's units (rows) and B's units (columns).
        eps: the last bidding increment, relative to the similarity's range (max minus min):
            the objective falls short of the optimum by at most ``n * eps * range``.
            float32 sets a floor of about 5e-7 on it.

    Returns:
        A ``LongTensor`` of ``n`` distinct column indices, on ``similarity``'s device.

    Example:
        >>> import torch
        >>> auction(torch.tensor([[0., 1., 0.], [0., 0., 1.], [1., 0., 0.]])).tolist()
        [1, 2, 0]
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"auction needs a square similarity, got shape {tuple(similarity.shape)}")
    n, device = similarity.shape[0], similarity.device
    if n <= 1:
        return torch.zeros(n, dtype=torch.long, device=device)
    benefit = similarity.detach().float()
    if not torch.isfinite(benefit).all():
        raise ValueError("auction needs finite similarities (found NaN or inf)")
    low, high = benefit.min(), benefit.max()
    span = float(high - low)
    if span == 0.0:
        return torch.arange(n, device=device)
    # Benefits in [0, 1]: eps and prices mean the same at every scale, and float32 resolves them.
    benefit = (benefit - low) / span
    eps_final = max(eps, EPS_FLOOR)
    prices = torch.zeros(n, device=device)
    owner = torch.full((n,), -1, dtype=torch.long, device=device)
    step = max(EPS_START, eps_final)
    rounds = 0
    while True:
        rounds += _auction_phase(benefit, prices, owner, step)
        if step <= eps_final:
            break
        step = max(step / EPS_FACTOR, eps_final)
        # Prices only matter up to a constant; keep them near [0, 1] where float32 resolves eps.
        prices -= prices.min()
    logger.debug("auction: n=%d, %d bidding rounds, final eps %.3g", n, rounds, step)
    perm = torch.empty(n, dtype=torch.long, device=device)
    perm[owner] = torch.arange(n, device=device)
    return perm


def _auction_phase(benefit: torch.Tensor, prices: torch.Tensor, owner: torch.Tensor, eps: float) -> int:
    """One epsilon phase: bid until every row owns a column (``owner[j]`` is column ``j``'s row).

    ``prices`` and ``owner`` are updated in place and carried to the next phase (that is what
    makes scaling pay). Returns the number of bidding rounds.
    """
    n = benefit.shape[0]
    device = benefit.device
    rows = torch.arange(n, device=device)
    assigned = torch.full((n,), -1, dtype=torch.long, device=device)
    held = rows[owner >= 0]
    if held.numel():
        # A row keeps its column while that column is still within eps of the row's best;
        # the others bid again. Most pairs survive, so later phases bid for few rows.
        value = benefit[owner[held]] - prices
        keep = value[torch.arange(held.numel(), device=device), held] >= value.max(dim=1).values - eps
        owner[held[~keep]] = -1
        assigned[owner[held[keep]]] = held[keep]
    bidders = rows[assigned < 0]
    rounds = 0
    while bidders.numel():
        rounds += 1
        value = benefit[bidders] - prices
        top = value.topk(2, dim=1)
        target = top.indices[:, 0]
        # Each bidder raises its best column's price until the runner-up is as good, plus eps.
        bid = prices[target] + (top.values[:, 0] - top.values[:, 1]) + eps
        best = torch.full((n,), -torch.inf, device=device).scatter_reduce_(0, target, bid, "amax")
        won = bid == best[target]
        # Equal bids on one column: the highest row index takes it (any one will do).
        winner = torch.full((n,), -1, dtype=torch.long, device=device)
        winner.scatter_reduce_(0, target[won], bidders[won], "amax")
        sold = rows[winner >= 0]
        previous = owner[sold]
        assigned[previous[previous >= 0]] = -1
        owner[sold] = winner[sold]
        assigned[winner[sold]] = sold
        prices[sold] = best[sold]
        bidders = rows[assigned < 0]
    return rounds
