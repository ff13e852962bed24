"""A local fake of the Hugging Face Hub's HTTP API, for testing with the real ``huggingface_hub`` client.

It speaks the subset of the Hub API that ``huggingface_hub`` 2.x calls to create a repository,
upload a folder, read repository info and download files (``snapshot_download``,
``hf_hub_download``, ``from_pretrained`` through the cache). Repositories live in memory.

What the client calls, and what this server answers (read from the client's source):

- ``POST /api/repos/create`` ``{name, organization, visibility?, type?}``: ``{"url": ...}``;
  409 with ``url`` when the repository exists (``create_repo(exist_ok=True)`` reads it).
  A new repository gets an initial commit holding ``.gitattributes``, as on the Hub.
- ``POST /api/models/{ns}/{name}/preupload/{rev}``: every file is answered
  ``uploadMode: "regular"`` (``shouldIgnore: false``, ``oid``: the git blob id of the file
  already at that path, or null), so neither Xet nor Git LFS is ever used, with or without
  ``hf_xet`` installed. ``upload_folder`` then sends the files base64-encoded in the commit.
- ``POST /api/models/{ns}/{name}/commit/{rev}`` (ndjson: ``header``, ``file``,
  ``deletedFile``, ``deletedFolder``; ``lfsFile`` is refused): ``{commitOid, commitUrl}``.
- ``POST /api/validate-yaml`` (``create_commit`` with a ``README.md``), ``POST
  /api/models/{ns}/{name}/branch/{branch}``, ``GET /api/models/{ns}/{name}/refs``.
- ``GET /api/models/{ns}/{name}[/revision/{rev}]``: ``id``, ``sha``, ``siblings``,
  ``cardData`` (the YAML front matter of ``README.md``), ``tags``, ``library_name``.
- ``GET /api/models/{ns}/{name}/tree/{rev}[/{path}]?recursive=...&expand=...``: files and
  folders, paginated with a ``Link: <...>; rel="next"`` header like the Hub.
- ``HEAD``/``GET /{ns}/{name}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the git
  blob id), ``Content-Length``; ``Range`` requests. ``GET /api/whoami-v2``.

Errors carry ``X-Error-Message`` and, where the Hub sets one, ``X-Error-Code``
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), and a JSON body
``{"error": ...}``. Auth: one valid token (``Authorization: Bearer <token>``) for one user
and its organizations. A wrong token gets 401 on every route; no token gets 401 on writes;
writing under a namespace the user does not own gets 403; private repositories are invisible
(404 ``RepoNotFound``) to others. Anything else is answered 404 and recorded in
:attr:`FakeHub.unhandled`, so a test can assert that the client called nothing unexpected
(no Xet token, no LFS batch).

The server binds to 127.0.0.1 on a free port, serves each request on its own thread
(``ThreadingHTTPServer``), closes every connection after one request, limits request bodies,
and, when given ``max_lifetime_s``, shuts itself down after that long even if nobody stops it
(:func:`running_hub` gives none: it always stops the server itself, and a timer could stop it in
the middle of a slow test on a busy machine). The token is never
logged or stored in :attr:`FakeHub.requests`.

In a test module: wrap :func:`running_hub` in a fixture (it also turns huggingface_hub's offline
mode off and hides any real token for the test), or import the ``hub`` fixture defined here; pass
``endpoint=hub.endpoint`` and ``token=hub.token`` to the client. For code without an ``endpoint``
argument, :func:`patch_default_endpoint`. Outside pytest: ``with FakeHub() as hub: ...``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

DEFAULT_TOKEN = "hf_FakeHubTestToken0123456789abcdefXYZ"  # not a real token: the fake Hub's only valid one
DEFAULT_USER = "alice"
DEFAULT_ORGS = ("merge-org",)

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """An error answer: status, message (``X-Error-Message`` and ``{"error": ...}``), optional ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's ``oid`` and ``ETag``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def card_data(readme: bytes | None) -> dict | None:
    """The YAML front matter of a README.md as a dict, None when there is none; raises ValueError when invalid."""
    if readme is None:
        return None
    match = _YAML_BLOCK.search(readme.decode("utf-8", errors="replace"))
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        raise ValueError(f"invalid YAML in README.md metadata: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README.md metadata must be a YAML mapping")  # noqa: TRY004 - a message for the client
    return data


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    parent: str | None
    summary: str
    description: str = ""
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name or a full commit id names; 404 RevisionNotFound otherwise."""
        oid = self.branches.get(revision)
        if oid is None and _COMMIT_ID.match(revision) and revision in self.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


class FakeHub:
    """An in-memory Hugging Face Hub on ``http://127.0.0.1:<port>``.

    Args:
        token: the one valid access token.
        user: the user that token belongs to.
        orgs: organizations the user can write to.
        other_namespaces: users and organizations that exist but the user cannot write to (403);
            namespaces in none of these, and owning no repository, do not exist (404).
        tree_page_size: entries per page of ``/tree`` listings (the Hub pages at 1000; small
            values exercise the client's pagination).
        max_body_bytes: larger request bodies are refused (413).
        max_lifetime_s: the server shuts itself down after this long (None: only :meth:`stop` stops it).
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        orgs: tuple[str, ...] = DEFAULT_ORGS,
        other_namespaces: tuple[str, ...] = ("bob",),
        tree_page_size: int = 1000,
        max_body_bytes: int = 512 * 1024 * 1024,
        max_lifetime_s: float | None = 300.0,
    ):
        self.token, self.user, self.orgs = token, user, tuple(orgs)
        self.other_namespaces = tuple(other_namespaces)
        #: injected failures: [method, path prefix, status, message, remaining count]
        self.faults: list[list[Any]] = []
        self.tree_page_size = tree_page_size
        self.max_body_bytes = max_body_bytes
        self.max_lifetime_s = max_lifetime_s
        self.repos: dict[str, Repo] = {}
        #: (method, path with query, authenticated: bool, status) of every request; never the token.
        self.requests: list[tuple[str, str, bool, int]] = []
        #: (method, path) of requests that no route handles.
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: pass it as ``endpoint=`` to ``HfApi`` / ``snapshot_download``."""
        if self._server is None:
            raise RuntimeError("the fake Hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        if self.max_lifetime_s is not None:
            self._timer = threading.Timer(self.max_lifetime_s, self.stop)
            self._timer.daemon = True
            self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port (idempotent): later requests get 'connection refused'."""
        server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ state helpers

    def namespaces(self) -> set[str]:
        """The namespaces the token's user can write to."""
        return {self.user, *self.orgs}

    def namespace_exists(self, namespace: str) -> bool:
        return namespace in self.namespaces() or namespace in self.other_namespaces or any(
            r.namespace == namespace for r in self.repos.values()
        )

    def fail(self, method: str, path_prefix: str, status: int, message: str, *, times: int = 1) -> None:
        """Answer the next ``times`` requests ``method path_prefix...`` with an error ``status`` and ``message``."""
        with self._lock:
            self.faults.append([method, path_prefix, status, message, times])

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False) -> str:
        """Create a repository directly (any namespace, e.g. one the token's user does not own); its commit id."""
        with self._lock:
            repo = self.repos[repo_id] = Repo(repo_id=repo_id, private=private)
            initial = {".gitattributes": GITATTRIBUTES, **(files or {})}
            commit = self._new_commit(repo, initial, parent=None, summary="initial commit")
            repo.branches["main"] = commit.oid
            return commit.oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repository at a revision."""
        with self._lock:
            return dict(self.repos[repo_id].resolve(revision).files)

    def paths_requested(self) -> list[str]:
        """Request paths (without query) in the order received."""
        return [urlsplit(path).path for _, path, _, _ in self.requests]

    def _new_commit(self, repo: Repo, files: dict[str, bytes], *, parent: str | None, summary: str,
                    description: str = "") -> Commit:
        seed = f"{repo.repo_id}\0{parent}\0{summary}\0{next(self._counter)}\0{time.time_ns()}"
        digest = hashlib.sha1(seed.encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_id(files[path])}\0".encode())
        commit = Commit(oid=digest.hexdigest(), files=files, parent=parent, summary=summary, description=description)
        repo.commits[commit.oid] = commit
        return commit

    def _url(self, path: str) -> str:
        return f"{self.endpoint}{path}"


# ---------------------------------------------------------------------- request handling


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after stop()
    server_version = "FakeHub/1.0"
    timeout = 30  # seconds a connection may stay silent

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # silence the access log on stderr
        pass

    # --- plumbing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        authorization = self.headers.get("Authorization")
        status = 500
        self._raw: bytes | HubError = b""
        if method in ("POST", "PUT"):
            try:
                self._raw = self._read_body()  # before taking the hub's lock: a slow client blocks nobody
            except HubError as err:
                self._raw = err
        try:
            status, headers, body = self._route(method)
        except HubError as err:
            status = err.status
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            if "X-Repo-Commit" in err.extra:
                headers["X-Repo-Commit"] = err.extra.pop("X-Repo-Commit")
            body = {"error": err.message, **err.extra}
        except Exception as err:  # noqa: BLE001 - a bug in the fake must surface as a 500, not a hang
            status, headers, body = 500, {"X-Error-Message": f"fake hub error: {type(err).__name__}"}, {
                "error": f"fake hub error: {type(err).__name__}: {err}"
            }
        with self.hub._lock:
            self.hub.requests.append((method, self.path, authorization is not None, status))
        self._send(method, status, headers, body)

    def _send(self, method: str, status: int, headers: dict[str, str], body: Any) -> None:
        if isinstance(body, (bytes, bytearray)):
            payload = bytes(body)
            headers.setdefault("Content-Type", "application/octet-stream")
        else:
            payload = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        headers.setdefault("Content-Length", str(len(payload)))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body_bytes:
            raise HubError(413, f"request body too large ({length} bytes)")
        return self.rfile.read(length) if length else b""

    def _body(self) -> bytes:
        if isinstance(self._raw, HubError):
            raise self._raw
        return self._raw

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except ValueError as err:
            raise HubError(400, f"invalid JSON body: {err}") from err

    # --- auth

    def _user(self) -> str | None:
        """The authenticated user, None when anonymous; 401 for a wrong token."""
        header = self.headers.get("Authorization")
        if header is None:
            return None
        if header != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.user

    def _writer(self) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to do this: no token in Authorization header")
        return user

    def _repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or repo.namespace not in self.hub.namespaces())):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str) -> Repo:
        user = self._writer()
        repo = self._repo(repo_id, user)
        if repo.namespace not in self.hub.namespaces():
            raise HubError(403, f"You don't have write access to {repo_id}: {user} is not a member of {repo.namespace}")
        return repo

    # --- routes

    def _route(self, method: str) -> tuple[int, dict[str, str], Any]:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        hub = self.hub
        with hub._lock:
            for fault in hub.faults:
                if fault[4] > 0 and fault[0] == method and url.path.startswith(fault[1]):
                    fault[4] -= 1
                    raise HubError(fault[2], fault[3])
            if method == "POST" and segments == ["api", "repos", "create"]:
                return self._create_repo()
            if method == "POST" and segments == ["api", "validate-yaml"]:
                return self._validate_yaml()
            if method == "GET" and segments == ["api", "whoami-v2"]:
                return self._whoami()
            if len(segments) >= 4 and segments[:2] == ["api", "models"]:
                repo_id, rest = f"{segments[2]}/{segments[3]}", segments[4:]
                if method == "GET" and not rest:
                    return self._model_info(repo_id, "main")
                if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                    return self._model_info(repo_id, rest[1])
                if method == "GET" and rest and rest[0] == "tree" and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
                if method == "GET" and rest == ["refs"]:
                    return self._refs(repo_id)
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._preupload(repo_id, rest[1])
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._commit(repo_id, rest[1], query)
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._create_branch(repo_id, rest[1])
            if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve" and segments[0] != "api":
                return self._resolve(method, f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]))
            hub.unhandled.append((method, url.path))
        raise HubError(404, f"Not implemented by the fake Hub: {method} {url.path}")

    def _create_repo(self) -> tuple[int, dict[str, str], Any]:
        user = self._writer()
        payload = self._json_body()
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"the fake Hub only has model repositories, not {repo_type!r}")
        if not isinstance(name, str) or not name:
            raise HubError(400, "missing repository name")
        namespace = org or user
        repo_id = f"{namespace}/{name}"
        url = self.hub._url(f"/{repo_id}")
        if not self.hub.namespace_exists(namespace):
            raise HubError(404, f'Namespace "{namespace}" does not exist')
        if namespace not in self.hub.namespaces():
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.hub.repos:
            raise HubError(409, "You already created this model repo", url=url)
        self.hub.add_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def _validate_yaml(self) -> tuple[int, dict[str, str], Any]:
        self._user()
        payload = self._json_body()
        try:
            card_data((payload.get("content") or "").encode())
        except ValueError as err:
            return 400, {"X-Error-Message": "Invalid metadata"}, {"errors": [{"message": str(err)}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def _whoami(self) -> tuple[int, dict[str, str], Any]:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return 200, {}, {
            "type": "user", "id": "0" * 24, "name": user, "fullname": user.title(), "email": None,
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in self.hub.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
        }

    def _model_info(self, repo_id: str, revision: str) -> tuple[int, dict[str, str], Any]:
        user = self._user()
        repo = self._repo(repo_id, user)
        commit = repo.resolve(revision)
        try:
            card = card_data(commit.files.get("README.md"))
        except ValueError:
            card = None
        tags = list((card or {}).get("tags") or [])
        library = (card or {}).get("library_name")
        if library and library not in tags:
            tags.insert(0, library)
        if any(p.endswith(".safetensors") for p in commit.files) and "safetensors" not in tags:
            tags.append("safetensors")
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo.namespace, "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": tags, "library_name": library,
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
                for path, data in sorted(commit.files.items())
            ],
        }
        if card is not None:
            info["cardData"] = card
        if "config.json" in commit.files:
            try:
                info["config"] = {k: v for k, v in json.loads(commit.files["config.json"]).items()
                                  if k in ("architectures", "model_type")}
            except ValueError:
                pass
        return 200, {}, info

    def _tree(self, repo_id: str, revision: str, prefix: str, query: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        repo = self._repo(repo_id, self._user())
        commit = repo.resolve(revision)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        if prefix and prefix in commit.files:
            raise HubError(400, f"{prefix} is a file, not a folder")
        entries: dict[str, dict[str, Any]] = {}
        for path, data in commit.files.items():
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(len(parts), depth) + 1):
                sub = base + "/".join(parts[:i])
                if i == len(parts):
                    entries[sub] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": sub}
                else:
                    entries.setdefault(sub, {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(),
                                             "size": 0, "path": sub})
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        listing = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", "0"))
        page = listing[start:start + self.hub.tree_page_size]
        headers: dict[str, str] = {}
        if start + self.hub.tree_page_size < len(listing):
            next_query = f"recursive={str(recursive).lower()}&expand=false&cursor={start + self.hub.tree_page_size}"
            path = f"/api/models/{repo_id}/tree/{quote(revision, safe='')}" + (f"/{quote(prefix)}" if prefix else "")
            headers["Link"] = f'<{self.hub._url(path)}?{next_query}>; rel="next"'
        return 200, headers, page

    def _refs(self, repo_id: str) -> tuple[int, dict[str, str], Any]:
        repo = self._repo(repo_id, self._user())
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in sorted(repo.branches.items())]
        return 200, {}, {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    def _preupload(self, repo_id: str, revision: str) -> tuple[int, dict[str, str], Any]:
        repo = self._writable_repo(repo_id)
        payload = self._json_body()
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        commit = repo.resolve(revision)
        files = []
        for item in payload.get("files") or []:
            path = item["path"]
            existing = commit.files.get(path)
            files.append({
                "path": path, "uploadMode": "regular", "shouldIgnore": False,
                "oid": git_blob_id(existing) if existing is not None else None,
            })
        return 200, {}, {"files": files, "commitOid": commit.oid}

    def _commit(self, repo_id: str, revision: str, query: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        repo = self._writable_repo(repo_id)
        if query.get("create_pr"):
            raise HubError(400, "the fake Hub does not implement pull requests")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        head = repo.resolve(revision)
        parent = header.get("parentCommit")
        if parent and not head.oid.startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}: {revision} is at {head.oid}")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[path] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                folder = path.rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            elif key == "lfsFile":
                raise HubError(400, f"{path}: LFS/Xet uploads are not supported by the fake Hub (preupload said regular)")
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self.hub._new_commit(repo, files, parent=head.oid, summary=header.get("summary") or "",
                                      description=header.get("description") or "")
        repo.branches[revision] = commit.oid
        url = self.hub._url(f"/{repo_id}/commit/{commit.oid}")
        return 200, {}, {"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": "",
                         "pullRequestUrl": None}

    def _create_branch(self, repo_id: str, branch: str) -> tuple[int, dict[str, str], Any]:
        repo = self._writable_repo(repo_id)
        payload = self._json_body()
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = repo.resolve(payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        return 200, {}, {}

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> tuple[int, dict[str, str], Any]:
        repo = self._repo(repo_id, self._user())
        commit = repo.resolve(revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, body = 200, data
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if ranged and method == "GET" and (ranged.group(1) or ranged.group(2)):
            first, last = ranged.groups()
            if first:
                start, end = int(first), int(last) if last else len(data) - 1
            else:
                start, end = max(len(data) - int(last), 0), len(data) - 1
            if start >= len(data):
                raise HubError(416, "Requested range not satisfiable")
            end = min(end, len(data) - 1)
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        return status, headers, body


# ---------------------------------------------------------------------- pytest fixture


def _isolate_client(monkeypatch: pytest.MonkeyPatch, tmp_dir: str) -> None:
    """Online mode, no inherited token, direct connections to 127.0.0.1 for huggingface_hub in this test."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    # tests/conftest.py sets HF_HUB_OFFLINE=1 before the import; the client reads the constant at call time.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    # Never pick up the developer's real token (env or `hf auth login` file).
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(tmp_dir, "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", os.path.join(tmp_dir, "stored_tokens"))
    # Keep the traffic on 127.0.0.1 even where a proxy is configured.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    _http.close_session()  # the shared client is rebuilt with these settings


