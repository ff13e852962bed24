"""Merge methods: combine the tensors that N aligned models hold at one position.

mergekit 0.1.5's twenty methods, with its definitions, parameter names and defaults, so a recipe
means the same thing in both tools. The registry and :func:`merge_tensors` live in
:mod:`~merge_graphs.methods.registry` (whose docstring gives the conventions: what ``base`` and
``tensors`` hold); each family in a module of its own, modelled on mergekit's ``merge_methods/``:

* :mod:`~merge_graphs.methods.linear`: ``linear``
* :mod:`~merge_graphs.methods.slerp`: ``slerp``, ``nuslerp``
* :mod:`~merge_graphs.methods.multislerp`: ``multislerp``
* :mod:`~merge_graphs.methods.karcher`: ``karcher``
* :mod:`~merge_graphs.methods.task_arithmetic`: ``task_arithmetic``, ``ties``, ``dare_linear``,
  ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, with their
  sparsification in :mod:`~merge_graphs.methods.sparsify`
* :mod:`~merge_graphs.methods.sce`: ``sce``
* :mod:`~merge_graphs.methods.model_stock`: ``model_stock``
* :mod:`~merge_graphs.methods.nearswap`: ``nearswap``
* :mod:`~merge_graphs.methods.arcee_fusion`: ``arcee_fusion``
* :mod:`~merge_graphs.methods.ram`: ``ram``, ``ramplus_tl``
* :mod:`~merge_graphs.methods.passthrough`: ``passthrough``

Importing this package registers them all in :data:`METHODS`.
"""

from merge_graphs.methods import (  # noqa: F401  (each module registers its methods)
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
from merge_graphs.methods.registry import (
    METHODS,
    NOT_SET,
    ROW_BLOCK,
    MergeMethod,
    accumulator,
    get_method,
    merge_tensors,
    per_model,
    register,
)
from merge_graphs.methods.slerp import DOT_THRESHOLD, slerp_coefficients, slerp_row_moments
from merge_graphs.methods.sparsify import (
    MagnitudeCut,
    RandomCut,
    magnitude_cut,
    magnitude_prune,
    random_cut,
    random_prune,
)
from merge_graphs.methods.task_arithmetic import combine_deltas, sign_consensus

# the names these had when the methods were one module
_magnitude_prune = magnitude_prune
_random_prune = random_prune
_per_model = per_model

__all__ = [
    "DOT_THRESHOLD", "METHODS", "NOT_SET", "ROW_BLOCK", "MagnitudeCut", "MergeMethod", "RandomCut", "accumulator",
    "combine_deltas", "get_method", "magnitude_cut", "magnitude_prune", "merge_tensors", "per_model", "random_cut",
    "random_prune", "register", "sign_consensus", "slerp_coefficients", "slerp_row_moments",
]
