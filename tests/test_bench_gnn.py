"""The gnn benchmark's CI smoke run: ``merge-graphs bench gnn --quick``."""

import json

import pytest
import torch

from merge_graphs.lab.bench import SUITES, main


@pytest.fixture
def one_thread():
    # On a shared 2-core runner a second torch thread mostly waits for the first (several times slower).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
def test_gnn_suite_quick(tmp_path, capsys, one_thread):
    assert "gnn" in SUITES
    assert main(["gnn", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "recovery of a permuted copy" in out and "MiniLM-L6 embedding" in out
    report = json.loads((tmp_path / "bench-gnn.json").read_text())
    assert report["settings"]["quick"] and report["settings"]["noise"] == 0.1
    for row in report["recovery"]:
        assert set(row["methods"]) == {"gnn", "gnn+weight", "gnn&weight", "weight"} and row["noise"] == 0.1
        # The README: at noise 0.1 x std every method recovers 100% of the units of every held-out model.
        assert {name: m["recovered"] for name, m in row["methods"].items()} == dict.fromkeys(row["methods"], 1.0)
    for row in report["barrier"]:
        assert set(row["methods"]) == {"naive", "weight", "gnn", "gnn+weight", "gnn&weight"}
        assert len(row["methods"]["naive"]["curve"]["losses"]) == 11
    # One timing on the default threads (quick), within the run's own wall time.
    (seconds,) = report["minilm"]["seconds"].values()
    assert seconds["min"] == seconds["median"] == seconds["max"] < report["total_s"]
