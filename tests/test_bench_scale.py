"""``merge-graphs bench scale --quick``: a tiny Llama pair merged by us (streamed or not) and, when its
environment can be made, by mergekit; without mergekit the suite still passes and says why."""

import json

import pytest

from merge_graphs.bench import main
from merge_graphs.bench import mergekit as mk
from merge_graphs.bench.scale import SIZES, VARIANTS, parameter_count


@pytest.mark.slow
def test_scale_quick(tmp_path, capsys):
    assert main(["scale", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "bench-scale.json").read_text(encoding="utf-8"))
    (size,) = report["sizes"]
    assert size["name"] == "quick" and size["parameters"] == parameter_count(SIZES["quick"])
    merges = size["merges"]
    assert set(merges) == set(VARIANTS)
    for name in (v for v in VARIANTS if v.startswith("ours")):
        row = merges[name]
        assert row["wall_s"] > 0 and row["peak_rss_bytes"] > 0 and row["path"] in ("streamed", "in-memory")
        assert {"load", "align"} <= set(row["stage_seconds"])
    assert merges["ours-weight"]["alignments"][1]["method"] == "weight"
    assert merges["ours-gnn"]["alignments"][1]["method"] == "gnn" and merges["ours-gnn"]["path"] == "streamed"
    assert {a["method"] for a in merges["ours-ties"]["alignments"]} == {"none"}
    if merges["mergekit"]["skipped"]:
        assert "wall_ratio" not in merges["ours-none"] and size["diff_vs_mergekit"] == {}
    else:
        # Unaligned merging by a deterministic method gives the same tensors whoever computes it
        # (slerp's trigonometry rounds differently); DARE's masks are random.
        diff = size["diff_vs_mergekit"]
        assert set(diff) == {"linear", "slerp", "ties"}
        assert diff["linear"]["max"] < 1e-6
        assert diff["linear"]["of"] == size["parameters"]
        assert diff["slerp"]["max"] < 1e-5
        # TIES keeps the same entries unless some tie at the pruning threshold (not in this pair).
        assert diff["ties"]["entries"] == 0
        for name in ("ours-none", "ours-ties", "ours-dare_ties"):
            assert merges[name]["wall_ratio"] > 0 and merges[name]["rss_ratio"] > 0
    (solver,) = report["solvers"]
    assert solver["n"] == 256 and solver["relative_gap"] < 1e-5 and solver["scipy_s"] > 0
    # Merged folders are deleted once measured; the pair stays for the next run.
    assert sorted(p.name for p in (tmp_path / "scale").iterdir() if p.is_dir()) == ["quick-seed0", "quick-seed1"]
    table = capsys.readouterr().out
    assert "ours-weight" in table and "mergekit-ties" in table and "assignment n=256" in table and "machine:" in table


def test_mergekit_unavailable_is_a_skip_not_an_error(tmp_path, monkeypatch):
    def no_index(venv=None):
        raise mk.MergekitUnavailable("pip could not reach the package index")

    monkeypatch.setattr(mk, "mergekit_env", no_index)
    run = mk.mergekit_linear([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert run.skipped.startswith("no mergekit environment") and "package index" in run.skipped
    assert run.output is None and run.wall_s is None and run.to_dict()["skipped"] == run.skipped


def test_linear_config_refuses_mismatched_weights():
    with pytest.raises(ValueError, match="2 models but 1 weights"):
        mk.linear_config(["a", "b"], [0.5])
