"""Pushing to the Hub and downloading back, with the real huggingface_hub client against a local fake Hub.

The fake Hub (tests/hub_server.py) speaks the Hub's HTTP API on 127.0.0.1; nothing leaves the
machine. The ``hub`` fixture turns huggingface_hub's offline mode (set in conftest) off for the
test, hides any real token, and stops the server afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
from hub_server import FakeHub, patch_default_endpoint, running_hub
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file

from merge_graphs.errors import PushError
from merge_graphs.io import load_model, resolve
from merge_graphs.io.push import push_folder

CARD = """---
base_model:
- org-a/parent-one
- org-b/parent-two
tags:
- merge
- merge-graphs
library_name: transformers
---

# merged

A merge made with merge-graphs.
"""
SECRET = "hf_NotTheRealOneButSecret9876543210zyx"


def _tiny_bert(seed: int = 0) -> transformers.BertModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


@pytest.fixture
def hub(monkeypatch, tmp_path_factory):
    with running_hub(monkeypatch, tmp_path_factory.mktemp("hf_home")) as fake:
        yield fake


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "merged"
    _tiny_bert().save_pretrained(folder)
    (folder / "README.md").write_text(CARD)
    return folder


@pytest.fixture
def model_folder(saved_model, tmp_path) -> Path:
    """A fresh copy of a saved tiny BertModel with a model card, per test."""
    folder = tmp_path / "merged"
    folder.mkdir()
    for f in saved_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _log_all(caplog) -> None:
    for name in ("", "huggingface_hub", "httpx2", "merge_graphs"):
        caplog.set_level(logging.DEBUG, logger=name or None)


def _all_text(err: BaseException) -> str:
    """The message of an error and of every error in its cause/context chain."""
    texts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        texts += [str(err), repr(err)]
        err = err.__cause__ or err.__context__
    return "\n".join(texts)


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("xet", ["hf_xet installed", "HF_HUB_DISABLE_XET"])
def test_push_then_download_round_trip(hub, model_folder, tmp_path, monkeypatch, xet):
    # With hf_xet (a dependency, so the normal case) upload_folder runs huggingface_hub's pipelined
    # uploader; without it, the single create_commit path. Both must work against the Hub API.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", xet == "HF_HUB_DISABLE_XET")
    before = _digest(model_folder)
    url = push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)

    commit = url.rsplit("/", 1)[-1]
    assert url == f"{hub.endpoint}/alice/merged/commit/{commit}"
    assert _digest(model_folder) == before  # pushing never touches the folder

    snapshot = Path(snapshot_download("alice/merged", endpoint=hub.endpoint, cache_dir=tmp_path / "cache"))
    assert snapshot.name == commit
    original, downloaded = load_file(model_folder / "model.safetensors"), load_file(snapshot / "model.safetensors")
    assert original.keys() == downloaded.keys() and len(original) > 10
    for name, tensor in original.items():
        assert torch.equal(tensor, downloaded[name]), name
    for name in ("config.json", "README.md"):
        assert (snapshot / name).read_bytes() == (model_folder / name).read_bytes()

    info = HfApi(endpoint=hub.endpoint).model_info("alice/merged")
    assert info.sha == commit
    assert {s.rfilename for s in info.siblings} >= {"config.json", "model.safetensors", "README.md"}
    card = info.card_data
    assert card.base_model == ["org-a/parent-one", "org-b/parent-two"]
    assert card.tags == ["merge", "merge-graphs"]
    assert card.library_name == "transformers"
    assert "merge-graphs" in info.tags

    # hf_xet is installed, yet answering uploadMode "regular" keeps every byte on the plain HTTP API.
    assert hub.unhandled == []
    paths = hub.paths_requested()
    assert not [p for p in paths if "xet" in p or "lfs" in p or p.endswith(".git/info/lfs/objects/batch")]
    assert "/api/models/alice/merged/preupload/main" in paths and "/api/models/alice/merged/commit/main" in paths


def test_push_again_to_same_repo_and_to_a_new_branch(hub, model_folder, tmp_path):
    first = push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)
    # Same files again: the repository exists (create_repo exist_ok), nothing changed, no new commit.
    again = push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)
    assert again.rsplit("/", 1)[-1] == first.rsplit("/", 1)[-1]

    (model_folder / "README.md").write_text(CARD + "\nSecond version.\n")
    second = push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint,
                         commit_message="second version")
    assert second != first
    assert hub.files("alice/merged")["README.md"].endswith(b"Second version.\n")
    assert hub.repos["alice/merged"].commits[second.rsplit("/", 1)[-1]].summary == "second version"

    # A branch that does not exist yet is created from main, then pushed to; main is left alone.
    (model_folder / "notes.txt").write_text("experimental variant\n")
    on_branch = push_folder(model_folder, "alice/merged", revision="experiment", token=hub.token,
                            endpoint=hub.endpoint)
    assert on_branch.rsplit("/", 1)[-1] == hub.repos["alice/merged"].branches["experiment"]
    assert "notes.txt" not in hub.files("alice/merged", "main")
    assert hub.files("alice/merged", "experiment")["notes.txt"] == b"experimental variant\n"
    snapshot = Path(snapshot_download("alice/merged", revision="experiment", endpoint=hub.endpoint,
                                      cache_dir=tmp_path / "cache"))
    assert (snapshot / "notes.txt").read_text() == "experimental variant\n"
    # ... and pushing to it again works (the branch exists now).
    (model_folder / "notes.txt").write_text("experimental variant, take 2\n")
    push_folder(model_folder, "alice/merged", revision="experiment", token=hub.token, endpoint=hub.endpoint)
    assert hub.files("alice/merged", "experiment")["notes.txt"] == b"experimental variant, take 2\n"
    assert hub.unhandled == []


def test_cli_push_uploads_a_folder_and_says_where(hub, model_folder, monkeypatch, capsys):
    """``merge-graphs push FOLDER REPO`` (what a failed push tells the user to run): the repository,
    branch, privacy and message asked for, the URL printed, the token never; a refusal exits 1."""
    from merge_graphs.cli import main

    patch_default_endpoint(monkeypatch, hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert main(["push", str(model_folder), "alice/from-cli", "--private", "--revision", "dev",
                 "--message", "pushed from the command"]) == 0
    printed = capsys.readouterr()
    commit = hub.repos["alice/from-cli"].branches["dev"]
    assert printed.out.strip() == f"pushed: {hub.endpoint}/alice/from-cli/commit/{commit}"
    assert hub.token not in printed.out + printed.err
    assert hub.repos["alice/from-cli"].private
    assert hub.repos["alice/from-cli"].commits[commit].summary == "pushed from the command"
    assert hub.files("alice/from-cli", "dev")["model.safetensors"] == (model_folder / "model.safetensors").read_bytes()
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["push", str(model_folder), "alice/from-cli"]) == 1
    printed = capsys.readouterr()
    assert "rejected the token" in printed.err and "merge-graphs push" in printed.err
    assert SECRET not in printed.out + printed.err


def test_private_repo_and_organization(hub, model_folder):
    push_folder(model_folder, "merge-org/private-merge", private=True, token=hub.token, endpoint=hub.endpoint)
    assert hub.repos["merge-org/private-merge"].private
    assert HfApi(endpoint=hub.endpoint, token=hub.token).model_info("merge-org/private-merge").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info("merge-org/private-merge")


@pytest.mark.parametrize("source", ["HF_TOKEN", "token file"])
def test_token_is_found_like_huggingface_hub_finds_it(hub, model_folder, monkeypatch, source):
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", hub.token)
    else:  # what `hf auth login` writes (the fixture points HF_TOKEN_PATH into a temporary folder)
        Path(constants.HF_TOKEN_PATH).write_text(hub.token)
    url = push_folder(model_folder, "alice/merged", endpoint=hub.endpoint)
    assert "/alice/merged/commit/" in url


def test_download_with_resolve_and_load_model(hub, model_folder, monkeypatch, tmp_path):
    """The colleague's download path (merge_graphs.io.resolve / load_model) against the fake Hub."""
    push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)
    # resolve() has no endpoint argument: point huggingface_hub's default endpoint at the fake Hub.
    patch_default_endpoint(monkeypatch, hub.endpoint)
    cache = tmp_path / "cache"

    folder = resolve("alice/merged", cache_dir=cache)
    assert folder.parent.name == "snapshots" and folder.name == hub.repos["alice/merged"].branches["main"]
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not (folder / "README.md").exists()  # resolve fetches only what merging needs

    expected = _tiny_bert().state_dict()
    for model in (load_model(folder), load_model("alice/merged", cache_dir=cache)):
        assert type(model).__name__ == "BertModel"
        state = model.state_dict()
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), name

    # A Hub revision through the same path.
    (model_folder / "config.json").write_text(json.dumps({**json.loads((model_folder / "config.json").read_text()),
                                                          "merge_note": "branch"}))
    push_folder(model_folder, "alice/merged", revision="v2", token=hub.token, endpoint=hub.endpoint)
    on_branch = resolve("alice/merged@v2", cache_dir=cache)
    assert json.loads((on_branch / "config.json").read_text())["merge_note"] == "branch"
    assert hub.unhandled == []


