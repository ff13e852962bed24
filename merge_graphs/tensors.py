"""Stored tensors without their data: shape and dtype, and the safetensors names of dtypes.

The lowest layer above :mod:`merge_graphs.errors`: :mod:`merge_graphs.io` reads and writes
tensors described this way, and :mod:`merge_graphs.symmetry` checks a family's spec against them.

Example:
    >>> import torch
    >>> from merge_graphs.tensors import SAFETENSORS_CODES, SAFETENSORS_DTYPES, TensorInfo, infos
    >>> info = infos({"w": torch.zeros(3, 4, dtype=torch.bfloat16)})["w"]
    >>> info
    TensorInfo(shape=(3, 4), dtype=torch.bfloat16)
    >>> info.nbytes, SAFETENSORS_CODES[info.dtype], SAFETENSORS_DTYPES["F32"]
    (24, 'BF16', torch.float32)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


class TensorInfo:
    """Shape and dtype of one stored tensor, without its data."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: Sequence[int], dtype: torch.dtype):
        self.shape = tuple(shape)
        self.dtype = dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorInfo:
        return cls(tensor.shape, tensor.dtype)

    @property
    def nbytes(self) -> int:
        """The size of the tensor's data."""
        return math.prod(self.shape) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"TensorInfo(shape={self.shape}, dtype={self.dtype})"


def infos(state: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """Shapes and dtypes of a state dict."""
    return {k: TensorInfo.of(v) for k, v in state.items()}


#: safetensors dtype codes -> torch dtypes (those this torch build has).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
    }.items()
    if hasattr(torch, name)
}

#: torch dtypes -> safetensors dtype codes (the dtypes a safetensors file can hold).
SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
