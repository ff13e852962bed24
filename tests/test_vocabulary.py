"""Merging models with different vocabularies as mergekit 0.1.5 does: ``tokenizer_source`` (union,
base, a model) and the ``tokenizer`` section (``tokens``, ``pad_to_multiple_of``), checked against
mergekit's own output (``merge_graphs.lab.bench.mergekit_vocabulary`` stored it)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from merge_graphs.cli import main
from merge_graphs.lab.bench.mergekit_vocabulary import RECIPES, build_models, rewrite
from merge_graphs.vocabulary import Vocabulary

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit" / "vocabulary"
TOKEN_INDEXED = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("vocabulary-models"))


def merge(tmp_path, recipe, models):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(rewrite(recipe, models)))
    return main([str(path), "--out", str(tmp_path / "out"), "--quiet"])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_merge_is_mergekits_token_for_token(tmp_path, models, name):
    assert merge(tmp_path, RECIPES[name], models) == 0
    expected = json.loads((FIXTURES / "manifest.json").read_text())["recipes"][name]
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(FIXTURES / f"{name}.safetensors")
    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert vocab.keys() == expected["vocab"].keys()
    assert AutoConfig.from_pretrained(tmp_path / "out").vocab_size == expected["vocab_size"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
        if key not in TOKEN_INDEXED:
            assert torch.equal(ours[key], theirs[key]), key
            continue
        for token, i in vocab.items():  # mergekit numbers a union's added tokens in hash order
            assert torch.equal(ours[key][i], theirs[key][expected["vocab"][token]]), (key, token)
        # padding rows are the mean row, which depends on the rows' order only through round-off
        torch.testing.assert_close(ours[key][len(vocab):], theirs[key][len(vocab):])
        if name == "model-tokens-padded":
            assert ours[key].shape[0] == 24 and torch.equal(ours[key], theirs[key])


def test_a_vocabulary_change_refuses_alignment_and_a_missing_source_token(tmp_path, models, capsys):
    recipe = {**RECIPES["base-linear"], "align": {"method": "weight"}}
    assert merge(tmp_path, recipe, models) == 1
    assert "aligned models must share one vocabulary" in capsys.readouterr().err
    recipe = {**RECIPES["model-tokens-padded"]}
    recipe["tokenizer"] = {"source": "b", "tokens": {"zz": {"source": {"kind": "model_token", "model": "a",
                                                                        "token": "y0"}}}}
    assert merge(tmp_path, recipe, models) == 1
    assert "has no token 'y0'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stand_in_rows_follow_mergekits_rule():
    tokens = {"all": 0, "one": 1, "base+a": 2, "a+b": 3, "none": 4}
    rows = {"base": torch.tensor([0, -1, 1, -1, -1]), "a": torch.tensor([0, -1, 1, 2, -1]),
            "b": torch.tensor([0, 0, -1, 1, -1])}
    v = Vocabulary(None, tokens, 5, rows, original={})
    tensors = [torch.tensor([[1.0], [2.0]]), torch.tensor([[10.0], [20.0], [30.0]]), torch.tensor([[100.0], [300.0]])]
    base, a, b = (t.flatten().tolist() for t in v.remap(tensors, ["base", "a", "b"], base="base"))
    assert base == [1.0, 100.0, 2.0, 165.0, 0.0]  # b's alone; own; a and b's average; zero
    assert a == [10.0, 100.0, 20.0, 30.0, 0.0]
    assert b == [100.0, 100.0, 2.0, 300.0, 0.0]  # the base's row where the base has it
