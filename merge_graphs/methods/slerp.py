"""Spherical interpolation of two models: ``slerp`` (mergekit's ``slerp.py``: the whole tensor
as one vector, base at ``t = 0``) and ``nuslerp`` (``nuslerp.py``: two models weighted, by rows,
columns or whole, optionally as deltas from a base)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from merge_graphs.methods.registry import accumulator, register

# Above this |cosine| slerp falls back to lerp, as in mergekit: the slerp weights divide by
# sin(theta), which vanishes for (anti-)colinear tensors.
DOT_THRESHOLD = 0.9995


def slerp_row_moments(v0: Tensor, v1: Tensor) -> Tensor:
    """``(rows, 3)`` float64: per row (first axis) the sums of ``v0 * v1``, ``v0**2`` and ``v1**2``.

    Rows are summed separately so that a tensor merged a block of rows at a time
    (:attr:`~merge_graphs.methods.registry.MergeMethod.rows`) gets bitwise the moments of the whole.
    """
    rows = max(1, v0.shape[0]) if v0.dim() else 1
    a, b = v0.reshape(rows, -1), v1.reshape(rows, -1)
    return torch.stack([(a * b).sum(1, dtype=torch.float64), (a * a).sum(1, dtype=torch.float64),
                        (b * b).sum(1, dtype=torch.float64)], 1)


def slerp_coefficients(moments: Tensor, t: float, eps: float = 1e-8) -> tuple[float, float]:
    """``(c0, c1)`` with ``slerp(v0, v1, t) = c0 * v0 + c1 * v1``, from :func:`slerp_row_moments`.

    Each tensor is flattened to one vector and normalized (a near-zero one is left as it is, so
    its cosine with anything is 0, as in mergekit); lerp where they are (anti-)colinear.
    """
    dot, sq0, sq1 = moments.sum(0).tolist()
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    cosine = dot / (n0 if n0 > eps else 1.0) / (n1 if n1 > eps else 1.0)
    if abs(cosine) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cosine)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _slerp_rows(tensors, base, model_parameters, parameters, generator, blocks):
    """Slerp a block of rows at a time: the whole tensor's moments first, then each block
    combined as the whole is. Computed in float32 (float64 for float64 inputs), as mergekit."""
    (other,) = tensors
    acc = accumulator(base)
    moments = torch.cat([slerp_row_moments(base[b].to(acc), other[b].to(acc)) for b in blocks])
    c0, c1 = slerp_coefficients(moments, parameters["t"])
    for b in blocks:
        yield (c0 * base[b].to(acc) + c1 * other[b].to(acc)).to(base.dtype)


@register("slerp", base="required", models=(1, 1), global_parameters={"t": None}, model_parameters={},
          rows=_slerp_rows)
def slerp(tensors, base, model_parameters, parameters, generator):
    """Spherical interpolation from ``base`` (t=0) to the other tensor (t=1), each flattened
    to one vector; lerp where they are (anti-)colinear."""
    return next(_slerp_rows(tensors, base, model_parameters, parameters, generator, [...]))


def nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, dim: int = -1, flatten: bool = False,
                    eps: float = 1e-8) -> Tensor:
    """Slerp from ``v0`` (t=0) to ``v1`` (t=1) of each pair of vectors along ``dim`` (of the
    flattened tensors if ``flatten``), lerp for pairs within ``eps`` of colinear; in the inputs'
    dtype."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: Tensor) -> Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cosine = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cosine.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cosine))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@register("nuslerp", base="optional", models=(2, 2), global_parameters={"nuslerp_row_wise": False,
                                                                       "nuslerp_flatten": True},
          model_parameters={"weight": None})
def nuslerp(tensors, base, model_parameters, parameters, generator):
    """Slerp from the first model to the second at ``t = w_2 / (w_1 + w_2)`` (0.5 when the weights
    sum to 0): the tensors as one vector (``nuslerp_flatten``, the default), else row by row
    (``nuslerp_row_wise``: vectors along the first axis) or along the last axis. With a base, the
    deltas from it are interpolated and added back."""
    w0, w1 = (p["weight"] for p in model_parameters)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    dim = 0 if parameters["nuslerp_row_wise"] else -1
    flatten = parameters["nuslerp_flatten"]
    a, b = tensors
    if base is None:
        return nuslerp_vectors(t, a, b, dim=dim, flatten=flatten)
    return base + nuslerp_vectors(t, a - base, b - base, dim=dim, flatten=flatten)