# ---------------------------------------------------------------------- failures


def _assert_retry_message(message: str, folder: Path, repo_id: str) -> None:
    assert "intact" in message
    assert f"merge-graphs push {folder} {repo_id}" in message
    assert f"hf upload {repo_id} {folder}" in message


def test_no_token(hub, model_folder, caplog):
    _log_all(caplog)
    before = _digest(model_folder)
    with pytest.raises(PushError) as err:
        push_folder(model_folder, "alice/merged", endpoint=hub.endpoint)
    message = str(err.value)
    assert "not logged in" in message and "hf auth login" in message and "HF_TOKEN" in message
    _assert_retry_message(message, model_folder, "alice/merged")
    assert _digest(model_folder) == before
    assert "alice/merged" not in hub.repos


def test_invalid_token_never_appears_anywhere(hub, model_folder, caplog, monkeypatch):
    _log_all(caplog)
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub then logs every request as curl
    before = _digest(model_folder)
    for how in ("argument", "HF_TOKEN"):
        if how == "HF_TOKEN":
            monkeypatch.setenv("HF_TOKEN", SECRET)
        with pytest.raises(PushError) as err:
            push_folder(model_folder, "alice/merged", token=SECRET if how == "argument" else None,
                        endpoint=hub.endpoint)
        message = str(err.value)
        assert "rejected the token" in message and "HTTP 401" in message
        assert "hf auth login" in message and "HF_TOKEN" in message
        _assert_retry_message(message, model_folder, "alice/merged")
        assert SECRET not in _all_text(err.value)
    assert caplog.records, "the client logged nothing: the check below would prove nothing"
    assert SECRET not in caplog.text
    assert _digest(model_folder) == before


