"""``bench families``: the rows build their family's model, the spec decides the rows' methods, the table, and the
CI smoke run (one quick pair per family) in which every alignment keeps each parent's function."""

import json
import math
import pickle

import pytest
import torch
import transformers

from merge_graphs import symmetry_spec
from merge_graphs.lab import quickstart, trainers
from merge_graphs.lab.bench import SUITES, families_suite, main
from merge_graphs.lab.bench.families import METHODS, QUICK_SIZE, ROWS, SIZE, family, format_families

POST_NORM = {"gemma2", "gemma3", "olmo2"}


@pytest.mark.parametrize("name", list(ROWS))
def test_row_builds_its_family_from_the_config_class(name):
    fam, unrotated = family(name, quick=True)
    model = fam.make(0)
    cls = getattr(transformers, ROWS[name].architecture)
    assert type(model) is cls and type(model.config) is cls.config_class
    # Every field of the shared size and of the row reaches the config (a renamed or dropped field would not).
    for key, value in {**QUICK_SIZE, **ROWS[name].config}.items():
        assert getattr(model.config, key) == value, (name, key)
    assert model.config.vocab_size == trainers.BYTE_VOCAB_SIZE and fam.config == {**QUICK_SIZE, **ROWS[name].config}
    assert dict(family(name)[0].config) == {**SIZE, **ROWS[name].config}
    # Seeded: the same seed gives the same weights, another seed others.
    again, other = fam.make(0).state_dict(), fam.make(1).state_dict()
    assert all(torch.equal(model.state_dict()[k], again[k]) for k in again)
    assert not all(torch.equal(model.state_dict()[k], other[k]) for k in other)
    # The spec decides the best data-free row: the rotation where the family admits one, else permutations only.
    spec = symmetry_spec(model)
    assert (unrotated is None) == (spec.rotation is not None) == (name not in POST_NORM)
    assert list(fam.methods) == ([m for m in METHODS if m != "rotation"] if name in POST_NORM else list(METHODS))
    if unrotated:
        assert unrotated == spec.unrotated and "permutations only" in unrotated


def test_families_train_in_spawned_workers():
    # --jobs trains in spawned processes, which receive the family pickled.
    fam, _ = family("phi3", quick=True)
    back = pickle.loads(pickle.dumps(fam))
    assert (back.name, back.config, back.training, back.methods) == (fam.name, fam.config, fam.training, fam.methods)
    assert all(torch.equal(a, b) for a, b in zip(back.make(3).state_dict().values(), fam.make(3).state_dict().values()))


def test_make_byte_lm_refuses_an_unknown_class():
    with pytest.raises(ValueError, match="no model class 'GemmaForCasualLM'.*LlamaForCausalLM"):
        trainers.make_byte_lm("GemmaForCasualLM", 0)
    llama = trainers.make_byte_lm("LlamaForCausalLM", 0, **trainers.BYTE_LLAMA)
    assert all(torch.equal(a, b) for a, b in zip(llama.state_dict().values(),
                                                 trainers.make_byte_llama(0).state_dict().values()))


def test_unknown_family_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'nope'; choose from llama, qwen3"):
        families_suite(quick=True, out=tmp_path, families=["qwen3", "nope"])
    assert not (tmp_path / "models").exists()


def _report() -> dict:
    def spread(v):
        return {"median": v, "min": v, "max": v}

    def fam(name, methods, train_s):
        return {"architecture": ROWS[name].architecture, "what": ROWS[name].what, "params": 1234,
                "unrotated": "post-norms" if "rotation" not in methods else None,
                "summary": {m: {"barrier": spread(0.25), "removed": spread(0.5), "midpoint": spread(2.5),
                                "align_s": spread(0.125)} for m in methods},
                "pairs": [{"seeds": [0, 1], "loss_a": 2.0, "loss_b": 2.25, "train_s": train_s}]}

    return {"suite": "families",
            "settings": {"pairs": 1, "steps": 300, "training": {"lr": 2e-3}, "size": SIZE, "heldout_windows": 64,
                         "window": 128},
            "families": {"qwen3": fam("qwen3", METHODS, [61.4, 70.6]),
                         "olmo2": fam("olmo2", ["naive", "weight", "learned+sampled"], [None, None])},
            "machine": {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 1, "python": "3"}}


