"""Output folders (merge_graphs.io.writer) and model cards (merge_graphs.io.card). Offline, tiny models."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard, metadata_load
from safetensors import safe_open
from tiny_models import example_input, make, minilm_path, outputs

from merge_graphs.errors import CheckpointNotFoundError
from merge_graphs.io import writer as writer_module
from merge_graphs.io.card import model_card
from merge_graphs.io.files import TOKENIZER_PATTERNS
from merge_graphs.io.writer import parse_size, stored_state_dict, write_model_folder, write_tensor_folder
from merge_graphs.tensors import infos

AUTO = {"bert": transformers.AutoModel, "gpt2-lm": transformers.AutoModelForCausalLM,
        "llama-lm": transformers.AutoModelForCausalLM,
        "llama-lm-mha-tied-bias": transformers.AutoModelForCausalLM}


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files, by name."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                assert name not in tensors, f"{name} stored twice"
                tensors[name] = f.get_tensor(name)
    return tensors


def assert_same_outputs(a, b, name: str) -> None:
    inputs = example_input(a)
    out_a, out_b = outputs(a, inputs), outputs(b, inputs)
    assert out_a.keys() == out_b.keys()
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), f"{name}: {key} differs after the round trip"


def assert_tied_like(original, loaded) -> None:
    """Tied input/output embeddings stay tied; untied ones stay untied."""
    out_emb = original.get_output_embeddings()
    if out_emb is None:
        return
    tied = out_emb.weight.data_ptr() == original.get_input_embeddings().weight.data_ptr()
    loaded_tied = loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert loaded_tied == tied


def only_entry(parent: Path) -> list[str]:
    """Everything in ``parent`` (to check that no temporary folder is left behind)."""
    return sorted(os.listdir(parent))


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(AUTO))
def test_round_trip_loads_with_identical_outputs(tmp_path, name):
    model = make(name)
    out = write_model_folder(model, tmp_path / "merged")
    assert out == (tmp_path / "merged").absolute()
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    assert only_entry(tmp_path) == ["merged"]
    loaded = AUTO[name].from_pretrained(out)
    assert type(loaded) is type(model)
    assert_same_outputs(model, loaded, name)
    assert_tied_like(model, loaded)
    stored = stored_tensors(out)
    state = model.state_dict()
    for key, tensor in stored.items():
        assert torch.equal(tensor, state[key]), key
    if model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        assert "lm_head.weight" not in stored  # tied weights stored once


def test_gpt2_tied_head_is_stored_once_and_stays_tied(tmp_path):
    model = make("gpt2-lm")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    out = write_model_folder(model, tmp_path / "gpt2")
    assert "lm_head.weight" not in stored_tensors(out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert (out / "generation_config.json").is_file()


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "llama-lm-mha-tied-bias"])
def test_sharded_folder_has_an_index_and_loads_identically(tmp_path, name):
    model = make(name)
    out = write_model_folder(model, tmp_path / "sharded", shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(stored_tensors(out))
    for shard in shards:  # no shard is bigger than the limit unless one tensor is
        with safe_open(out / shard, "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
        assert len(sizes) == 1 or (out / shard).stat().st_size <= 20_000 + 4_096
    loaded = AUTO[name].from_pretrained(out)
    assert_same_outputs(model, loaded, name)
    assert_tied_like(model, loaded)


def tiny_mixtral():
    """A mixture of experts: transformers 5 fuses its experts' weights on loading."""
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1)).eval()


@pytest.mark.parametrize("name", ["bert", "bert-mlm", "roberta-mlm", "gpt2-lm", "llama-lm", "llama-lm-mha-tied-bias",
                                  "qwen2-lm-tied", "gemma-lm", "phi3-lm", "mixtral"])