def test_valid_token_is_not_logged(hub, model_folder, caplog, monkeypatch):
    _log_all(caplog)
    monkeypatch.setattr(constants, "HF_DEBUG", True)
    push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)
    assert any("alice/merged" in r.getMessage() for r in caplog.records)
    assert "<TOKEN>" in caplog.text  # HF_DEBUG logged the authorization headers, masked
    assert hub.token not in caplog.text


def test_no_write_access_to_namespace(hub, model_folder):
    hub.add_repo("bob/public-model", {"README.md": b"bob's model\n"})
    bobs_files = hub.files("bob/public-model")
    before = _digest(model_folder)
    for repo_id in ("bob/merged", "bob/public-model"):  # a new repository, and an existing public one
        with pytest.raises(PushError) as err:
            push_folder(model_folder, repo_id, token=hub.token, endpoint=hub.endpoint)
        message = str(err.value)
        assert "no write access" in message and "HTTP 403" in message and "'bob'" in message
        _assert_retry_message(message, model_folder, repo_id)
    assert "bob/merged" not in hub.repos and hub.files("bob/public-model") == bobs_files
    assert _digest(model_folder) == before


def test_namespace_not_found(hub, model_folder):
    with pytest.raises(PushError) as err:
        push_folder(model_folder, "no-such-org/merged", token=hub.token, endpoint=hub.endpoint)
    message = str(err.value)
    assert "not found" in message and "HTTP 404" in message and "no-such-org" in message
    _assert_retry_message(message, model_folder, "no-such-org/merged")


