"""A folder written whole or not at all, and the leftovers of writers that were killed.

:func:`atomic_folder` hands out a hidden temporary folder beside the target and renames it onto
the target only once the block that fills it has finished: after an error or Ctrl-C nothing is at
the target, and an existing folder is replaced only by a complete one.

A writer killed outright (``kill -9``, out of memory, a lost node) cannot clean up, and its
temporary folder may hold gigabytes. So the folder's name records who writes it, as
``.{target}.tmp-{machine}-{pid}-{start}-{random}`` (``machine``: a hash of the host name and PID
namespace; ``start``: when the process started, so that a process that later got the same pid is
not taken for the writer), and every write removes the leftovers in its parent folder whose writer
no longer runs. A folder whose writer still runs, or runs on another machine, is left alone.

Example:
    >>> import os, tempfile
    >>> from merge_graphs.io.atomic import atomic_folder
    >>> with tempfile.TemporaryDirectory() as parent:
    ...     with atomic_folder(os.path.join(parent, "out"), overwrite=False, what="notes") as (tmp, target):
    ...         _ = (tmp / "a.txt").write_text("hello")
    ...         [name.startswith(".out.tmp-") for name in os.listdir(parent)]
    ...     os.listdir(parent), os.listdir(target)
    [True]
    (['out'], ['a.txt'])
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

# .{target}.{tmp|old}-{machine}-{pid}-{start}-{random}
_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-(?P<machine>[0-9a-f]{8})-(?P<pid>\d{1,9})-(?P<start>\d{1,20})-[0-9a-f]{8}$")


@contextmanager
def atomic_folder(path: str | os.PathLike[str], overwrite: bool, what: str) -> Iterator[tuple[Path, Path]]:
    """Yield ``(temporary folder, target)``; the folder is renamed onto the target when the
    block ends, and removed (nothing at the target) when it raises, Ctrl-C included.

    The temporary folder is ``.{name}.tmp-...`` in the target's parent (same file system, so the
    rename is atomic). With ``overwrite`` an existing target is moved aside only once the new
    folder is complete, then deleted; if the final rename fails, the old folder is put back.
    Leftovers of killed writers in the parent are removed first (one INFO line each).

    Args:
        path: the folder to write (its parent folders are created).
        overwrite: replace an existing folder at ``path``.
        what: what is written, for the log.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is off, or ``path`` is a file; raised
            before anything is written, or at the end if such a path appeared meanwhile.
        ValueError: ``path`` has no name (a file system root).
    """
    target = Path(os.path.abspath(os.fspath(Path(path).expanduser())))
    if not target.name or target.parent == target:
        raise ValueError(f"cannot write a model folder at {str(target)!r}: choose a folder path such as 'merged-model'")
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target.parent)
    tmp = _make_sibling_dir(target, "tmp")
    logger.info("writing %s to %s (via %s)", what, target, tmp.name)
    try:
        yield tmp, target
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    logger.info("wrote %s: %s", target, ", ".join(sorted(os.listdir(target))))


def _exists_message(target: Path) -> str:
    return (f"output folder {str(target)!r} already exists; pass overwrite=True (CLI: --force) to replace it, "
            "or choose another path")


def _check_target(target: Path, overwrite: bool) -> None:
    """Raise when ``target`` cannot be written."""
    if os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(f"{str(target)!r} exists and is not a folder; the model is written as a folder: "
                              "choose another path (or remove the file)")
    if target.is_dir() and not overwrite:
        raise FileExistsError(_exists_message(target))


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` onto ``target``; an old folder is replaced only now."""
    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)
        except OSError as err:
            if os.path.lexists(target):  # created meanwhile by someone else
                raise FileExistsError(_exists_message(target)) from err
            raise
        return
    _check_target(target, overwrite)  # appeared while writing, or is no longer a folder
    aside = _sibling_name(target, "old")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        try:
            os.rename(aside, target)
        except OSError as err:  # pragma: no cover - depends on the file system
            logger.error("could not put the old folder back at %s (%s); it is at %s", target, err, aside)
        raise
    _remove(aside)


# -- who writes a temporary folder ---------------------------------------------------------------


def _sibling_name(target: Path, kind: str) -> Path:
    """A new name ``.{name}.{kind}-{writer}-{random}`` beside ``target`` (nothing is created)."""
    return target.parent / f".{target.name}.{kind}-{_writer()}-{secrets.token_hex(4)}"


def _make_sibling_dir(target: Path, kind: str) -> Path:
    """Create an empty hidden folder :func:`_sibling_name` beside ``target`` (mode per umask)."""
    for _ in range(100):
        candidate = _sibling_name(target, kind)
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary folder beside {target}")  # pragma: no cover


@cache
def _machine() -> str:
    """This host and PID namespace, hashed: pids name processes only within one of these."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State (``R``, ``S``, ``Z`` ...) and start time (clock ticks after boot) of process ``pid``,
    from Linux's ``/proc``; None where it cannot tell (no such process, no ``/proc``, hidden)."""
    try:
        # The command name (in parentheses) may hold spaces: after it come the state, 18 more
        # fields, then the start time.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _writer() -> str:
    """``{machine}-{pid}-{start}`` of this process (start 0: unknown)."""
    stat = _proc_stat(os.getpid())
    return f"{_machine()}-{os.getpid()}-{stat[1] if stat else 0}"


def _running(pid: int, start: int) -> bool:
    """Whether process ``pid`` of this machine, started at ``start`` (0: unknown), still runs."""
    if os.name != "posix":  # pragma: no cover - os.kill(pid, 0) would signal the process there
        return True
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    stat = _proc_stat(pid)
    if stat is None:  # no /proc, or the process is hidden in it (hidepid): it exists, so assume it is the writer
        return True
    state, started = stat
    # A zombie is a killed writer its parent has not reaped; another start time, a new process
    # that got the writer's pid.
    return state not in ("Z", "X") and start in (0, started)


def _remove_leftovers(parent: Path) -> None:
    """Remove the temporary folders in ``parent`` whose writer, on this machine, no longer runs."""
    try:
        names = os.listdir(parent)
    except OSError:  # pragma: no cover - the write itself then reports the problem
        return
    for name in names:
        match = _LEFTOVER.match(name)
        if match is None or match["machine"] != _machine():
            continue
        pid, start = int(match["pid"]), int(match["start"])
        if not _running(pid, start):
            logger.info("removing %s: the unfinished write of process %d, which no longer runs", parent / name, pid)
            _remove(parent / name)


def _remove(path: Path) -> None:
    """Remove a folder tree, or a symlink / file, ignoring errors (logged)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except FileNotFoundError:  # removed meanwhile by another writer's clean-up
        pass
    except OSError as err:  # pragma: no cover - depends on the file system
        logger.warning("could not remove %s: %s; delete it by hand", path, err)
