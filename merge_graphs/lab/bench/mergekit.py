"""mergekit, the tool merge-graphs' users already know, as a baseline run beside ours.

mergekit is not a dependency of merge-graphs: :func:`mergekit_merge` (and :func:`mergekit_linear`) installs mergekit 0.1.5
into a virtual environment of its own on first use (``out/bench/mergekit-venv`` by default;
``python -m venv``, then ``pip install torch==2.13.0`` first, because an unpinned torch makes pip
fetch a multi-GB CUDA build, then ``pip install mergekit==0.1.5``), runs ``mergekit-yaml`` there
as a subprocess and measures its wall time and peak resident memory
(:func:`~merge_graphs.lab.bench.measure.run_measured`). When the environment cannot be made (no package index) or
mergekit fails, the result says ``skipped`` and why instead of raising, so a benchmark can still
report its own figures::

    run = mergekit_linear(["out/a", "out/b"], "out/ab-mergekit")
    if run.skipped:
        print("mergekit:", run.skipped)
    else:
        print(run.wall_s, run.peak_rss_bytes)

Seen with 0.1.5 (2026-11): it merges Llama checkpoints. It crashes on BertModel checkpoints
(all-MiniLM-L6-v2: ``TypeError: can only concatenate list (not "tuple") to list`` in
``plan_tensor``) and refuses the same folder twice (``Duplicate merge inputs``: pass a copy);
both come back as ``skipped`` with the error's last line (the full tail in ``log_tail``).

Tests never make this environment (no network at test time): they compare our merges with
mergekit outputs stored by :mod:`merge_graphs.lab.bench.mergekit_fixtures`, which uses it once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merge_graphs.lab.bench.common import DEFAULT_OUT
from merge_graphs.lab.bench.measure import run_measured

logger = logging.getLogger(__name__)

MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"
DEFAULT_VENV = Path(DEFAULT_OUT) / "mergekit-venv"
#: Lines of mergekit's output kept in a result.
LOG_TAIL = 40


@dataclass
class MergekitRun:
    """One ``mergekit-yaml`` run.

    Attributes:
        output: the merged model folder (None when skipped).
        wall_s: wall time of the ``mergekit-yaml`` process, start to exit (None when skipped).
        peak_rss_bytes: its peak resident memory (None when skipped).
        skipped: why mergekit did not run or failed; None when it merged.
        command: the command line run (empty when the environment could not be made).
        log_tail: the last lines of its output.
    """

    output: Path | None
    wall_s: float | None
    peak_rss_bytes: int | None
    skipped: str | None = None
    command: tuple[str, ...] = ()
    log_tail: str = ""

    def to_dict(self) -> dict:
        """JSON-able, for benchmark reports."""
        return {"output": str(self.output) if self.output else None, "wall_s": self.wall_s,
                "peak_rss_bytes": self.peak_rss_bytes, "skipped": self.skipped, "command": list(self.command),
                "version": MERGEKIT_VERSION}


class MergekitUnavailable(RuntimeError):
    """mergekit's environment could not be made (say, no package index reachable)."""


def mergekit_env(venv: str | os.PathLike | None = None) -> Path:
    """The ``mergekit-yaml`` executable of a virtual environment with mergekit 0.1.5, made on first use.

    Raises:
        MergekitUnavailable: with pip's last lines, when the environment cannot be made.
    """
    venv = Path(venv if venv is not None else DEFAULT_VENV)
    exe = venv / "bin" / "mergekit-yaml"
    marker = venv / f"mergekit-{MERGEKIT_VERSION}.ok"
    if exe.is_file() and marker.is_file():
        return exe
    logger.info("making %s: torch (CPU) and mergekit %s, a few minutes on first use", venv, MERGEKIT_VERSION)
    python = venv / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", TORCH_PIN],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              f"mergekit=={MERGEKIT_VERSION}"]]
    for step in steps:
        done = subprocess.run(step, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            raise MergekitUnavailable(f"`{' '.join(step)}` failed (exit {done.returncode}): {tail}")
    marker.write_text(f"{TORCH_PIN}\nmergekit=={MERGEKIT_VERSION}\n", encoding="utf-8")
    return exe


def linear_config(models: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                  dtype: str = "float32") -> dict:
    """mergekit's recipe for a linear merge of ``models`` (equal weights by default).

    Example:
        >>> linear_config(["a", "b"])["models"]
        [{'model': 'a', 'parameters': {'weight': 1.0}}, {'model': 'b', 'parameters': {'weight': 1.0}}]
    """
    weights = [1.0] * len(models) if weights is None else list(weights)
    if len(weights) != len(models):
        raise ValueError(f"{len(models)} models but {len(weights)} weights")
    return {"merge_method": "linear", "dtype": dtype,
            "models": [{"model": str(m), "parameters": {"weight": float(w)}} for m, w in zip(models, weights)]}


def mergekit_linear(models: Sequence[str | os.PathLike], out: str | os.PathLike,
                    weights: Sequence[float] | None = None, *, dtype: str = "float32",
                    venv: str | os.PathLike | None = None, extra_args: Sequence[str] = ()) -> MergekitRun:
    """Merge ``models`` (local folders) with mergekit's linear method into ``out``, timed.

    Args:
        models: Hugging Face model folders of one architecture.
        out: the output folder (mergekit writes it; an existing one is overwritten by mergekit).
        weights: one weight per model, normalized by mergekit; equal by default.
        dtype: mergekit's ``dtype`` for the merge and the output.
        venv, extra_args: as for :func:`mergekit_merge`.

    Returns:
        A :class:`MergekitRun`; ``skipped`` says why when mergekit could not run or failed.
    """
    return mergekit_merge(linear_config(models, weights, dtype), out, venv=venv, extra_args=extra_args)


def mergekit_merge(config: Mapping[str, Any], out: str | os.PathLike, *, venv: str | os.PathLike | None = None,
                   extra_args: Sequence[str] = ()) -> MergekitRun:
    """Run ``mergekit-yaml`` on ``config`` (a mergekit recipe: ``merge_method``, ``models`` ...) into ``out``, timed.

    Args:
        config: the recipe, written next to ``out`` as ``OUT.mergekit.yaml``.
        out: the output folder (mergekit writes it; an existing one is overwritten by mergekit).
        venv: mergekit's virtual environment (``out/bench/mergekit-venv`` by default; made if missing).
        extra_args: more ``mergekit-yaml`` options (e.g. ``["--out-shard-size", "1B"]``).

    Returns:
        A :class:`MergekitRun`; ``skipped`` says why when mergekit could not run or failed.
    """
    out = Path(out)
    try:
        exe = mergekit_env(venv)
    except MergekitUnavailable as e:
        logger.warning("mergekit skipped: %s", e)
        return MergekitRun(None, None, None, skipped=f"no mergekit environment: {e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    config_file = out.parent / f"{out.name}.mergekit.yaml"
    config_file.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    log = out.parent / f"{out.name}.mergekit.log"
    command = (str(exe), str(config_file), str(out), "--copy-tokenizer", *extra_args)
    # Offline: the models are local folders; mergekit must not wait on the Hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = run_measured(command, log, env)
    tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:])
    if done.returncode != 0:
        last = tail.splitlines()[-1] if tail else ""
        logger.warning("mergekit failed (exit %d): %s", done.returncode, last)
        return MergekitRun(None, done.wall_s, done.peak_rss_bytes, skipped=f"mergekit failed (exit {done.returncode}): "
                           f"{last}", command=command, log_tail=tail)
    return MergekitRun(out, done.wall_s, done.peak_rss_bytes, command=command, log_tail=tail)
