"""The ``clip`` suite: the digits CLIP maker, the table, and the CI smoke run (one pair of tiny CLIPs)."""

import json
import math

import pytest
import torch

from merge_graphs.lab import trainers
from merge_graphs.lab.bench import main
from merge_graphs.lab.bench.clip import CLIP_METHODS, format_clip
from merge_graphs.lab.bench.common import machine, summary

TOWER = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
TINY = {"projection_dim": 8, "text_config": TOWER, "vision_config": TOWER}


def test_make_digits_clip_is_a_seeded_clip_of_the_config():
    from transformers import CLIPModel

    before = torch.random.get_rng_state()
    a, same, other = (trainers.make_digits_clip(s, **TINY) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert isinstance(a, CLIPModel) and not a.training
    vision, text = a.config.vision_config, a.config.text_config
    assert (vision.image_size, vision.num_channels, vision.patch_size, vision.hidden_size) == (8, 1, 2, 16)
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, a.config.projection_dim) == (16, 16, 1, 8)
    assert vision.dropout == vision.attention_dropout == text.dropout == text.attention_dropout == 0.0
    state, twin, moved = a.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], twin[k]) for k in state)
    assert not torch.equal(state["visual_projection.weight"], moved["visual_projection.weight"])
    x, _, _, _ = trainers.load_digit_images()
    assert trainers.ZeroShotLogits(a)(x[:3]).shape == (3, 10)
    # 16 patches of 2x2 pixels and the class token.
    assert a.vision_model.embeddings.position_embedding.weight.shape == (17, 16)
    # Every caption ends in the end-of-text token the text tower pools at, and the ten differ.
    assert (trainers.DIGIT_CAPTIONS[:, -1] == text.eos_token_id).all()
    assert len({tuple(c) for c in trainers.DIGIT_CAPTIONS.tolist()}) == 10


def test_format_clip_prints_every_method_and_every_skip():
    barriers = {"naive": [0.9, 0.5, 0.7], "weight": [0.4, 0.3, 0.2], "activation": [0.25, 0.35, 0.3]}
    pairs = []
    for i in range(3):
        rows = {name: {"barrier": b[i], "removed": 1 - b[i] / barriers["naive"][i], "midpoint": 1 + b[i],
                       "midpoint_acc": 0.5 + b[i] / 2, "align_s": 0.1 * i} for name, b in barriers.items()}
        pairs.append({"seeds": [2 * i, 2 * i + 1], "loss_a": 0.1, "loss_b": 0.2, "acc_a": 0.95, "acc_b": 0.9,
                      "methods": rows})
    keys = ("barrier", "removed", "midpoint", "midpoint_acc", "align_s")
    report = {"settings": {"pairs": 3, "epochs": 30, "lr": 1e-3, "test_inputs": 360, "config": trainers.DIGITS_CLIP},
              "machine": machine(), "pairs": pairs, "summary": summary(pairs, list(barriers), keys),
              "skipped": {"rotation": "no rotation here", "rebasin": "not installed"}}
    lines = format_clip(report).splitlines()
    assert lines[0].startswith("clip suite: 3 pair(s)") and "2x2 patches" in lines[0] and "zero-shot" in lines[0]
    for name, b in barriers.items():
        (row,) = [line for line in lines if line.split()[0] == name]
        s = sorted(b)
        assert f"{s[1]:.4f} [{s[0]:.4f}, {s[2]:.4f}]" in row
    for name in ("rotation", "rebasin"):
        assert any(line.startswith(name) and "skipped: " in line for line in lines), name
    assert "0/1: 95.0% / 90.0%" in lines[-2]


@pytest.mark.slow
def test_clip_suite_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("merge_graphs.lab.bench.rebasin_baseline.unavailable", lambda: "not installed (test)")
    assert main(["clip", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    written = json.loads((tmp_path / "bench-clip.json").read_text(encoding="utf-8"))
    assert written["suite"] == "clip" and written["settings"]["quick"] and written["settings"]["pairs"] == 1
    (pair,) = written["pairs"]
    # CLIP's spec admits no residual rotation: the row is skipped with the spec's reason.
    assert set(pair["methods"]) == set(CLIP_METHODS) - {"rotation"} == set(written["summary"])
    assert "admits no residual rotation" in written["skipped"]["rotation"]
    assert set(written["skipped"]) == {"rotation", "rebasin"}  # the learned row runs, on CLIP's own loss
    for name, row in pair["methods"].items():
        for key in ("barrier", "removed", "midpoint", "midpoint_acc", "align_s"):
            assert math.isfinite(row[key]), (name, key, row[key])
        losses = row["curve"]["losses"]
        assert len(losses) == 11 and all(math.isfinite(v) for v in losses)
        # Permuting B's units in both towers preserves its function: the endpoints are the parents' losses.
        assert losses[0] == pytest.approx(pair["loss_a"], abs=1e-5), name
        assert losses[-1] == pytest.approx(pair["loss_b"], abs=1e-5), name
    assert pair["methods"]["naive"]["barrier"] > 0
    assert (tmp_path / "bench-clip.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert all(name in table for name in CLIP_METHODS) and table.count("skipped") == 2  # rotation, rebasin

    # A second run reuses the cached models (identical training metadata).
    assert main(["clip", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    again = json.loads((tmp_path / "bench-clip.json").read_text(encoding="utf-8"))
    assert again["pairs"][0]["train_s"] == [None, None]
    assert again["pairs"][0]["loss_a"] == pair["loss_a"]