def test_the_folder_is_the_one_save_pretrained_writes(tmp_path, name):
    model = tiny_mixtral() if name == "mixtral" else make(name)
    model.save_pretrained(tmp_path / "hf")
    out = write_model_folder(model, tmp_path / "ours")
    ours, theirs = stored_tensors(out), stored_tensors(tmp_path / "hf")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert stored_state_dict(model).keys() == ours.keys()
    for file in ["config.json", "generation_config.json"]:
        assert (out / file).is_file() == (tmp_path / "hf" / file).is_file(), file
        if (out / file).is_file():
            assert json.loads((out / file).read_text()) == json.loads((tmp_path / "hf" / file).read_text()), file
    loaded = type(model).from_pretrained(out)
    assert_tied_like(model, loaded)
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())


REMOTE_CODE = """
import torch
import transformers


class TinyConfig(getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig):
    model_type = "merge-graphs-tiny"

    def __init__(self, width=4, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class TinyModel(transformers.PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.linear = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.linear(x)
"""


def test_a_model_from_repository_code_keeps_its_code(tmp_path, monkeypatch):
    """As save_pretrained does: the code is copied and named in auto_map, so the folder loads again."""
    import importlib.util
    import sys

    import transformers.dynamic_module_utils as dynamic

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "modeling_tiny.py").write_text(REMOTE_CODE)
    spec = importlib.util.spec_from_file_location("modeling_tiny", tmp_path / "code" / "modeling_tiny.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "modeling_tiny", module)
    spec.loader.exec_module(module)
    module.TinyConfig.register_for_auto_class()
    module.TinyModel.register_for_auto_class("AutoModel")
    model = module.TinyModel(module.TinyConfig())

    out = write_model_folder(model, tmp_path / "out")
    assert (out / "modeling_tiny.py").read_text() == REMOTE_CODE
    assert json.loads((out / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "modeling_tiny.TinyConfig", "AutoModel": "modeling_tiny.TinyModel"}
    assert not hasattr(model.config, "auto_map") or "AutoModel" not in (model.config.auto_map or {})
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    loaded = transformers.AutoModel.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(loaded.linear.weight, model.linear.weight)


def test_caller_model_is_not_modified(tmp_path):
    model = make("llama-lm")
    config_before = model.config.to_dict()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    write_model_folder(model, tmp_path / "a", dtype=torch.bfloat16)
    write_model_folder(model, tmp_path / "b")
    assert model.config.to_dict() == config_before
    assert model.dtype == torch.float32
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == state_before[key].dtype and torch.equal(tensor, state_before[key]), key


# --- dtype ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "bf16"])
def test_dtype_bfloat16(tmp_path, dtype):
    model = make("gpt2-lm")
    out = write_model_folder(model, tmp_path / "bf16", dtype=dtype)
    stored = stored_tensors(out)
    assert stored and all(t.dtype == torch.bfloat16 for t in stored.values() if t.is_floating_point())
    state = model.state_dict()
    for key, tensor in stored.items():
        assert torch.equal(tensor, state[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert model.dtype == torch.float32 and model.config.dtype in (None, "float32", torch.float32)


def test_cast_keeps_integer_tensors(tmp_path):
    state = {"w": torch.randn(3, 3), "steps": torch.arange(4)}
    out = write_tensor_folder(state.items(), infos(state), transformers.BertConfig(), tmp_path / "out", dtype="fp16")
    stored = stored_tensors(out)
    assert stored["w"].dtype == torch.float16 and torch.equal(stored["w"], state["w"].half())
    assert stored["steps"].dtype == torch.int64 and torch.equal(stored["steps"], state["steps"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("dtype", [torch.int8, "int8", "fp8", "float8_e4m3fn"])
def test_bad_dtype_is_rejected_before_writing(tmp_path, dtype):
    with pytest.raises(ValueError, match="bfloat16"):
        write_model_folder(make("bert"), tmp_path / "out", dtype=dtype)
    assert only_entry(tmp_path) == []


# --- tokenizer and extra files ---------------------------------------------------------------------


def test_tokenizer_files_are_copied_from_minilm(tmp_path):
    source = Path(minilm_path())
    out = write_model_folder(make("bert"), tmp_path / "tok", tokenizer_from=source)
    expected = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}
    written = set(os.listdir(out))
    assert expected <= written
    assert not {"README.md", "modules.json", "sentence_bert_config.json", "1_Pooling"} & written
    for name in expected:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    tok, ref = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(source)
    text = "Merging models trained from different seeds."
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"])[0] == "[CLS]"


def test_tokenizer_object_is_saved(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    out = write_model_folder(make("bert"), tmp_path / "tok", tokenizer_from=tok)
    assert (out / "tokenizer_config.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == tok("hello")["input_ids"]


def test_tokenizer_source_without_tokenizer_fails_cleanly(tmp_path):
    empty = tmp_path / "src"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    parent = tmp_path / "parent"
    with pytest.raises(CheckpointNotFoundError, match="no tokenizer files"):
        write_model_folder(make("bert"), parent / "out", tokenizer_from=empty)
    assert only_entry(parent) == []
    with pytest.raises(CheckpointNotFoundError, match="not a folder"):
        write_model_folder(make("bert"), parent / "out", tokenizer_from=tmp_path / "missing")
    assert only_entry(parent) == []


def test_tokenizer_patterns_cover_common_files():
    import fnmatch

    for name in ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                 "added_tokens.json", "chat_template.jinja"]:
        assert any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS), name
    for name in ["config.json", "model.safetensors", "README.md", "generation_config.json"]:
        assert not any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS), name


def test_extra_files(tmp_path):
    out = write_model_folder(make("bert"), tmp_path / "x", tokenizer_from=minilm_path(), extra_files={
        "merge-graphs.yaml": "merge:\n  method: linear\n", "README.md": "# card\n", "sub/data.bin": b"\x00\x01",
        "vocab.txt": "[PAD]\n"})
    assert (out / "merge-graphs.yaml").read_text() == "merge:\n  method: linear\n"
    assert (out / "README.md").read_bytes() == b"# card\n"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert (out / "vocab.txt").read_text() == "[PAD]\n"  # extra files are written last


@pytest.mark.parametrize("name", ["../escape.txt", "/abs.txt", "a/../../b", "", "config.json", "model.safetensors",
                                  "model-00001-of-00002.safetensors", "model.safetensors.index.json"])
def test_bad_extra_file_names_are_rejected_before_writing(tmp_path, name):
    with pytest.raises(ValueError, match="extra file name"):
        write_model_folder(make("bert"), tmp_path / "out", extra_files={name: "x"})
    assert only_entry(tmp_path) == []


def test_extra_file_content_must_be_text_or_bytes(tmp_path):
    with pytest.raises(TypeError, match="str or bytes"):
        write_model_folder(make("bert"), tmp_path / "out", extra_files={"scores.json": {"a": 1}})
    assert only_entry(tmp_path) == []


def test_overwrite_taking_the_tokenizer_from_the_folder_being_replaced(tmp_path):
    out = write_model_folder(make("bert"), tmp_path / "out", tokenizer_from=minilm_path())
    vocab = (out / "vocab.txt").read_bytes()
    write_model_folder(make("bert", seed=1), out, tokenizer_from=out, overwrite=True)
    assert (out / "vocab.txt").read_bytes() == vocab
    assert only_entry(tmp_path) == ["out"]


def test_not_a_transformers_model(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        write_model_folder(make("mlp"), tmp_path / "out")
    assert only_entry(tmp_path) == []


# --- atomicity ------------------------------------------------------------------------------------


def old_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"old": true}')
    (path / "marker.txt").write_text("old model")
    return contents(path)


def contents(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fail_mid_write(monkeypatch, parent: Path, exc: BaseException, after: int = 5) -> None:
    """Make the weights write into ``parent / "out"`` fail halfway, ``after`` tensors in."""
    real = writer_module._tensor_bytes
    written: list[str] = []

    def partial_then_fail(expected, item, info):
        if len(written) == after:
            assert list(parent.glob(".out.tmp-*/*.safetensors")), "shards are written beside the target"
            raise exc
        written.append(expected)
        return real(expected, item, info)

    monkeypatch.setattr(writer_module, "_tensor_bytes", partial_then_fail)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    fail_mid_write(monkeypatch, tmp_path, exc)
    with pytest.raises(type(exc)):
        write_model_folder(make("gpt2-lm"), tmp_path / "out", shard_size="20KB")
    assert only_entry(tmp_path) == []


def test_interrupt_while_copying_the_tokenizer_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(source, folder):
        assert (folder / "model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module, "_copy_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_model_folder(make("bert"), tmp_path / "out", tokenizer_from=minilm_path())
    assert only_entry(tmp_path) == []


def test_existing_target_without_overwrite(tmp_path, monkeypatch):
    target = tmp_path / "out"
    before = old_folder(target)
    monkeypatch.setattr(writer_module, "_write_shards", lambda *a, **k: pytest.fail("nothing may be written"))
    with pytest.raises(FileExistsError) as info:
        write_model_folder(make("bert"), target)
    message = str(info.value)
    assert str(target) in message and "overwrite=True" in message and "--force" in message
    assert "another path" in message
    assert contents(target) == before
    assert only_entry(tmp_path) == ["out"]


def test_overwrite_with_failure_keeps_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "out"
    before = old_folder(target)
    fail_mid_write(monkeypatch, tmp_path, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_model_folder(make("bert"), target, overwrite=True)
    assert contents(target) == before
    assert only_entry(tmp_path) == ["out"]


def test_overwrite_with_failing_final_swap_restores_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "out"
    before = old_folder(target)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.tmp-") and Path(dst) == target:
            raise OSError("simulated failure of the final rename")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_model_folder(make("bert"), target, overwrite=True)
    assert contents(target) == before
    assert only_entry(tmp_path) == ["out"]


def test_overwrite_replaces_the_old_folder(tmp_path):
    target = tmp_path / "out"
    old_folder(target)
    model = make("bert")
    out = write_model_folder(model, target, overwrite=True, extra_files={"README.md": "new"})
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert only_entry(tmp_path) == ["out"]
    assert_same_outputs(model, transformers.AutoModel.from_pretrained(out), "bert")


def test_overwrite_a_symlink_replaces_the_link_not_what_it_points_to(tmp_path):
    real = tmp_path / "real"
    before = old_folder(real)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    write_model_folder(make("bert"), tmp_path / "link", overwrite=True)
    assert contents(real) == before
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "model.safetensors").is_file()
    assert only_entry(tmp_path) == ["link", "real"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_target_that_is_a_file(tmp_path, overwrite):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_model_folder(make("bert"), target, overwrite=overwrite)
    assert target.read_text() == "not a folder"
    assert only_entry(tmp_path) == ["out"]


def test_missing_parents_are_created_and_folder_is_readable(tmp_path):
    out = write_model_folder(make("bert"), tmp_path / "a" / "b" / "out")
    assert out.is_dir()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700


def test_bad_shard_size_is_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="'lots'"):
        write_model_folder(make("bert"), tmp_path / "out", shard_size="lots")
    assert only_entry(tmp_path) == []


# --- parse_size -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("20KB", 20_000), ("10KiB", 10_240),
    ("1TB", 10**12), ("1.5GB", 1_500_000_000), (" 5 gb ", 5 * 10**9), ("5gib", 5 * 2**30), ("1000", 1000),
    (1024, 1024), ("5B", 5 * 10**9), ("500M", 500 * 10**6), ("20K", 20_000), ("5e9", 5 * 10**9), (5e9, 5 * 10**9),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["5 gigs", "", "GB", "-5GB", "5XB", "5 G B", "5GB5", 0, -1, 0.5, "0MB", float("inf")])
def test_parse_size_errors(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    assert repr(bad) in str(info.value) and "5GB" in str(info.value)


@pytest.mark.parametrize("bad", [True, None, [5]])
def test_parse_size_type_errors(bad):
    with pytest.raises(TypeError, match="5GB"):
        parse_size(bad)


# --- model card -----------------------------------------------------------------------------------

RECIPE = "models:\n  - model: org/model-a\n  - model: org/model-b@v2\nmerge:\n  method: linear\n"


def card(**overrides) -> str:
    kwargs = {
        "base_models": ["org/model-a", "org/model-b@v2"], "merge_method": "linear", "align_method": "weight",
        "parameters": {"weight": 0.5}, "recipe_yaml": RECIPE,
        "alignment_summary": {"residual": {"before": 10.0, "after": 12.5},
                              "layers.0.mlp": {"before": 1.0, "after": 3.0}},
    }
    return model_card(**{**kwargs, **overrides})


def test_card_metadata_parses():
    data = ModelCard(card()).data
    assert data.base_model == ["org/model-a", "org/model-b"]
    assert {"merge", "merge-graphs"} <= set(data.tags)
    assert data.library_name == "transformers"
    assert data.to_dict()["base_model_relation"] == "merge"


def test_card_body_has_methods_table_and_recipe():
    text = card(notes=["Model B was aligned to model A."])
    body = text.split("\n---\n", 1)[1]
    assert "weight matching" in body and "`linear`" in body and "`weight`: `0.5`" in body
    assert "| group | objective before | objective after | change |" in body
    assert "| residual | 10 | 12.5 | 2.5 |" in body
    assert "| **total (2 groups)** | 11 | 15.5 | 4.5 |" in body
    assert "```yaml\n" + RECIPE + "```" in body
    assert "- Model B was aligned to model A." in body
    assert "## Evaluation" not in body
    assert all(ord(c) < 0x2000 for c in text)  # plain text, no emojis


def test_card_written_in_a_folder_is_read_by_metadata_load(tmp_path):
    out = write_model_folder(make("bert"), tmp_path / "m", extra_files={"README.md": card(), "merge-graphs.yaml": RECIPE})
    meta = metadata_load(out / "README.md")
    assert meta["base_model"] == ["org/model-a", "org/model-b"] and meta["library_name"] == "transformers"
    assert ModelCard.load(out / "README.md").data.tags == ["merge", "merge-graphs"]


def test_card_summarizes_many_groups():
    summary = {f"layers.{i}.mlp": {"before": float(i), "after": float(i) + 1} for i in range(30)}
    body = card(alignment_summary=summary).split("\n---\n", 1)[1]
    rows = [line for line in body.splitlines() if line.startswith("| layers.")]
    assert len(rows) == 20
    assert "| ... 10 more groups |" in body
    assert f"| **total (30 groups)** | {sum(range(30))} | {sum(range(30)) + 30} | 30 |" in body


def test_card_without_alignment_with_scores_and_local_models(tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    text = card(base_models=[str(local), "org/model-b"], align_method="none", alignment_summary=None,
                scores={"parent A": {"accuracy": 0.975, "loss": 0.08}, "merged": {"accuracy": 0.964}})
    data = ModelCard(text).data
    assert data.base_model == ["org/model-b"]  # local folders are not Hub metadata
    body = text.split("\n---\n", 1)[1]
    assert str(local) in body and "## Alignment" not in body and "without aligning" in body
    assert "| model | accuracy | loss |" in body and "| parent A | 0.975 | 0.08 |" in body
    flat = card(scores={"naive": 0.919, "aligned": 0.964}).split("\n---\n", 1)[1]
    assert "| naive | 0.919 |" in flat


def test_card_with_only_local_models_still_parses(tmp_path):
    text = card(base_models=[str(tmp_path)], alignment_summary={"g": {"before": math.nan, "after": 1.0}})
    data = ModelCard(text).data
    assert data.base_model is None and data.tags == ["merge", "merge-graphs"]
    assert "| g | n/a | 1 | n/a |" in text


def test_card_recipe_containing_a_fence():
    text = card(recipe_yaml="note: |\n  ```\n  x\n  ```\n")
    assert "````yaml\nnote: |\n  ```\n  x\n  ```\n````" in text


# --- streamed writing (write_tensor_folder) ------------------------------------------------------


def saved_checkpoint(tmp_path, name: str):
    from merge_graphs.io import Checkpoint

    model = make(name)
    model.save_pretrained(tmp_path / "source")
    return model, Checkpoint(tmp_path / "source")


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm-mha-tied-bias", "bert"])
def test_tensor_stream_is_written_in_transformers_shards_and_loads_identically(tmp_path, name):
    model, ckpt = saved_checkpoint(tmp_path, name)
    out = write_tensor_folder(ckpt.items(), ckpt.infos(), ckpt.config, tmp_path / "streamed", shard_size="20KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and set(index["weight_map"]) == set(ckpt.names())
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in out.glob("*.safetensors")) - sum(
        8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards)
    for shard in shards:  # as transformers splits: under the limit unless one tensor is not
        with safe_open(out / shard, "pt") as f:
            count = len(f.keys())
        assert count == 1 or (out / shard).stat().st_size <= 20_000 + 4_096
    stored = stored_tensors(out)
    assert all(torch.equal(stored[k], ckpt.get(k)) for k in ckpt.names())
    loaded = AUTO[name].from_pretrained(out)
    assert_same_outputs(model, loaded, name)
    assert_tied_like(model, loaded)
    assert only_entry(tmp_path) == ["source", "streamed"]


def test_tensor_stream_casts_to_dtype_and_records_it(tmp_path):
    _, ckpt = saved_checkpoint(tmp_path, "llama-lm")
    out = write_tensor_folder(ckpt.items(), ckpt.infos(), ckpt.config, tmp_path / "bf16", dtype="bf16")
    stored = stored_tensors(out)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert all(torch.equal(stored[k], ckpt.get(k).to(torch.bfloat16)) for k in ckpt.names())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_tensor_stream_holds_one_tensor_at_a_time(tmp_path):
    """Each tensor is on disk (and released) before the next one is asked for: no shard buffer."""
    import weakref

    _, ckpt = saved_checkpoint(tmp_path, "llama-lm")
    previous: list[weakref.ref] = []

    def tensors():
        for name in ckpt.names():
            assert all(ref() is None for ref in previous), "the writer still holds an earlier tensor"
            tensor = ckpt.get(name)
            previous.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    write_tensor_folder(tensors(), ckpt.infos(), ckpt.config, tmp_path / "out", shard_size="1MB")
    assert len(previous) == len(ckpt.names())


@pytest.mark.parametrize("fault", ["short", "long", "order", "shape"])
def test_a_tensor_stream_that_disagrees_with_its_layout_leaves_nothing(tmp_path, fault):
    _, ckpt = saved_checkpoint(tmp_path, "gpt2-lm")
    items = list(ckpt.items())
    if fault == "short":
        items = items[:-1]
    elif fault == "long":
        items = [*items, ("extra", torch.zeros(1))]
    elif fault == "order":
        items[0], items[1] = items[1], items[0]
    else:
        items[0] = (items[0][0], items[0][1][:1])
    with pytest.raises(ValueError, match="layout"):
        write_tensor_folder(iter(items), ckpt.infos(), ckpt.config, tmp_path / "out", shard_size="20KB")
    assert only_entry(tmp_path) == ["source"]


def test_an_interrupted_tensor_stream_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    _, ckpt = saved_checkpoint(tmp_path, "gpt2-lm")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")

    def interrupted():
        for i, item in enumerate(ckpt.items()):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        write_tensor_folder(interrupted(), ckpt.infos(), ckpt.config, tmp_path / "out", shard_size="20KB",
                            overwrite=True)
    assert only_entry(tmp_path) == ["out", "source"] and os.listdir(tmp_path / "out") == ["keep.txt"]
    with pytest.raises(FileExistsError):
        write_tensor_folder(ckpt.items(), ckpt.infos(), ckpt.config, tmp_path / "out")


def test_tensor_stream_writes_generation_config_tokenizer_and_extras(tmp_path):
    _, ckpt = saved_checkpoint(tmp_path, "gpt2-lm")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "source")
    out = write_tensor_folder(ckpt.items(), ckpt.infos(), ckpt.config, tmp_path / "out",
                              generation_config=generation, tokenizer_from=minilm_path(),
                              extra_files={"README.md": "card", "merge-graphs.yaml": "merge: {}\n"})
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "README.md", "merge-graphs.yaml", "vocab.txt"} <= files
    assert transformers.GenerationConfig.from_pretrained(out).to_dict() == generation.to_dict()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
