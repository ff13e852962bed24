"""The torch auction against scipy's exact assignment (and on a GPU when there is one)."""

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from merge_graphs.assignment import EPS_FLOOR, auction
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
