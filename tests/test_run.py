"""Running recipes end to end: the CLI, the output folder, dry runs, interruptions, mergekit recipes."""

import copy
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tiny_models import minilm_path

import merge_graphs as mg
import merge_graphs.run as run_module
from merge_graphs.cli import main
from merge_graphs.methods import merge_tensors
from merge_graphs.run import run_recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def gpt2(seed):
    torch.manual_seed(seed)
    cfg = T.GPT2Config(vocab_size=30522, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=101,
                       eos_token_id=102)
    return T.GPT2LMHeadModel(cfg).eval()


def save(model, folder: Path) -> str:
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(minilm_path()) / name, folder / name)
    return str(folder)


@pytest.fixture
def pair(tmp_path):
    """A tiny GPT-2 and a permuted copy of it, saved with MiniLM's tokenizer."""
    a = gpt2(0)
    spec = mg.symmetry_spec(a)
    b = mg.permute(a, mg.random_permutations(spec, seed=3), spec)
    return a, save(a, tmp_path / "a"), save(b, tmp_path / "b")


def write_recipe(tmp_path, recipe) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_cli_aligns_a_permuted_copy_back_and_writes_a_loadable_folder(tmp_path, pair, capsys):
    a, folder_a, folder_b = pair
    recipe = write_recipe(tmp_path, {"models": [{"model": folder_a}, {"model": folder_b}],
                                     "output": {"path": str(tmp_path / "out"), "shard_size": "100KB"}})
    assert main([recipe]) == 0
    out = capsys.readouterr().out
    assert "aligned" in out and "wrote" in out and "layers.0.mlp" in out
    assert "streamed path (" in out and "GiB" in out
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for k, v in a.state_dict().items():
        assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), k
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "merge-graphs.yaml", "README.md", "vocab.txt"} <= files
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"merge", "merge-graphs"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert "weight" in card.text and "layers.0.mlp" in card.text
    assert T.AutoTokenizer.from_pretrained(tmp_path / "out")("hello")["input_ids"]


def test_evaluate_section_scores_parents_naive_and_merged(tmp_path, pair):
    # A permuted copy: aligned back, the merge is the parent (its loss exactly); averaged unaligned it
    # is worse (measured 10.3311 against 10.3256).
    _, folder_a, folder_b = pair
    held = tmp_path / "held.txt"
    held.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    result = run_recipe({"models": [{"model": f} for f in (folder_a, folder_b)], "evaluate": {"data": str(held)},
                         "output": {"path": str(tmp_path / "out")}}, progress=False)
    assert set(result.scores) == {folder_a, folder_b, "naive", "merged"}
    parent = result.scores[folder_a]
    assert 9 < parent < 11  # a random GPT-2 over 30522 tokens: about ln(30522) = 10.33
    assert result.scores[folder_b] == pytest.approx(parent, abs=1e-6)
    assert result.scores["merged"] == pytest.approx(parent, abs=1e-6)
    assert result.scores["naive"] > parent + 2e-3
    assert set(result.stage_seconds) == {"load", "align", "verify", "merge", "evaluate", "write"}


