"""Matching units on GNN node embeddings.

Each permuted node set's embeddings are unit-normalized (so the matching objective is a sum
of cosine similarities) and labelled with the node set's space like a tensor, exactly as
:mod:`merge_graphs.activations` labels activations; :func:`~merge_graphs.match.weight_matching`
then matches every group on them, attention heads as blocks. With ``weight`` > 0 the model's
own tensors join in, so one coordinate descent maximizes embedding similarity plus weight
similarity.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from merge_graphs.gnn.embedding import Embeddings, default_encoder, embed
from merge_graphs.graph import NeuralGraph
from merge_graphs.match import Alignment, weight_matching
from merge_graphs.rotation import RESIDUAL, rotation_alignment
from merge_graphs.symmetry.spec import SymmetrySpec, TensorSpec, invert_permutations


def pseudo_tensors(emb: Embeddings) -> tuple[dict[str, TensorSpec], dict[str, torch.Tensor]]:
    """``(specs, tensors)``: one ``(dim, units)`` tensor of unit-norm embeddings per permuted node set."""
    specs, tensors = {}, {}
    for name, ns in emb.graph.node_sets.items():
        if ns.fixed:
            continue
        key = f"gnn:{name}"
        x = emb.nodes[name].float()
        x = x - x.mean(0)  # what every unit shares says nothing about which is which
        tensors[key] = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)).T
        specs[key] = TensorSpec(key, (None, (ns.space,)), "gnn", 0)
    return specs, tensors


def gnn_matching(
    spec: SymmetrySpec,
    emb_a: Embeddings,
    emb_b: Embeddings,
    *,
    state_a: Mapping[str, torch.Tensor] | None = None,
    state_b: Mapping[str, torch.Tensor] | None = None,
    weight: float = 0.0,
    solver: str = "exact",
    groups: list[str] | None = None,
    seed: int = 0,
) -> Alignment:
    """Match each group of ``spec`` on the cosine similarity of the two models' node embeddings.

    Args:
        spec: the symmetry spec both models share.
        emb_a, emb_b: :func:`~merge_graphs.gnn.embed` of model A and model B.
        state_a, state_b, weight: with ``weight`` > 0, the models' tensors (each scaled to
            ``weight`` times the embeddings' norm) are added to the objective.
        solver, groups, seed: as in :func:`~merge_graphs.match.weight_matching`.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.gnn import embed, GraphEncoder
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = merge_graphs.symmetry_spec(mlp)
        >>> perms = merge_graphs.random_permutations(spec, seed=0)
        >>> enc = GraphEncoder(dim=16)
        >>> found = gnn_matching(spec, embed(mlp, enc), embed(merge_graphs.permute(mlp, perms), enc))
        >>> torch.equal(found.permutations["mlp.0"], merge_graphs.invert_permutations(spec, perms)["mlp.0"])
        True
    """
    specs, a = pseudo_tensors(emb_a)
    _, b = pseudo_tensors(emb_b)
    if weight > 0:
        if state_a is None or state_b is None:
            raise ValueError("weight > 0 needs both models' tensors: pass state_a=... and state_b=...")
        for name, t in spec.tensors.items():
            # Each tensor counts like one node set's embeddings (norm sqrt(units)) times weight.
            scale = weight * spec_units(t) ** 0.5 / max(float(state_a[name].float().norm()), 1e-8)
            specs[name], a[name], b[name] = t, state_a[name].float() * scale, state_b[name].float() * scale
    pseudo = SymmetrySpec(spec.family, spec.groups, specs)
    found = weight_matching(pseudo, a, b, solver=solver, groups=groups, seed=seed)
    found.spec = spec
    found.method = "gnn" if weight == 0 else "gnn&weight"
    return found


def spec_units(t: TensorSpec) -> int:
    """How many permuted units a tensor's axes index (at least 1)."""
    return max(1, sum(s.size for axis in t.axes for s in axis or () if s.groups))


def recovered_fraction(
    spec: SymmetrySpec, found: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> float:
    """The fraction of units (over every group, children included) that ``found`` puts back where
    they were, for ``found`` aligning ``permute(a, perms)`` to ``a``.

    Example:
        >>> import torch, merge_graphs
        >>> from merge_graphs.symmetry.spec import invert_permutations
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = merge_graphs.symmetry_spec(mlp)
        >>> perms = merge_graphs.random_permutations(spec, seed=0)
        >>> recovered_fraction(spec, invert_permutations(spec, perms), perms)
        1.0
    """
    truth = invert_permutations(spec, perms)
    hits = sum(int((found[g].cpu() == truth[g]).sum()) for g in truth)
    return hits / sum(truth[g].numel() for g in truth)


def gnn_align(
    model_a,
    model_b,
    spec: SymmetrySpec,
    *,
    refine: bool = False,
    residual: str = "permutation",
    encoder=None,
    solver: str = "exact",
    groups: list[str] | None = None,
    seed: int = 0,
) -> Alignment:
    """Align ``model_b`` to ``model_a`` by GNN embeddings, then (``refine``) by weight matching
    started from that matching. ``encoder`` defaults to the pretrained one.

    With ``residual="rotation"`` (pre-norm families) the GNN matches every group but the residual
    stream, and orthogonal weight matching (:func:`merge_graphs.rotation.rotation_alignment`)
    starts from those permutations: a permutation-equivariant GNN cannot say how the stream is
    rotated, so this refinement always runs.

    ``model_a`` and ``model_b`` are ``nn.Module`` s or mappings of named tensors (such as
    :class:`~merge_graphs.sources.ModelTensors`, which the encoder then reads one weight matrix
    at a time: nothing else of the model is held). The result's ``stage_seconds`` says where the
    time went: ``embed`` (both models), ``match`` (assignments on the embeddings) and ``refine``.
    """
    start = time.perf_counter()
    encoder = encoder or default_encoder()
    state_a, state_b = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (model_a, model_b))
    emb_a, emb_b = embed(NeuralGraph(spec, state_a), encoder), embed(NeuralGraph(spec, state_b), encoder)
    embedded = time.perf_counter()
    if residual == "rotation":
        roots = [g for g, grp in spec.groups.items() if grp.parent is None and g != RESIDUAL]
        groups = [g for g in roots if groups is None or g in groups]
    found = gnn_matching(spec, emb_a, emb_b, solver=solver, groups=groups, seed=seed)
    found.seconds = time.perf_counter() - start
    found.stage_seconds = {"embed": embedded - start, "match": found.seconds - (embedded - start)}
    if residual == "rotation":
        refined = rotation_alignment(model_a, model_b, init=found.permutations, solver=solver, groups=groups,
                                     seed=seed)
        refined.method = "gnn+rotation"
    elif refine:
        refined = weight_matching(spec, state_a, state_b, init=found.permutations, solver=solver, groups=groups,
                                  seed=seed)
        refined.method = "gnn+weight"
    else:
        return found
    refined.stage_seconds = {**found.stage_seconds, "refine": refined.seconds}
    refined.seconds += found.seconds
    return refined
