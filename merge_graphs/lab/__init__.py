"""The lab: what trains, measures and plots the models merge-graphs is developed on, not what merges.

Trainers and small data sets (:mod:`merge_graphs.lab.trainers`), the generator of the shipped
quickstart pair (:mod:`merge_graphs.lab.quickstart`), the GNN's pretraining zoo and its pretraining
(:mod:`merge_graphs.lab.pretraining_zoo`, :mod:`merge_graphs.lab.pretrain_gnn`), the benchmarks
(:mod:`merge_graphs.lab.bench`) and their plots (:mod:`merge_graphs.lab.plots`).

The runtime never imports the lab; only the ``bench`` and ``pretrain-gnn`` commands of
:mod:`merge_graphs.cli` do. Its dependencies beyond the runtime's are an optional extra,
``pip install "merge-graphs[lab]"``.

Example:
    >>> from merge_graphs.lab import missing_dependencies
    >>> missing_dependencies()  # the test extra installs the lab
    []
"""

from __future__ import annotations

import importlib.util

#: What installs the lab's dependencies.
INSTALL = 'pip install "merge-graphs[lab]"'

#: The lab's dependencies beyond the runtime's, by import name (the ``lab`` extra of pyproject.toml).
DEPENDENCIES = ("sklearn", "matplotlib")


def missing_dependencies() -> list[str]:
    """The modules of :data:`DEPENDENCIES` that are not installed, found without importing them."""
    return [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]
