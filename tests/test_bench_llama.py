"""``bench llama``: the CI smoke run (one quick pair of byte-level Llamas), the model, the rows' groups, the table."""

import json
import math

import pytest

from merge_graphs.lab import quickstart, trainers
from merge_graphs.lab.bench import LLAMA_METHODS, SUITES, llama_suite
from merge_graphs.lab.bench.lm import FAMILIES, LEARN, LLAMA_GROUPS, _models, format_lm, resolve_groups, select_methods


def test_make_byte_llama_is_the_benchmarks_llama():
    m = trainers.make_byte_llama(0)
    c = m.config
    assert type(m).__name__ == "LlamaForCausalLM"
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.max_position_embeddings) == (257, 128, 3, 4, 2, 344, 128)
    assert not c.tie_word_embeddings and m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in m.parameters()) == 610432
    # Seeded: the same seed gives the same weights, another seed others.
    again, other = trainers.make_byte_llama(0).state_dict(), trainers.make_byte_llama(1).state_dict()
    assert all((m.state_dict()[k] == again[k]).all() for k in again)
    assert not (m.state_dict()["model.embed_tokens.weight"] == other["model.embed_tokens.weight"]).all()


def test_rows_match_the_groups_they_name():
    m = trainers.make_byte_llama(0, num_hidden_layers=2)
    assert resolve_groups(m, None, "permutation") is None
    assert resolve_groups(m, LLAMA_GROUPS["weight-noheads"], "permutation") == [
        "residual", "layers.0.mlp", "layers.1.mlp"]
    # Rotation always maps the residual stream itself: only the permutation groups are listed.
    assert resolve_groups(m, ("residual", "mlp"), "rotation") == ["layers.0.mlp", "layers.1.mlp"]
    assert resolve_groups(m, ("heads",), "permutation") == ["layers.0.attn.heads", "layers.1.attn.heads"]
    assert LLAMA_GROUPS == {"weight-noheads": ("residual", "mlp"), "rotation-noheads": ("mlp",)}
    assert LLAMA_METHODS["learned"] == LLAMA_METHODS["learned+heads"] == ("learned", "rotation", True, False)
    assert LLAMA_METHODS["learned+sampled"] == ("learned", "rotation", True, False)
    assert LEARN == {"learned": {"heads": False}, "learned+heads": {"heads": True}, "learned+sampled": {"heads": True}}
    assert set(FAMILIES) == {"gpt2", "llama"}


def test_methods_runs_the_rows_named_in_the_familys_order_with_naive():
    family = FAMILIES["llama"]
    assert select_methods(family, ["gnn+rotation", "rotation"]) == ["naive", "rotation", "gnn+rotation"]
    with pytest.raises(ValueError, match=r"unknown llama rows \['rotations'\]; choose among naive, weight"):
        select_methods(family, ["rotation", "rotations"])


def _report() -> dict:
    names = list(LLAMA_METHODS)
    spread = {"median": 0.5, "min": 0.25, "max": 0.75}
    return {
        "suite": "llama",
        "settings": {"pairs": 2, "steps": 500, "training": {"lr": 2e-3}, "heldout_windows": 64, "window": 128,
                     "detail": True, "unigram": 3.4826},
        "summary": {n: {k: spread for k in ("barrier", "removed", "midpoint", "align_s")} for n in names},
        "pairs": [{"seeds": [2 * i, 2 * i + 1], "loss_a": 2.0 + i, "loss_b": 2.25 + i,
                   "methods": {n: {"barrier": 0.125, "removed": 0.5, "midpoint": 2.5} for n in names}}
                  for i in range(2)],
        "machine": {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 1, "python": "3"},
    }


