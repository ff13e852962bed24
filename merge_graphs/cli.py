"""The ``merge-graphs`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from merge_graphs import __version__
from merge_graphs.errors import MergeGraphsError


def inspect(args: argparse.Namespace) -> int:
    from merge_graphs.graph import NeuralGraph
    from merge_graphs.io import Checkpoint
    from merge_graphs.symmetry import spec_from_config

    ckpt = Checkpoint.open(args.model, allow_pickle=args.allow_pickle)
    spec = spec_from_config(ckpt.config, ckpt.infos(), ckpt.architecture)
    graph = NeuralGraph(spec, ckpt)
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
    print(f"{args.model}: {spec.family}, {len(spec.tensors)} labelled tensors, carried: {', '.join(spec.carried) or 'none'}")
    print(f"neural graph: {graph.num_nodes} nodes in {len(graph.node_sets)} sets, {graph.num_edges} edges")
    width = max(len(n) for n in spec.groups)
    for name, g in spec.groups.items():
        inside = f"  (one per unit of {g.parent})" if g.parent else ""
        print(f"  {name:<{width}}  {g.size:>6}{inside}")
    for note in spec.notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="merge-graphs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"merge-graphs {__version__}")
    parser.add_argument("--quiet", action="store_true", help="only errors")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("inspect", help="show a model's symmetry groups and neural graph size")
    p.add_argument("model", help="a local folder, or a Hub id org/name[@revision]")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pytorch_model.bin (runs pickle)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=inspect)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except MergeGraphsError as e:
        print(f"merge-graphs: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
