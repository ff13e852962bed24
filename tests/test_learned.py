"""Learned alignment: the learned maps keep B's function, and learning lowers the interpolated
models' loss on a real pair; post-LayerNorm encoders learn permutations (straight-through)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T

import merge_graphs as mg
from merge_graphs.aligners import basis_identity
from merge_graphs.api import aligned_model, merge_aligned
from merge_graphs.errors import AlignmentError, RecipeError, UnsupportedArchitectureError
from merge_graphs.lab import trainers
from merge_graphs.lab.quickstart import calibration_inputs, heldout_loss, load_pair
from merge_graphs.learned import learned_alignment, learned_permutations
from merge_graphs.match import weight_matching
from merge_graphs.recipe import load_recipe
from merge_graphs.run import run_recipe
from merge_graphs.sources import StateTensors
from tests.tiny_models import VOCAB, example_input, make, outputs, randomize

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


@pytest.mark.parametrize("family", ["gpt2-lm", "llama-lm", "qwen2-lm-tied", "qwen3-lm", "gemma-lm", "phi3-lm",
                                    "mixtral-lm", "qwen3-moe-lm-tied"])
def test_learned_maps_keep_b_function_and_are_deterministic(family):
    a, b = make(family, seed=0), make(family, seed=1)
    calib = {"input_ids": torch.randint(2, VOCAB, (8, 9), generator=torch.Generator().manual_seed(0))}
    found = learned_alignment(a, b, calib, steps=4, batch_size=4, lr=0.05, heads=True)
    again = learned_alignment(a, b, calib, steps=4, batch_size=4, lr=0.05, heads=True)
    assert found.method == "learned" and len(found.loss_curve) == 4
    assert torch.equal(found.rotation, again.rotation)
    start = mg.rotation.rotation_alignment(a, b)
    assert set(found.head_maps) == {hm.name for hm in found.spec.head_maps}
    assert all(name not in start.head_maps or not torch.allclose(m, start.head_maps[name], atol=1e-4)
               for name, m in found.head_maps.items())
    for hm in found.spec.head_maps:  # learned in the whole class the family admits, not only orthogonal maps
        m = found.head_maps[hm.name].double()
        gram = m.transpose(1, 2) @ m
        assert not torch.allclose(gram, torch.eye(hm.head_dim, dtype=gram.dtype).expand_as(gram), atol=1e-3)
        if hm.kind == "rope_pairs":  # a rotation times a scale in each RoPE plane, nothing across planes
            assert torch.allclose(gram, torch.diag_embed(gram.diagonal(dim1=1, dim2=2)), atol=1e-5)
    moved = aligned_model(b, found)  # raises if B's function changed
    inputs = example_input(b)
    want = outputs(b, inputs)["logits"]
    assert torch.allclose(outputs(moved, inputs)["logits"], want, atol=1e-4 * want.abs().max())


def test_a_classifier_learns_its_maps_on_its_own_labelled_loss():
    a, b = make("vit-cls", seed=0), make("vit-cls", seed=1)
    g = torch.Generator().manual_seed(0)
    side, channels = a.config.image_size, a.config.num_channels
    calib = {"pixel_values": torch.randn(12, channels, side, side, generator=g),
             "labels": torch.randint(0, a.config.num_labels, (12,), generator=g)}
    start = mg.rotation.rotation_alignment(a, b)
    found = learned_alignment(a, b, calib, start=start, steps=30, batch_size=12, lr=0.05, lam_range=(0.5, 0.5))
    assert found.method == "learned" and len(found.loss_curve) == 30
    assert found.loss_curve[-1] < found.loss_curve[0] - 1e-3, found.loss_curve  # one fixed batch: it must fall
    moved = aligned_model(b, found)  # raises if B's function changed
    inputs = example_input(b)
    want = outputs(b, inputs)["logits"]
    assert torch.allclose(outputs(moved, inputs)["logits"], want, atol=1e-4 * want.abs().max())
    with pytest.raises(AlignmentError, match="labels"):
        learned_alignment(a, b, {"pixel_values": calib["pixel_values"]}, start=start, steps=2)


def test_clip_learns_its_permutations_on_its_own_contrastive_loss():
    a, b = make("clip", seed=0), make("clip", seed=1)
    calib = example_input(a)  # images beside texts: CLIP's forward returns its contrastive loss on the pairs
    found = learned_permutations(a, b, calib, steps=3, batch_size=2)
    assert found.method == "learned" and len(found.loss_curve) == 3
    assert all(torch.isfinite(torch.tensor(found.loss_curve)))
    moved = aligned_model(b, found)  # raises if B's function changed
    inputs = example_input(b, seed=1)
    got, want = outputs(moved, inputs), outputs(b, inputs)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):  # the shared space is fixed; towers permute
        assert torch.allclose(got[name], want[name], atol=1e-4 * want[name].abs().max()), name


def test_cosine_schedule_decays_the_steps_and_unknown_schedules_are_refused():
    a, b = make("gpt2-lm", seed=0), make("gpt2-lm", seed=1)
    calib = {"input_ids": torch.randint(2, VOCAB, (8, 9), generator=torch.Generator().manual_seed(0))}
    start = mg.rotation.rotation_alignment(a, b)
    constant = learned_alignment(a, b, calib, start=start, steps=3, batch_size=4, lr=0.05, schedule="constant")
    cosine = learned_alignment(a, b, calib, start=start, steps=3, batch_size=4, lr=0.05)  # the default
    assert constant.loss_curve[0] == cosine.loss_curve[0]  # the first step uses the full rate either way
    assert not torch.equal(constant.rotation, cosine.rotation)
    with pytest.raises(mg.errors.AlignmentError, match="schedule"):
        learned_alignment(a, b, calib, start=start, steps=3, batch_size=4, schedule="linear")


def test_learning_lowers_the_midpoint_loss_of_a_real_pair():
    a, b, _ = load_pair(QUICKSTART)
    heldout = QUICKSTART / "heldout.txt"
    calib = calibration_inputs(trainers.load_docstring_corpus("train"), n=64, seq_len=128)
    start = mg.rotation.rotation_alignment(a, b)
    found = learned_alignment(a, b, calib, start=start, steps=40, batch_size=8)
    assert torch.equal(found.permutations["layers.0.mlp"], start.permutations["layers.0.mlp"])

    def midpoint(alignment):
        merged = merge_aligned(a, [a, b], [basis_identity(StateTensors(a), "rotation"), alignment], "linear",
                               model_parameters=[{"weight": 1.0}] * 2)
        return heldout_loss(merged, None, heldout, max_windows=32)

    before, after = midpoint(start), midpoint(found)
    assert after < before - 0.02, (before, after)


def test_recipe_learned_needs_calibration_and_merges_in_the_folded_basis():
    with pytest.raises(RecipeError, match="calibration"):
        load_recipe({"models": [{"model": "a"}, {"model": "b"}], "align": {"method": "learned"}})
    recipe = load_recipe({"models": [{"model": "a"}, {"model": "b"}],
                          "align": {"method": "learned", "calibration": {"texts": ["x"]}, "learn": {"steps": 7}}})
    assert recipe.align.learn.steps == 7 and recipe.align.learn.settings() == {"steps": 7}
    insist = load_recipe({"models": [{"model": "a"}, {"model": "b"}],
                          "align": {"method": "learned", "residual": "rotation", "calibration": {"texts": ["x"]}}})
    assert insist.align.residual == "rotation"
    with pytest.raises(RecipeError, match="as the family admits.*drop residual: permutation"):
        load_recipe({"models": [{"model": "a"}, {"model": "b"}],
                     "align": {"method": "learned", "residual": "permutation", "calibration": {"texts": ["x"]}}})


# --- post-LayerNorm encoders: permutations learned by a straight-through estimator -------------

# Odd sizes: 3 heads of 7 dims, 29 MLP units, 2 layers.
BERT_ODD = dict(vocab_size=VOCAB, hidden_size=21, num_hidden_layers=2, num_attention_heads=3, intermediate_size=29,
                max_position_embeddings=16, type_vocab_size=2)


def bert(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "seqcls":
        return randomize(T.BertForSequenceClassification(T.BertConfig(**BERT_ODD, num_labels=3)))
    return randomize(T.BertForMaskedLM(T.BertConfig(**BERT_ODD)))


def bert_calibration(kind: str, n: int = 12):
    g = torch.Generator().manual_seed(5)
    calib = {"input_ids": torch.randint(2, VOCAB, (n, 9), generator=g), "attention_mask": torch.ones(n, 9, dtype=torch.long)}
    calib["attention_mask"][::3, 6:] = 0
    if kind == "seqcls":
        calib["labels"] = torch.randint(0, 3, (n,), generator=g)
    return calib


MASK = 1  # the masked-LM tests' mask token


def midpoint_loss(a, b, alignment, calib, lam=0.5):
    """The loss of ``(1 - lam) A + lam B'`` on ``calib``: its labels, or the masked-LM loss with every
    attended token masked (``mlm_probability=1.0, mask_token_id=MASK``)."""
    merged = merge_aligned(a, [a, b], [basis_identity(StateTensors(a)), alignment], "linear",
                           model_parameters=[{"weight": 1 - lam}, {"weight": lam}])
    ids, mask = calib["input_ids"], calib["attention_mask"]
    labels = calib.get("labels")
    if labels is None:
        ids, labels = ids.masked_fill(mask != 0, MASK), ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        return merged(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


@pytest.mark.parametrize("kind, heads", [("seqcls", False), ("mlm", False), ("seqcls", True)])
def test_learned_permutations_keep_b_function_and_are_deterministic(kind, heads):
    a, b = bert(kind, 0), bert(kind, 1)
    calib = bert_calibration(kind)
    found = learned_permutations(a, b, calib, steps=6, batch_size=4, lr=0.2, heads=heads)
    again = learned_permutations(a, b, calib, steps=6, batch_size=4, lr=0.2, heads=heads)
    assert found.method == "learned" and found.basis == "permutation" and len(found.loss_curve) == 6
    assert found.loss_curve == again.loss_curve
    assert all(torch.equal(found.permutations[g], again.permutations[g]) for g in found.spec.groups)
    start = weight_matching(found.spec, a.state_dict(), b.state_dict())
    assert any(not torch.equal(found.permutations[g], start.permutations[g]) for g in found.spec.groups)
    moved = aligned_model(b, found)  # raises if B's function changed
    inputs = example_input(b)
    want = outputs(b, inputs)["logits"]
    assert torch.allclose(outputs(moved, inputs)["logits"], want, atol=1e-5 * want.abs().max())


def test_permutation_matrices_move_tensors_as_the_permutations_do():
    """The forward pass's hard matrices (children inside each head too) are the spec's permutations."""
    from merge_graphs.learned import _factor_ops, _permute_soft

    model = bert("seqcls", 0)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=3)
    eye = {g: torch.eye(grp.size) if grp.parent is None else torch.eye(grp.size).repeat(spec.groups[grp.parent].size, 1, 1)
           for g, grp in spec.groups.items()}
    maps = {g: eye[g][p] if p.dim() == 1 else torch.stack([eye[g][r][row] for r, row in enumerate(p)])
            for g, p in perms.items()}
    ops = _factor_ops(spec, set(spec.groups))
    want = mg.permute(model, perms, spec).state_dict()
    for name, tensor in model.state_dict().items():
        if name in ops:
            assert torch.allclose(_permute_soft(tensor, ops[name], maps), want[name], atol=1e-6), name


def test_learned_permutations_of_an_mlp_take_cross_entropy_on_its_output():
    a, b = make("mlp", 0), make("mlp", 1)
    g = torch.Generator().manual_seed(0)
    calib = {"input": torch.randn(16, 10, generator=g), "labels": torch.randint(0, 3, (16,), generator=g)}
    found = mg.align(a, b, "learned", calibration=calib, learn={"steps": 5, "batch_size": 8, "lr": 0.3})
    assert found.method == "learned" and len(found.loss_curve) == 5 and found.basis == "permutation"
    moved = aligned_model(b, found)
    x = calib["input"]
    assert torch.allclose(moved(x), b(x), atol=1e-5)
    with pytest.raises(AlignmentError, match="labels"):
        mg.align(a, b, "learned", calibration=x)


def test_straight_through_start_is_the_weight_matching_start():
    a, b = bert("seqcls", 0), bert("seqcls", 1)
    calib = {k: v[:1] for k, v in bert_calibration("seqcls").items()}  # one sample: step 0's batch is known
    start = weight_matching(mg.symmetry_spec(b), a.state_dict(), b.state_dict())
    found = learned_permutations(a, b, calib, start=start, steps=1, lam_range=(0.5, 0.5))
    assert all(torch.equal(found.permutations[g], start.permutations[g]) for g in start.spec.groups)
    assert found.loss_curve[0] == pytest.approx(midpoint_loss(a, b, start, calib), rel=1e-5)
    unmoved = learned_permutations(a, b, calib, start=start, steps=0)
    assert all(torch.equal(unmoved.permutations[g], start.permutations[g]) for g in start.spec.groups)


@pytest.mark.parametrize("kind", ["seqcls", "mlm"])
def test_learned_permutations_lower_the_midpoint_loss_below_the_start(kind):
    a, b = bert(kind, 0), bert(kind, 1)
    calib = bert_calibration(kind, n=16)
    start = weight_matching(mg.symmetry_spec(b), a.state_dict(), b.state_dict())
    # Masked-LM: every attended token masked, so the loss learned on is the one measured.
    found = learned_permutations(a, b, calib, start=start, steps=40, batch_size=16, mlm_probability=1.0,
                                 mask_token_id=MASK)
    before, after = midpoint_loss(a, b, start, calib), midpoint_loss(a, b, found, calib)
    assert after < before, (before, after)


def test_api_and_recipe_learn_permutations_on_bert(tmp_path):
    a, b = bert("seqcls", 0), bert("seqcls", 1)
    calib = bert_calibration("seqcls")
    found = mg.align(a, b, "learned", calibration=calib, learn={"steps": 3, "batch_size": 4})
    assert found.method == "learned" and found.basis == "permutation" and len(found.loss_curve) == 3
    merged = mg.merge_models([a, b], align="learned", calibration=calib, learn={"steps": 2})
    assert type(merged) is T.BertForSequenceClassification
    with pytest.raises(AlignmentError, match="labels"):
        mg.align(a, b, "learned", calibration={k: calib[k] for k in ("input_ids", "attention_mask")})
    with pytest.raises(UnsupportedArchitectureError, match="post-LayerNorm"):  # insisting on a rotation
        mg.align(a, b, "learned", calibration=calib, residual="rotation")

    import shutil

    from tests.tiny_models import minilm_path
    tokenizer = T.AutoTokenizer.from_pretrained(minilm_path())
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = T.BertForMaskedLM(T.BertConfig(**dict(BERT_ODD, vocab_size=tokenizer.vocab_size)))
        folder = tmp_path / f"m{seed}"
        model.save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(Path(minilm_path()) / name, folder / name)
        folders.append(str(folder))
    recipe = {"models": [{"model": f} for f in folders],
              "align": {"method": "learned", "calibration": {"texts": ["the cat sat on the mat", "hello world"] * 3},
                        "learn": {"steps": 2, "batch_size": 2}},
              "output": {"path": str(tmp_path / "out")}}
    result = run_recipe(load_recipe(recipe))
    assert [al.method for al in result.alignments] == ["none", "learned"]
    assert {al.basis for al in result.alignments} == {"permutation"}
    out = T.BertForMaskedLM.from_pretrained(tmp_path / "out")
    assert out.config.hidden_size == 21
    assert "straight-through" in (tmp_path / "out" / "README.md").read_text()
