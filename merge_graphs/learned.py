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

The residual map is parametrized as ``exp(S - S^T)`` (under LayerNorm, in the complement of the
all-ones vector); a within-head map as ``exp(S)`` (any invertible map: the reading side takes its
inverse transpose) or, in a RoPE plane, a rotation times ``exp(s)``. Every parameter is 0 at the
start, so step 0 is the data-free alignment. Within-head maps beyond orthogonal ones matter: on the
bench's GPT-2 pairs they remove several points more of the barrier than orthogonal ones.

Families without a residual rotation (post-LayerNorm BERT and RoBERTa; the post-norm decoders
Gemma 2/3 and OLMo 2; MLPs and CNNs) learn their permutations instead: :func:`learned_permutations`
starts from weight matching and learns one score matrix per permutation group by a straight-through
estimator (the hard assignment forward, its Sinkhorn relaxation backward), on the model's own loss
(the task head's on labelled calibration inputs, the causal-LM or the masked-LM loss). The result is
an ordinary permutation :class:`~merge_graphs.match.Alignment`. The aligner ``"learned"``
(:mod:`merge_graphs.aligners`) picks one or the other by the family's spec.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from merge_graphs.errors import AlignmentError
from merge_graphs.match import Alignment, objective, solve, weight_matching
from merge_graphs.rotation import (
    RESIDUAL,
    Folding,
    RotationAlignment,
    embed_fixing_ones,
    folded_model,
    rope_plane_rotations,
    rotate,
    rotate_heads,
    rotation_alignment,
)
from merge_graphs.sources import StateTensors, module_tensors
from merge_graphs.symmetry import symmetry_spec
from merge_graphs.symmetry.spec import SymmetrySpec, compose_permutations

logger = logging.getLogger(__name__)

__all__ = ["learned_alignment", "learned_permutations"]


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
    steps: int = 600,
    lr: float = 1e-2,
    batch_size: int = 16,
    lam_range: tuple[float, float] = (0.3, 0.7),
    heads: bool = True,
    schedule: str = "cosine",
    seed: int = 0,
    progress: bool = False,
    **start_kwargs,
) -> RotationAlignment:
    """Align ``model_b`` to ``model_a`` by learning its symmetry maps on the loss of the interpolated models.

    Args:
        model_a: the reference, a pre-norm model: a causal LM (GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3,
            Mixtral, Qwen2-MoE, Qwen3-MoE), or any model the rotation admits (e.g. ViT) given its task's labels.
        model_b: a model of the same architecture and size.
        calibration: model inputs, samples first: a causal LM's ``input_ids`` (and optionally ``attention_mask``),
            its own next-token loss; or any inputs with ``labels`` (e.g. ``pixel_values`` and class labels), the
            model's own loss on them (its ``loss``, else cross-entropy on its logits).
        start: the data-free alignment to start from (default: :func:`rotation_alignment` with
            ``start_kwargs``, e.g. ``solver``, ``groups``).
        steps: optimization steps (Adam).
        lr: Adam's learning rate.
        batch_size: calibration samples per step, drawn at random.
        lam_range: the interpolation weight of B is drawn uniformly from this range each step.
        schedule: the learning rate over the steps: ``"constant"``, or ``"cosine"`` (from ``lr``
            down to 0 at the last step).
        heads: also learn the maps of the dims inside every attention head that the family
            declares (``spec.head_maps``: v/o invertible; q/k invertible, or with RoPE a rotation
            times a scale in each frequency plane), on top of those the data-free start fitted.
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
    if schedule not in ("constant", "cosine"):
        raise AlignmentError(f"schedule must be 'constant' or 'cosine'; got {schedule!r}")
    begin = time.perf_counter()
    if start is None:
        start = rotation_alignment(model_a, model_b, seed=seed, **start_kwargs)
    kind = start.kind
    device = next(model_a.parameters()).device
    skeleton = folded_model(model_a).eval()
    for p in skeleton.parameters():
        p.requires_grad_(False)
    # The learned maps act on the module's own tensors: its state-dict names (stacked experts), not
    # the names B's checkpoint stores (which the start's spec labels); the maps are the same.
    spec = Folding(symmetry_spec(model_b)).spec
    a_state = {k: v.detach() for k, v in skeleton.state_dict().items()}
    b_state = {k: v.detach() for k, v in module_tensors(skeleton, start.apply(StateTensors(model_b)))}
    floating = [k for k, v in a_state.items() if v.is_floating_point() and k in spec.tensors]

    d = spec.groups[RESIDUAL].size
    fix_ones = kind == "fix_ones"
    k = d - 1 if fix_ones else d
    skews = {RESIDUAL: torch.zeros(k, k, device=device, requires_grad=True)}
    kinds = {}
    if heads:
        # Per RoPE plane an angle and a log-scale; otherwise a matrix whose exponential is the map.
        for hm in spec.head_maps:
            n = spec.groups[hm.heads].size
            shape = (n, 2, hm.head_dim // 2) if hm.kind == "rope_pairs" else (n, hm.head_dim, hm.head_dim)
            skews[hm.name] = torch.zeros(shape, device=device, requires_grad=True)
            kinds[hm.name] = hm.kind
    optimizer = torch.optim.Adam(list(skews.values()), lr=lr)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
                 if schedule == "cosine" else None)

    inputs, loss_kind = _loss_kind(model_a, calibration)
    if loss_kind == "mlm":
        raise AlignmentError(f"learned alignment of {type(model_a).__name__} needs a causal-LM head or the task's "
                             "labels with the calibration inputs (e.g. pixel_values and labels)")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    n = next(iter(inputs.values())).shape[0]
    takes_labels = "labels" in inspect.signature(skeleton.forward).parameters
    gen = torch.Generator().manual_seed(seed)
    low, high = lam_range

    def maps() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = _orthogonal(skews[RESIDUAL], fix_ones)
        return r, {g: rope_plane_rotations(s[:, 0], s[:, 1]) if kinds[g] == "rope_pairs" else torch.linalg.matrix_exp(s)
                   for g, s in skews.items() if g != RESIDUAL}

    curve: list[float] = []
    for _ in tqdm(range(steps), desc="learning alignment", disable=not progress):
        rows = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        lam = low + (high - low) * float(torch.rand((), generator=gen))
        r, head = maps()
        b_moved = rotate_heads(spec, rotate(spec, b_state, r, check=False), head)
        mixed = dict(a_state)
        for name in floating:
            mixed[name] = (1 - lam) * a_state[name] + lam * b_moved[name]
        loss = _model_loss(skeleton, mixed, {k: v[rows] for k, v in inputs.items()}, takes_labels, loss_kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        curve.append(loss.item())

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
        start.spec, start.permutations, "learned", start.objective_before, start.objective_after,
        start.group_objective_before, start.group_objective_after, seconds, start.iterations,
        rotation=rotation.cpu(), kind=kind, fit="learned", fit_error=start.fit_error,
        fit_error_before=start.fit_error_before, source_spec=start.source_spec,
        head_maps=head_maps, loss_curve=curve,
    )


# --- post-LayerNorm encoders: learned permutations -----------------------------------------------

#: Share of calibration tokens masked for the masked-LM loss (BERT's).
MLM_PROBABILITY = 0.15


def sinkhorn(logits: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """The doubly stochastic matrix ``exp(logits)`` scaled to unit row and column sums (log domain),
    for each matrix of a batch ``(..., n, n)``."""
    log_p = logits
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp()


def assignments(scores: torch.Tensor) -> torch.Tensor:
    """``perm`` maximizing ``sum_i scores[i, perm[i]]``, for each matrix of a batch ``(..., n, n)`` (CPU longs)."""
    flat = scores.detach().reshape(-1, *scores.shape[-2:])
    return torch.stack([solve(m) for m in flat]).reshape(scores.shape[:-1])


def hard_permutation(scores: torch.Tensor) -> torch.Tensor:
    """The permutation matrices ``P`` maximizing ``sum(P * scores)`` (``P[i, perm[i]] = 1``), batched like :func:`sinkhorn`."""
    perm = assignments(scores).to(scores.device)
    return torch.zeros_like(scores).scatter_(-1, perm.unsqueeze(-1), 1.0)


def _factor_ops(spec: SymmetrySpec, learned: set[str]) -> dict[str, list[tuple[int, int, tuple[int, ...], int, int | None, str]]]:
    """Per tensor: ``(axis, offset, factor sizes, factor, parent factor or None, group)`` for every factor a
    learned group permutes; a child group's after its parent's (its map is chosen by the parent's new position)."""
    ops: dict[str, list] = {}
    for t in spec.tensors.values():
        for axis, spaces in enumerate(t.axes):
            offset = 0
            for s in spaces or ():
                sizes = tuple(k for _, k in s.factors)
                position = {g: j for j, (g, _) in enumerate(s.factors) if g is not None}
                found = [(axis, offset, sizes, j, position.get(spec.groups[g].parent), g)
                         for j, (g, _) in enumerate(s.factors) if g in learned]
                ops.setdefault(t.name, []).extend(sorted(found, key=lambda op: op[4] is not None))
                offset += s.size
    return {name: found for name, found in ops.items() if found}


def _permute_soft(tensor: torch.Tensor, ops, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``tensor`` with every factor in ``ops`` multiplied by its group's matrix: ``new = P @ old`` on that factor
    (a child group's matrix ``P[r]`` inside the parent unit at position ``r``)."""
    for axis, offset, sizes, j, parent, g in ops:
        size = math.prod(sizes)
        x = tensor.narrow(axis, offset, size).movedim(axis, 0)
        rest = x.shape[1:]
        x = x.reshape(*sizes, *rest)
        if parent is None:
            x = x.movedim(j, 0)
            shape = x.shape
            x = (maps[g] @ x.reshape(shape[0], -1)).reshape(shape).movedim(0, j)
        else:
            x = x.movedim((parent, j), (0, 1))
            shape = x.shape
            x = torch.bmm(maps[g], x.reshape(shape[0], shape[1], -1)).reshape(shape).movedim((0, 1), (parent, j))
        x = x.reshape(size, *rest).movedim(0, axis)
        if size == tensor.shape[axis]:
            tensor = x
        else:
            tensor = torch.cat([tensor.narrow(axis, 0, offset), x,
                                tensor.narrow(axis, offset + size, tensor.shape[axis] - offset - size)], dim=axis)
    return tensor


def _loss_kind(model: nn.Module, calibration: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """``(inputs, kind)``: ``"labels"``, the task's own loss on the calibration's labels (the model's
    ``loss`` when its forward takes ``labels``, else cross-entropy on its output; a causal LM's labels
    are its input ids), ``"contrastive"`` (a model whose forward returns its own loss on paired inputs
    with ``return_loss``: CLIP on images and their captions), or ``"mlm"``."""
    inputs = {k: v for k, v in calibration.items() if isinstance(v, torch.Tensor)}
    if "labels" in inputs:
        return inputs, "labels"
    if "return_loss" in inspect.signature(model.forward).parameters:
        return inputs, "contrastive"
    if getattr(model, "can_generate", lambda: False)() and "input_ids" in inputs:
        return {**inputs, "labels": _lm_batches(inputs)[2]}, "labels"
    if type(model).__name__.endswith("ForMaskedLM") and "input_ids" in inputs:
        return inputs, "mlm"
    raise AlignmentError(
        f"learned alignment needs a loss: {type(model).__name__} has no masked-LM or causal-LM head, so give "
        "the task's labels with the calibration inputs (a dict of model inputs with labels, e.g. input_ids, "
        "attention_mask and labels, through the API: merge_graphs.align(a, b, 'learned', calibration={...})); "
        "a recipe's calibration texts train a masked-LM or causal-LM head only")


def _model_loss(skeleton: nn.Module, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                takes_labels: bool, kind: str = "labels") -> torch.Tensor:
    """The loss of ``skeleton`` with ``params`` on ``batch`` (which holds ``labels``, unless ``kind`` is
    ``"contrastive"``: then the model's own loss on the paired inputs)."""
    if kind == "contrastive":
        return functional_call(skeleton, dict(params), (), {**batch, "return_loss": True}).loss
    if takes_labels:
        return functional_call(skeleton, dict(params), (), dict(batch)).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = functional_call(skeleton, dict(params), (), inputs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                       ignore_index=-100)


def _mlm_batch(ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, probability: float,
               mask_token_id: int | None, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` with ``probability`` of the attended tokens masked (at least one per batch):
    replaced by ``mask_token_id``, or by random tokens when the model's mask token is unknown."""
    draw = torch.rand(ids.shape, generator=gen) < probability
    draw = draw.to(ids.device) & (mask != 0)
    if not draw.any():
        draw.view(-1)[int(torch.nonzero(mask.reshape(-1))[0])] = True
    labels = ids.masked_fill(~draw, -100)
    if mask_token_id is None:
        fill = torch.randint(0, vocab, ids.shape, generator=gen).to(ids.device)
    else:
        fill = torch.full_like(ids, mask_token_id)
    return torch.where(draw, fill, ids), labels


def learned_permutations(
    model_a: nn.Module,
    model_b: nn.Module,
    calibration: Mapping[str, torch.Tensor],
    *,
    start: Alignment | None = None,
    steps: int = 300,
    lr: float = 0.05,
    batch_size: int = 32,
    lam_range: tuple[float, float] = (0.4, 0.6),
    tau: float = 1.0,
    sinkhorn_iterations: int = 10,
    groups: list[str] | None = None,
    heads: bool = True,
    mlm_probability: float = MLM_PROBABILITY,
    mask_token_id: int | None = None,
    seed: int = 0,
    progress: bool = False,
    **start_kwargs,
) -> Alignment:
    """Align ``model_b`` to ``model_a`` by learning permutations on the interpolated models' loss.

    For families that admit permutations only (post-LayerNorm BERT and RoBERTa; post-norm decoders,
    Gemma 2/3 and OLMo 2; MLPs and CNNs with labels), in the manner of Peña et al. ("Re-basin via
    implicit Sinkhorn differentiation", CVPR 2023) with a straight-through estimator: starting from
    weight matching, every root group (the residual stream, each layer's attention heads and MLP
    units, the pooler) keeps a learnable score matrix, the identity on top of the start at step 0
    (and with ``heads``, so does every child group, one matrix per parent unit: the dims inside each head). Each step the forward
    pass runs ``(1 - lam) * A + lam * P(B)`` with the *hard* permutations ``P`` (the assignment
    maximizing the scores, :func:`merge_graphs.match.solve`), and the gradient flows through
    their soft relaxation, Sinkhorn of ``scores / tau``: ``P_hard + P_soft - P_soft.detach()``.
    The loss is the model's own: the task head's when ``calibration`` carries ``labels`` (a
    transformers model's ``loss``; for a model whose forward takes no labels, e.g. an MLP,
    cross-entropy on its output), else the next-token loss on the calibration ids (a ``...ForCausalLM``),
    else the masked-LM loss on ``mlm_probability`` of the tokens (a ``...ForMaskedLM``).

    Args:
        model_a: the reference.
        model_b: a model of the same architecture and size.
        calibration: ``input_ids`` (samples x tokens), optionally ``attention_mask`` and
            ``labels`` (one per sample for a sequence classifier).
        start: the permutation alignment to start from (default: weight matching with
            ``start_kwargs``, e.g. ``solver``).
        steps: optimization steps (Adam on the scores).
        lr: Adam's learning rate (the scores start as the identity: 1 on the diagonal, 0 off it).
        batch_size: calibration samples per step, drawn at random.
        lam_range: the interpolation weight of B is drawn uniformly from this range each step.
        tau: the Sinkhorn temperature of the soft relaxation.
        sinkhorn_iterations: Sinkhorn's row and column normalizations per step.
        groups: the root groups to learn (default all); the others keep the start's permutations.
        heads: also learn the child groups (the q/k and v/o dims inside each attention head, one
            score matrix per head; on the bench's BERT pairs they lower the barrier a little more
            at no measurable cost); with False they keep the start's permutations.
        mlm_probability: share of tokens masked for the masked-LM loss.
        mask_token_id: the tokenizer's mask token (default: masked tokens become random tokens).
        seed: seeds the batches, masks and interpolation weights (the result is deterministic).
        progress: show a progress bar.

    Returns:
        A permutation :class:`~merge_graphs.match.Alignment` (``method="learned"``) whose
        ``loss_curve`` holds the interpolated models' loss (hard permutations) at every step.

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=12, num_labels=3)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> a = transformers.BertForSequenceClassification(cfg).eval()
        >>> b = transformers.BertForSequenceClassification(cfg).eval()
        >>> calib = {"input_ids": torch.randint(0, 20, (8, 6)), "labels": torch.randint(0, 3, (8,))}
        >>> found = learned_permutations(a, b, calib, steps=3, batch_size=4)
        >>> found.method, len(found.loss_curve)
        ('learned', 3)
    """
    begin = time.perf_counter()
    spec = symmetry_spec(model_b)
    if start is None:
        start = weight_matching(spec, model_a.state_dict(), model_b.state_dict(), groups=groups, seed=seed,
                                **start_kwargs)
    inputs, kind = _loss_kind(model_b, calibration)
    takes_labels = "labels" in inspect.signature(model_a.forward).parameters
    device = next(model_a.parameters()).device
    skeleton = copy.deepcopy(model_a).eval()
    for p in skeleton.parameters():
        p.requires_grad_(False)
    # Tied tensors (a masked-LM decoder and the word embeddings) are passed once, by their first name.
    names = [n for n, _ in skeleton.named_parameters()] + [n for n, _ in skeleton.named_buffers()]
    a_state = {k: v.detach().float() if v.is_floating_point() else v for k, v in model_a.state_dict().items()}
    b_state = {k: v.detach().float() for k, v in start.apply(model_b.state_dict()).items()
               if v.is_floating_point() and k in spec.tensors}

    roots = [g for g, grp in spec.groups.items() if grp.parent is None]
    unknown = set(groups or ()) - set(roots)
    if unknown:
        raise ValueError(f"unknown root groups {sorted(unknown)}; the spec has {sorted(roots)}")
    learned = [g for g in roots if groups is None or g in groups]
    if heads:
        learned += [g for g, grp in spec.groups.items() if grp.parent in learned]
    ops = _factor_ops(spec, set(learned))
    scores = {}
    for g in learned:
        grp = spec.groups[g]
        eye = torch.eye(grp.size, device=device)
        if grp.parent is not None:
            eye = eye.repeat(spec.groups[grp.parent].size, 1, 1)
        scores[g] = eye.requires_grad_(True)
    optimizer = torch.optim.Adam(list(scores.values()), lr=lr)

    n = next(iter(inputs.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    low, high = lam_range
    vocab = getattr(getattr(model_a, "config", None), "vocab_size", None)

    curve: list[float] = []
    for _ in tqdm(range(steps), desc="learning permutations", disable=not progress):
        rows = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
        lam = low + (high - low) * float(torch.rand((), generator=gen))
        batch = {k: v.to(device)[rows] for k, v in inputs.items()}
        if kind == "mlm":
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            batch["input_ids"], batch["labels"] = _mlm_batch(batch["input_ids"], mask, gen, mlm_probability,
                                                             mask_token_id, vocab)
        maps = {}
        for g, s in scores.items():
            soft = sinkhorn(s / tau, sinkhorn_iterations)
            maps[g] = hard_permutation(s) + soft - soft.detach()
        mixed = {}
        for name in names:
            if name not in b_state:
                if name in a_state:
                    mixed[name] = a_state[name]
                continue
            b_moved = _permute_soft(b_state[name], ops[name], maps) if name in ops else b_state[name]
            mixed[name] = (1 - lam) * a_state[name] + lam * b_moved
        loss = _model_loss(skeleton, mixed, batch, takes_labels, kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(loss.item())

    relative = {g: assignments(s) for g, s in scores.items()}
    permutations = compose_permutations(spec, start.permutations, relative)
    moved = sum(int((p != torch.arange(p.shape[-1])).sum()) for p in relative.values())
    seconds = time.perf_counter() - begin
    logger.info("learned permutations: interpolated loss %.4f -> %.4f over %d steps (%d units moved from the "
                "start) in %.1fs", curve[0] if curve else float("nan"), curve[-1] if curve else float("nan"),
                steps, moved, seconds)
    after, group_after = objective(spec, model_a.state_dict(), model_b.state_dict(), permutations)
    return Alignment(spec, permutations, "learned", start.objective_before, after, start.group_objective_before,
                     group_after, seconds, start.iterations, loss_curve=curve)
