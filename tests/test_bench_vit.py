"""The ``vit`` suite: the digits ViT maker, the table, and the CI smoke run (one pair of tiny ViTs)."""

import json
import math

import pytest
import torch

from merge_graphs.lab import trainers
from merge_graphs.lab.bench import main
from merge_graphs.lab.bench.common import machine, summary
from merge_graphs.lab.bench.vit import VIT_METHODS, format_vit

TINY = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def test_make_digits_vit_is_a_seeded_vit_classifier_of_the_config():
    from transformers import ViTForImageClassification

    before = torch.random.get_rng_state()
    a, same, other = (trainers.make_digits_vit(s, **TINY) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert isinstance(a, ViTForImageClassification) and not a.training
    assert (a.config.image_size, a.config.num_channels, a.config.patch_size) == (8, 1, 2)
    assert (a.config.hidden_size, a.config.num_hidden_layers, a.config.num_labels) == (16, 1, 10)
    assert a.config.hidden_dropout_prob == a.config.attention_probs_dropout_prob == 0.0
    state, twin, moved = a.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], twin[k]) for k in state)
    assert not torch.equal(state["classifier.weight"], moved["classifier.weight"])
    x, _, _, _ = trainers.load_digit_images()
    assert trainers.ImageLogits(a)(x[:3]).shape == (3, 10)
    # 16 patches of 2x2 pixels and the class token.
    assert a.vit.embeddings.position_embeddings.shape == (1, 17, 16)


def test_format_vit_prints_every_method_as_median_and_range():
    barriers = {"naive": [0.9, 0.5, 0.7], "weight": [0.4, 0.3, 0.2], "rotation": [0.1, 0.3, 0.2],
                "activation": [0.25, 0.35, 0.3]}
    pairs = []
    for i in range(3):
        rows = {name: {"barrier": b[i], "removed": 1 - b[i] / barriers["naive"][i], "midpoint": 1 + b[i],
                       "midpoint_acc": 0.5 + b[i] / 2, "align_s": 0.1 * i} for name, b in barriers.items()}
        pairs.append({"seeds": [2 * i, 2 * i + 1], "loss_a": 0.1, "loss_b": 0.2, "acc_a": 0.95, "acc_b": 0.9,
                      "methods": rows})
    keys = ("barrier", "removed", "midpoint", "midpoint_acc", "align_s")
    report = {"settings": {"pairs": 3, "epochs": 30, "lr": 1e-3, "test_inputs": 360, "config": trainers.DIGITS_VIT},
              "machine": machine(), "skipped": {"rebasin": "not installed"}, "pairs": pairs,
              "summary": summary(pairs, list(barriers), keys)}
    lines = format_vit(report).splitlines()
    assert lines[0].startswith("vit suite: 3 pair(s)") and "2x2 patches" in lines[0]
    for name, b in barriers.items():
        (row,) = [line for line in lines if line.split()[0] == name]
        s = sorted(b)
        assert f"{s[1]:.4f} [{s[0]:.4f}, {s[2]:.4f}]" in row
    assert any(line.startswith("rebasin") and "skipped: not installed" in line for line in lines)
    assert "0/1: 95.0% / 90.0%" in lines[-2]


@pytest.mark.slow
def test_vit_suite_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("merge_graphs.lab.bench.rebasin_baseline.unavailable", lambda: "not installed (test)")
    assert main(["vit", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    written = json.loads((tmp_path / "bench-vit.json").read_text(encoding="utf-8"))
    assert written["suite"] == "vit" and written["settings"]["quick"] and written["settings"]["pairs"] == 1
    (pair,) = written["pairs"]
    assert set(pair["methods"]) == set(VIT_METHODS) == set(written["summary"])
    assert written["methods"]["rotation"]["residual"] == "rotation"
    assert "rotation" in pair["methods"]["rotation"]["alignment"]
    for name, row in pair["methods"].items():
        for key in ("barrier", "removed", "midpoint", "midpoint_acc", "align_s"):
            assert math.isfinite(row[key]), (name, key, row[key])
        losses = row["curve"]["losses"]
        assert len(losses) == 11 and all(math.isfinite(v) for v in losses)
        # Permuting and rotating B's units preserves its function: the endpoints are the parents' losses.
        assert losses[0] == pytest.approx(pair["loss_a"], abs=1e-5), name
        assert losses[-1] == pytest.approx(pair["loss_b"], abs=1e-5), name
    assert pair["methods"]["naive"]["barrier"] > 0
    assert (tmp_path / "bench-vit.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert all(name in table for name in VIT_METHODS) and "skipped" in table

    # A second run reuses the cached models (identical training metadata).
    assert main(["vit", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    again = json.loads((tmp_path / "bench-vit.json").read_text(encoding="utf-8"))
    assert again["pairs"][0]["train_s"] == [None, None]
    assert again["pairs"][0]["loss_a"] == pair["loss_a"]