def patch_default_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point huggingface_hub's default endpoint (HF_ENDPOINT, read at import) at ``endpoint`` for one test.

    For code that has no ``endpoint=`` argument: ``HfApi()`` reads ``constants.ENDPOINT`` when
    built, and ``hf_hub_url`` formats ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, which was built
    from it at import, so both are patched.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@contextlib.contextmanager
def running_hub(monkeypatch: pytest.MonkeyPatch, tmp_dir: str | os.PathLike[str], **kwargs: Any) -> Iterator[FakeHub]:
    """A running :class:`FakeHub`, with huggingface_hub online, tokenless and isolated, for one test.

    ``monkeypatch`` undoes the client settings at the end of the test (offline mode comes back);
    the server is stopped when the block ends. ``kwargs`` go to :class:`FakeHub`.
    """
    from huggingface_hub.utils import _http

    _isolate_client(monkeypatch, str(tmp_dir))
    fake = FakeHub(**{"max_lifetime_s": None, **kwargs}).start()
    try:
        yield fake
    finally:
        fake.stop()
        _http.close_session()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A running :class:`FakeHub` (see :func:`running_hub`); the valid token is ``hub.token``.

    To use it, import it into a test module, or wrap :func:`running_hub` in a fixture there.
    """
    with running_hub(monkeypatch, tmp_path_factory.mktemp("hf_home")) as fake:
        yield fake
