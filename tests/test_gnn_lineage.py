"""Lineage from GNN embeddings: the score is permutation-invariant, 1 for a model against itself, higher
for a fine-tune than for another initialization; the shipped threshold; ``merge-graphs embed``'s table."""

import hashlib
import json
import math

import pytest
import torch
import transformers
from tiny_models import fine_tuned, make, shuffled

from merge_graphs.cli import main
from merge_graphs.errors import SpecMismatchError
from merge_graphs.gnn import default_encoder, embed
from merge_graphs.gnn.lineage import (
    DIFFERENT,
    INDEPENDENT,
    SAME_BASE,
    embedding_score,
    lineage,
    lineage_score,
    lineage_threshold,
    matched_weight_correlations,
)
from merge_graphs.gnn.pretrained import WEIGHTS_DIR
from merge_graphs.io import Checkpoint
from merge_graphs.sources import ModelTensors

FAMILIES = ["mlp", "gpt2", "bert", "llama"]


@pytest.fixture(scope="module")
def encoder():
    return default_encoder()


@pytest.mark.parametrize("name", FAMILIES)
def test_score_is_invariant_to_permuting_either_model(name, encoder):
    # Exact wherever the matching finds its optimum whatever B's order. Llama's grouped-query heads are
    # matched by coordinate descent, whose local optimum can depend on where it starts: for an
    # independent pair the score moved by up to 0.025 over 20 permutations of A (score 0.175, far from any
    # threshold; 0.017 over 40 with the weights shipped before); a fine-tune's optimum is clear, so its
    # score stays exact there too.
    tol = 3e-2 if name == "llama" else 1e-5
    a, b = make(name, seed=0), make(name, seed=1)
    score = lineage_score(a, b, encoder=encoder)
    assert abs(lineage_score(shuffled(a, 3), b, encoder=encoder) - score) < tol
    assert abs(lineage_score(a, shuffled(b, 4), encoder=encoder) - score) < tol
    tuned = fine_tuned(a)
    same = lineage_score(a, tuned, encoder=encoder)
    assert abs(lineage_score(shuffled(a, 5), tuned, encoder=encoder) - same) < 1e-5
    assert abs(lineage_score(a, shuffled(tuned, 6), encoder=encoder) - same) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_embedding_score_is_invariant_to_permuting_either_model(name, encoder):
    tol = 1e-2 if name == "llama" else 1e-5  # measured up to 0.0034 over 16 permutations on Llama, as above
    a, b = make(name, seed=0), make(name, seed=1)
    score = embedding_score(a, b, encoder=encoder)
    assert abs(embedding_score(shuffled(a, 3), b, encoder=encoder) - score) < tol
    assert abs(embedding_score(a, shuffled(b, 4), encoder=encoder) - score) < tol


@pytest.mark.parametrize("name", FAMILIES)
def test_a_model_against_itself_scores_one(name, encoder):
    emb = embed(make(name), encoder)
    assert abs(lineage_score(emb, emb) - 1) < 1e-5
    assert abs(embedding_score(emb, emb) - 1) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_a_fine_tune_scores_above_another_initialization(name, encoder):
    base = make(name, seed=0)
    emb = embed(base, encoder)
    tuned, other = embed(shuffled(fine_tuned(base), 5), encoder), embed(make(name, seed=1), encoder)
    assert lineage_score(emb, tuned) > 0.9 > 0.6 > lineage_score(emb, other)  # measured: 0.9998-0.9999 against 0.16-0.47
    assert embedding_score(emb, tuned) > 0.9 > 0.6 > embedding_score(emb, other)  # 0.995-0.999 against 0.23-0.42


def test_lineage_of_several_models_and_a_different_architecture(encoder):
    base = make("gpt2", seed=0)
    models = [base, shuffled(fine_tuned(base), 1), make("gpt2", seed=1), make("bert")]
    pairs = lineage(models, ["base", "tuned", "other", "bert"], encoder=encoder)
    assert [(p.a, p.b) for p in pairs] == [("base", "tuned"), ("base", "other"), ("base", "bert"),
                                           ("tuned", "other"), ("tuned", "bert"), ("other", "bert")]
    verdicts = {(p.a, p.b): p.verdict for p in pairs}
    assert verdicts[("base", "tuned")] == SAME_BASE
    assert verdicts[("base", "other")] == verdicts[("tuned", "other")] == INDEPENDENT
    assert all(math.isnan(p.score) and p.verdict == DIFFERENT for p in pairs if p.b == "bert")
    with pytest.raises(SpecMismatchError):
        lineage_score(base, models[3], encoder=encoder)
    with pytest.raises(ValueError, match="names"):
        lineage(models, ["just one"], encoder=encoder)


