"""The ``finetune`` suite's CI smoke run: two 3-step fine-tunes of MiniLM-L6, alignment, mergekit absent."""

import json

import pytest

from merge_graphs.lab.bench import main
from merge_graphs.lab.bench.mergekit import MergekitUnavailable


@pytest.mark.slow
def test_finetune_suite_quick_without_mergekit(tmp_path, capsys, monkeypatch):
    # No network at test time: mergekit's environment is "unavailable", and the run must still pass.
    def no_env(venv=None):
        raise MergekitUnavailable("no package index in tests")

    monkeypatch.setattr("merge_graphs.lab.bench.mergekit.mergekit_env", no_env)
    assert main(["finetune", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "bench-finetune.json").read_text(encoding="utf-8"))
    assert set(report["finetunes"]) == {"returns", "calls"}
    # Two fine-tunes of one checkpoint: weight matching must leave every unit where it is, in every kind
    # of group (the README: 100%).
    assert set(report["alignments"]) == {"weight", "activation"}
    assert set(report["alignments"]["weight"]["in_place"].values()) == {1.0}
    for row in report["alignments"].values():
        kinds = [v for k, v in row["in_place"].items() if k != "all"]
        assert {"residual", "mlp"} <= set(row["in_place"])
        # the overall fraction is a mean over the units of every kind
        assert min(kinds) <= row["in_place"]["all"] <= max(kinds)
    assert report["vs_mergekit"]["skipped"].startswith("no mergekit environment")
    assert (tmp_path / "finetune" / "merged-ours" / "model.safetensors").is_file()
    table = capsys.readouterr().out
    assert "fraction of units left in place" in table and "skipped" in table


def test_identity_fractions_counts_units_in_place():
    import torch

    from merge_graphs import random_permutations, symmetry_spec
    from merge_graphs.lab.bench.finetune import identity_fractions
    from merge_graphs.match import Alignment
    from merge_graphs.symmetry import identity_permutations

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    spec = symmetry_spec(mlp)
    assert identity_fractions(Alignment(spec, identity_permutations(spec), "none")) == {"all": 1.0, "0": 1.0}
    moved = identity_fractions(Alignment(spec, random_permutations(spec, seed=0), "none"))
    assert moved["all"] < 1.0
