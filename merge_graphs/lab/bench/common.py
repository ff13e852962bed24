"""What every benchmark suite shares: the registry, interpolation curves, spreads, the machine, the report file.

A suite is a function that measures and returns a JSON-able report (and writes
``OUT/bench-NAME.json`` with :func:`write_report`), registered with a function that turns the
report into the table the command prints::

    @register("mlp", format=format_mlp)
    def mlp_suite(pairs: int = 5, quick: bool = False, out=None, *, progress: bool = False) -> dict: ...

The command passes a suite only the options its signature accepts (``pairs``, ``steps``,
``quick``, ``out``, ``jobs``, ``lr``, ``progress``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_graphs.evaluate import InterpolationCurve, interpolate_state_dicts
from merge_graphs.sources import module_tensors

logger = logging.getLogger(__name__)

DEFAULT_OUT = os.path.join("out", "bench")
POINTS = 11


@dataclass(frozen=True)
class Suite:
    """A registered benchmark: ``run(**options) -> report`` and ``format(report) -> table``."""

    name: str
    run: Callable[..., dict[str, Any]]
    format: Callable[[Mapping[str, Any]], str]


SUITES: dict[str, Suite] = {}


def register(name: str, *, format: Callable[[Mapping[str, Any]], str]):
    """Decorator: make a suite function available as ``merge-graphs bench NAME``."""

    def decorate(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in SUITES:
            raise ValueError(f"benchmark suite {name!r} is registered twice")
        SUITES[name] = Suite(name, run, format)
        return run

    return decorate


def out_folder(out: str | os.PathLike | None) -> Path:
    """The results folder (created), ``out/bench`` by default."""
    folder = Path(out if out is not None else DEFAULT_OUT)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def curve(skeleton: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
          loss: Callable[[nn.Module], float], label: str, points: int = POINTS) -> InterpolationCurve:
    """Loss along the line from ``state_a`` to ``state_b`` (named as ``skeleton``'s state dict or as its checkpoints
    store them: a mixture of experts' experts one tensor each), each point loaded into a copy of ``skeleton``."""
    scratch = copy.deepcopy(skeleton)
    alphas = [i / (points - 1) for i in range(points)]
    losses = []
    for alpha in alphas:
        scratch.load_state_dict(dict(module_tensors(scratch, interpolate_state_dicts(state_a, state_b, alpha))))
        losses.append(float(loss(scratch)))
    return InterpolationCurve(alphas, losses, label)


def add_removed(methods: Mapping[str, dict[str, Any]]) -> None:
    """Set each method's ``removed``: the share of the ``naive`` barrier that it removes."""
    naive = methods["naive"]["barrier"]
    for row in methods.values():
        row["removed"] = 1.0 - row["barrier"] / naive if naive > 0 else math.nan


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(results: Sequence[Mapping[str, Any]], methods: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """Per method and key, the :func:`spread` over the pairs in ``results``."""
    return {name: {key: spread([r["methods"][name][key] for r in results]) for key in keys} for name in methods}


def machine() -> dict[str, Any]:
    """The machine the figures were measured on."""
    return {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def machine_line(m: Mapping[str, Any]) -> str:
    """One line naming the machine of a report."""
    return (f"machine: {m['processor']} ({m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} "
            f"threads, Python {m['python']})")


def cell(s: Mapping[str, float], fmt: str, scale: float = 1.0) -> str:
    """``median [min, max]`` of a :func:`spread`."""
    return f"{s['median'] * scale:{fmt}} [{s['min'] * scale:{fmt}}, {s['max'] * scale:{fmt}}]"


def write_report(report: dict[str, Any], out: Path, suite: str, plot: str | os.PathLike | None,
                 total_start: float) -> dict[str, Any]:
    """Stamp the total time, write ``bench-SUITE.json`` and record the files written."""
    report["total_s"] = time.perf_counter() - total_start
    path = out / f"bench-{suite}.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["files"] = {"json": str(path), **({"png": str(plot)} if plot else {})}
    logger.info("wrote %s", " and ".join(report["files"].values()))
    return report
