"""merge-graphs: merge models trained from different initializations by aligning their units first."""

from merge_graphs.api import align, merge_models, neural_graph, permute
from merge_graphs.errors import (
    AlignmentError,
    CheckpointNotFoundError,
    MergeGraphsError,
    PushError,
    RecipeError,
    RemoteCodeError,
    SpecMismatchError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    UnsupportedTensorError,
)
from merge_graphs.gnn import embed
from merge_graphs.graph import NeuralGraph
from merge_graphs.match import Alignment
from merge_graphs.recipe import Recipe, load_recipe
from merge_graphs.run import RunResult, run_recipe
from merge_graphs.sampled_text import sample_calibration
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
    "Alignment",
    "AlignmentError",
    "CheckpointNotFoundError",
    "MergeGraphsError",
    "NeuralGraph",
    "PushError",
    "Recipe",
    "RecipeError",
    "RemoteCodeError",
    "RunResult",
    "SpecMismatchError",
    "SymmetrySpec",
    "UnsafeCheckpointError",
    "UnsupportedArchitectureError",
    "UnsupportedTensorError",
    "align",
    "compose_permutations",
    "embed",
    "identity_permutations",
    "invert_permutations",
    "load_recipe",
    "merge_models",
    "neural_graph",
    "permute",
    "random_permutations",
    "run_recipe",
    "sample_calibration",
    "symmetry_spec",
]
