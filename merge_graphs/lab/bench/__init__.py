"""Benchmarks: how much of naive averaging's loss barrier each alignment method removes, how
many permuted units each recovers, and what it costs.

    merge-graphs bench SUITE [--pairs N] [--steps S] [--lr LR] [--quick] [--out DIR] [--jobs J] [--quiet]
    merge-graphs bench scale [--sizes A,B] [--variants A,B] [--venv DIR] ...
    merge-graphs bench families [--families A,B] ...
    merge-graphs bench gpt2|llama --methods rotation,gnn+rotation   (those rows and naive only)
    merge-graphs bench gpt2|llama|gnn --encoder DIR ...   (another GNN's weights)
    python -m merge_graphs.lab.bench SUITE ...

Each suite prints a table, writes every figure to ``OUT/bench-SUITE.json`` (``out/bench`` by
default) and, where it draws curves, ``OUT/bench-SUITE.png``. ``--quick`` is the reduced run
that CI does. The suites (one module each; see their docstrings):

* ``gpt2`` (:mod:`merge_graphs.lab.bench.lm`): different-seed byte-level GPT-2 language models;
* ``llama`` (:mod:`merge_graphs.lab.bench.lm`): different-seed byte-level Llama language models (GQA, RoPE);
* ``families`` (:mod:`merge_graphs.lab.bench.families`): one different-seed pair per decoder family (Llama, Qwen3,
  Gemma 1/2/3, OLMo 2, Phi-3) at one small size: naive, weight matching, the best data-free alignment;
* ``mlp`` (:mod:`merge_graphs.lab.bench.mlp`): different-seed MLPs on scikit-learn's digits;
* ``minilm`` (:mod:`merge_graphs.lab.bench.minilm`): the real MiniLM-L6 against permuted, noised copies;
* ``gnn`` (:mod:`merge_graphs.lab.bench.gnn`): the pretrained GNN against weight matching on held-out zoo models;
* ``scale`` (:mod:`merge_graphs.lab.bench.scale`): wall time and peak memory of merging Llama pairs up to 1B
  (8B on a GPU) by every merge method, beside mergekit's merge by the same method;
* ``bert`` (:mod:`merge_graphs.lab.bench.bert`): different-seed BERT classifiers (post-LN) on digit tokens;
* ``speed`` (:mod:`merge_graphs.lab.bench.speed`): time and peak memory per stage of aligning and merging a
  MiniLM-L6 pair, beside mergekit's linear merge;
* ``finetune`` (:mod:`merge_graphs.lab.bench.finetune`): two fine-tunes of MiniLM-L6: alignment must find the
  identity; our linear merge against mergekit's;
* ``vit`` (:mod:`merge_graphs.lab.bench.vit`): different-seed ViT image classifiers (pre-LN) on digit images;
* ``clip`` (:mod:`merge_graphs.lab.bench.clip`): different-seed CLIP models (two towers) on digit images and
  captions, scored by zero-shot classification.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time
from collections.abc import Sequence

from merge_graphs.lab.bench import bert, clip, families, finetune, gnn, gpt2, lm, minilm, mlp, scale, speed, vit
from merge_graphs.lab.bench.bert import BERT_METHODS, bert_suite
from merge_graphs.lab.bench.clip import CLIP_METHODS, clip_suite
from merge_graphs.lab.bench.common import DEFAULT_OUT, SUITES, Suite, register
from merge_graphs.lab.bench.families import families_suite
from merge_graphs.lab.bench.gpt2 import METHODS, gpt2_suite
from merge_graphs.lab.bench.lm import LLAMA_METHODS, llama_suite
from merge_graphs.lab.bench.minilm import minilm_suite
from merge_graphs.lab.bench.mlp import MLP_METHODS, mlp_suite
from merge_graphs.lab.bench.vit import VIT_METHODS, vit_suite

__all__ = ["BERT_METHODS", "CLIP_METHODS", "LLAMA_METHODS", "METHODS", "MLP_METHODS", "SUITES", "Suite",
           "VIT_METHODS", "bert", "bert_suite", "clip", "clip_suite", "families", "families_suite", "finetune", "gnn",
           "gpt2", "gpt2_suite", "llama_suite", "lm", "main", "minilm", "minilm_suite", "mlp", "mlp_suite",
           "register", "run_suite", "scale", "speed", "vit", "vit_suite"]


def run_suite(name: str, **options) -> dict:
    """Run the suite ``name`` with the ``options`` its function accepts (others are ignored)."""
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; choose one of {sorted(SUITES)}")
    run = SUITES[name].run
    accepted = inspect.signature(run).parameters
    return run(**{k: v for k, v in options.items() if k in accepted and v is not None})


def _comma_list(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``: an option's comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``merge-graphs bench`` command."""
    parser = argparse.ArgumentParser(prog="merge-graphs bench", description=__doc__.split("\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES), help="which benchmark to run")
    parser.add_argument("--pairs", type=int, default=None,
                        help="seed pairs (default: gpt2 3, llama 3, mlp 5, bert 3, vit 3, clip 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per model (gpt2, default 800; llama, default 500; families, default 300; "
                             "finetune, default 150) "
                             "or epochs (mlp, default 20; bert, default 30; vit, default 30; clip, default 30)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of the trained models (gpt2, llama, families)")
    parser.add_argument("--quick", action="store_true", help="one pair, a few steps and windows (CI smoke run)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for results and cached models (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=None, help="train this many models at once (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no log lines or progress bars")
    parser.add_argument("--sizes", type=_comma_list, default=None,
                        help="scale: comma-separated model sizes to run, e.g. 100m,1b (default: all but quick)")
    parser.add_argument("--variants", type=_comma_list, default=None,
                        help="scale: comma-separated merges to run, e.g. mergekit-ties,ours-ties (default: all)")
    parser.add_argument("--methods", type=_comma_list, default=None,
                        help="gpt2, llama: comma-separated rows to run, e.g. rotation,gnn+rotation (naive always "
                             "runs; default: all)")
    parser.add_argument("--families", type=_comma_list, default=None,
                        help="families: comma-separated rows to run, e.g. qwen3,gemma2 (default: all)")
    parser.add_argument("--encoder", default=None,
                        help="gnn, gpt2, llama: a folder of GNN weights (merge-graphs pretrain-gnn --out DIR; default: shipped)")
    parser.add_argument("--venv", default=None,
                        help="scale: mergekit's virtual environment (default out/bench/mergekit-venv, made if missing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        report = run_suite(args.suite, pairs=args.pairs, steps=args.steps, lr=args.lr, quick=args.quick,
                           out=args.out, jobs=args.jobs, sizes=args.sizes, variants=args.variants, venv=args.venv,
                           families=args.families, methods=args.methods, encoder=args.encoder,
                           progress=not args.quiet)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    print(SUITES[args.suite].format(report))
    print(f"wall time {time.perf_counter() - start:.1f} s; wrote {' and '.join(report['files'].values())}")
    return 0
