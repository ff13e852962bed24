"""Learned alignment: the symmetry maps refined on the loss of interpolated models.

Data-free alignment picks the maps that make two models' *weights* alike; what a merge needs is
maps under which the *average* computes well. Following Theus et al. ("Generalized Linear Mode
Connectivity for Transformers", NeurIPS 2025), :func:`learned_alignment` starts from the best
data-free answer (norms folded, residual stream rotated, units permuted:
:func:`merge_graphs.rotation.rotation_alignment`) and optimizes an extra orthogonal map of
model B's residual stream ``R`` (and, with ``heads=True``, the maps of the dims inside each
attention head that the family declares, :class:`~merge_graphs.symmetry.spec.HeadMap`) by gradient descent on
the causal-LM loss of ``(1 - lam) * A + lam * B'`` on calibration text, ``lam`` drawn from
``U(lam_range)`` each step. Only B's transform is learned, never its weights: B' computes
exactly what B computes (the function check still holds), so the result is an ordinary
:class:`~merge_graphs.rotation.RotationAlignment` whose ``rotation`` is ``Q R``.

The maps are parametrized as ``exp(S - S^T)`` (under LayerNorm, in the complement of the
all-ones vector), ``S = 0`` at the start, so step 0 is the data-free alignment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from merge_graphs.errors import AlignmentError
from merge_graphs.rotation import (
    RESIDUAL,
    RotationAlignment,
    embed_fixing_ones,
    folded_model,
    rope_plane_rotations,
    rotate,
    rotate_heads,
    rotation_alignment,
)

logger = logging.getLogger(__name__)

__all__ = ["learned_alignment"]


def _orthogonal(skew: torch.Tensor, fix_ones: bool) -> torch.Tensor:
    """``exp(S - S^T)``; with ``fix_ones``, acting on the complement of all-ones and fixing all-ones."""
    r = torch.linalg.matrix_exp(skew - skew.transpose(-1, -2))
    return embed_fixing_ones(r) if fix_ones else r


def _lm_batches(calibration: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = calibration.get("input_ids")
    if ids is None:
        raise AlignmentError("learned alignment needs token ids: calibration texts (with the model's tokenizer) "
                             "or a dict with input_ids")
    mask = calibration.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def learned_alignment(
    model_a: nn.Module,
    model_b: nn.Module,
    calibration: Mapping[str, torch.Tensor],
    *,
    start: RotationAlignment | None = None,
    steps: int = 300,
    lr: float = 2e-3,
    batch_size: int = 16,
    lam_range: tuple[float, float] = (0.4, 0.6),
    heads: bool = False,
    seed: int = 0,
    progress: bool = False,
    **start_kwargs,
) -> RotationAlignment:
    """Align causal LM ``model_b`` to ``model_a`` by learning its symmetry maps on calibration text.

    Args:
        model_a: the reference, a pre-norm causal LM (GPT-2, Llama, Mistral, Qwen2).
        model_b: a model of the same architecture and size.
        calibration: ``input_ids`` (samples x tokens) and optionally ``attention_mask``.
        start: the data-free alignment to start from (default: :func:`rotation_alignment` with
            ``start_kwargs``, e.g. ``solver``, ``groups``).
        steps: optimization steps (Adam).
        lr: Adam's learning rate.
        batch_size: calibration samples per step, drawn at random.
        lam_range: the interpolation weight of B is drawn uniformly from this range each step.
        heads: also learn the maps of the dims inside every attention head that the family
            declares (``spec.head_maps``: v/o orthogonal; q/k orthogonal, or with RoPE a rotation in
            each frequency plane), on top of those the data-free start fitted.
        seed: seeds the batches and interpolation weights (the result is deterministic).
        progress: show a progress bar.

    Returns:
        A :class:`RotationAlignment` (``method="learned"``) whose ``loss_curve`` holds the
        interpolated models' loss at every step.

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, num_key_value_heads=1, intermediate_size=24)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> a, b = transformers.LlamaForCausalLM(cfg).eval(), transformers.LlamaForCausalLM(cfg).eval()
        >>> calib = {"input_ids": torch.randint(0, 32, (8, 12))}
        >>> found = learned_alignment(a, b, calib, steps=5, batch_size=4)
        >>> found.method, len(found.loss_curve)
        ('learned', 5)
    """
    begin = time.perf_counter()
    if start is None:
        start = rotation_alignment(model_a, model_b, seed=seed, **start_kwargs)
    spec, kind = start.spec, start.kind
    device = next(model_a.parameters()).device
    skeleton = folded_model(model_a).eval()
    for p in skeleton.parameters():
        p.requires_grad_(False)
    a_state = {k: v.detach() for k, v in skeleton.state_dict().items()}
    b_state = {k: v.detach() for k, v in start.apply(model_b.state_dict()).items()}
    floating = [k for k, v in a_state.items() if v.is_floating_point() and k in spec.tensors]

    d = spec.groups[RESIDUAL].size
    fix_ones = kind == "fix_ones"
    k = d - 1 if fix_ones else d
    skews = {RESIDUAL: torch.zeros(k, k, device=device, requires_grad=True)}
    kinds = {}
    if heads:
        for hm in spec.head_maps:
            n = spec.groups[hm.heads].size
            shape = (n, hm.head_dim // 2) if hm.kind == "rope_pairs" else (n, hm.head_dim, hm.head_dim)
            skews[hm.name] = torch.zeros(shape, device=device, requires_grad=True)
            kinds[hm.name] = hm.kind
    optimizer = torch.optim.Adam(list(skews.values()), lr=lr)

    ids, mask, labels = _lm_batches(calibration)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    low, high = lam_range

    def maps() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = _orthogonal(skews[RESIDUAL], fix_ones)
        return r, {g: rope_plane_rotations(s) if kinds[g] == "rope_pairs" else _orthogonal(s, False)
                   for g, s in skews.items() if g != RESIDUAL}

    curve: list[float] = []
    for _ in tqdm(range(steps), desc="learning alignment", disable=not progress):
        rows = torch.randint(0, ids.shape[0], (min(batch_size, ids.shape[0]),), generator=gen)
        lam = low + (high - low) * float(torch.rand((), generator=gen))
        r, head = maps()
        b_moved = rotate_heads(spec, rotate(spec, b_state, r, check=False), head)
        mixed = dict(a_state)
        for name in floating:
            mixed[name] = (1 - lam) * a_state[name] + lam * b_moved[name]
        out = functional_call(skeleton, mixed, (), {"input_ids": ids[rows], "attention_mask": mask[rows],
                                                   "labels": labels[rows]})
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        curve.append(out.loss.item())

    with torch.no_grad():
        r, head = maps()
    rotation = (start.rotation.to(device=device, dtype=torch.float64) @ r.double()).float()
    # Maps compose in the order they act: x -> x @ start's map, then @ the learned one.
    head_maps = {name: m.detach().cpu() for name, m in start.head_maps.items()}
    for name, m in head.items():
        head_maps[name] = head_maps[name] @ m.cpu() if name in head_maps else m.cpu()
    seconds = time.perf_counter() - begin
    logger.info("learned alignment: interpolated loss %.4f -> %.4f over %d steps in %.1fs",
                curve[0] if curve else float("nan"), curve[-1] if curve else float("nan"), steps, seconds)
    return RotationAlignment(
        spec, start.permutations, "learned", start.objective_before, start.objective_after,
        start.group_objective_before, start.group_objective_after, seconds, start.iterations,
        rotation=rotation.cpu(), kind=kind, fit="learned", fit_error=start.fit_error,
        fit_error_before=start.fit_error_before, source_spec=start.source_spec,
        head_maps=head_maps, loss_curve=curve,
    )
