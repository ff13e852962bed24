"""Running a recipe: load, align, merge, evaluate, write, push.

:func:`run_recipe` is what ``merge-graphs recipe.yaml`` calls. It validates the recipe before
touching any model, writes the output folder atomically (complete or absent), and keeps the
local folder when a push fails.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_graphs.api import _with_state, align_models, identity_alignment, merge_states, output_skeleton
from merge_graphs.errors import RecipeError
from merge_graphs.match import Alignment
from merge_graphs.methods import get_method
from merge_graphs.recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a recipe run did.

    Attributes:
        recipe: the validated recipe as run.
        output: the written folder (None for a dry run).
        merged: the references of the merged models, in recipe order (the base of a
            task-vector method is not among them).
        alignments: one per merged model (the reference gets the identity).
        stage_seconds: wall time per stage (load, align, merge, evaluate, write, push).
        scores: held-out scores when the recipe has an ``evaluate`` section: each parent,
            ``naive`` (unaligned average) and ``merged``; lower is better.
        commit_url: the Hub commit, when pushed.
        plan: for a dry run, what would happen.
    """

    recipe: Recipe
    output: Path | None = None
    merged: list[str] = field(default_factory=list)
    alignments: list[Alignment] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] | None = None
    commit_url: str | None = None
    plan: list[str] = field(default_factory=list)


