"""The assignment solvers against scipy's dense exact assignment: the candidate-pair solver (exact,
or no answer), the torch auction (and on a GPU when there is one)."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import merge_graphs.assignment as assignment
from merge_graphs.assignment import EPS_FLOOR, auction, candidate_assignment
from merge_graphs.match import solve


def exact(similarity: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(linear_sum_assignment(similarity.double().cpu().numpy(), maximize=True)[1])


def score(similarity: torch.Tensor, perm: torch.Tensor) -> float:
    s = similarity.double().cpu()
    return float(s[torch.arange(len(perm)), perm.cpu()].sum())


def assert_permutation(perm: torch.Tensor, n: int) -> None:
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(perm.sort().values.cpu(), torch.arange(n))


def planted(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities of A's units to a shuffled copy of them, plus noise, and the shuffle's inverse."""
    g = torch.Generator().manual_seed(seed)
    units = torch.randn(n, 64, generator=g)
    shuffle = torch.randperm(n, generator=g)
    b = units[shuffle] + noise * torch.randn(n, 64, generator=g)
    return units @ b.T, torch.argsort(shuffle)


@pytest.mark.parametrize("n", [2, 7, 64, 300])
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_planted_permutation_is_recovered_like_scipy(n, noise):
    similarity, truth = planted(n, noise, seed=n)
    found = auction(similarity)
    assert_permutation(found, n)
    assert torch.equal(found, exact(similarity))
    assert torch.equal(found, truth)


@pytest.mark.parametrize("n", [5, 50, 400])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_costs_reach_scipys_objective(n, seed):
    # Pure noise: many near-optimal permutations, the hardest case for a bidding algorithm.
    similarity = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    found = auction(similarity)
    assert_permutation(found, n)
    span = float(similarity.max() - similarity.min())
    best = score(similarity, exact(similarity))
    assert best - score(similarity, found) <= n * EPS_FLOOR * span * 1.01 + 1e-9


def test_one_unit_and_constant_similarity():
    assert auction(torch.tensor([[3.0]])).tolist() == [0]
    assert auction(torch.zeros(0, 0)).tolist() == []
    assert_permutation(auction(torch.full((9, 9), 2.5)), 9)


