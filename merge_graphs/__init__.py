"""merge-graphs: merge models trained from different initializations by aligning their units first."""

from merge_graphs.api import align, merge_models, neural_graph, permute
from merge_graphs.match import Alignment
from merge_graphs.graph import NeuralGraph
from merge_graphs.errors import (
    AlignmentError,
    CheckpointNotFoundError,
    MergeGraphsError,
    SpecMismatchError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    UnsupportedTensorError,
)
from merge_graphs.symmetry import (
    SymmetrySpec,
    compose_permutations,
    identity_permutations,
    invert_permutations,
    random_permutations,
    symmetry_spec,
)

__version__ = "0.1.0"

__all__ = [
    "Alignment", "AlignmentError", "align", "merge_models",
    "CheckpointNotFoundError", "MergeGraphsError", "SpecMismatchError", "SymmetrySpec",
    "UnsafeCheckpointError", "UnsupportedArchitectureError", "UnsupportedTensorError",
    "NeuralGraph", "compose_permutations", "identity_permutations", "invert_permutations", "neural_graph", "permute", "random_permutations", "symmetry_spec",
]
