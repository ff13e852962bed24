"""Pushing a written model folder to the Hugging Face Hub.

:func:`push_folder` creates the repository if needed (``create_repo(exist_ok=True)``), the
branch if a ``revision`` is given, then uploads the folder in one ``upload_folder`` call. The
token comes from the ``token`` argument, else ``HF_TOKEN``, else the file ``hf auth login``
wrote: huggingface_hub resolves it, and it is never printed, logged or written anywhere.

Every failure is a :class:`~merge_graphs.errors.PushError` whose message says what went wrong
(no or invalid token, no write access, repository or namespace not found, Hub unreachable, any
other HTTP error with the server's message), that the local folder is intact, and the command
that retries the push.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from merge_graphs.errors import PushError

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload merge made with merge-graphs"


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the Hub could not be reached (for whichever HTTP client huggingface_hub uses)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _uri_error() -> tuple[type[BaseException], ...]:
    try:
        from huggingface_hub.errors import HfUriError
    except ImportError:  # older huggingface_hub
        return ()
    return (HfUriError,)


def _retry_hint(folder: Path, repo_id: str, revision: str | None) -> str:
    rev = f" --revision {shlex.quote(revision)}" if revision else ""
    path, repo = shlex.quote(str(folder)), shlex.quote(repo_id)
    return (
        f"The local folder {str(folder)!r} is intact; nothing in it was changed or deleted. Retry with "
        f"`merge-graphs push {path} {repo}{rev}` (or `hf upload {repo} {path} .{rev}`)."
    )


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "hf_***")
    return text


def _token_available(token: str | bool | None) -> bool:
    """Whether a token would be sent (without reading it into any message)."""
    if isinstance(token, str):
        return bool(token)
    if token is False:
        return False
    from huggingface_hub import get_token

    try:
        return get_token() is not None
    except Exception:  # noqa: BLE001 - e.g. an OIDC exchange failing; only picks the wording of a message
        return False


def _server_message(err: BaseException) -> str:
    message = getattr(err, "server_message", None)
    if message:
        return str(message).strip().splitlines()[0]
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _explain(err: BaseException, *, repo_id: str, revision: str | None, endpoint: str,
             token: str | bool | None) -> str:
    """What happened and what to do, for an error raised by huggingface_hub while pushing."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RevisionNotFoundError,
    )

    namespace = repo_id.split("/", 1)[0] if "/" in repo_id else "your user name"
    login = "set HF_TOKEN to a token with the write role (https://huggingface.co/settings/tokens) or run `hf auth login`"
    where = f"to {repo_id!r}" + (f" (branch {revision!r})" if revision else "") + f" on {endpoint}"
    if isinstance(err, OfflineModeIsEnabled):
        return f"cannot push {where}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls. Unset it."
    if isinstance(err, LocalTokenNotFoundError):
        return f"cannot push {where}: no Hugging Face token found. To log in, {login}."
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        server = _server_message(err)
        if status == 401:
            if _token_available(token):
                return (f"the Hub rejected the token while pushing {where} (HTTP 401: {server}): it is invalid, "
                        f"expired or revoked. Note that HF_TOKEN takes precedence over `hf auth login`; {login}.")
            return f"cannot push {where}: not logged in (HTTP 401, no Hugging Face token found). To log in, {login}."
        if status == 403:
            return (f"no write access {where} (HTTP 403: {server}). The token's user can write only to its own "
                    f"namespace and to organizations where it has the write role, not to {namespace!r}; push to "
                    "'your-name/model-name', ask an admin of the organization for write access, or use a token with "
                    "the write role.")
        if status == 404 and isinstance(err, RevisionNotFoundError):
            return (f"branch {revision!r} was not found in {repo_id!r} on {endpoint} (HTTP 404: {server}). Check "
                    "the revision: it must be a branch name (it is created when missing), not a tag or a commit.")
        if status == 404:
            return (f"repository or namespace not found while pushing {where} (HTTP 404: {server}). Check that "
                    f"{namespace!r} is your user name or an organization you belong to, and the spelling of the id.")
        return f"the Hub answered HTTP {status} while pushing {where}: {server}. Try again later."
    if isinstance(err, _network_errors()):
        return (f"the Hub ({endpoint}) is unreachable, so {repo_id!r} could not be pushed: {type(err).__name__}: "
                f"{_server_message(err)}. Check the network connection, proxy settings and HF_ENDPOINT.")
    return f"pushing {where} failed: {type(err).__name__}: {_server_message(err)}"


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a model folder to a Hub model repository, creating the repository (and branch) if needed.

    Args:
        folder: the local folder (e.g. written by ``merge-graphs``); uploaded as it is, in one commit
            (folders of many files go in several commits).
        repo_id: ``your-name/model-name`` or ``organization/model-name``.
        private: make a *new* repository private (True) or public (False); None: the Hub's default.
            An existing repository keeps its visibility.
        revision: a branch to push to, created from the default branch when missing; None: the
            default branch.
        commit_message: the commit's title; default ``"Upload merge made with merge-graphs"``.
        token: a Hub token with write access; default ``HF_TOKEN``, else the one saved by
            ``hf auth login``. Never printed, logged or stored.
        endpoint: the Hub's URL; default ``HF_ENDPOINT`` or https://huggingface.co.

    Returns:
        The URL of the commit.

    Raises:
        PushError: the folder is missing or empty, or the Hub refused or could not be reached;
            the message says why, that the local folder is intact, and how to retry.
    """
    from huggingface_hub import HfApi

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PushError(f"cannot push {str(folder)!r} to {repo_id!r}: it is not a folder. Pass the output folder "
                        "that merge-graphs wrote (output.path or --out).")
    if not any(p.is_file() for p in folder.rglob("*")):
        raise PushError(f"cannot push {str(folder)!r} to {repo_id!r}: the folder holds no files.")
    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint
    secrets = [token] if isinstance(token, str) else []
    if token is None:
        try:
            from huggingface_hub import get_token

            secrets.append(get_token() or "")  # only to scrub it from messages, should a server echo it
        except Exception:  # noqa: BLE001, S110 - the scrub is a second line of defence, never a reason to fail
            pass
    try:
        logger.info("creating or reusing Hub repository %s on %s", repo_id, where)
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            target = getattr(repo_url, "repo_id", None) or repo_id  # 'name' alone lands in the user's namespace
        except _uri_error() as err:
            # huggingface_hub 2.4: after a 401/403 on create, exist_ok checks that the repository exists
            # (it does, or this would be an HTTP error) and then fails to parse its URL on an endpoint
            # other than HF_ENDPOINT. The repository exists: go on, the upload says whether we may write.
            logger.debug("create_repo could not parse the URL of existing %s: %s", repo_id, type(err).__name__)
            target = repo_id
        if revision and not revision.startswith("refs/pr/") and revision != "main":
            logger.info("creating branch %s of %s if missing", revision, target)
            api.create_branch(target, branch=revision, exist_ok=True, repo_type="model")
        n_files = sum(1 for p in folder.rglob("*") if p.is_file())
        logger.info("uploading %s (%d files) to %s%s", folder, n_files, target, f"@{revision}" if revision else "")
        info = api.upload_folder(
            folder_path=str(folder), repo_id=target, repo_type="model", revision=revision,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except Exception as err:  # every failure becomes a PushError that says how to retry
        if isinstance(err, ValueError) and not hasattr(err, "response"):
            # raised by huggingface_hub before or without an HTTP error: a bad id or revision, invalid
            # README.md metadata ...
            message = f"cannot push {str(folder)!r} to {repo_id!r}: {_server_message(err)}"
        else:
            message = _explain(err, repo_id=repo_id, revision=revision, endpoint=where, token=token)
        message = _redact(f"{message}\n{_retry_hint(folder, repo_id, revision)}", secrets)
        logger.debug("push of %s to %s failed: %s", folder, repo_id, type(err).__name__)
        raise PushError(message) from err
    url = str(getattr(info, "commit_url", info))
    logger.info("pushed %s to %s: %s", folder, repo_id, url)
    return url
