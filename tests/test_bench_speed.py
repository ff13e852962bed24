"""The ``speed`` suite's CI smoke run: a tiny BERT pair, every stage timed, mergekit absent."""

import json

import pytest

from merge_graphs.lab.bench import main
from merge_graphs.lab.bench.mergekit import MergekitUnavailable
from merge_graphs.lab.bench.speed import TIMED


@pytest.mark.slow
def test_speed_suite_quick_without_mergekit(tmp_path, capsys, monkeypatch):
    # No network at test time: mergekit's environment is "unavailable", and the run must still pass.
    def no_env(venv=None):
        raise MergekitUnavailable("no package index in tests")

    monkeypatch.setattr("merge_graphs.lab.bench.mergekit.mergekit_env", no_env)
    assert main(["speed", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "bench-speed.json").read_text(encoding="utf-8"))
    assert set(TIMED) <= set(report["stages"])
    for stage in report["stages"].values():
        assert stage["peak_rss_bytes"] > 0
    # The stages are timed one after the other inside the run: together within its wall time.
    assert report["staged_s"] == pytest.approx(sum(report["stages"][s]["seconds"] for s in TIMED))
    assert sum(stage["seconds"] for stage in report["stages"].values()) < report["total_s"]
    assert report["merges"]["mergekit"]["skipped"].startswith("no mergekit environment")
    assert report["merges"]["ours-weight"]["wall_s"] > 0 and report["staged_ratio"] is None
    assert (tmp_path / "speed" / "merged-staged" / "config.json").is_file()
    table = capsys.readouterr().out
    assert "mergekit" in table and "skipped" in table and "matching" in table
