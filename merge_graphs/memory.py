"""Peak resident memory of this process, measured while a block of code runs.

``resource.getrusage`` only knows the peak of the whole process so far, which cannot tell the
stages of a run apart. :class:`PeakRSS` samples the current resident set size
(``/proc/self/statm`` on Linux) in a background thread, so each stage gets its own peak.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from types import TracebackType
from typing import Self

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The resident set size of this process now, in bytes.

    Where ``/proc`` is missing (macOS), the process's peak so far (``ru_maxrss``) stands in.

    Example:
        >>> from merge_graphs.memory import rss_bytes
        >>> rss_bytes() > 0
        True
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS:
    """Context manager: the largest resident set size seen while the block ran (``.peak``, bytes).

    Args:
        interval: seconds between samples; a spike shorter than that can be missed.

    Example:
        >>> import mmap
        >>> from merge_graphs.memory import PeakRSS, rss_bytes
        >>> with PeakRSS() as meter:  # 50 MB of fresh pages (malloc could reuse resident memory)
        ...     block = mmap.mmap(-1, 50_000_000)
        ...     for i in range(0, len(block), 4096):
        ...         block[i] = 1
        ...     alive = rss_bytes()
        >>> meter.peak >= alive - 1_000_000  # still alive when the block ends: the last sample sees it
        True
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Take one sample now (also useful right after allocating); returns the peak so far."""
        self.peak = max(self.peak, rss_bytes())
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
