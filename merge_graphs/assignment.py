"""The assignment problem at LLM widths: on candidate pairs on a CPU, by auction on a GPU.

scipy's dense ``linear_sum_assignment`` is exact but runs on one CPU core and takes seconds to
tens of seconds at LLM widths (an MLP group of 5632 units: 3 s on weight similarities, 10 s on
GNN embeddings, whose low-rank similarities are full of near-ties). Two ways round it:

* :func:`candidate_assignment` (CPU, exact) solves the problem on each unit's best few
  partners only (scipy's sparse matching), then *proves* the answer optimal for the whole
  matrix: dual prices are read off the sparse solution (shortest paths) and every pair is
  checked against them; a pair that would improve the matching joins the candidates and the
  sparse problem is solved again. It returns scipy's optimum (to float64 rounding), or
  ``None`` when the candidates cannot give it cheaply (then the dense solver runs).
  :func:`merge_graphs.match.solve`'s ``"exact"`` takes it from :data:`CANDIDATES_FROM` units.
* :func:`auction` solves the same problem with Bertsekas' auction algorithm, every unassigned
  unit bidding at once (the Jacobi form, a few tensor operations a round), with epsilon
  scaling: each phase ends in a permutation whose objective is within ``n * eps`` of the
  optimum, so the last phase's ``eps`` (relative to the similarity's range) bounds how far the
  result may fall short of scipy's optimum; it is scipy's permutation whenever the best one is
  clear by more than that. It always returns a permutation. On a CPU scipy is faster (n = 4096
  random costs, one thread: about 3 s against 4.6 s), so :func:`merge_graphs.match.solve`'s
  ``"auto"`` keeps scipy there and takes the auction for similarities on a GPU, where a round
  is a few kernel launches whatever ``n``.
"""
from __future__ import annotations

import logging

import numpy as np
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


#: Units from which ``solve(..., "exact")`` tries :func:`candidate_assignment` first: below it
#: the dense solver takes milliseconds (n = 512: 20 ms).
CANDIDATES_FROM = 1024
#: Each unit's best partners, as a row and as a column, that start the candidate pairs.
CANDIDATES = 32
#: Rounds of adding the pairs that break the optimality check before giving up on candidates.
MAX_ROUNDS = 4
#: Relative to the similarity's largest magnitude: a pair breaks the check by more than this,
#: and a shortest-path relaxation counts when it improves a price by more than ``SLACK / 1000``
#: (float64 rounding must not make a zero-weight cycle look negative).
SLACK = 1e-10
#: Entries of the dense matrix handled at a time by the check and the column candidates (64 MB).
CHUNK = 1 << 23
#: Relaxation rounds the prices get to settle (they took 90-210 on a 1.1B model's 5632-unit groups;
#: past this the dense solver is the cheaper way to an answer).
MAX_PRICE_ROUNDS = 2000


def candidate_assignment(similarity: np.ndarray, k: int = CANDIDATES) -> np.ndarray | None:
    """The optimal assignment of a square ``similarity`` found on candidate pairs, or ``None``.

    Starts from each row's and each column's ``k`` best pairs, solves that sparse problem
    exactly (``scipy.sparse.csgraph.min_weight_full_bipartite_matching``) and certifies it by
    linear-programming duality: prices ``v`` for B's units are shortest-path distances in the
    sparse problem's residual graph, ``u_i`` follows from row ``i``'s matched pair, and the
    matching is optimal for the dense matrix when no pair has ``s_ij > u_i + v_j`` (up to
    :data:`SLACK`). Pairs that do are added and the sparse problem solved again.

    Returns:
        ``cols`` with ``cols[i]`` B's unit matched to A's unit ``i`` (maximizing the sum), or
        ``None`` when the candidates have no full matching, the check keeps failing after
        :data:`MAX_ROUNDS` rounds, or too many pairs fail it: then solve densely.

    Example:
        >>> import numpy as np
        >>> s = np.random.default_rng(0).standard_normal((1500, 1500))
        >>> from scipy.optimize import linear_sum_assignment
        >>> bool((candidate_assignment(s) == linear_sum_assignment(s, maximize=True)[1]).all())
        True
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    s = torch.from_numpy(np.ascontiguousarray(similarity, dtype=np.float64))
    n = s.shape[0]
    scale = max(float(s.abs().max()), 1e-300)
    rows, cols = _best_pairs(s, min(k, n))
    for _ in range(MAX_ROUNDS):
        pairs = torch.unique(rows * n + cols)
        rows, cols = pairs // n, pairs % n
        weight = s[rows, cols]
        # scipy minimizes positive weights: flip and shift by the matrix's own scale (the same shift for
        # every row, so the same optimum, at float64's resolution whatever the similarities' magnitude).
        biadjacency = csr_matrix(((weight.max() - weight + scale).numpy(), (rows.numpy(), cols.numpy())),
                                 shape=(n, n))
        try:
            matched = torch.from_numpy(min_weight_full_bipartite_matching(biadjacency)[1])
        except ValueError:  # the candidates have no full matching
            return None
        v = _prices(s, rows, cols, matched, scale)
        if v is None:
            return None
        u = -s[torch.arange(n), matched] - v[matched]
        bad_rows, bad_cols = _violations(s, u, v, SLACK * scale)
        logger.debug("candidate assignment: n=%d, %d candidate pairs, %d fail the check", n, len(pairs),
                     bad_rows.numel())
        if bad_rows.numel() == 0:
            return matched.numpy().astype(np.int64)
        if bad_rows.numel() > k * n:
            return None
        rows, cols = torch.cat([rows, bad_rows]), torch.cat([cols, bad_cols])
    return None


def _best_pairs(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of every row's ``k`` largest entries and every column's."""
    n = s.shape[0]
    by_row = s.topk(k, dim=1).indices
    step = max(1, CHUNK // n)
    by_col = torch.cat([s[:, j:j + step].topk(k, dim=0).indices.T for j in range(0, n, step)])
    return (torch.cat([torch.arange(n).repeat_interleave(k), by_col.reshape(-1)]),
            torch.cat([by_row.reshape(-1), torch.arange(n).repeat_interleave(k)]))


def _prices(s, rows, cols, matched, scale: float) -> torch.Tensor | None:
    """Shortest-path distances in the residual graph over B's units (Bellman-Ford from a virtual
    source joined to every unit at 0): moving row ``i`` from its unit ``matched[i]`` to ``j``
    costs ``s[i, matched[i]] - s[i, j]``. ``None`` if they do not settle within :data:`MAX_PRICE_ROUNDS`
    rounds (or ``n``, after which only a negative cycle would keep them moving)."""
    n = s.shape[0]
    start = matched[rows]
    moves = cols != start
    src, dst = start[moves], cols[moves]
    cost = s[rows[moves], src] - s[rows[moves], dst]
    d = torch.zeros(n, dtype=s.dtype)
    for _ in range(min(n, MAX_PRICE_ROUNDS)):
        better = d.scatter_reduce(0, dst, d[src] + cost, "amin")
        if not bool((better < d - SLACK * scale / 1000).any()):
            return d
        d = better
    return None


def _violations(s, u, v, slack: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs with ``s_ij + u_i + v_j > slack``, the dense matrix read a block of rows at a time."""
    n = s.shape[0]
    step = max(1, CHUNK // n)
    found_rows, found_cols = [], []
    for i in range(0, n, step):
        block = s[i:i + step] + u[i:i + step, None]
        block += v
        r, c = (block > slack).nonzero(as_tuple=True)
        found_rows.append(r + i)
        found_cols.append(c)
    return torch.cat(found_rows), torch.cat(found_cols)
