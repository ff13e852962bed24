"""Matching: solvers agree, permuted copies are recovered exactly, refinement never hurts."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import FACTORIES, make

import merge_graphs as mg
from merge_graphs.match import objective, solve, transport_plan, weight_matching


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_emd_and_assignment_give_the_same_matching(n, seed):
    sim = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact, emd = solve(sim, "exact"), solve(sim, "emd")
    # Ties aside, the optimum is unique; compare the value, then the matching itself.
    rows = torch.arange(n)
    assert sim[rows, exact].sum() == pytest.approx(sim[rows, emd].sum().item(), abs=1e-9)
    assert torch.equal(exact, emd)


def test_solvers_recover_a_planted_permutation():
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(50, generator=g)
    sim = torch.eye(50)[perm] * 5 + 0.1 * torch.randn(50, 50, generator=g)
    for solver in ("exact", "emd", "sinkhorn"):
        assert torch.equal(solve(sim, solver), perm), solver
    with pytest.raises(ValueError, match="unknown solver"):
        solve(sim, "hungarian")
    with pytest.raises(ValueError, match="transport_plan"):
        solve(sim[:, :10])


def test_transport_plan_has_uniform_marginals():
    sim = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    for kwargs in ({}, {"reg": 0.05}):
        plan = transport_plan(sim, **kwargs)
        assert plan.shape == (6, 9)
        np.testing.assert_allclose(plan.sum(1), np.full(6, 1 / 6), atol=1e-4)
        np.testing.assert_allclose(plan.sum(0), np.full(9, 1 / 9), atol=1e-4)


@pytest.mark.parametrize("solver", ["exact", "emd"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_weight_matching_recovers_a_permuted_copy(name, solver):
    model = make(name)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=5)
    shuffled = mg.permute(model, perms, spec)
    found = weight_matching(spec, model.state_dict(), shuffled.state_dict(), solver=solver)
    expected = mg.invert_permutations(spec, perms)
    for group in spec.groups:
        assert torch.equal(found.permutations[group], expected[group]), group
    assert found.objective_after > found.objective_before
    aligned = found.apply(shuffled.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(aligned[k], v), k


@pytest.mark.parametrize("name", ["mlp", "bert-seqcls", "gpt2-lm", "llama-lm", "vit-cls", "clip"])
def test_a_model_matched_with_itself_gives_the_identity(name):
    model = make(name)
    spec = mg.symmetry_spec(model)
    found = weight_matching(spec, model.state_dict(), model.state_dict())
    for group, p in mg.identity_permutations(spec).items():
        assert torch.equal(found.permutations[group], p), group
    assert found.iterations == 1


def test_refinement_starts_from_init_and_never_lowers_the_objective():
    a, b = make("gpt2-lm", seed=0), make("gpt2-lm", seed=1)
    spec = mg.symmetry_spec(a)
    init = mg.random_permutations(spec, seed=3)
    start, _ = objective(spec, a.state_dict(), b.state_dict(), init)
    refined = weight_matching(spec, a.state_dict(), b.state_dict(), init=init)
    assert refined.objective_before == pytest.approx(start)
    assert refined.objective_after >= start
    assert set(refined.summary()) == set(spec.groups)


def test_unscored_coordinate_ascent_finds_weight_matchings_permutations_and_reads_less():
    """Orthogonal weight matching runs the coordinate ascent once a round without weight matching's two
    scoring passes: the same permutations and sweeps, and no read of a tensor beyond the sweeps' own."""
    from merge_graphs.match import coordinate_ascent

    a, b = make("llama-lm", seed=0), make("llama-lm", seed=1)
    spec = mg.symmetry_spec(a)
    init = mg.random_permutations(spec, seed=3)

    class Counted(dict):
        reads = 0

        def __getitem__(self, name):
            Counted.reads += 1
            return super().__getitem__(name)

    scored = weight_matching(spec, a.state_dict(), Counted(b.state_dict()), init=init, seed=2)
    scored_reads, Counted.reads = Counted.reads, 0
    perms, sweeps = coordinate_ascent(spec, a.state_dict(), Counted(b.state_dict()), init=init, seed=2)
    assert sweeps == scored.iterations
    assert all(torch.equal(perms[g], scored.permutations[g]) for g in spec.groups)
    assert Counted.reads == scored_reads - 2 * len(spec.tensors)


def test_matching_a_subset_of_groups_leaves_the_others_alone():
    model = make("bert")
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=6)
    shuffled = mg.permute(model, perms, spec)
    found = weight_matching(spec, model.state_dict(), shuffled.state_dict(), groups=["layers.0.mlp"])
    assert torch.equal(found.permutations["residual"], torch.arange(24))
    with pytest.raises(ValueError, match="unknown groups"):
        weight_matching(spec, model.state_dict(), shuffled.state_dict(), groups=["nope"])


@pytest.mark.parametrize("family", ["llama-lm", "gpt2-lm", "bert", "mlp", "vit-cls", "clip"])
def test_weight_matching_stops_at_a_coordinate_optimum_and_skips_unchanged_subproblems(family, monkeypatch):
    # Groups whose inputs did not change since their last solve are skipped; the result must
    # still be a fixed point of coordinate descent: solving any block again improves nothing.
    from merge_graphs import match

    a, b = make(family, seed=0), make(family, seed=1)
    spec = mg.symmetry_spec(a)
    calls = []
    start = match._start_block
    monkeypatch.setattr(match, "_start_block", lambda *args: calls.append(args[4]) or start(*args))
    found = weight_matching(spec, a.state_dict(), b.state_dict())
    roots = [g for g in spec.groups if spec.groups[g].parent is None]
    assert len(calls) < found.iterations * len(roots)
    for g in roots:
        children = [c for c, grp in spec.groups.items() if grp.parent == g]
        _, old, new = match._match_block(spec, a.state_dict(), b.state_dict(), found.permutations, g, children, "exact")
        assert new <= old + 1e-6 * max(abs(old), 1.0), g


