"""The ``merge-graphs`` command: a thin layer over the Python API (:data:`HELP` is what users see)."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys

import torch

from merge_graphs import __version__
from merge_graphs.errors import MergeGraphsError
from merge_graphs.gnn import default_encoder
from merge_graphs.gnn import embed as embed_model
from merge_graphs.gnn.lineage import DIFFERENT, lineage, lineage_threshold
from merge_graphs.gnn.mergeability import barrier_model, pair_features
from merge_graphs.graph import NeuralGraph
from merge_graphs.io import Checkpoint
from merge_graphs.io.push import push_folder
from merge_graphs.run import run_recipe
from merge_graphs.sources import ModelTensors
from merge_graphs.symmetry import spec_from_config

MAX_GROUP_ROWS = 12

HELP = """\
Merge Hugging Face models trained from different initializations: align their hidden units
(permutations, residual-stream rotations, maps learned on a little text), then merge them with
mergekit's methods, and write a normal Hugging Face model folder.

examples:
  merge-graphs recipe.yaml                       run a recipe (merge-graphs or mergekit format)
  merge-graphs recipe.yaml --dry-run             check it and say what would happen, load no weights
  merge-graphs recipe.yaml --out merged --push-to-hub me/merged
  merge-graphs inspect org/model                 a checkpoint's symmetry groups, read lazily
  merge-graphs push merged me/merged --private   push a written folder to the Hub
  merge-graphs embed model-a model-b             how alike models are by their GNN embeddings, which
                                                 share a base (fine-tunes) or were trained apart, and
                                                 each pair's predicted barrier after weight matching
  merge-graphs bench gpt2                        rerun a benchmark of the README
  merge-graphs pretrain-gnn                      retrain the shipped GNN

a recipe:
  models: [{model: org/model-a}, {model: ./model-b}]
  align: {method: weight, residual: rotation}   # none | weight | activation | gnn | learned
  merge: {method: linear}
  output: {path: ./merged}
