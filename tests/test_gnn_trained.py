"""The shipped GNN: equivariant on every family, loads, aligns, merges, compares models; pretraining learns."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from tiny_models import FACTORIES, make, minilm_path

import merge_graphs as mg
from merge_graphs.cli import main
from merge_graphs.errors import CheckpointNotFoundError
from merge_graphs.gnn import default_encoder, embed
from merge_graphs.gnn.alignment import recovered_fraction
from merge_graphs.gnn.encoder import GraphEncoder
from merge_graphs.gnn.pretrained import WEIGHTS_DIR, encoder_info, load_encoder, save_encoder
from merge_graphs.lab import pretrain_gnn, pretraining_zoo, trainers
from merge_graphs.lab.pretrain_gnn import PretrainConfig, _graph, contrastive_loss, node_targets, perturb, pretrain


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def trained():
    return default_encoder()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_trained_encoder_is_equivariant(name, trained):
    model = make(name)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=5)
    a, b = embed(model, trained), embed(mg.permute(model, perms, spec), trained)
    order = a.graph.node_order(perms)
    nodes_a = torch.cat([a.nodes[n] for n in a.graph.node_sets])
    nodes_b = torch.cat([b.nodes[n] for n in b.graph.node_sets])
    assert rel(nodes_b, nodes_a[order]) < 1e-5
    assert rel(b.pooled, a.pooled) < 1e-5


def test_shipped_weights_are_small_and_described():
    info = encoder_info()
    assert (WEIGHTS_DIR / "encoder.safetensors").stat().st_size < 4_000_000
    assert {"version", "dim", "layers", "command", "seed", "zoo", "validation", "packages", "cpu_capability"} <= set(info)
    # a rerun elsewhere can tell a changed zoo from changed kernels or libraries
    assert set(info["zoo"]["sha256"]) == {*info["zoo"]["train"], *info["zoo"]["validation"]}
    assert default_encoder().dim == info["dim"]


def test_pretrain_gnn_defaults_are_the_shipped_weights_recipe():
    # `merge-graphs pretrain-gnn` says it retrains the shipped GNN: without options it must run the
    # configuration and zoo version the shipped encoder.json records.
    from dataclasses import asdict

    info = encoder_info()
    assert asdict(PretrainConfig()) == info["config"]
    assert pretrain_gnn.SHIPPED_ZOO_VERSION == info["zoo"]["version"]
    assert [e.name for e in pretraining_zoo.zoo_entries(pretraining_zoo.archs_of(pretrain_gnn.SHIPPED_ZOO_VERSION),
                                                         split="train")] == info["zoo"]["train"]


def test_missing_weights_raise_a_clear_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="pretrain-gnn"):
        load_encoder(tmp_path)


def test_align_gnn_recovers_a_permuted_mlp():
    a = trainers.train_digits_mlp(seed=0, widths=(64, 32, 32, 10), epochs=3)
    spec = mg.symmetry_spec(a)
    perms = mg.random_permutations(spec, seed=2)
    b = mg.permute(a, perms, spec)
    for refine in (False, True):
        found = mg.align(a, b, method="gnn", refine=refine)
        assert recovered_fraction(spec, found.permutations, perms) == 1.0
        assert found.method == ("gnn+weight" if refine else "gnn")


def test_align_gnn_matches_attention_heads_as_blocks():
    a = make("llama-lm")
    spec = mg.symmetry_spec(a)
    perms = mg.random_permutations(spec, seed=4)
    found = mg.align(a, mg.permute(a, perms, spec), method="gnn")
    assert recovered_fraction(spec, found.permutations, perms) == 1.0


def test_embed_is_public_and_pooled_is_invariant():
    model = make("gpt2-lm")
    spec = mg.symmetry_spec(model)
    out = mg.embed(model)
    again = mg.embed(mg.permute(model, mg.random_permutations(spec, seed=1), spec))
    assert out.pooled.shape == (default_encoder().dim,) and rel(again.pooled, out.pooled) < 1e-5


def tiny_zoo(tmp_path):
    mlp = pretraining_zoo.Arch("mlp-t", "mlp", {"widths": (64, 12, 10), "activation": "relu"}, {"epochs": 2},
                               (0, 1, 2), (2,))
    entries = pretraining_zoo.zoo_entries([mlp], split="train")
    return pretraining_zoo.load_zoo(entries, tmp_path / "zoo")


def test_zoo_models_are_cached_and_reused(tmp_path):
    models = tiny_zoo(tmp_path)
    meta = json.loads((tmp_path / "zoo" / "mlp-t-s0.json").read_text())
    assert meta["entry"]["seed"] == 0 and meta["heldout_loss"] > 0
    again = tiny_zoo(tmp_path)  # loaded, not retrained: identical weights
    for x, y in zip(models, again):
        assert all(torch.equal(x.model.state_dict()[k], v) for k, v in y.model.state_dict().items())
    assert [m.entry.name for m in models] == ["mlp-t-s0", "mlp-t-s1"]  # seed 2 is held out


def test_zoo_v2_keeps_v1_models_and_never_shares_an_initialization_across_splits():
    v1 = pretraining_zoo.archs_of(1)
    assert [a.name for a in v1] == ["mlp-32", "mlp-64x2", "mlp-128x2-gelu", "mlp-48x3-tanh", "gpt2-32", "llama-32",
                                    "bert-32"]
    # a version-1 model's cache key is what version 1 wrote: caches made before version 2 stay valid
    meta = pretraining_zoo.ZooEntry(v1[4], 0).metadata()
    assert meta["zoo_version"] == 1 and set(meta["arch"]) == {"name", "family", "config", "training", "seeds", "heldout"}
    # same config and seed is the same initialization: a training model must not share one with a validation
    # or held-out model of any arch (an lr or schedule variant of the same config included)
    by_init = {}
    for e in pretraining_zoo.zoo_entries():
        key = (e.family, json.dumps(e.arch.config, sort_keys=True), e.seed)
        by_init.setdefault(key, set()).add(e.split == "train")
    assert all(len(kinds) == 1 for kinds in by_init.values())
    assert {e.split for e in pretraining_zoo.zoo_entries() if e.arch.since == 2 and "128" in e.arch.name} == {
        "validation", "heldout"}


@pytest.mark.slow
def test_pretraining_lowers_the_loss_and_is_deterministic(tmp_path):
    models = tiny_zoo(tmp_path)
    config = PretrainConfig(dim=16, layers=1, steps=60, stage2_from=0.5, lr=1e-2, seed=0)
    rng = random.Random(123)
    probes = []
    for zm in models:
        b, perms, _ = perturb(zm.entry, zm.model, rng, max_noise=0.3)
        ga, gb = _graph(zm.model, "cpu"), _graph(b, "cpu")
        probes.append((ga, gb, node_targets(ga, perms)))

    def probe_loss(encoder):
        with torch.no_grad():
            return sum(float(contrastive_loss(encoder, *p, 0.05)) for p in probes)

    torch.manual_seed(config.seed)
    before = probe_loss(GraphEncoder(config.dim, config.layers).eval())
    encoder, history = pretrain(config, models)
    assert probe_loss(encoder) < 0.8 * before
    assert 2 in history["stage"] and len(history["teachers"]) == 1  # one stage-2 pair, labelled
    again, _ = pretrain(config, models)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in encoder.state_dict().items())


def test_recipe_with_gnn_alignment_runs_end_to_end(tmp_path):
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=30522, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=101,
                       eos_token_id=102)
    a = T.GPT2LMHeadModel(cfg).eval()
    spec = mg.symmetry_spec(a)
    b = mg.permute(a, mg.random_permutations(spec, seed=3), spec)
    folders = []
    for name, model in (("a", a), ("b", b)):
        model.save_pretrained(tmp_path / name)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(f"{minilm_path()}/{f}", tmp_path / name / f)
        folders.append(str(tmp_path / name))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": [{"model": f} for f in folders], "align": {"method": "gnn"},
                                      "output": {"path": str(tmp_path / "out")}}))
    assert main([str(recipe), "--quiet"]) == 0
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for k, v in a.state_dict().items():  # a permuted copy, aligned back, averages to the original
        assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), k


def test_cli_embed_prints_a_similarity_table(tmp_path, capsys, trained):
    # Two different-seed BERTs and a permuted copy of the first: the copy is the same model to the
    # GNN (cosine 1), the other seed is not (measured 0.991; constant embeddings would give 1 everywhere).
    a, b = make("bert", seed=0), make("bert", seed=1)
    spec = mg.symmetry_spec(a)
    models = [a, b, mg.permute(a, mg.random_permutations(spec, seed=3), spec)]
    folders = []
    for i, model in enumerate(models):
        model.save_pretrained(tmp_path / f"m{i}")
        folders.append(str(tmp_path / f"m{i}"))
    assert main(["embed", *folders]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.rstrip().endswith("]")]
    assert len(rows) == 3 and "cosine similarity" in out
    table = torch.tensor([[float(x) for x in r.split()[1:4]] for r in rows])
    assert torch.allclose(table.diagonal(), torch.ones(3), atol=1e-4)
    assert torch.allclose(table, table.T, atol=1e-4) and abs(table[0, 2] - 1) < 1e-4
    assert table[0, 1] < 0.999 and table[1, 2] < 0.999
    # the printed figures are the pooled embeddings' cosines, to the 3 decimals printed
    pooled = torch.nn.functional.normalize(torch.stack([embed(m, trained).pooled for m in models]).float(), dim=1)
    assert (table - pooled @ pooled.T).abs().max() <= 5e-4 + 1e-6


def test_cli_pretrain_gnn_writes_a_loadable_encoder_and_repeats_bit_for_bit(tmp_path, monkeypatch):
    """``merge-graphs pretrain-gnn`` end to end on a tiny zoo (the real zoo takes minutes to train): the
    files it writes, and the same bytes from a second run (the shipped weights' own 650 s rerun is
    not part of the suite)."""
    mlp = pretraining_zoo.Arch("mlp-t", "mlp", {"widths": (64, 12, 10), "activation": "relu"}, {"epochs": 2},
                               (0, 1, 2, 3, 4), (2,), (3, 4))
    real_entries = pretraining_zoo.zoo_entries
    monkeypatch.setattr(pretraining_zoo, "zoo_entries", lambda archs=None, split=None: real_entries([mlp], split=split))
    labelled = []
    real_teacher = pretrain_gnn.teacher
    monkeypatch.setattr(pretrain_gnn, "teacher", lambda *a: labelled.append(a[0].name) or real_teacher(*a))
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["pretrain-gnn", "--out", str(out), "--zoo", str(tmp_path / "zoo"), "--steps", "6",
                     "--dim", "8", "--layers", "1", "--eval-every", "3", "--teacher-steps", "5",
                     "--keep", "best"]) == 0
        assert {"encoder.safetensors", "encoder.json", "history.json", "curves.png"} <= {p.name for p in out.iterdir()}
        info = encoder_info(out)
        assert info["config"]["steps"] == 6 and info["zoo"]["train"] == ["mlp-t-s0", "mlp-t-s1"]
        assert info["zoo"]["heldout"] == ["mlp-t-s2"] and "--steps 6" in info["command"]
        assert info["zoo"]["validation"] == ["mlp-t-s3", "mlp-t-s4"] and info["best_step"] in (3, 6)
        # what a later rerun needs to tell a changed zoo or library from a changed script
        assert info["packages"]["torch"] == torch.__version__ and info["packages"]["POT"]
        assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        zoo = pretraining_zoo.load_zoo(real_entries([mlp], split="train"), tmp_path / "zoo")
        assert {name: info["zoo"]["sha256"][name] for name in ("mlp-t-s0", "mlp-t-s1")} == {
            zm.entry.name: pretrain_gnn.state_sha256(zm.model) for zm in zoo}
        assert len(set(info["zoo"]["sha256"].values())) == 4
        history = json.loads((out / "history.json").read_text())
        assert len(history["eval"]) == 2 and set(history["naive_barrier"]) == {"mlp-t-s3/4"}
        assert info["validation"]["barrier"] == min(e["barrier"] for e in history["eval"])
        assert sum(info["teacher_wins"].values()) == 1
        (label,) = history["teachers"]  # the one stage-2 pair: the teacher of lowest midpoint loss, learned among them
        assert set(label["midpoint"]) == {"activation", "activation+weight", "weight", "learned"}
        assert label["teacher"] == min(label["midpoint"], key=label["midpoint"].get)
        encoder = load_encoder(out)
        assert encoder.dim == 8
        model = pretraining_zoo.load_zoo(real_entries([mlp], split="heldout"), tmp_path / "zoo")[0].model
        assert embed(model, encoder).pooled.shape == (8,)
        digests.append((out / "encoder.safetensors").read_bytes())
    assert digests[0] == digests[1]
    assert labelled == ["mlp-t-s0"]  # the second run read the pseudo-labels from the zoo's cache


def test_cli_pretrain_gnn_validate_prints_each_saved_encoders_validation_barrier(tmp_path, monkeypatch, capsys):
    """``--validate DIR...`` trains nothing and prints, per saved encoder (float16 as shipped), the
    early-stopping criterion on the zoo's validation pairs: the figure used to choose between runs."""
    mlp = pretraining_zoo.Arch("mlp-v", "mlp", {"widths": (64, 12, 10), "activation": "relu"}, {"epochs": 2},
                               (0, 1, 2, 3, 4), (2,), (3, 4))
    real_entries = pretraining_zoo.zoo_entries
    monkeypatch.setattr(pretraining_zoo, "zoo_entries", lambda archs=None, split=None: real_entries([mlp], split=split))
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        encoder = GraphEncoder(dim=8, layers=1)
        save_encoder(encoder, tmp_path / f"enc{seed}", {})
        folders.append(str(tmp_path / f"enc{seed}"))
    assert main(["pretrain-gnn", "--zoo", str(tmp_path / "zoo"), "--validate", *folders]) == 0
    assert all({f.name for f in Path(folder).iterdir()} == {"encoder.safetensors", "encoder.json"} for folder in folders)
    lines = capsys.readouterr().out.splitlines()
    printed = {line.split()[0]: (float(line.split()[1]), float(line.split()[2])) for line in lines
               if line.split() and line.split()[0] in folders}
    models = pretraining_zoo.load_zoo(real_entries([mlp], split="validation"), tmp_path / "zoo")
    pairs = pretrain_gnn.validation_pairs(models)
    assert [p.name for p in pairs] == ["mlp-v-s3/4"] and any(line.startswith("mlp-v-s3/4") for line in lines)
    for folder in folders:
        want = pretrain_gnn.validation_barriers(load_encoder(folder), pairs)
        assert printed[folder] == (round(want["barrier"], 4), round(want["barrier_refined"], 4))


def test_cli_pretrain_gnn_validate_refuses_a_folder_without_an_encoder_before_training_anything(tmp_path, capsys):
    assert main(["pretrain-gnn", "--zoo", str(tmp_path / "zoo"), "--validate", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "merge-graphs: error: no GNN weights in" in err and str(tmp_path / "nothing") in err
    assert "Traceback" not in err and not (tmp_path / "zoo").exists()