def test_dry_run_loads_no_weights(tmp_path, pair, monkeypatch, capsys):
    _, folder_a, folder_b = pair

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not load a model")

    monkeypatch.setattr(run_module, "_source", refuse)
    monkeypatch.setattr("merge_graphs.io.Checkpoint.get", refuse)
    recipe = write_recipe(tmp_path, {"models": [{"model": folder_a}, {"model": "org/on-the-hub"}],
                                     "output": {"path": str(tmp_path / "out")}})
    assert main([recipe, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel (gpt2, " in out and "download org/on-the-hub" in out
    assert "path: streamed (tensor by tensor" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["merge", "config"])
@pytest.mark.parametrize("path", ["streamed", "in-memory"])
def test_an_interrupted_run_leaves_no_output_folder(tmp_path, pair, monkeypatch, capsys, path, stage):
    _, folder_a, folder_b = pair
    calls = []

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def interrupt_later(*args, **kwargs):
        # after some tensors are on disk: the first shard is half written
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return merge_tensors(*args, **kwargs)

    if path == "in-memory":
        monkeypatch.setattr(run_module, "execution_path", lambda recipe: ("in-memory", "test"))
    if stage == "merge":  # while merging and writing shards
        monkeypatch.setattr("merge_graphs.engine.merge_tensors", interrupt_later)
    else:  # after the weights, while writing the config
        monkeypatch.setattr(T.PretrainedConfig, "save_pretrained", interrupt)
    recipe = write_recipe(tmp_path, {"models": [{"model": folder_a}, {"model": folder_b}],
                                     "output": {"path": str(tmp_path / "out"), "shard_size": "10KB"}})
    assert main([recipe]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "recipe.yaml"]


def test_existing_output_needs_force(tmp_path, pair, capsys):
    _, folder_a, folder_b = pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    recipe = write_recipe(tmp_path, {"models": [{"model": folder_a}, {"model": folder_b}],
                                     "output": {"path": str(tmp_path / "out")}})
    assert main([recipe]) == 1
    assert "already exists" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    assert main([recipe, "--force", "--quiet"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()


def test_bad_recipe_fails_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "_source", lambda *a, **k: pytest.fail("loaded a model"))
    recipe = write_recipe(tmp_path, {"models": [{"model": "x"}], "merge": {"method": "ties"}})
    assert main([recipe]) == 1
    assert "needs base_model" in capsys.readouterr().err
    missing = write_recipe(tmp_path, {"models": [{"model": str(tmp_path / "nope")}],
                                      "output": {"path": str(tmp_path / "out")}})
    assert main([missing]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_mismatched_architectures_get_a_clear_error(tmp_path):
    folder_a = save(gpt2(0), tmp_path / "a")
    bert = T.BertModel(T.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32))
    folder_b = save(bert, tmp_path / "b")
    with pytest.raises(mg.SpecMismatchError, match="gpt2 model with a bert model"):
        run_recipe({"models": [{"model": folder_a}, {"model": folder_b}], "output": {"path": str(tmp_path / "o")}},
                   progress=False)
    assert not (tmp_path / "o").exists()


def test_mergekit_recipe_gives_mergekits_linear_tensors_and_says_it_did_not_align(tmp_path, capsys, caplog):
    """A mergekit linear recipe whose weights (0.7, 0.5) do not sum to 1, on the stored tiny Llama
    fine-tunes: the tensors mergekit 0.1.5 itself wrote for it (normalised by 1.2), and the run says
    that it merged without alignment, on the terminal, in the recipe written and in the model card."""
    from test_mergekit_fixtures import FOLDERS, assert_same_tensors, mergekits

    from merge_graphs.lab.bench.mergekit_fixtures import recipe

    path = write_recipe(tmp_path, recipe("linear", FOLDERS))
    assert yaml.safe_load(Path(path).read_text())["merge_method"] == "linear"
    assert main([path, "--out", str(tmp_path / "out")]) == 0
    assert_same_tensors(load_file(tmp_path / "out" / "model.safetensors"), mergekits("linear"), 0.0)
    assert "mergekit recipe: merged without alignment, as mergekit does" in capsys.readouterr().out
    assert "mergekit recipe: merging without alignment" in caplog.text
    assert yaml.safe_load((tmp_path / "out" / "merge-graphs.yaml").read_text())["align"] == {"method": "none"}
    assert "merged name by name without aligning hidden units" in (tmp_path / "out" / "README.md").read_text()


def test_a_mergekit_recipe_with_an_align_section_aligns_before_its_method(tmp_path, caplog):
    """A TIES recipe over a fine-tune whose units were shuffled: with our align section the fine-tune is
    put back in the base's order first, and TIES gives what it gives on the unshuffled fine-tune."""
    base = gpt2(0)
    torch.manual_seed(1)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    spec = mg.symmetry_spec(base)
    shuffled = mg.permute(tuned, mg.random_permutations(spec, seed=5), spec)
    folders = {n: save(m, tmp_path / n) for n, m in [("base", base), ("tuned", tuned), ("shuffled", shuffled)]}
    recipe = {"merge_method": "ties", "base_model": folders["base"], "dtype": "float32",
              "models": [{"model": folders["shuffled"], "parameters": {"density": 0.5, "weight": 1.0}}]}
    assert main([write_recipe(tmp_path, {**recipe, "align": {"method": "weight"}}), "--out", str(tmp_path / "aligned"),
                 "--quiet"]) == 0
    assert "merging without alignment" not in caplog.text
    assert main([write_recipe(tmp_path, recipe), "--out", str(tmp_path / "as-is"), "--quiet"]) == 0
    unshuffled = {**recipe, "models": [{**recipe["models"][0], "model": folders["tuned"]}]}
    assert main([write_recipe(tmp_path, unshuffled), "--out", str(tmp_path / "want"), "--quiet"]) == 0
    aligned, as_is, want = (load_file(tmp_path / n / "model.safetensors") for n in ("aligned", "as-is", "want"))
    w = "transformer.h.0.mlp.c_fc.weight"
    assert torch.allclose(aligned[w], want[w], atol=1e-6)
    assert not torch.allclose(as_is[w], want[w], atol=1e-2)


@pytest.fixture
def hub(monkeypatch, tmp_path_factory):
    from hub_server import patch_default_endpoint, running_hub

    with running_hub(monkeypatch, tmp_path_factory.mktemp("hf_home")) as fake:
        patch_default_endpoint(monkeypatch, fake.endpoint)
        yield fake


def assert_token_nowhere(token, printed, folder):
    """The token is not printed (stdout or stderr) nor written in any file of the output folder
    (merge-graphs.yaml, the model card, the config ...)."""
    assert token not in printed.out and token not in printed.err
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {"merge-graphs.yaml", "README.md"} <= {p.name for p in files}
    for p in files:
        assert token.encode() not in p.read_bytes(), p.name


def test_recipe_pushes_to_the_hub_and_the_card_is_visible(tmp_path, pair, hub, monkeypatch, capsys):
    from huggingface_hub import HfApi, snapshot_download

    _, folder_a, folder_b = pair
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo = f"{hub.user}/merged"
    recipe = write_recipe(tmp_path, {"models": [{"model": folder_a}, {"model": folder_b}],
                                     "output": {"path": str(tmp_path / "out"),
                                                "push_to_hub": {"repo_id": repo, "private": True}}})
    assert main([recipe]) == 0
    printed = capsys.readouterr()
    assert "pushed:" in printed.out
    assert_token_nowhere(hub.token, printed, tmp_path / "out")
    info = HfApi(endpoint=hub.endpoint, token=hub.token).model_info(repo)
    assert {"merge", "merge-graphs"} <= set(info.card_data.tags)
    local = snapshot_download(repo, endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "cache")
    pushed, written = (load_file(Path(f) / "model.safetensors") for f in (local, tmp_path / "out"))
    assert all(torch.equal(pushed[k], written[k]) for k in written)


def test_failed_push_keeps_the_folder_and_says_how_to_retry(tmp_path, pair, hub, monkeypatch, capsys):
    _, folder_a, folder_b = pair
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_token_000000000000")
    recipe = write_recipe(tmp_path, {"models": [{"model": folder_a}, {"model": folder_b}],
                                     "output": {"path": str(tmp_path / "out")}})
    assert main([recipe, "--push-to-hub", f"{hub.user}/merged"]) == 1
    printed = capsys.readouterr()
    assert "hf auth login" in printed.err and "merge-graphs push" in printed.err
    assert_token_nowhere("hf_not_the_right_token", printed, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists()


def test_rotation_recipe_merges_a_rotated_copy_back_and_the_folder_loads(tmp_path):
    from merge_graphs.rotation import folded_model, random_rotation, rotate_model

    a = gpt2(0)
    spec = mg.symmetry_spec(a)
    b = rotate_model(folded_model(mg.permute(a, mg.random_permutations(spec, seed=4), spec)),
                     random_rotation(16, "fix_ones", seed=5))
    folders = [save(a, tmp_path / "a"), save(b, tmp_path / "b")]
    run_recipe({"models": [{"model": f} for f in folders], "align": {"method": "weight", "residual": "rotation"},
                "output": {"path": str(tmp_path / "out")}}, progress=False)
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 30522, (2, 9))
    with torch.no_grad():
        want, got = a(ids).logits, merged(ids).logits
    assert (want - got).abs().max() <= 1e-4 * want.abs().max()


def test_rotation_is_refused_for_post_ln_encoders_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "_source", lambda *a, **k: pytest.fail("loaded a model"))
    bert = T.BertModel(T.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32))
    folder = save(bert, tmp_path / "bert")
    with pytest.raises(mg.UnsupportedArchitectureError, match="post-LayerNorm"):
        run_recipe({"models": [{"model": folder}, {"model": folder}],
                    "align": {"method": "weight", "residual": "rotation"}}, dry_run=True)
