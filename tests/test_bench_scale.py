"""``merge-graphs bench scale --quick``: a tiny Llama pair merged by us (streamed or not) and by mergekit.

No network here: mergekit's environment is never made. The quick run is checked with mergekit
unavailable (its rows say why, nothing is compared), and the suite's comparison with mergekit with a
stand-in ``mergekit-yaml`` (our own tool on the same mergekit recipe), which checks the plumbing only;
our tensors are compared with real mergekit 0.1.5's in ``test_mergekit_fixtures.py``."""

import json
import re
import sys
from pathlib import Path

import pytest

from merge_graphs.lab.bench import SUITES, Suite, main
from merge_graphs.lab.bench import mergekit as mk
from merge_graphs.lab.bench.scale import (
    MERGES,
    RANDOM_MERGES,
    SIZES,
    VARIANTS,
    method_config,
    method_seeds,
    parameter_count,
    scale_suite,
)
from merge_graphs.methods import METHODS
from merge_graphs.recipe import load_recipe


def no_mergekit(venv=None):
    raise mk.MergekitUnavailable("no package index in tests")


@pytest.mark.slow
def test_scale_quick_without_mergekit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mk, "mergekit_env", no_mergekit)
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
        # nothing to compare with: no ratio is made up
        assert "wall_ratio" not in row and "rss_ratio" not in row
    for name in (v for v in VARIANTS if v.startswith("mergekit")):
        assert merges[name]["skipped"].startswith("no mergekit environment"), name
        assert merges[name]["wall_s"] is None
    assert size["diff_vs_mergekit"] == {}
    assert merges["ours-weight"]["alignments"][1]["method"] == "weight"
    assert merges["ours-gnn"]["alignments"][1]["method"] == "gnn" and merges["ours-gnn"]["path"] == "streamed"
    rotation = merges["ours-rotation"]
    assert rotation["alignments"][1]["method"].startswith("weight+rotation") and rotation["path"] == "streamed"
    for method in MERGES:  # every method of the registry but linear, unaligned, from mergekit's recipe
        assert {a["method"] for a in merges[f"ours-{method}"]["alignments"]} == {"none"}, method
    # the third model, for model_stock and nuslerp
    assert size["models"] == [str(tmp_path / "scale" / f"quick-seed{seed}") for seed in (0, 1, 2)]
    assert [(s["kind"], s["n"]) for s in report["solvers"]] == [("random costs", 256), ("48-d embedding cosines", 256)]
    for solver in report["solvers"]:
        assert solver["relative_gap"] < 1e-5 and solver["scipy_s"] > 0 and solver["candidates_s"] > 0
        # the candidate-pair solver gives scipy's optimum or no answer, never another matching
        assert solver["candidates_same"] in (None, 1.0)
    # Merged folders are deleted once measured; the models stay for the next run.
    models = ["quick-seed0", "quick-seed1", "quick-seed2"]
    assert sorted(p.name for p in (tmp_path / "scale").iterdir() if p.is_dir()) == models
    table = capsys.readouterr().out
    assert "ours-weight" in table and "assignment n=256 (48-d embedding cosines)" in table and "machine:" in table
    assert re.search(r"mergekit-ties +skipped: no mergekit environment", table)
    assert "ours-breadcrumbs_ties " in table and "ours-model_stock " in table


STANDIN = """import sys
sys.path.insert(0, {root!r})
from merge_graphs.cli import main
config, out = sys.argv[1], sys.argv[2]  # then mergekit's options (--copy-tokenizer ...), ignored
sys.exit(main([config, "--out", out, "--quiet"]))
"""


@pytest.mark.slow
def test_scale_compares_each_method_with_mergekits_merge(tmp_path, monkeypatch):
    """The suite's comparison with mergekit, with a stand-in for ``mergekit-yaml`` that runs our tool on
    mergekit's recipe: ratios to the run of the same method, and the tensors of every entry compared."""
    exe = tmp_path / "bin" / "mergekit-yaml"
    exe.parent.mkdir()
    root = str(Path(mk.__file__).resolve().parents[2])
    exe.write_text(f"#!{sys.executable}\n" + STANDIN.format(root=root), encoding="utf-8")
    exe.chmod(0o755)
    monkeypatch.setattr(mk, "mergekit_env", lambda venv=None: exe)
    variants = ["mergekit", "ours-none", "mergekit-ties", "ours-ties", "mergekit-nuslerp", "ours-nuslerp",
                "mergekit-della", "ours-della"]
    report = scale_suite(quick=True, out=tmp_path, variants=variants, solvers=False)
    (size,) = report["sizes"]
    merges = size["merges"]
    assert merges["mergekit"]["command"][0] == str(exe) and "--copy-tokenizer" in merges["mergekit"]["command"]
    for name in ("mergekit", "mergekit-ties", "mergekit-nuslerp", "mergekit-della"):
        assert merges[name]["skipped"] is None and merges[name]["wall_s"] > 0 and "wall_ratio" not in merges[name]
    for ours, theirs in (("ours-none", "mergekit"), ("ours-ties", "mergekit-ties"), ("ours-nuslerp", "mergekit-nuslerp"),
                         ("ours-della", "mergekit-della")):
        row = merges[ours]
        assert row["wall_ratio"] == pytest.approx(row["wall_s"] / merges[theirs]["wall_s"])
        assert row["rss_ratio"] == pytest.approx(row["peak_rss_bytes"] / merges[theirs]["peak_rss_bytes"])
    diff = size["diff_vs_mergekit"]
    assert set(diff) == {"linear", "ties", "nuslerp"}  # della is random: not compared
    for method in diff.values():  # the same tool on the same recipe: every entry compared, none differs
        assert method == {"max": 0.0, "entries": 0, "of": size["parameters"]}


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


def test_every_registered_method_has_a_valid_scale_recipe():
    """Derived from the registry: every method but linear (the linear variants' own), each recipe one our
    reader accepts (model counts, required parameters), a third model only where a pair is too few."""
    assert set(MERGES) == set(METHODS) - {"linear"}
    assert set(RANDOM_MERGES) == {m for m in MERGES if METHODS[m].random}
    assert {f"{tool}-{m}" for m in MERGES for tool in ("mergekit", "ours")} <= set(VARIANTS)
    folders = {seed: Path(f"m{seed}") for seed in (0, 1, 2)}
    third = set()
    for method in MERGES:
        base, others = method_seeds(method)
        assert (base is None) == (METHODS[method].base == "none"), method
        if 2 in others:
            third.add(method)
        config = method_config(method, folders, "float32")
        assert load_recipe(config).merge.method == method
    assert third == {"model_stock", "nuslerp"}
    assert method_config("slerp", folders, "float32")["parameters"] == {"t": 0.5}
    assert method_config("ties", folders, "float32")["models"][0]["parameters"]["density"] == 0.5


def test_scale_command_passes_sizes_variants_and_venv(monkeypatch, capsys):
    seen = {}

    def fake(quick=False, out=None, sizes=None, variants=None, venv=None, progress=False):
        seen.update(sizes=sizes, variants=variants, venv=venv)
        return {"files": {}}

    monkeypatch.setitem(SUITES, "scale", Suite("scale", fake, lambda report: "table"))
    assert main(["scale", "--sizes", "100m", "--variants", "mergekit-ties, ours-ties", "--venv", "/v", "--quiet"]) == 0
    assert seen == {"sizes": ["100m"], "variants": ["mergekit-ties", "ours-ties"], "venv": "/v"}
    assert "table" in capsys.readouterr().out