def test_threshold_ships_with_the_weights_it_was_fitted_for():
    info = json.loads((WEIGHTS_DIR / "lineage.json").read_text())
    assert 0 < lineage_threshold() == info["threshold"] < 1
    assert "gnn_lineage" in info["command"] and info["heldout"]["pairs"] > 0
    # a retrained encoder needs a refitted threshold: `python -m merge_graphs.lab.gnn_lineage`
    assert info["encoder_sha256"] == hashlib.sha256((WEIGHTS_DIR / "encoder.safetensors").read_bytes()).hexdigest()


def test_cli_embed_prints_the_lineage_table(tmp_path, capsys):
    base = make("bert", seed=0)
    models = [base, shuffled(fine_tuned(base), 2), make("bert", seed=1)]
    folders = []
    for i, model in enumerate(models):
        model.save_pretrained(tmp_path / f"m{i}")
        folders.append(str(tmp_path / f"m{i}"))
    assert main(["embed", *folders]) == 0
    out = capsys.readouterr().out
    assert "cosine similarity of pooled GNN embeddings" in out and "lineage" in out
    rows = {line.split()[0] + line.split()[1]: line.split()[2:] for line in out.splitlines()
            if line.startswith("  [")}
    assert set(rows) == {"[0][1]", "[0][2]", "[1][2]"}
    # columns: score, predicted barrier (tests/test_gnn_mergeability.py), verdict
    assert " ".join(rows["[0][1]"][2:]) == SAME_BASE and float(rows["[0][1]"][0]) > 0.9
    assert rows["[0][2]"][2] == rows["[1][2]"][2] == INDEPENDENT


@pytest.mark.parametrize("script", ["gnn_lineage", "gnn_mergeability"])
def test_lab_scripts_refuse_architectures_the_zoo_version_lacks(script, capsys):
    import importlib

    lab = importlib.import_module(f"merge_graphs.lab.{script}")
    with pytest.raises(SystemExit) as stopped:  # before any model is trained or read
        lab.main(["--archs", "gpt2-32", "gpt3-32", "--out", "-"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "no architecture gpt3-32" in err and "gpt2-32" in err and "--zoo-version" in err


def test_weight_correlations_ignore_what_every_model_shares(encoder):
    # Norm weights sit near one in every trained model: an offset both models share must not look like
    # a common base. The score is the mean of the per-tensor correlations.
    a, b = make("gpt2", seed=0), make("gpt2", seed=1)
    before = matched_weight_correlations(a, b, encoder=encoder)
    assert lineage_score(a, b, encoder=encoder) == pytest.approx(sum(before.values()) / len(before))
    name = "h.0.ln_1.weight"
    with torch.no_grad():
        for seed, model in enumerate((a, b)):
            weight = model.get_parameter(name)
            weight.copy_(1.0 + 0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
    after = matched_weight_correlations(a, b, encoder=encoder)
    assert abs(after[name]) < 0.6  # independent deviations around a shared one; the plain cosine would be ~0.99


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_a_checkpoint_read_lazily_embeds_and_scores_as_the_model_in_memory(name, encoder, tmp_path):
    # `merge-graphs embed` reads checkpoints lazily (never loads a model whole): the same tensors, the same answers.
    a, b = make(name, seed=0), shuffled(fine_tuned(make(name, seed=0)), 2)
    for i, model in enumerate((a, b)):
        model.save_pretrained(tmp_path / f"m{i}")
    on_disk = [embed(ModelTensors(Checkpoint(tmp_path / f"m{i}")), encoder) for i in range(2)]
    in_memory = [embed(model, encoder) for model in (a, b)]
    for disk, memory in zip(on_disk, in_memory):
        assert disk.nodes.keys() == memory.nodes.keys()
        assert all(torch.allclose(disk.nodes[k], memory.nodes[k], atol=1e-5) for k in memory.nodes)
    assert lineage_score(*on_disk) == pytest.approx(lineage_score(*in_memory), abs=1e-6)


def test_cli_embed_refuses_an_architecture_without_a_spec(tmp_path, capsys):
    config = transformers.PhiConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=40)
    transformers.PhiForCausalLM(config).save_pretrained(tmp_path / "phi")
    assert main(["embed", str(tmp_path / "phi"), str(tmp_path / "phi")]) == 1
    err = capsys.readouterr().err
    assert "no symmetry spec for 'PhiForCausalLM'" in err and "Supported:" in err


def test_cli_embed_reads_pickles_only_when_allowed(tmp_path, capsys):
    model = make("bert", seed=0)
    model.config.architectures = [type(model).__name__]  # what save_pretrained records
    model.config.save_pretrained(tmp_path / "bin")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    folder = str(tmp_path / "bin")
    assert main(["embed", folder, folder]) == 1
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["embed", "--allow-pickle", folder, folder]) == 0
    assert SAME_BASE in capsys.readouterr().out