"""


def run(args: argparse.Namespace) -> int:
    result = run_recipe(args.recipe, out=args.out, push_to_hub=args.push_to_hub, device=args.device,
                        dry_run=args.dry_run, overwrite=True if args.force else None, progress=not args.quiet)
    if args.dry_run:
        print("dry run, nothing loaded or written:")
        for line in result.plan:
            print(f"  {line}")
        return 0
    if args.quiet:
        return 0
    if result.recipe.source_format == "mergekit":
        print("mergekit recipe: merged without alignment, as mergekit does")
    for entry, a in zip(result.merged, result.alignments):
        if a.method == "none":
            continue
        gain = a.objective_after - a.objective_before
        where = "".join(f", {k} {v:.1f}s" for k, v in a.stage_seconds.items())
        print(f"aligned {_short(entry)} ({a.method}, {a.iterations} sweeps, {a.seconds:.1f}s{where}): "
              f"matching objective {a.objective_before:.4g} -> {a.objective_after:.4g} ({gain:+.4g})")
        rows = list(a.summary().items())
        width = max(len(g) for g, _ in rows)
        for group, row in rows[:MAX_GROUP_ROWS]:
            print(f"  {group:<{width}}  {row['before']:>11.4g} -> {row['after']:<11.4g}")
        if len(rows) > MAX_GROUP_ROWS:
            print(f"  ... {len(rows) - MAX_GROUP_ROWS} more groups in the model card")
    if result.scores:
        print("held-out loss (lower is better):")
        names = {k: _short(k) for k in result.scores}
        width = max(len(n) for n in names.values())
        for key, value in result.scores.items():
            print(f"  {names[key]:<{width}}  {value:.4f}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.stage_seconds.items())
    print(f"time: {stages}; total {math.fsum(result.stage_seconds.values()):.1f}s")
    if result.stage_peak_rss:
        print(f"{result.path} path ({result.path_reason}); peak memory "
              f"{max(result.stage_peak_rss.values()) / 2**30:.2f} GiB")
    print(f"wrote {_short(str(result.output))}")
    if result.commit_url:
        print(f"pushed: {result.commit_url}")
    return 0


def _short(ref: str) -> str:
    """A model folder below the working directory as a relative path; anything else as given."""
    if os.path.isabs(ref):
        rel = os.path.relpath(ref)
        return ref if rel.startswith("..") else rel
    return ref


def inspect(args: argparse.Namespace) -> int:
    ckpt = Checkpoint.open(args.model, allow_pickle=args.allow_pickle)
    tensors = ModelTensors(ckpt)  # under the model's names (a ViT checkpoint's are older)
    spec = spec_from_config(ckpt.config, tensors.infos(), ckpt.architecture)
    graph = NeuralGraph(spec, tensors)
    report = {
        "family": spec.family,
        "groups": {name: {"size": g.size, "parent": g.parent} for name, g in spec.groups.items()},
        "tensors": len(spec.tensors),
        "carried": list(spec.carried),
        "graph": {"node_sets": len(graph.node_sets), "nodes": graph.num_nodes, "edges": graph.num_edges},
        "notes": list(spec.notes),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: {spec.family}, {len(spec.tensors)} labelled tensors, "
          f"carried: {', '.join(spec.carried) or 'none'}")
    print(f"neural graph: {graph.num_nodes} nodes in {len(graph.node_sets)} sets, {graph.num_edges} edges")
    width = max(len(n) for n in spec.groups)
    for name, g in spec.groups.items():
        inside = f"  (one per unit of {g.parent})" if g.parent else ""
        print(f"  {name:<{width}}  {g.size:>6}{inside}")
    for note in spec.notes:
        print(f"note: {note}")
    return 0


def push(args: argparse.Namespace) -> int:
    url = push_folder(args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                      commit_message=args.message)
    print(f"pushed: {url}")
    return 0


def embed(args: argparse.Namespace) -> int:
    encoder = default_encoder()
    # Each model embedded once; its embeddings serve both the pooled table and the lineage pairs. Read from the
    # checkpoints as needed, never loaded whole: lineage's weight matching streams as an alignment does.
    embeddings = [embed_model(ModelTensors(Checkpoint.open(ref, allow_pickle=args.allow_pickle)), encoder)
                  for ref in args.models]
    x = torch.nn.functional.normalize(torch.stack([e.pooled for e in embeddings]).float(), dim=1)
    similarity = x @ x.T
    names = [_short(m) for m in args.models]
    width = max(8, *(len(n) for n in names))
    print("cosine similarity of pooled GNN embeddings (a summary of each model: near 1 for any two models of one "
          "architecture)")
    print(" " * width + "".join(f"  {i:>6}" for i in range(len(names))))
    for i, name in enumerate(names):
        print(f"{name:<{width}}" + "".join(f"  {v:6.3f}" for v in similarity[i].tolist()) + f"  [{i}]")
    if len(embeddings) < 2:
        return 0
    threshold = lineage_threshold()
    print("\nlineage: mean correlation of the two models' tensors once B's units are matched to A's; "
          f"above {threshold:.3f} says same base")
    print("barrier: predicted loss barrier after weight matching, relative to the two models' mean loss")
    pairs = lineage(embeddings, [f"[{i}]" for i in range(len(names))], threshold=threshold)
    labels = [f"{p.a} {p.b}" for p in pairs]
    pw = max(4, *(len(label) for label in labels))
    print(f"  {'pair':<{pw}}  {'score':>6}  {'barrier':>8}  verdict")
    model, extrapolated = barrier_model(), False
    for (i, j), label, pair in zip(itertools.combinations(range(len(embeddings)), 2), labels, pairs):
        if pair.verdict == DIFFERENT:
            score, barrier = "     -", "       -"
        else:
            features = pair_features(embeddings[i], embeddings[j], pair.score)
            mark = " " if model.covers(features) else "*"
            extrapolated |= mark == "*"
            score, barrier = f"{pair.score:6.3f}", f"{model.predict(features):7.3f}{mark}"
        print(f"  {label:<{pw}}  {score}  {barrier}  {pair.verdict}")
    if extrapolated:
        print("  * a width or depth outside the zoo models the barrier was fitted on: an extrapolation, untested")
    return 0


def lab(command: str, argv: list[str]) -> int:
    """``bench`` and ``pretrain-gnn``, the lab's commands. The lab is an optional extra, so it is imported
    here, once its dependencies are known to be installed: without them, one line that says how to get them."""
    from merge_graphs.lab import INSTALL, missing_dependencies

    missing = missing_dependencies()
    if missing:
        print(f"merge-graphs: error: {command} needs {' and '.join(missing)}, which the lab extra installs: "
              f"{INSTALL}", file=sys.stderr)
        return 1
    if command == "bench":
        from merge_graphs.lab.bench import main
    else:
        from merge_graphs.lab.pretrain_gnn import main
    rest = list(argv)
    rest.remove(command)
    try:
        return main(rest)
    except MergeGraphsError as e:
        print(f"merge-graphs: error: {e}", file=sys.stderr)
        return 1


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge-graphs", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"merge-graphs {__version__}")
    parser.add_argument("--quiet", action="store_true", help="print errors only")
    if command == "inspect":
        commands = parser.add_subparsers(dest="command", required=True)
        p = commands.add_parser("inspect", help="show a model's symmetry groups and neural-graph size")
        p.add_argument("model", help="a local folder, or a Hub id org/name[@revision]")
        p.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (runs pickle)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(handler=inspect)
    elif command == "push":
        commands = parser.add_subparsers(dest="command", required=True)
        p = commands.add_parser("push", help="push a written model folder to the Hub")
        p.add_argument("folder")
        p.add_argument("repo_id", help="your-name/model-name")
        p.add_argument("--private", action="store_true")
        p.add_argument("--revision", help="a branch to push to (created if missing)")
        p.add_argument("--message", help="commit message")
        p.set_defaults(handler=push)
    elif command == "embed":
        commands = parser.add_subparsers(dest="command", required=True)
        p = commands.add_parser("embed", help="pairwise similarity of models by their GNN embeddings, their lineage "
                                "and predicted barrier")
        p.add_argument("models", nargs="+", help="local folders, or Hub ids org/name[@revision]")
        p.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (runs pickle)")
        p.set_defaults(handler=embed)
    else:
        parser.add_argument("recipe", help="a recipe YAML file (merge-graphs or mergekit format)")
        parser.add_argument("--out", help="output folder (overrides output.path)")
        parser.add_argument("--push-to-hub", metavar="REPO", help="push the result to this Hub repo")
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        parser.add_argument("--dry-run", action="store_true", help="validate and plan; load no weights")
        parser.add_argument("--force", action="store_true", help="replace an existing output folder")
        parser.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in ("bench", "pretrain-gnn"):
        return lab(command, argv)
    args = _parser(command if command in ("inspect", "push", "embed") else None).parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(message)s")
    from transformers.utils import logging as hf_logging

    # Our own bars and summary report progress; transformers' per-file bars are noise here.
    hf_logging.disable_progress_bar()
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        return args.handler(args)
    except (MergeGraphsError, FileExistsError) as e:
        print(f"merge-graphs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("merge-graphs: interrupted; no output folder was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