@pytest.mark.parametrize("family", ["llama-lm", "gpt2-lm", "bert"])
def test_bfloat16_tensors_match_like_their_float32_values(family, monkeypatch):
    # bf16 checkpoints are matched in float32 a block at a time (no float32 copy of a whole
    # embedding); a small block makes every tensor here take several blocks.
    from merge_graphs import match

    a, b = ({k: v.bfloat16() for k, v in make(family, seed=s).state_dict().items()} for s in (0, 1))
    spec = mg.symmetry_spec(make(family))
    exact = weight_matching(spec, {k: v.float() for k, v in a.items()}, {k: v.float() for k, v in b.items()})
    monkeypatch.setattr(match, "BLOCK", 64)
    blocked = weight_matching(spec, a, b)
    for g, p in exact.permutations.items():
        assert torch.equal(blocked.permutations[g], p), g
    assert blocked.objective_after == pytest.approx(exact.objective_after, rel=1e-5)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("family", ["llama-lm", "gpt2-lm", "bert"])
def test_assignments_running_beside_the_next_similarity_give_the_sequential_result(family, workers, monkeypatch):
    # Plain coordinate descent, one block solved and applied after the other, against
    # weight_matching, where blocks' assignments run in worker threads (slowed down here) while
    # the next blocks start: those that read a running group must wait for it.
    import time

    from merge_graphs import match

    monkeypatch.setattr(match, "ASSIGNMENT_WORKERS", workers)

    a, b = make(family, seed=0).state_dict(), make(family, seed=1).state_dict()
    spec = mg.symmetry_spec(make(family))
    roots = [g for g in spec.groups if spec.groups[g].parent is None]
    children = {g: [c for c, grp in spec.groups.items() if grp.parent == g] for g in roots}
    perms, gen = mg.symmetry.identity_permutations(spec), torch.Generator().manual_seed(3)
    for sweeps in range(1, 100):
        improved = False
        for i in torch.randperm(len(roots), generator=gen).tolist():
            found, old, new = match._match_block(spec, a, b, perms, roots[i], children[roots[i]], "exact")
            if new > old + 1e-6 * max(abs(old), 1.0):
                perms.update(found)
                improved = True
        if not improved:
            break
    solve_array = match._solve_array
    monkeypatch.setattr(match, "_solve_array", lambda *args: time.sleep(0.01) or solve_array(*args))
    overlapped = weight_matching(spec, a, b, seed=3)
    assert overlapped.iterations == sweeps
    for g, p in perms.items():
        assert torch.equal(overlapped.permutations[g], p), g


def test_independent_assignments_run_at_once_and_give_the_one_worker_result(monkeypatch):
    # GNN matching's groups read nothing of each other (each is matched on its own embeddings):
    # with two workers two assignments are in flight at a time, never more.
    import threading
    import time

    from merge_graphs import match

    a, b = make("llama-lm", seed=0), make("llama-lm", seed=1)
    solve_array, changed = match._solve_array, threading.Condition()
    running, most = [0], [0]

    def slow(*args):
        if not threading.current_thread().name.startswith("assignment"):
            return solve_array(*args)  # attention heads, matched in the calling thread
        with changed:
            running[0] += 1
            most[0] = max(most[0], running[0])
            changed.notify_all()
            # Until two have been seen at once, the first assignment waits for a second one (with two
            # workers it comes, however slow the machine; with one it cannot: the wait times out once),
            # so the count does not hang on timing. Then a stay, so that a third would be seen too.
            if not gave_up[0] and not changed.wait_for(lambda: most[0] >= 2,
                                                       timeout=30 if workers_now[0] > 1 else 0.2):
                gave_up[0] = True
        time.sleep(0.2)
        with changed:
            running[0] -= 1
        return solve_array(*args)

    monkeypatch.setattr(match, "_solve_array", slow)
    found, workers_now, gave_up = {}, [1], [False]
    for workers in (1, 2):
        monkeypatch.setattr(match, "ASSIGNMENT_WORKERS", workers)
        most[0], workers_now[0], gave_up[0] = 0, workers, False
        found[workers] = mg.align(a, b, "gnn")
        assert most[0] == workers
    for g, p in found[1].permutations.items():
        assert torch.equal(found[2].permutations[g], p), g


@pytest.mark.parametrize("family", ["gpt2-lm", "llama-lm", "mixtral-lm"])
def test_every_assignment_on_candidate_pairs_gives_the_dense_result(family, monkeypatch):
    import merge_graphs.assignment as assignment

    a, b = make(family, seed=0), make(family, seed=1)
    spec = mg.symmetry_spec(a)
    dense = weight_matching(spec, a.state_dict(), b.state_dict())
    calls = []
    real = assignment.candidate_assignment
    monkeypatch.setattr(assignment, "CANDIDATES_FROM", 2)
    monkeypatch.setattr(assignment, "candidate_assignment", lambda s: calls.append(real(s)) or calls[-1])
    on_candidates = weight_matching(spec, a.state_dict(), b.state_dict())
    assert calls and any(c is not None for c in calls)
    for g in spec.groups:
        assert torch.equal(on_candidates.permutations[g], dense.permutations[g]), g
    assert on_candidates.objective_after == pytest.approx(dense.objective_after, rel=1e-9)