def test_table_lists_every_method_and_every_pair():
    table = format_lm(_report()).splitlines()
    assert table[0].startswith("llama suite: 2 pair(s), 500 steps per model at lr 0.002")
    assert sum(line.startswith("learned ") for line in table) == 2  # summary and per-pair rows
    assert sum(line.startswith("learned+heads ") for line in table) == 2
    assert any("seeds 0/1" in line and line.endswith("seeds 2/3") for line in table)
    assert table.count("naive                  0.5000 [0.2500, 0.7500]        50.0 [25.0, 75.0]  "
                       "0.5000 [0.2500, 0.7500]     0.50 [0.25, 0.75]") == 1
    assert sum("0.1250 /  50.0% / 2.5000" in line for line in table) == len(LLAMA_METHODS)
    assert "parents (A / B): 0/1: 2.0000 / 2.2500; 2/3: 3.0000 / 3.2500; byte unigram 3.4826" in table[-2]


@pytest.mark.slow
def test_llama_suite_quick(tmp_path):
    report = llama_suite(quick=True, out=tmp_path)
    written = json.loads((tmp_path / "bench-llama.json").read_text(encoding="utf-8"))
    assert written["suite"] == "llama" and written["settings"]["quick"] and written["settings"]["pairs"] == 1
    assert written["settings"]["config"] == trainers.BYTE_LLAMA and written["settings"]["window"] == 128
    assert written["settings"]["learn"]["learned+heads"] == {"steps": 10, "heads": True}
    assert written["settings"]["sampled_calibration"] == written["settings"]["calibration"]
    assert written["methods"]["weight-noheads"]["groups"] == ["residual", "mlp"]
    assert written["methods"]["rotation-noheads"]["groups"] == ["mlp"]
    (pair,) = written["pairs"]
    assert list(pair["methods"]) == list(LLAMA_METHODS) == list(written["summary"])
    for name, row in pair["methods"].items():
        for key in ("barrier", "removed", "midpoint", "align_s"):
            assert math.isfinite(row[key]), (name, key, row[key])
        losses = row["curve"]["losses"]
        assert len(losses) == 11 and all(math.isfinite(v) for v in losses)
        assert row["barrier"] >= 0 and row["midpoint"] == pytest.approx(losses[5])
        # Permuting, folding and rotating B preserve each parent's function: the endpoints are the parents' losses.
        assert losses[0] == pytest.approx(pair["loss_a"], abs=1e-4), name
        assert losses[-1] == pytest.approx(pair["loss_b"], abs=1e-4), name
    # Even after 40 steps the parents beat the byte-unigram baseline (3.48 nats/byte) ...
    assert max(pair["loss_a"], pair["loss_b"]) < written["settings"]["unigram"] < 3.6
    # ... and the residual rotation removes most of naive's barrier (measured: 0.455 -> 0.058, and 0.012 fitted
    # on activations; deterministic training, so this is a regression guard with a wide margin).
    naive = pair["methods"]["naive"]["barrier"]
    assert naive > 0.2
    assert pair["methods"]["rotation"]["barrier"] < 0.5 * naive
    assert pair["methods"]["rotation+activation"]["barrier"] < 0.5 * naive
    assert (tmp_path / "bench-llama.png").stat().st_size > 0
    assert report["summary"] == written["summary"]

    # A second run reuses the cached models (identical training metadata) without training.
    family = FAMILIES["llama"]
    training = dict(family.training, steps=family.quick["steps"])
    models, seconds = _models(family, [0, 1], training, trainers.load_docstring_corpus("train"), tmp_path / "models", 1)
    assert seconds == {0: None, 1: None}
    heldout = trainers.load_docstring_corpus("heldout")
    assert quickstart.heldout_loss(models[0], None, heldout, max_windows=8) == pair["loss_a"]
    table = SUITES["llama"].format(report)
    assert all(name in table for name in LLAMA_METHODS) and "byte unigram" in table and "machine:" in table

    # --methods: those rows and naive, the same figures as in the full run.
    only = llama_suite(quick=True, out=tmp_path, methods=["rotation"])
    assert list(only["summary"]) == list(only["pairs"][0]["methods"]) == ["naive", "rotation"]
    assert only["pairs"][0]["methods"]["rotation"]["barrier"] == pair["methods"]["rotation"]["barrier"]
