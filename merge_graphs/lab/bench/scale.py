"""Suite ``scale``: wall time and peak memory of merging Llama pairs, beside mergekit's merges.

    merge-graphs bench scale [--quick] [--out DIR] [--sizes 100m,1b] [--variants mergekit-ties,ours-ties] [--venv DIR]

Pairs of Llama models with random weights from seeds 0 and 1 (float32, ``save_pretrained`` as
sharded safetensors under ``OUT/scale/``, kept for the next run), in the sizes of :data:`SIZES`:

* ``100m``: hidden 768, 8 layers, 12 heads / 4 KV heads, intermediate 2048, vocab 32000, untied
  LM head: 99.6M parameters (0.40 GB a model);
* ``1b``: TinyLlama-1.1B's shape with 8 KV heads: hidden 2048, 22 layers, 32 heads / 8 KV heads,
  intermediate 5632, vocab 32000, untied: 1.12B parameters (4.5 GB a model);
* ``1b-bf16``: the same in bfloat16 (2.2 GB a model), the dtype such checkpoints ship in;
* ``8b`` (only when CUDA is available, bfloat16): hidden 4096, 32 layers, 32 heads / 8 KV heads,
  intermediate 14336, vocab 32000 (Llama-3-8B's body with Llama-2's vocabulary): 7.0B.

For each pair, the merges of :data:`VARIANTS`, each in a process of its own so its peak resident
memory is its own (:func:`~merge_graphs.lab.bench.measure.run_measured`):

* ``mergekit``: mergekit 0.1.5's linear merge (:mod:`merge_graphs.lab.bench.mergekit`; its own
  virtual environment, made on first use; ``skipped`` when it cannot be made);
* ``ours-none``: :func:`~merge_graphs.run.run_recipe` (what ``merge-graphs recipe.yaml`` runs)
  with ``align: none`` and a linear merge: the same merge as mergekit's;
* ``ours-weight``: the same with ``align: weight`` (Git Re-Basin weight matching, scipy's exact
  assignment on CPU, the torch auction on a GPU);
* ``ours-gnn``: the same with ``align: gnn`` (the pretrained encoder's embeddings, streamed);
* ``ours-rotation``: the same with ``align: {method: weight, residual: rotation}`` (norms folded,
  orthogonal weight matching and within-head maps, streamed);
* ``mergekit-M`` and ``ours-M`` for each method ``M`` of :data:`MERGES` (every method of the registry,
  :data:`merge_graphs.methods.METHODS`, but ``linear``): one mergekit recipe (:func:`method_config`),
  run by mergekit and by our tool (which reads mergekit recipes and merges them without alignment,
  as mergekit does). The registry says which models a method takes (:func:`method_seeds`): seed 0's
  model is the base of a method that takes one (required or optional), seed 1's the other; a method
  without a base merges seeds 0 and 1 alike (``passthrough``: seed 0's alone); ``model_stock`` and
  ``nuslerp``, which need two models besides the base, also take seed 2's, made for them only.
  Parameters (:data:`PARAMETERS`): weight 1, density 0.5 for the sparsifying methods (TIES, DARE,
  breadcrumbs, DELLA), ``select_topk`` 0.5 for SCE, t 0.5 for slerp, t 0.01 for nearswap, the
  registry's defaults otherwise.

``--sizes`` and ``--variants`` (comma lists) run a subset; ``--venv`` names mergekit's virtual
environment (default ``out/bench/mergekit-venv``, made on first use).

Reported per merge: wall time of the child, start to exit (Python start-up and imports
included, for both tools), its peak RSS, and for ours the time, peak RSS and peak GPU memory
per stage and the execution path (streamed or in-memory); ratios to mergekit's merge by the same
method; and per deterministic method the largest difference between our unaligned merge's tensors
and mergekit's (not for the random methods of the registry: :data:`RANDOM_MERGES`). Before each merge
the models' files are read once so every run starts with them in the
page cache. Then scipy's dense assignment, the candidate-pair solver and the torch auction
(:mod:`merge_graphs.assignment`) are timed on random costs and on 48-d embedding cosines of LLM group
widths (:data:`SOLVER_SIZES`; 14336 on a GPU only).
``OUT/bench-scale.json``. ``--quick`` merges a tiny pair (hidden 64, 2 layers, a few MB) and
times n = 256, so CI runs it in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import merge_graphs
from merge_graphs.lab.bench.common import machine, machine_line, out_folder, register, write_report
from merge_graphs.lab.bench.measure import run_measured
from merge_graphs.lab.bench.mergekit import mergekit_linear, mergekit_merge
from merge_graphs.methods import METHODS, MergeMethod

logger = logging.getLogger(__name__)

#: name -> LlamaConfig fields (every pair also gets an untied LM head and 2048 positions).
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 176, "vocab_size": 512},
    "100m": {"hidden_size": 768, "num_hidden_layers": 8, "num_attention_heads": 12, "num_key_value_heads": 4,
             "intermediate_size": 2048, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 5632, "vocab_size": 32000},
    "1b-bf16": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 5632, "vocab_size": 32000},
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 32000},
}
#: Sizes made in a dtype other than float32 (float32 8B models are 28 GB each).
DTYPES = {"1b-bf16": torch.bfloat16, "8b": torch.bfloat16}
#: Sizes that need a GPU.
GPU_SIZES = ("8b",)
#: Sizes of the square costs on which the assignment solvers are timed against scipy's dense one (CPU, GPU, --quick).
SOLVER_SIZES = {"cpu": (1024, 4096, 5632), "cuda": (1024, 4096, 14336), "quick": (256,)}
#: The pair's seeds. A third model (seed 2) is made, lazily and then kept like the pair, only for methods
#: that merge more models than a pair gives (``model_stock``: two besides the base; ``nuslerp``: exactly two).
SEEDS = (0, 1)
SHARD = "1GB"
#: Parameter values the scale merges set beyond the registry's defaults, per method: every parameter
#: the registry requires (its default ``None``: ``weight``, slerp's ``t`` ...) and what makes a method do
#: its work (density 0.5 for the sparsifying methods). Split into the recipe's global and per-model
#: parameters by the registry (:func:`method_parameters`).
PARAMETERS: dict[str, dict[str, Any]] = {
    "slerp": {"t": 0.5},
    # entries of the two random models lie ~0.03 apart (init std 0.02): t = 0.01 swaps some, moves the rest
    "nearswap": {"t": 0.01},
    "task_arithmetic": {"weight": 1.0},
    **{m: {"weight": 1.0, "density": 0.5} for m in ("ties", "dare_ties", "dare_linear", "breadcrumbs",
                                                     "breadcrumbs_ties", "della", "della_linear")},
    "sce": {"select_topk": 0.5},
    "multislerp": {"weight": 1.0},
    "nuslerp": {"weight": 1.0},
}


def _merges() -> dict[str, MergeMethod]:
    """Every method of the registry but ``linear`` (which the linear variants run, with and without alignment)."""
    return {name: m for name, m in METHODS.items() if name != "linear"}


#: Merge methods other than linear, run by both tools from one mergekit recipe without alignment
#: (:func:`method_config`): every method of :data:`merge_graphs.methods.METHODS` but ``linear``.
MERGES: dict[str, MergeMethod] = _merges()
#: Methods whose result is random (the registry's ``random``): the two tools' outputs are not compared.
RANDOM_MERGES = tuple(name for name, m in MERGES.items() if m.random)
#: name -> (tool, merge method, alignment): linear merges with each alignment, then each of
#: :data:`MERGES` by both tools.
VARIANTS: dict[str, tuple[str, str, str]] = {
    "mergekit": ("mergekit", "linear", "none"),
    "ours-none": ("ours", "linear", "none"),
    "ours-weight": ("ours", "linear", "weight"),
    "ours-gnn": ("ours", "linear", "gnn"),
    "ours-rotation": ("ours", "linear", "rotation"),
    **{f"{tool}-{method}": (tool, method, "none") for method in MERGES for tool in ("mergekit", "ours")},
}


def method_seeds(method: str) -> tuple[int | None, tuple[int, ...]]:
    """``(the base's seed or None, the other models' seeds)`` that a merge by ``method`` takes, from the
    registry: seed 0's model is the base of a method that takes one (required or optional), the others
    as many as the method needs, at least one (seed 2's model where a pair is not enough); a
    method without a base merges seeds 0 and 1 alike (one model where it merges exactly one).

    Example:
        >>> method_seeds("ties"), method_seeds("model_stock"), method_seeds("karcher"), method_seeds("passthrough")
        ((0, (1,)), (0, (1, 2)), (None, (0, 1)), (None, (0,)))
    """
    m = METHODS[method]
    low, high = m.models
    if m.base == "none":
        count = min(2, high) if high is not None else 2
        return None, tuple(range(max(low, count)))
    return 0, tuple(range(1, 1 + max(low, 1)))


def method_parameters(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(global parameters, each model's parameters)`` of the scale merge by ``method``: :data:`PARAMETERS`
    split by the registry. ValueError when a parameter the registry requires is not set there.

    Example:
        >>> method_parameters("della")
        ({}, {'weight': 1.0, 'density': 0.5})
    """
    m = METHODS[method]
    values = PARAMETERS.get(method, {})
    required = [k for k, v in {**m.global_parameters, **m.model_parameters}.items() if v is None and k not in values]
    if required:
        raise ValueError(f"the scale merge by {method} needs {required}: add them to PARAMETERS")
    return ({k: v for k, v in values.items() if k in m.global_parameters},
            {k: v for k, v in values.items() if k in m.model_parameters})


# The child that runs our recipe: run_recipe is what `merge-graphs recipe.yaml` calls; the child
# writes what the command would print as JSON, for the report.
_OURS = """
import json, sys, torch
from merge_graphs.run import run_recipe
r = run_recipe(sys.argv[1], out=sys.argv[4], device=sys.argv[2], overwrite=True, progress=False)
json.dump({"path": r.path, "path_reason": r.path_reason, "stage_seconds": r.stage_seconds,
           "stage_peak_rss": r.stage_peak_rss,
           "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
           "alignments": [{"method": a.method, "objective_before": a.objective_before,
                           "objective_after": a.objective_after, "iterations": a.iterations, "seconds": a.seconds,
                           "stage_seconds": a.stage_seconds}
                          for a in r.alignments]}, open(sys.argv[3], "w"))
"""


def solver_timings(sizes: Sequence[int], device: str) -> list[dict[str, Any]]:
    """scipy's dense exact assignment (CPU) against the candidate-pair solver (CPU, exact) and the torch
    auction (on ``device``), on ``n x n`` random costs and on cosines of 48-d embeddings.

    Random costs are the hard case for the dense solver and the auction (many permutations are nearly
    optimal); embedding cosines (low rank, as the GNN's similarities are) the dense solver's slowest.
    """
    from scipy.optimize import linear_sum_assignment

    from merge_graphs.assignment import auction, candidate_assignment

    rows = []
    for kind in ("random costs", "48-d embedding cosines"):
        for n in sizes:
            g = torch.Generator().manual_seed(n)
            if kind == "random costs":
                cost = torch.randn(n, n, generator=g)
            else:
                a = torch.nn.functional.normalize(torch.randn(n, 48, generator=g), dim=1)
                b = torch.nn.functional.normalize(a[torch.randperm(n, generator=g)] + torch.randn(n, 48, generator=g),
                                                  dim=1)
                cost = a @ b.T
            array = cost.double().numpy()
            start = time.perf_counter()
            exact = torch.as_tensor(linear_sum_assignment(array, maximize=True)[1])
            scipy_s = time.perf_counter() - start
            start = time.perf_counter()
            candidates = candidate_assignment(array)
            candidates_s = time.perf_counter() - start
            on_device = cost.to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            found = auction(on_device).cpu()
            auction_s = time.perf_counter() - start
            i = torch.arange(n)
            best = float(cost[i, exact].double().sum())
            row = {"kind": kind, "n": n, "device": device, "scipy_s": scipy_s, "auction_s": auction_s,
                   "relative_gap": (best - float(cost[i, found].double().sum())) / abs(best),
                   "same": float((found == exact).float().mean()), "candidates_s": candidates_s,
                   "candidates_same": None if candidates is None else float((torch.as_tensor(candidates) == exact)
                                                                            .float().mean())}
            rows.append(row)
            logger.info("assignment n=%d (%s): scipy %.2f s, candidates %.2f s, auction (%s) %.2f s", n, kind,
                        scipy_s, candidates_s, device, auction_s)
    return rows


def parameter_count(size: Mapping[str, Any]) -> int:
    """Parameters of a Llama of this :data:`SIZES` entry (untied LM head).

    Example:
        >>> round(parameter_count(SIZES["1b"]) / 1e9, 2)
        1.12
    """
    d, layers, vocab, inter = size["hidden_size"], size["num_hidden_layers"], size["vocab_size"], size["intermediate_size"]
    kv = d // size["num_attention_heads"] * size["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d
    return 2 * vocab * d + layers * per_layer + d


def llama_pair(name: str, folder: Path) -> list[Path]:
    """The pair of size ``name`` under ``folder`` (``NAME-seed0``, ``NAME-seed1``), made when missing."""
    return [llama_model(name, folder, seed) for seed in SEEDS]


def llama_model(name: str, folder: Path, seed: int) -> Path:
    """The model of size ``name`` from ``seed`` under ``folder`` (``NAME-seedS``), made when missing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = DTYPES.get(name, torch.float32)
    path = folder / f"{name}-seed{seed}"
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(**SIZES[name], max_position_embeddings=2048, tie_word_embeddings=False, dtype=dtype)
    logger.info("making %s (%.2fB parameters, seed %d)", path, parameter_count(SIZES[name]) / 1e9, seed)
    torch.manual_seed(seed)
    with torch.device("cuda" if name in GPU_SIZES else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    # Written aside, then renamed: a folder with a config is always a complete model.
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size=SHARD)
    del model
    partial.rename(path)
    return path


def _warm(folders: Sequence[Path]) -> None:
    """Read every file once, so that no run pays for the first read from disk."""
    for folder in folders:
        for f in folder.iterdir():
            with open(f, "rb") as src:
                while src.read(1 << 24):
                    pass


def _evict(folder: Path) -> None:
    """Write a finished merge's files to disk and drop them from the page cache (they stay on
    disk for the comparison): otherwise the next merge runs while the kernel writes back and
    reclaims this one's gigabytes (a 1.1B passthrough measured 2.2x slower right after
    mergekit's than on a machine without them)."""
    os.sync()
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def method_config(method: str, models: Mapping[int, Path], dtype: str) -> dict[str, Any]:
    """The mergekit recipe of one of :data:`MERGES` (both tools read it): the models of
    :func:`method_seeds` (``models``: seed -> folder) with :func:`method_parameters`; the base is
    ``base_model`` and not listed among ``models`` (mergekit adds it to the inputs).

    Example:
        >>> method_config("ties", {0: Path("a"), 1: Path("b")}, "float32")["models"]
        [{'model': 'b', 'parameters': {'weight': 1.0, 'density': 0.5}}]
    """
    base, others = method_seeds(method)
    global_parameters, parameters = method_parameters(method)
    config: dict[str, Any] = {"merge_method": method}
    if base is not None:
        config["base_model"] = str(models[base])
    config["models"] = [{"model": str(models[seed]), **({"parameters": dict(parameters)} if parameters else {})}
                        for seed in others]
    if global_parameters:
        config["parameters"] = dict(global_parameters)
    config["dtype"] = dtype
    return config


