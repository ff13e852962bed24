"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit sphere,
found by fixed-point iteration, scaled to their mean norm (mergekit's ``karcher.py``). Every
model weighs the same."""

from __future__ import annotations

import torch
from torch import Tensor

from merge_graphs.methods.registry import accumulator, register


def karcher_mean(tensors: list[Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher mean of ``tensors`` (each one flattened vector) on the unit sphere, times
    ``sum_i alpha_i |t_i|``. Norms are taken in float32 (float64 for float64 inputs); tensors of
    norm at most ``tol`` have no direction and are left out of the mean (not of the scale)."""
    if len(tensors) == 1:
        return tensors[0]
    acc = accumulator(tensors[0])
    norms = [torch.linalg.vector_norm(t.to(acc)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    kept = [i for i, n in enumerate(norms) if n.item() > tol]
    if not kept:
        return sum(t * 0 for t in tensors)
    total = sum(alphas[i] for i in kept)
    weights = [alphas[i] / total for i in kept]
    units = [units[i] for i in kept]

    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units):
        mean += w * u
    length = torch.linalg.vector_norm(mean.to(acc))
    mean = units[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)

    # Two buffers for every round: fresh tensor-sized temporaries per model and round made a 1.1B
    # merge 1.2x mergekit's time; the same products in place round the same.
    step, term = torch.empty_like(mean), torch.empty_like(mean)
    for _ in range(max_iter):
        # the weighted mean of the log maps of the units at the current mean
        step.zero_()
        for w, u in zip(weights, units):
            cosine = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cosine)
            if theta.item() < tol:
                continue
            torch.mul(cosine, mean, out=term)
            torch.sub(u, term, out=term)
            step += term.mul_(w * (theta / torch.sin(theta)))
        size = torch.linalg.vector_norm(step.to(acc))
        if size.item() < tol:
            break
        # the exponential map back to the sphere
        mean = (torch.cos(size) * mean + torch.sin(size) * (step / size)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(acc))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


@register("karcher", base="none", global_parameters={"max_iter": 10, "tol": 1e-5}, model_parameters={})
def karcher(tensors, base, model_parameters, parameters, generator):
    """Karcher mean of the models with equal weights (:func:`karcher_mean`)."""
    if len(tensors) == 1:
        return tensors[0]
    n = len(tensors)
    return karcher_mean(tensors, [1.0 / n] * n, max_iter=parameters["max_iter"], tol=parameters["tol"])