def run_recipe(
    recipe: str | os.PathLike | Mapping[str, Any] | Recipe,
    *,
    out: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool | None = None,
    progress: bool = True,
) -> RunResult:
    """Run a merge recipe end to end.

    Args:
        recipe: a recipe file, YAML text, dict, or :class:`Recipe`.
        out: output folder (overrides ``output.path``).
        push_to_hub: a Hub repo id (overrides ``output.push_to_hub.repo_id``).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        dry_run: validate and plan; read only configs and tensor headers of local models.
        overwrite: replace an existing output folder (overrides ``output.overwrite``).
        progress: show progress bars.

    Raises:
        RecipeError, CheckpointNotFoundError, SpecMismatchError, AlignmentError, PushError:
            each with a message that says what to fix. Nothing is left at the output path
            unless the run completed.
    """
    from merge_graphs.io import resolve

    recipe = load_recipe(recipe)
    destination = out or recipe.output.path
    target = Path(destination) if destination else None
    if target is None and not dry_run:
        raise RecipeError("no output folder: set output.path in the recipe, or pass --out DIR")
    repo_id = push_to_hub or (recipe.output.push_to_hub.repo_id if recipe.output.push_to_hub else None)
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    if target is not None and target.exists() and not overwrite:
        raise FileExistsError(f"output folder {target} already exists; choose another path, or pass --force "
                              "(output.overwrite: true) to replace it once the new merge is complete")
    device = _device(device)
    result = RunResult(recipe)
    if dry_run:
        result.plan = _plan(recipe, target, repo_id)
        return result

    with _stage(result, "load"):
        folders = {ref: resolve(ref, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
                   for ref in recipe.refs()}
        models = {ref: _load(folder, recipe, device) for ref, folder in folders.items()}
    reference_ref = recipe.base_model or recipe.models[0].model
    reference = models[reference_ref]
    base = models[recipe.base_model] if get_method(recipe.merge.method).needs_base else None
    result.merged = [m.model for m in recipe.merged_entries()]
    merged_models = [models[ref] for ref in result.merged]

    with _stage(result, "align"):
        calibration, tokenizer = _calibration(recipe, folders[reference_ref])
        result.alignments = align_models(
            reference, merged_models, recipe.align.method, solver=recipe.align.solver,
            refine=recipe.align.refine, groups=recipe.align.groups, residual=recipe.align.residual,
            calibration=calibration,
            tokenizer=tokenizer, seed=recipe.seed, progress=progress,
        )
    basis = identity_alignment(reference, recipe.align.residual)
    skeleton = output_skeleton(reference, recipe.align.residual)

    def merged_with(alignments: list[Alignment]) -> dict[str, torch.Tensor]:
        return merge_states(
            basis.spec, basis.apply(reference.state_dict()),
            [a.apply(m.state_dict()) for a, m in zip(alignments, merged_models)],
            recipe.merge.method, base_state=basis.apply(base.state_dict()) if base is not None else None,
            model_parameters=recipe.model_parameters(), parameters=recipe.merge.parameters,
            seed=recipe.seed,
        )

    with _stage(result, "merge"):
        merged = _with_state(skeleton, merged_with(result.alignments))

    if recipe.evaluate:
        with _stage(result, "evaluate"):
            naive = None
            if recipe.align.method != "none":
                naive = _with_state(skeleton, merged_with([basis] * len(merged_models)))
            result.scores = _evaluate(recipe, models, naive, merged, folders[reference_ref])

    from merge_graphs.io.card import model_card
    from merge_graphs.io.writer import write_model_folder

    with _stage(result, "write"):
        card = model_card(
            base_models=recipe.refs(), merge_method=recipe.merge.method, align_method=recipe.align.method,
            parameters=recipe.merge.parameters, alignment_summary=_summary(result.alignments),
            recipe_yaml=recipe.to_yaml(), scores=result.scores, notes=_card_notes(recipe),
        )
        result.output = write_model_folder(
            merged, target, shard_size=recipe.output.shard_size, dtype=_out_dtype(recipe, folders[reference_ref]),
            tokenizer_from=_tokenizer_folder(recipe, folders),
            extra_files={"merge-graphs.yaml": recipe.to_yaml(), "README.md": card}, overwrite=overwrite,
        )
    if repo_id:
        from merge_graphs.io.push import push_folder

        with _stage(result, "push"):
            hub = recipe.output.push_to_hub
            result.commit_url = push_folder(
                result.output, repo_id, private=hub.private if hub else None, revision=hub.revision if hub else None,
                commit_message=(hub.commit_message if hub else None) or "Upload merge made with merge-graphs",
            )
    return result


def _card_notes(recipe: Recipe) -> list[str]:
    if recipe.align.residual != "rotation":
        return []
    return ["Before matching, every norm's gain and bias were folded into the layers that read it, and the "
            "residual stream of each model was rotated onto the reference's (orthogonal Procrustes, alternated "
            "with the permutations). The merged model computes in that folded basis: its norms have unit gains "
            "and its LM head is untied."]


@contextmanager
def _stage(result: RunResult, name: str) -> Iterator[None]:
    start = time.perf_counter()
    logger.info("%s ...", name)
    try:
        yield
    finally:
        result.stage_seconds[name] = time.perf_counter() - start


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise RecipeError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device 'cuda' asked for but torch sees no GPU; use --device cpu")
    return torch.device(device)


def _load(folder: Path, recipe: Recipe, device: torch.device) -> torch.nn.Module:
    from merge_graphs.io import load_model

    # Matching and merging accumulate in float32 whatever the checkpoint's dtype.
    model = load_model(folder, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code,
                       dtype=torch.float32)
    return model.to(device)


def _plan(recipe: Recipe, target: Path | None, repo_id: str | None) -> list[str]:
    from merge_graphs.io import Checkpoint, parse_model_ref
    from merge_graphs.rotation import rotation_kind
    from merge_graphs.symmetry import spec_from_config

    plan = []
    for ref in recipe.refs():
        parsed = parse_model_ref(ref)
        if not parsed.is_local:
            plan.append(f"download {ref} from the Hub")
            continue
        ckpt = Checkpoint(parsed.path, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
        spec = spec_from_config(ckpt.config, ckpt.infos(), ckpt.architecture)
        if recipe.align.residual == "rotation":
            rotation_kind(spec)  # post-LN families refuse here, before anything is loaded
        plan.append(f"{ref}: {ckpt.architecture} ({spec.family}), {len(spec.groups)} groups, {len(ckpt.names())} tensors")
    align = recipe.align
    plan.append(f"align with {align.method}" + (f" ({align.solver}, residual {align.residual})"
                                                if align.method != "none" else ""))
    plan.append(f"merge with {recipe.merge.method} {recipe.merge.parameters or ''}".rstrip())
    if target is not None:
        plan.append(f"write {target}")
    if repo_id:
        plan.append(f"push to {repo_id}")
    return plan


def _calibration(recipe: Recipe, reference_folder: Path):
    cal = recipe.align.calibration
    if cal is None:
        return None, None
    from transformers import AutoTokenizer

    if cal.file:
        path = Path(cal.file)
        if not path.is_file():
            raise RecipeError(f"align.calibration.file {cal.file!r} not found; give a text file, one sample a line")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = list(cal.texts)
    tokenizer = AutoTokenizer.from_pretrained(reference_folder)
    tokenizer.model_max_length = cal.max_length
    return texts[: cal.max_samples], tokenizer


def _evaluate(recipe, models, naive, merged, reference_folder) -> dict[str, float]:
    from transformers import AutoTokenizer

    from merge_graphs.evaluate import text_loss

    text = Path(recipe.evaluate.data)
    if not text.is_file():
        raise RecipeError(f"evaluate.data {recipe.evaluate.data!r} not found; give a held-out text file")
    tokenizer = AutoTokenizer.from_pretrained(reference_folder)
    candidates = {**models, "naive": naive, "merged": merged}
    return {name: text_loss(m, tokenizer, text, max_windows=recipe.evaluate.max_windows)
            for name, m in candidates.items() if m is not None}


def _summary(alignments: list[Alignment]) -> dict[str, dict[str, float]] | None:
    aligned = [a for a in alignments if a.method != "none"]
    if not aligned:
        return None
    summary: dict[str, dict[str, float]] = {}
    for a in aligned:
        for group, row in a.summary().items():
            acc = summary.setdefault(group, {"before": 0.0, "after": 0.0})
            acc["before"] += row["before"]
            acc["after"] += row["after"]
    return summary


def _out_dtype(recipe: Recipe, reference_folder: Path) -> torch.dtype:
    if recipe.dtype:
        return getattr(torch, recipe.dtype)
    from merge_graphs.io import Checkpoint

    stored = [i.dtype for i in Checkpoint(reference_folder).infos().values() if i.dtype.is_floating_point]
    return stored[0] if stored else torch.float32


def _tokenizer_folder(recipe: Recipe, folders: Mapping[str, Path]) -> Path | None:
    from merge_graphs.io import resolve
    from merge_graphs.io.writer import tokenizer_files

    source = recipe.tokenizer_source
    if source in (None, "base"):
        folder = folders[recipe.base_model or recipe.models[0].model]
    elif source == "first":
        folder = folders[recipe.models[0].model]
    else:
        folder = folders.get(source) or resolve(source)
    if source is None and not tokenizer_files(Path(folder)):
        logger.warning("%s has no tokenizer files; the output folder will have none", folder)
        return None
    return folder
