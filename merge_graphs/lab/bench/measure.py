"""Wall time and peak resident memory of a command, run as a process of its own.

The obvious measure, ``ru_maxrss`` of a child from ``os.wait4`` (or ``RUSAGE_CHILDREN``), is
wrong after the parent has grown: Linux starts a child's peak at the high-water mark of the
memory it was forked from, so a child of a parent that once held a 4.5 GB model reports at
least 4.5 GB whatever it did. :func:`run_measured` therefore starts the command from a small
launcher process (plain Python, no imports beyond the standard library) and takes the
command's ``ru_maxrss`` from there: the floor is the launcher's few MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Runs COMMAND, then writes its exit code, wall time and ru_maxrss (KiB on Linux) to FIGURES.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss], f)
"""


@dataclass(frozen=True)
class Measured:
    """A finished command: exit code, wall time (start to exit) and peak RSS in bytes (it and
    the processes it waited for)."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int


def run_measured(command: Sequence[str], log: str | os.PathLike, env: Mapping[str, str] | None = None) -> Measured:
    """Run ``command`` with its output in ``log``; its exit code, wall time and peak RSS.

    Example:
        >>> import sys, tempfile, os
        >>> m = run_measured([sys.executable, "-c", "x = bytearray(200_000_000)"],
        ...                  os.path.join(tempfile.mkdtemp(), "log"))
        >>> m.returncode, 200e6 < m.peak_rss_bytes < 400e6
        (0, True)
    """
    with tempfile.TemporaryDirectory() as scratch:
        figures = Path(scratch) / "figures.json"
        with open(log, "w", encoding="utf-8") as sink:
            subprocess.run([sys.executable, "-c", _LAUNCHER, str(figures), *command], stdout=sink,
                           stderr=subprocess.STDOUT, env=None if env is None else dict(env), check=False)
        code, wall, maxrss_kib = json.loads(figures.read_text(encoding="utf-8"))
    return Measured(code, wall, maxrss_kib * 1024)