def test_hub_unreachable(hub, model_folder, monkeypatch):
    endpoint = hub.endpoint
    hub.stop()  # the port is closed now: connection refused
    before = _digest(model_folder)
    # No retry loop on the first call: huggingface_hub's retries back off with time.sleep, so no
    # sleep at all (counted, not timed: a busy machine cannot make this fail).
    sleeps, here, sleep = [], threading.current_thread(), time.sleep
    with monkeypatch.context() as patch, pytest.raises(PushError) as err:
        patch.setattr(time, "sleep", lambda s: sleeps.append(s) if threading.current_thread() is here else sleep(s))
        push_folder(model_folder, "alice/merged", token=hub.token, endpoint=endpoint)
    assert sleeps == []
    message = str(err.value)
    assert "unreachable" in message and endpoint in message and "HF_ENDPOINT" in message
    _assert_retry_message(message, model_folder, "alice/merged")
    assert _digest(model_folder) == before


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/api/repos/create", 500),
    ("POST", "/api/models/alice/merged/commit/", 422),
])
def test_other_http_errors_carry_status_and_server_message(hub, model_folder, method, path, status):
    hub.fail(method, path, status, "the fake Hub says no today")
    with pytest.raises(PushError) as err:
        push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)
    message = str(err.value)
    assert f"HTTP {status}" in message and "the fake Hub says no today" in message
    _assert_retry_message(message, model_folder, "alice/merged")
    # the fault was transient: the retry the message suggests works
    assert "/commit/" in push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)


def test_offline_mode_is_explained(hub, model_folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)
    assert hub.requests == []


def test_missing_or_empty_folder(hub, tmp_path):
    with pytest.raises(PushError, match="not a folder"):
        push_folder(tmp_path / "nowhere", "alice/merged", token=hub.token, endpoint=hub.endpoint)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PushError, match="no files"):
        push_folder(tmp_path / "empty", "alice/merged", token=hub.token, endpoint=hub.endpoint)
    assert hub.requests == []


# ---------------------------------------------------------------------- the fake Hub itself


def test_fake_hub_pages_tree_listings_and_serves_ranges(hub, model_folder, tmp_path):
    hub.tree_page_size = 2  # the client must follow the Link header
    (model_folder / "sub").mkdir()
    (model_folder / "sub" / "extra.json").write_text("{}")
    push_folder(model_folder, "alice/merged", token=hub.token, endpoint=hub.endpoint)
    api = HfApi(endpoint=hub.endpoint)
    files = {f.path for f in api.list_repo_tree("alice/merged", recursive=True) if hasattr(f, "blob_id")}
    assert files == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub/extra.json"}
    assert sum("cursor=" in p for _, p, _, _ in hub.requests) >= 2
    snapshot = Path(snapshot_download("alice/merged", endpoint=hub.endpoint, cache_dir=tmp_path / "c"))
    assert (snapshot / "sub" / "extra.json").read_text() == "{}"

    from huggingface_hub.utils import get_session

    url = f"{hub.endpoint}/alice/merged/resolve/main/config.json"
    whole = (model_folder / "config.json").read_bytes()
    response = get_session().get(url, headers={"Range": "bytes=5-"})
    assert response.status_code == 206 and response.content == whole[5:]
    assert api.whoami(token=hub.token)["name"] == hub.user


def test_fake_hub_stops_by_itself():
    with FakeHub(max_lifetime_s=0.2) as fake:
        assert fake.running
        deadline = time.monotonic() + 5
        while fake.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not fake.running