def test_ties_still_give_a_permutation_of_best_score():
    # Every row prefers the same two columns equally: heavy ties in bids and in prices.
    similarity = torch.zeros(12, 12)
    similarity[:, :2] = 1.0
    similarity[3, 5] = 1.0
    found = auction(similarity)
    assert_permutation(found, 12)
    assert score(similarity, found) == pytest.approx(score(similarity, exact(similarity)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    similarity, truth = planted(128, 0.2, seed=3)
    found = auction(similarity.to(dtype))
    assert_permutation(found, 128)
    assert torch.equal(found, truth)


def test_refuses_what_is_not_a_finite_square():
    with pytest.raises(ValueError, match="square"):
        auction(torch.zeros(3, 4))
    bad = torch.zeros(3, 3)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        auction(bad)


def test_solve_dispatches_torch_and_auto():
    similarity, truth = planted(40, 0.1, seed=5)
    assert torch.equal(solve(similarity, "torch"), truth)
    # On CPU, auto is scipy's exact assignment.
    assert torch.equal(solve(similarity, "auto"), truth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("n", [64, 2048])
def test_gpu_auction_agrees_with_scipy(n):
    similarity, truth = planted(n, 0.3, seed=n)
    on_gpu = auction(similarity.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), exact(similarity))
    assert torch.equal(on_gpu.cpu(), truth)
    assert torch.equal(solve(similarity.cuda(), "auto"), truth)
    noise = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    span = float(noise.max() - noise.min())
    gap = score(noise, exact(noise)) - score(noise, auction(noise.cuda()))
    assert gap <= n * EPS_FLOOR * span * 1.01 + 1e-6


def low_rank(n: int, dim: int, seed: int) -> np.ndarray:
    """Cosine similarities of ``dim``-d unit vectors and noisy shuffled copies: GNN embeddings' kind
    of matrix, low rank and full of near-ties (where scipy's dense solver is slowest)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    b = torch.nn.functional.normalize(a[torch.randperm(n, generator=g)] + 0.8 * torch.randn(n, dim, generator=g), dim=1)
    return (a @ b.T).double().numpy()


def dense_optimum(s: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(s, maximize=True)[1]


def total(s: np.ndarray, cols: np.ndarray) -> float:
    return float(s[np.arange(len(s)), cols].sum())


@pytest.mark.parametrize("kind", ["random", "low-rank", "weight-like"])
def test_candidate_pairs_give_scipys_optimum(kind):
    rng = np.random.default_rng(1)
    n = 1100
    if kind == "random":
        s = rng.standard_normal((n, n))
    elif kind == "low-rank":
        s = low_rank(n, 48, seed=2)
    else:  # a Gram matrix of two weight matrices, as weight matching builds
        w = rng.standard_normal((n, 96))
        s = w @ (w[rng.permutation(n)] + rng.standard_normal((n, 96))).T
    found = candidate_assignment(s)
    assert found is not None and found.dtype == np.int64
    best = dense_optimum(s)
    assert total(s, found) == pytest.approx(total(s, best), rel=1e-12)
    assert np.array_equal(found, best)  # continuous entries: the optimum is unique


def test_pairs_that_break_the_optimality_check_join_the_candidates(monkeypatch):
    checks = []
    real = assignment._violations

    def counted(*args):
        rows, cols = real(*args)
        checks.append(rows.numel())
        return rows, cols

    monkeypatch.setattr(assignment, "_violations", counted)
    s = np.random.default_rng(0).standard_normal((300, 300))
    # Four partners each: the first sparse optimum is not the dense one, so pairs are added.
    found = candidate_assignment(s, k=4)
    assert len(checks) >= 2 and checks[0] > 0 and checks[-1] == 0
    assert np.array_equal(found, dense_optimum(s))


def test_no_answer_rather_than_a_wrong_one(monkeypatch):
    rng = np.random.default_rng(0)
    # One partner each: row 0..n-1 mostly want the same few columns, no full matching among them.
    assert candidate_assignment(np.add.outer(np.zeros(300), np.r_[100.0, np.zeros(299)]), k=1) is None
    # Too many pairs break the check for candidates to pay.
    assert candidate_assignment(rng.standard_normal((300, 300)), k=2) is None
    # Tied rows (dead units) leave some rows without candidates.
    tied = np.repeat(rng.standard_normal((30, 300)), 10, axis=0)
    assert candidate_assignment(tied, k=4) is None
    # Prices that have not settled certify nothing.
    s = rng.standard_normal((300, 300))
    assert np.array_equal(candidate_assignment(s, k=8), dense_optimum(s))
    monkeypatch.setattr(assignment, "MAX_PRICE_ROUNDS", 1)
    assert candidate_assignment(s, k=8) is None


def test_exact_solve_takes_candidates_from_the_threshold_and_falls_back(monkeypatch):
    used = []
    real = assignment.candidate_assignment

    def spy(s, *args):
        used.append(len(s))
        return real(s, *args)

    monkeypatch.setattr(assignment, "candidate_assignment", spy)
    rng = np.random.default_rng(3)
    small, large = rng.standard_normal((300, 300)), rng.standard_normal((assignment.CANDIDATES_FROM,) * 2)
    assert torch.equal(solve(torch.from_numpy(small)), torch.as_tensor(dense_optimum(small)))
    assert torch.equal(solve(torch.from_numpy(large)), torch.as_tensor(dense_optimum(large)))
    assert used == [assignment.CANDIDATES_FROM]
    # Where candidates give no answer (32 copies of each row: dead units), the dense solver's optimum comes back.
    tied = np.repeat(rng.standard_normal((32, 1024)), 32, axis=0)
    assert real(tied) is None
    found = solve(torch.from_numpy(tied)).numpy()
    assert used[-1] == 1024 and len(used) == 2 and total(tied, found) == pytest.approx(total(tied, dense_optimum(tied)), rel=1e-12)
    # Non-finite similarities get scipy's own error, not a candidate search.
    tied[0, 0] = np.nan
    with pytest.raises(ValueError, match="invalid numeric entries"):
        solve(torch.from_numpy(tied))
    assert len(used) == 2


@pytest.mark.parametrize("scale", [1e-12, 1e8])
def test_candidate_pairs_work_at_any_scale_of_similarity(scale):
    s = np.random.default_rng(5).standard_normal((1100, 1100)) * scale
    assert np.array_equal(candidate_assignment(s), dense_optimum(s))
