"""The output's tokenizer, as mergekit recipes set it: ``tokenizer_source`` (a model, ``base``, ``union``
of one vocabulary), the ``tokenizer: {source}`` section, and ``chat_template`` (a name, ``auto``, a
template's text); what is not supported is refused before anything is written. Different
vocabularies: tests/test_vocabulary.py."""

import json

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models

from merge_graphs.cli import main
from tests.tiny_models import LLAMA, randomize

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
ZEPHYR = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def save_model(folder, seed, vocab, template=None):
    torch.manual_seed(seed)
    randomize(T.LlamaForCausalLM(T.LlamaConfig(**LLAMA))).save_pretrained(folder)
    tok = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
                                    unk_token="<unk>")
    if template:
        tok.chat_template = template
    tok.save_pretrained(folder)
    return str(folder)


VOCAB = {"<unk>": 0, "hi": 1, "there": 2}


def run(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"merge_method": "linear", "parameters": {"weight": 1.0}, **recipe}))
    return main([str(path), "--out", str(tmp_path / "out"), "--quiet"])


def rendered(folder):
    return T.AutoTokenizer.from_pretrained(folder).apply_chat_template(CONVERSATION, tokenize=False)


def test_a_named_chat_template_is_written(tmp_path):
    a, b = save_model(tmp_path / "a", 0, VOCAB), save_model(tmp_path / "b", 1, VOCAB)
    assert run(tmp_path, {"models": [{"model": a}, {"model": b}], "chat_template": "chatml"}) == 0
    assert rendered(tmp_path / "out") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"


def test_auto_takes_the_template_most_models_have_and_a_text_is_used_as_it_is(tmp_path):
    a = save_model(tmp_path / "a", 0, VOCAB, template=ZEPHYR)
    b = save_model(tmp_path / "b", 1, VOCAB, template="{{ 'other' }}" * 3)
    c = save_model(tmp_path / "c", 2, VOCAB, template=ZEPHYR)
    assert run(tmp_path, {"models": [{"model": b}, {"model": a}, {"model": c}], "chat_template": "auto"}) == 0
    assert rendered(tmp_path / "out") == "<|user|>Hi</s><|assistant|>Hello.</s>"
    text = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (tmp_path / "out").rename(tmp_path / "first")
    assert run(tmp_path, {"models": [{"model": b}, {"model": a}], "chat_template": text}) == 0
    assert rendered(tmp_path / "out") == "[Hi][Hello.]"


def test_the_tokenizer_section_and_a_union_of_one_vocabulary(tmp_path):
    a, b = save_model(tmp_path / "a", 0, VOCAB), save_model(tmp_path / "b", 1, VOCAB)
    assert run(tmp_path, {"models": [{"model": a}, {"model": b}], "tokenizer": {"source": b}}) == 0
    assert T.AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == VOCAB
    (tmp_path / "out").rename(tmp_path / "first")
    assert run(tmp_path, {"models": [{"model": a}, {"model": b}], "tokenizer_source": "union"}) == 0
    assert T.AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == VOCAB


@pytest.mark.parametrize("recipe, says", [
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "c"}}}}, "'c' is not a model of this merge"),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "a"}}}}, "has no token '<x>'"),
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
    ({"chat_template": "llama9"}, "neither 'auto', a known name"),
])
def test_what_is_not_supported_exits_1_and_writes_nothing(tmp_path, capsys, recipe, says):
    a, b = save_model(tmp_path / "a", 0, VOCAB), save_model(tmp_path / "b", 1, {**VOCAB, "extra": 3})
    assert run(tmp_path, {"models": [{"model": a}, {"model": b}], **recipe}) == 1
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_tokenizer_serves_a_reference_without_one(tmp_path):
    a, b = save_model(tmp_path / "a", 0, VOCAB), save_model(tmp_path / "b", 1, VOCAB)
    for f in (tmp_path / "a").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    assert run(tmp_path, {"models": [{"model": a}, {"model": b}], "tokenizer_source": b}) == 0
    assert T.AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == VOCAB
    (tmp_path / "out").rename(tmp_path / "first")
    assert run(tmp_path, {"models": [{"model": a}, {"model": b}], "tokenizer_source": "base"}) == 1
    assert not (tmp_path / "out").exists()