def method_models(method: str, name: str, folder: Path) -> dict[int, Path]:
    """seed -> folder of the models a merge by ``method`` (linear: the pair) takes, made when missing."""
    if method == "linear":
        return dict(enumerate(llama_pair(name, folder)))
    base, others = method_seeds(method)
    return {seed: llama_model(name, folder, seed) for seed in ([] if base is None else [base]) + list(others)}


def run_ours(recipe: Mapping[str, Any], out: Path, device: str) -> dict[str, Any]:
    """Run ``recipe`` (ours or mergekit's format) with our tool into ``out`` in a child process; its figures."""
    recipe_file = out.parent / f"{out.name}.yaml"
    recipe_file.write_text(yaml.safe_dump(dict(recipe), sort_keys=False), encoding="utf-8")
    figures = out.parent / f"{out.name}.json"
    log = out.parent / f"{out.name}.log"
    package_root = str(Path(merge_graphs.__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = run_measured([sys.executable, "-c", _OURS, str(recipe_file), device, str(figures), str(out)], log, env)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-20:]
        raise RuntimeError(f"our merge into {out.name} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return {"wall_s": done.wall_s, "peak_rss_bytes": done.peak_rss_bytes, **json.loads(figures.read_text(encoding="utf-8"))}


def _merge(variant: str, models: Mapping[int, Path], target: Path, dtype: torch.dtype, device: str,
           venv: str | os.PathLike | None = None) -> dict[str, Any]:
    """One variant's merge of ``models`` (:func:`method_models`) into ``target``, measured."""
    tool, method, align = VARIANTS[variant]
    dtype_name = str(dtype).split(".")[1]
    extra = ["--cuda"] if device == "cuda" else []
    if method != "linear":
        config = method_config(method, models, dtype_name)
        return (mergekit_merge(config, target, venv=venv, extra_args=extra).to_dict() if tool == "mergekit"
                else run_ours(config, target, device))
    pair = [models[seed] for seed in SEEDS]
    if tool == "mergekit":
        return mergekit_linear(pair, target, dtype=dtype_name, venv=venv, extra_args=extra).to_dict()
    return run_ours(linear_recipe(pair, target, align), target, device)


def linear_recipe(pair: Sequence[Path], out: Path, align: str) -> dict[str, Any]:
    """Our recipe for the linear merge of ``pair`` into ``out`` with ``align`` (a method, or ``"rotation"``:
    weight matching with a rotated residual stream), in mergekit's 5 GB shards."""
    method = {"method": "weight", "residual": "rotation"} if align == "rotation" else {"method": align}
    return {"models": [{"model": str(p.resolve())} for p in pair], "align": method,
            "merge": {"method": "linear"}, "output": {"path": str(out.resolve()), "shard_size": "5GB"}}


def tensor_differences(folder_a: Path, folder_b: Path) -> dict[str, float | int]:
    """How two safetensors folders' same-named tensors differ: ``{"max": largest absolute
    difference, "entries": how many entries differ, "of": how many entries in all}``."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        names = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                names.update(dict.fromkeys(f.keys(), shard))
        return names

    a, b = index(folder_a), index(folder_b)
    if set(a) != set(b):
        raise ValueError(f"{folder_a} and {folder_b} hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    out = {"max": 0.0, "entries": 0, "of": 0}
    for name in a:
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            diff = (fa.get_tensor(name).float() - fb.get_tensor(name).float()).abs()
        out["max"] = max(out["max"], float(diff.max()))
        out["entries"] += int(diff.count_nonzero())
        out["of"] += diff.numel()
    return out


def _baseline(variant: str) -> str:
    """The mergekit variant that ``variant`` is compared with: mergekit's merge by the same method."""
    method = VARIANTS[variant][1]
    return "mergekit" if method == "linear" else f"mergekit-{method}"


def _ratios(rows: Mapping[str, Mapping[str, Any]]) -> None:
    for name, row in rows.items():
        base = rows.get(_baseline(name), {})
        if VARIANTS[name][0] == "mergekit" or not base.get("wall_s") or base.get("skipped"):
            continue
        row["wall_ratio"] = row["wall_s"] / base["wall_s"]
        row["rss_ratio"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]


def format_scale(report: Mapping[str, Any]) -> str:
    """The table: per size and merge, wall time, peak RSS and their ratios to mergekit."""
    lines = [(f"scale suite: merges of random-weight Llama pairs (seeds {SEEDS[0]}/{SEEDS[1]}); each merge a "
              "process of its own; ratio = ours / mergekit 0.1.5's merge by the same method")]
    width = max([18, *(len(name) for size in report["sizes"] for name in size["merges"])])
    lines.append(f"{'size':6} {'params':>7} {'merge':{width}} {'wall s':>8} {'peak RSS GB':>12} {'x wall':>7} {'x RSS':>6}"
                 f"  {'path':10} stages")
    for size in report["sizes"]:
        params = f"{size['parameters'] / 1e9:.2f}B"
        for name, row in size["merges"].items():
            if row.get("skipped"):
                lines.append(f"{size['name']:6} {params:>7} {name:{width}} skipped: {row['skipped'][:100]}")
                continue
            ratios = (f"{row['wall_ratio']:>7.2f} {row['rss_ratio']:>6.2f}" if "wall_ratio" in row
                      else f"{'':>7} {'':>6}")
            stages = ", ".join(
                f"{k} {v:.1f}s" + (f"/{row['stage_peak_rss'][k] / 1e9:.2f}GB" if k in row.get("stage_peak_rss", {})
                                    else "")
                for k, v in row.get("stage_seconds", {}).items())
            # Where an aligner says where its time went (the GNN: embedding, matching, refinement).
            for found in row.get("alignments", []):
                if found.get("stage_seconds"):
                    stages += " (align: " + ", ".join(f"{k} {v:.1f}s" for k, v in found["stage_seconds"].items()) + ")"
            gpu = f"; GPU peak {row['gpu_peak_bytes'] / 1e9:.2f} GB" if row.get("gpu_peak_bytes") else ""
            lines.append(f"{size['name']:6} {params:>7} {name:{width}} {row['wall_s']:>8.1f} "
                         f"{row['peak_rss_bytes'] / 1e9:>12.2f} {ratios}  {row.get('path', ''):10} {stages}{gpu}")
        for method, diff in size["diff_vs_mergekit"].items():
            lines.append(f"{'':6} {method} without alignment, ours vs mergekit: largest difference {diff['max']:.3g}, "
                         f"{diff['entries']} of {diff['of']} entries differ")
    for row in report["solvers"]:
        same = row.get("candidates_same")
        candidates = "" if "candidates_s" not in row else (
            f"candidate pairs {row['candidates_s']:.2f} s ("
            + ("no answer: dense fallback" if same is None else f"{100 * same:.1f}% same matches") + "), ")
        lines.append(f"assignment n={row['n']} ({row.get('kind', 'random costs')}): scipy {row['scipy_s']:.2f} s, "
                     f"{candidates}torch auction on {row['device']} {row['auction_s']:.2f} s (objective gap "
                     f"{row['relative_gap']:.1e}, {100 * row['same']:.1f}% same matches)")
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


@register("scale", format=format_scale)
def scale_suite(quick: bool = False, out: str | os.PathLike | None = None, sizes: Sequence[str] | None = None,
                variants: Sequence[str] = tuple(VARIANTS), keep: bool = False, solvers: bool = True, *,
                venv: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Time and measure our merges of Llama pairs beside mergekit's; writes ``bench-scale.json``.

    Args:
        quick: the tiny pair only (CI).
        out: results folder (``out/bench``); pairs and merges go to ``OUT/scale/``.
        sizes: names from :data:`SIZES` (default ``100m``, ``1b`` and ``1b-bf16``, and ``8b`` when CUDA
            is available).
        variants: which merges of :data:`VARIANTS` to run (``merge-graphs bench scale --variants
            mergekit-ties,ours-ties``).
        keep: keep the merged folders (by default each is deleted once measured; the pairs stay).
        solvers: also time the assignment solvers (:func:`solver_timings`, :data:`SOLVER_SIZES`).
        venv: mergekit's virtual environment (:func:`~merge_graphs.lab.bench.mergekit.mergekit_env`'s
            default when None; made when missing).
        progress: accepted for the command's sake; the children run without bars.
    """
    total_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if sizes is None:
        sizes = ["quick"] if quick else ["100m", "1b", "1b-bf16", *(["8b"] if cuda else [])]
    unknown = set(sizes) - set(SIZES) | set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown sizes or variants {sorted(unknown)}; sizes: {sorted(SIZES)}, variants: {list(VARIANTS)}")
    if not cuda and set(sizes) & set(GPU_SIZES):
        raise ValueError(f"sizes {sorted(set(sizes) & set(GPU_SIZES))} need a GPU and torch sees none")
    device = "cuda" if cuda else "cpu"
    out = out_folder(out)
    folder = out / "scale"
    folder.mkdir(exist_ok=True)
    results = []
    for name in sizes:
        used: dict[int, Path] = {}  # every model a merge took: the pair, and the third where one needed it
        merges: dict[str, dict[str, Any]] = {}
        for variant in variants:
            target = folder / f"{name}-merged-{variant}"
            shutil.rmtree(target, ignore_errors=True)
            models = method_models(VARIANTS[variant][1], name, folder)
            used.update(models)
            _warm(list(models.values()))
            logger.info("%s: %s merge ...", name, variant)
            merges[variant] = _merge(variant, models, target, DTYPES.get(name, torch.float32), device, venv)
            if target.is_dir():
                _evict(target)
            logger.info("%s %s: %.1f s, peak RSS %.2f GB", name, variant, merges[variant]["wall_s"] or 0,
                        (merges[variant]["peak_rss_bytes"] or 0) / 1e9)
        _ratios(merges)
        row = {"name": name, "config": SIZES[name], "parameters": parameter_count(SIZES[name]),
               "dtype": str(DTYPES.get(name, torch.float32)), "models": [str(used[s]) for s in sorted(used)],
               "merges": merges, "diff_vs_mergekit": {}}
        # Unaligned merges by a deterministic method should give mergekit's tensors: count where not.
        for ours in variants:
            tool, method, align = VARIANTS[ours]
            merged = [folder / f"{name}-merged-{v}" for v in (ours, _baseline(ours))]
            if (tool, align) == ("ours", "none") and method not in RANDOM_MERGES and all(p.is_dir() for p in merged):
                row["diff_vs_mergekit"][method] = tensor_differences(*merged)
        if not keep:
            for variant in variants:
                shutil.rmtree(folder / f"{name}-merged-{variant}", ignore_errors=True)
        results.append(row)
    report = {"suite": "scale", "settings": {"quick": quick, "sizes": list(sizes), "variants": list(variants),
                                             "device": device, "seeds": list(SEEDS), "shard": SHARD},
              "machine": machine(), "sizes": results,
              "solvers": solver_timings(SOLVER_SIZES["quick" if quick else device], device) if solvers else []}
    return write_report(report, out, "scale", None, total_start)
