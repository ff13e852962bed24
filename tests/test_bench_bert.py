"""The ``bert`` suite's CI smoke run: one pair of tiny digits BERT classifiers, every method, the cache."""

import json
import math

import pytest

from merge_graphs.lab.bench import main
from merge_graphs.lab.bench.bert import bert_methods


@pytest.mark.slow
def test_bert_suite_quick(tmp_path, capsys, monkeypatch):
    # Whether or not rebasin is installed here, the run must pass: force the "not installed" path.
    monkeypatch.setattr("merge_graphs.lab.bench.rebasin_baseline.unavailable", lambda: "not installed (test)")
    assert main(["bert", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    written = json.loads((tmp_path / "bench-bert.json").read_text(encoding="utf-8"))
    assert written["suite"] == "bert" and written["settings"]["quick"] and written["settings"]["pairs"] == 1
    (pair,) = written["pairs"]
    assert set(pair["methods"]) == set(bert_methods(quick=True)) == set(written["summary"])
    assert written["skipped"] == {"rebasin": "not installed (test)"}
    for name, row in pair["methods"].items():
        for key in ("barrier", "removed", "midpoint", "midpoint_acc", "align_s"):
            assert math.isfinite(row[key]), (name, key, row[key])
        losses = row["curve"]["losses"]
        assert len(losses) == 11 and all(math.isfinite(v) for v in losses)
        # Permuting B's units preserves its function: the curve's endpoints are the parents' losses.
        assert losses[0] == pytest.approx(pair["loss_a"], abs=1e-5), name
        assert losses[-1] == pytest.approx(pair["loss_b"], abs=1e-5), name
    assert pair["methods"]["naive"]["barrier"] > 0
    assert (tmp_path / "bench-bert.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert all(name in table for name in bert_methods(quick=True)) and "rebasin" in table and "skipped" in table

    # A second run reuses the cached models (identical training metadata).
    assert main(["bert", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    again = json.loads((tmp_path / "bench-bert.json").read_text(encoding="utf-8"))
    assert again["pairs"][0]["train_s"] == [None, None]
    assert again["pairs"][0]["loss_a"] == pair["loss_a"]


def test_rebasin_row_reports_why_it_is_missing():
    from merge_graphs.lab.bench.rebasin_baseline import unavailable

    why = unavailable()
    assert why is None or why.startswith("not installed")
