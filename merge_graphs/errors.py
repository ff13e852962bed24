"""Errors raised by merge-graphs. Each message names the problem and the fix."""


class MergeGraphsError(Exception):
    """Base class of every error merge-graphs raises on purpose."""


class UnsupportedArchitectureError(MergeGraphsError, ValueError):
    """The model's architecture has no symmetry spec."""


class UnsupportedTensorError(MergeGraphsError, ValueError):
    """A checkpoint holds a floating-point tensor that its family's spec does not describe."""


class SpecMismatchError(MergeGraphsError, ValueError):
    """A checkpoint's tensor shapes disagree with what its config implies."""


class CheckpointNotFoundError(MergeGraphsError, FileNotFoundError):
    """A model folder or Hub repository could not be found."""


class UnsafeCheckpointError(MergeGraphsError, ValueError):
    """Only pickle weights exist and the user has not opted in to loading them."""


class RemoteCodeError(UnsafeCheckpointError):
    """The checkpoint needs Python code from its repository and the user has not opted in to running it."""


class AlignmentError(MergeGraphsError, RuntimeError):
    """An alignment failed its function-preservation check."""


class RecipeError(MergeGraphsError, ValueError):
    """A recipe is invalid; the message names the field, the bad value and the fix."""


class PushError(MergeGraphsError, RuntimeError):
    """Pushing a model folder to the Hugging Face Hub failed; the local folder is left as it was."""


class MergeParameterError(MergeGraphsError, ValueError):
    """A merge method's parameters are invalid for the tensors at hand (e.g. weights summing to 0
    with ``normalize``, a density that keeps nothing); the message names the parameter and the fix."""
