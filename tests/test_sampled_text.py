"""Calibration sampled from the models themselves: the cached sampler draws what the model's own
distribution gives, token for token as a sampler without a cache; recipes learn on it with no data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T

from merge_graphs.errors import AlignmentError, RecipeError
from merge_graphs.recipe import load_recipe
from merge_graphs.run import run_recipe
from merge_graphs.sampled_text import sample_calibration
from tests.tiny_models import make

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


def sample_without_cache(model, n, length, start, end, generator):
    """The reference sampler: the whole prefix run again for every token."""
    ids = torch.full((n, 1), start)
    with torch.no_grad():
        for _ in range(length - 1):
            logits = model(input_ids=ids).logits[:, -1].float()
            logits[:, end] = -torch.inf
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)], 1)
    return ids


@pytest.mark.parametrize("family", ["gpt2-lm", "llama-lm", "qwen3-lm", "gemma2-lm", "mixtral-lm"])
def test_cached_sampling_draws_the_tokens_of_an_uncached_sampler(family):
    model = make(family, seed=0)
    start, end = model.config.bos_token_id, model.config.eos_token_id
    got = sample_calibration([model], samples=5, length=9, seed=3)["input_ids"]
    want = sample_without_cache(model, 5, 9, start, end, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_samples_follow_the_model_distribution_and_alternate_between_models():
    cfg = T.LlamaConfig(vocab_size=5, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    a, b = T.LlamaForCausalLM(cfg).eval(), T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        a.lm_head.weight.mul_(30)  # peaked, and unlike b's
    calib = sample_calibration([a, b], samples=4000, length=2, seed=0, batch_size=500)
    ids = calib["input_ids"]
    assert ids.shape == (4000, 2) and torch.equal(calib["attention_mask"], torch.ones_like(ids))
    assert bool((ids[:, 0] == 0).all()) and not bool((ids[:, 1] == 1).any())
    for model, rows in ((a, ids[0::2]), (b, ids[1::2])):  # a draws the even rows, b the odd ones
        with torch.no_grad():
            logits = model(input_ids=torch.zeros(1, 1, dtype=torch.long)).logits[0, -1]
        logits[1] = -torch.inf
        want = logits.softmax(-1)
        freq = torch.bincount(rows[:, 1], minlength=5).float() / len(rows)
        assert torch.allclose(freq, want, atol=0.04), (freq, want)
    again = sample_calibration([a, b], samples=4000, length=2, seed=0, batch_size=500)["input_ids"]
    assert torch.equal(again, ids)
    assert not torch.equal(sample_calibration([a, b], samples=4000, length=2, seed=1, batch_size=500)["input_ids"], ids)


def test_what_cannot_be_sampled_is_refused_with_the_fix():
    gpt2 = make("gpt2-lm", seed=0)
    with pytest.raises(AlignmentError, match="not a causal LM.*calibration texts"):
        sample_calibration([T.BertForMaskedLM(T.BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=8))])
    with pytest.raises(AlignmentError, match="exceeds the models' context"):
        sample_calibration([gpt2], length=gpt2.config.n_positions + 1)
    other = make("gpt2-lm", seed=1)
    other.config.bos_token_id = other.config.eos_token_id = 3
    with pytest.raises(AlignmentError, match="do not share a tokenizer"):
        sample_calibration([gpt2, other], samples=2, length=4)


def test_a_recipe_learns_on_sampled_text_without_data(tmp_path):
    with pytest.raises(RecipeError, match="exactly one of"):
        load_recipe({"models": [{"model": "a"}, {"model": "b"}],
                     "align": {"method": "learned", "calibration": {"texts": ["x"], "generate": 8}}})
    with pytest.raises(RecipeError, match="generate: 4096"):
        load_recipe({"models": [{"model": "a"}, {"model": "b"}], "align": {"method": "learned"}})
    recipe = load_recipe({
        "models": [{"model": str(QUICKSTART / "model-a")}, {"model": str(QUICKSTART / "model-b")}],
        "align": {"method": "learned", "calibration": {"generate": 8, "max_length": 16}, "learn": {"steps": 2}},
        "output": {"path": str(tmp_path / "merged")},
    })
    result = run_recipe(recipe, progress=False)
    alignment = result.alignments[-1]
    assert alignment.method == "learned" and len(alignment.loss_curve) == 2
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "8 sequences sampled from the models themselves" in card
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert loaded.config.vocab_size == 257
