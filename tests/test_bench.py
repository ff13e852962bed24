"""The benchmark command's CI smoke runs: ``gpt2_suite(quick=True)`` (one pair, a few training steps) and
``mlp --quick`` (one pair of small digits MLPs)."""

import json
import math

import pytest

from merge_graphs.gnn.pretrained import WEIGHTS_DIR
from merge_graphs.lab.bench import METHODS, MLP_METHODS, gpt2_suite, main


@pytest.mark.slow
def test_gpt2_suite_quick(tmp_path, capsys):
    report = gpt2_suite(quick=True, out=tmp_path)
    written = json.loads((tmp_path / "bench-gpt2.json").read_text(encoding="utf-8"))
    assert written["settings"]["quick"] and written["settings"]["pairs"] == 1
    (pair,) = written["pairs"]
    assert set(pair["methods"]) == set(METHODS) == set(written["summary"])
    for name, row in pair["methods"].items():
        for key in ("barrier", "removed", "midpoint", "align_s"):
            assert math.isfinite(row[key]), (name, key, row[key])
        losses = row["curve"]["losses"]
        assert len(losses) == 11 and all(math.isfinite(v) for v in losses)
        # the reported barrier is the curve's largest excess over the line between its endpoints
        line = [losses[0] + i / 10 * (losses[-1] - losses[0]) for i in range(11)]
        assert row["barrier"] == pytest.approx(max(v - s for v, s in zip(losses, line)), abs=1e-9), name
    assert pair["methods"]["naive"]["barrier"] > 0
    # Folding (and rotating B) preserves each parent's function: the curve's endpoints are the parents' losses.
    for name in METHODS:
        losses = pair["methods"][name]["curve"]["losses"]
        assert losses[0] == pytest.approx(pair["loss_a"], abs=1e-4), name
        assert losses[-1] == pytest.approx(pair["loss_b"], abs=1e-4), name
    assert (tmp_path / "bench-gpt2.png").stat().st_size > 0
    assert report["summary"] == written["summary"]

    # The command reuses the cached models (identical training metadata) and prints the table.
    assert main(["gpt2", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    again = json.loads((tmp_path / "bench-gpt2.json").read_text(encoding="utf-8"))
    assert again["pairs"][0]["train_s"] == [None, None]
    assert again["pairs"][0]["loss_a"] == pair["loss_a"]
    table = capsys.readouterr().out
    assert all(name in table for name in METHODS) and "machine:" in table

    # Only the rows asked for (and naive), the GNN's from an encoder folder: the shipped one's gives the same row.
    assert main(["gpt2", "--quick", "--out", str(tmp_path), "--quiet", "--methods", "gnn",
                 "--encoder", str(WEIGHTS_DIR)]) == 0
    only = json.loads((tmp_path / "bench-gpt2.json").read_text(encoding="utf-8"))
    assert set(only["pairs"][0]["methods"]) == set(only["summary"]) == {"naive", "gnn"}
    assert only["settings"]["encoder"] == str(WEIGHTS_DIR)
    assert only["pairs"][0]["methods"]["gnn"]["barrier"] == pair["methods"]["gnn"]["barrier"]
    with pytest.raises(ValueError, match=r"unknown gpt2 rows \['typo'\]"):
        gpt2_suite(quick=True, out=tmp_path, methods=["gnn", "typo"])


def test_mlp_suite_quick(tmp_path, capsys, monkeypatch):
    # The rebasin row is optional (an external package): force its "not installed" path here.
    monkeypatch.setattr("merge_graphs.lab.bench.rebasin_baseline.unavailable", lambda: "not installed (test)")
    assert main(["mlp", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    written = json.loads((tmp_path / "bench-mlp.json").read_text(encoding="utf-8"))
    assert written["suite"] == "mlp" and written["settings"]["quick"] and written["settings"]["pairs"] == 1
    (pair,) = written["pairs"]
    assert set(pair["methods"]) == set(MLP_METHODS) == set(written["summary"])
    assert {"naive", "weight", "activation", "activation+weight", "gnn", "gnn+weight"} == set(MLP_METHODS)
    for key in ("loss_a", "loss_b", "acc_a", "acc_b"):
        assert math.isfinite(pair[key]), key
    for name, row in pair["methods"].items():
        for key in ("barrier", "removed", "midpoint", "midpoint_acc", "align_s"):
            assert math.isfinite(row[key]), (name, key, row[key])
        losses = row["curve"]["losses"]
        assert len(losses) == 11 and all(math.isfinite(v) for v in losses)
        # Permuting B's units preserves its function: the curve's endpoints are the parents' losses.
        assert losses[0] == pytest.approx(pair["loss_a"], abs=1e-5), name
        assert losses[-1] == pytest.approx(pair["loss_b"], abs=1e-5), name
        assert row["midpoint"] == pytest.approx(losses[5]), name
    assert pair["methods"]["naive"]["barrier"] > 0
    assert (tmp_path / "bench-mlp.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert all(name in table for name in MLP_METHODS) and "machine:" in table


@pytest.mark.slow
def test_minilm_suite_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the suite's calibration text must not depend on the working directory
    assert main(["minilm", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "bench-minilm.json").read_text())
    assert {(r["noise"], r["method"]) for r in report["rows"]} == {
        (n, m) for n in (0.0, 0.05) for m in ("weight", "activation", "gnn", "gnn+weight")}
    # The README's table: at noise 0 and 0.05 every method puts back 100% of the units, of every kind.
    for row in report["rows"]:
        assert set(row["by_kind"]) >= {"residual", "mlp", "heads"}
        assert row["recovered"] == 1.0 and set(row["by_kind"].values()) == {1.0}, (row["noise"], row["method"])
    # Without noise a permuted copy is recovered exactly: weight matching is exact on it.
    exact = next(r for r in report["rows"] if r["noise"] == 0.0 and r["method"] == "weight")
    assert exact["recovered"] == 1.0
    assert "fraction of units recovered" in capsys.readouterr().out


def test_suites_are_registered_and_unknown_names_are_refused():
    from merge_graphs.lab.bench import SUITES, run_suite

    assert {"gpt2", "mlp", "minilm"} <= set(SUITES)
    assert all(callable(s.run) and callable(s.format) for s in SUITES.values())
    with pytest.raises(ValueError, match="unknown benchmark suite 'nope'"):
        run_suite("nope")
    with pytest.raises(ValueError, match="learning rate must be positive"):
        run_suite("gpt2", lr=-1.0)