def test_table_names_the_best_data_free_alignment_of_every_family():
    table = format_families(_report()).splitlines()
    assert table[0].startswith("families suite: 1 pair(s) per family, 300 steps per model at lr 0.002, width 128")
    assert sum(line.startswith("qwen3 ") for line in table) == 2  # its four rows, then its parents
    assert any("best data-free: rotation (norms folded)" in line for line in table)
    assert any("best data-free: = weight (no rotation)" in line for line in table)
    assert sum("0.2500       50.0     2.5000     0.12" in line for line in table) == 8
    assert sum("learned on sampled text (no data)" in line for line in table) == 2
    assert any(line.startswith("qwen3") and "Qwen3ForCausalLM" in line and "2.0000 / 2.2500" in line
               and "61 / 71" in line for line in table)
    assert any(line.startswith("olmo2") and "cached / cached" in line for line in table)
    assert table[-2].startswith("no rotation for olmo2:") and table[-1].startswith("machine:")


@pytest.mark.slow
def test_families_suite_quick(tmp_path, capsys):
    report = families_suite(quick=True, out=tmp_path)
    written = json.loads((tmp_path / "bench-families.json").read_text(encoding="utf-8"))
    assert written["settings"]["quick"] and written["settings"]["size"] == QUICK_SIZE
    assert list(written["families"]) == list(ROWS)
    unigram = quickstart.unigram_loss(trainers.load_docstring_corpus("heldout"),
                                      fit_text=trainers.load_docstring_corpus("train"))
    for name, fam in written["families"].items():
        (pair,) = fam["pairs"]
        assert list(pair["methods"]) == list(fam["summary"]) == list(family(name)[0].methods)
        # The parents learned more than byte frequencies.
        assert max(pair["loss_a"], pair["loss_b"]) < unigram, name
        for method, row in pair["methods"].items():
            losses = row["curve"]["losses"]
            assert len(losses) == 11 and all(math.isfinite(v) for v in losses), (name, method)
            assert row["barrier"] >= 0 and row["midpoint"] == pytest.approx(losses[5])
            # Permuting, folding and rotating B keep each parent's function: the endpoints are the parents' losses.
            assert losses[0] == pytest.approx(pair["loss_a"], abs=1e-4), (name, method)
            assert losses[-1] == pytest.approx(pair["loss_b"], abs=1e-4), (name, method)
        # Alignment removes most of naive's barrier on every family (measured: 75-96% by weight matching,
        # 85-99% by the rotation; deterministic training, so a regression guard with a wide margin).
        naive = pair["methods"]["naive"]["barrier"]
        assert naive > 0.1, name
        for method in ("weight", "rotation"):
            if method in pair["methods"]:
                assert pair["methods"][method]["barrier"] < 0.5 * naive, (name, method)
    assert report["families"].keys() == written["families"].keys()

    # The command runs a subset of the rows, reusing the cached models (identical training metadata).
    assert main(["families", "--quick", "--families", "gemma2", "--out", str(tmp_path), "--quiet"]) == 0
    again = json.loads((tmp_path / "bench-families.json").read_text(encoding="utf-8"))
    assert list(again["families"]) == ["gemma2"]
    (pair,) = again["families"]["gemma2"]["pairs"]
    assert pair["train_s"] == [None, None]
    assert pair["methods"]["weight"]["barrier"] == written["families"]["gemma2"]["pairs"][0]["methods"]["weight"][
        "barrier"]
    table = capsys.readouterr().out
    assert "gemma2" in table and "best data-free: = weight (no rotation)" in table and "cached / cached" in table
    assert "qwen3" not in table and SUITES["families"].format(again) in table
