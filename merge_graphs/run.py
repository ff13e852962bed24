"""Running a recipe: load, align, merge, evaluate, write, push.

:func:`run_recipe` is what ``merge-graphs recipe.yaml`` calls. It validates the recipe before
touching any model, writes the output folder atomically (complete or absent), and keeps the
local folder when a push fails.

Every recipe runs the one engine: its models become tensor sources
(:mod:`merge_graphs.sources`), an aligner of :mod:`merge_graphs.aligners` maps each onto the
reference, :func:`merge_graphs.verify.check_alignment` checks the maps, and the merge loop of
:mod:`merge_graphs.engine` streams into the shard writer. What differs is only how the sources
read their tensors (:func:`execution_path`, shown in the ``--dry-run`` plan and in
:attr:`RunResult.path`): *streamed*, from lazily opened checkpoints, tensor by tensor, for every
data-free recipe (rotations included); *in-memory*, from whole ``transformers`` models, when an
aligner runs forward passes (activation matching, learned alignment) or the recipe scores the
merge on held-out text.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig

from merge_graphs.activations import prepare_inputs
from merge_graphs.aligners import FAMILY, AlignOptions, align_sources, basis_identity, get_aligner
from merge_graphs.api import output_skeleton
from merge_graphs.engine import MergedModel, plan_merge
from merge_graphs.errors import RecipeError
from merge_graphs.evaluate import text_loss
from merge_graphs.io import Checkpoint, load_model, parse_model_ref, resolve
from merge_graphs.io.card import model_card
from merge_graphs.io.push import push_folder
from merge_graphs.io.writer import tokenizer_files, write_tensor_folder
from merge_graphs.match import Alignment
from merge_graphs.memory import PeakRSS
from merge_graphs.methods import get_method
from merge_graphs.modules import check_modules, selector
from merge_graphs.recipe import CHAT_TEMPLATES, Recipe, SliceEntry, load_recipe
from merge_graphs.rotation import rotation_kind
from merge_graphs.sampled_text import sample_calibration
from merge_graphs.slices import OutputModule, OutputSlice, SliceSource
from merge_graphs.sources import ModelTensors, StateTensors, TensorSource, compatible
from merge_graphs.verify import check_alignment
from merge_graphs.vocabulary import Vocabulary, build_vocabulary, token_indexed

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
        path: ``"streamed"`` or ``"in-memory"`` (see :func:`execution_path`), and
        path_reason: why.
        stage_peak_rss: the process's peak resident memory during each stage, in bytes
            (sampled, see :class:`~merge_graphs.memory.PeakRSS`). The stages are load, align,
            verify (the function-preservation check), merge+write (or merge, evaluate and write
            with an ``evaluate`` section), push.
    """

    recipe: Recipe
    output: Path | None = None
    merged: list[str] = field(default_factory=list)
    alignments: list[Alignment] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] | None = None
    commit_url: str | None = None
    plan: list[str] = field(default_factory=list)
    path: str = ""
    path_reason: str = ""
    stage_peak_rss: dict[str, int] = field(default_factory=dict)


def run_recipe(
    recipe: str | os.PathLike | Mapping[str, Any] | Recipe,
    *,
    out: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool | None = None,
    progress: bool = True,
    streaming: bool | None = None,
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
        streaming: ``None`` reads the models as :func:`execution_path` says; ``False`` loads
            whole models anyway; ``True`` insists on streaming.

    Raises:
        RecipeError, CheckpointNotFoundError, SpecMismatchError, AlignmentError, PushError:
            each with a message that says what to fix. Nothing is left at the output path
            unless the run completed.
    """
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
    result.path, result.path_reason = execution_path(recipe)
    if streaming is False and result.path == "streamed":
        result.path, result.path_reason = "in-memory", "asked for (streaming=False)"
    elif streaming and result.path != "streamed":
        raise RecipeError(f"this recipe cannot be streamed: {result.path_reason}; drop streaming=True")
    result.merged = [m.model for m in recipe.merged_entries()]
    if dry_run:
        result.plan = _plan(recipe, target, repo_id, result)
        return result

    _run(recipe, result, target, overwrite, device, progress)
    if repo_id:
        with _stage(result, "push"):
            hub = recipe.output.push_to_hub
            result.commit_url = push_folder(
                result.output, repo_id, private=hub.private if hub else None, revision=hub.revision if hub else None,
                commit_message=(hub.commit_message if hub else None) or "Upload merge made with merge-graphs",
            )
    return result


def execution_path(recipe: Recipe) -> tuple[str, str]:
    """How :func:`run_recipe` reads the models of ``recipe``, and why: ``("streamed", ...)`` or
    ``("in-memory", ...)``.

    Streamed, the checkpoints are read tensor by tensor, a few tensors at a time whatever the
    model size: every data-free alignment (``none``, ``weight`` with either residual
    alignment, ``gnn``) and every merge method. Aligners that run forward passes
    (``needs_models``) and held-out scoring load every model whole.

    Example:
        >>> from merge_graphs.recipe import load_recipe
        >>> from merge_graphs.run import execution_path
        >>> execution_path(load_recipe({"models": [{"model": "a"}, {"model": "b"}]}))[0]
        'streamed'
        >>> execution_path(load_recipe({"models": [{"model": "a"}], "align": {"method": "activation",
        ...                             "calibration": {"texts": ["hi"]}}}))
        ('in-memory', "align method 'activation' runs forward passes on whole models")
    """
    if get_aligner(recipe.align.method).needs_models:
        return "in-memory", f"align method {recipe.align.method!r} runs forward passes on whole models"
    if recipe.evaluate:
        return "in-memory", "the evaluate section scores whole models"
    return "streamed", "tensor by tensor, a few tensors in memory at a time"


def _slices(recipe: Recipe, slices: list[SliceEntry], sources: dict[str, TensorSource],
            module_parameters: Mapping[str, Any] | None = None) -> list[OutputSlice]:
    """The engine's slices of a recipe's ``slices`` (at the top or in a module with ``module_parameters``)."""
    return [OutputSlice([SliceSource(sources[src.model], src.layer_range,
                                     recipe.with_default_weight(src.parameters, sl.parameters, module_parameters or {}))
                         for src in sl.sources],
                        base=sources.get(sl.base_model or recipe.base_model), parameters=sl.parameters)
            for sl in slices]


def _modules(recipe: Recipe, sources: dict[str, TensorSource], reference: TensorSource,
             base: TensorSource | None) -> list[OutputModule]:
    """The engine's modules of a recipe's ``modules``: each from its whole models (with the base of a
    task-vector method, as mergekit adds it) or its slices."""
    model_type = getattr(reference.config, "model_type", None)
    table = check_modules(list(recipe.modules), model_type)
    out = []
    for name, entry in recipe.modules.items():
        if entry.slices is None:
            listed = [SliceSource(sources[m.model], None, recipe.with_default_weight(m.merge_parameters(), entry.parameters))
                      for m in entry.models]
            if base is not None and not any(s.model is base for s in listed):
                listed.append(SliceSource(base))
            slices = [OutputSlice(listed, base)]
        else:
            slices = _slices(recipe, entry.slices, sources, entry.parameters)
        out.append(OutputModule(name, selector(model_type, name), slices, entry.slices is None, entry.parameters,
                                table[name].layers_key))
    return out


def _run(recipe: Recipe, result: RunResult, target: Path, overwrite: bool, device: torch.device,
         progress: bool) -> None:
    """Load the sources, align, check, merge and write (and evaluate) with the one engine."""
    with _stage(result, "load"):
        folders = _resolve_all(recipe)
        sources = {ref: _source(folder, recipe, device, whole=result.path == "in-memory")
                   for ref, folder in folders.items()}
        reference_ref = recipe.base_model or recipe.first_model
        reference = sources[reference_ref]
        output_tokenizer, vocabulary = _tokenizer(recipe, folders, sources, reference)
        merged = [sources[ref] for ref in result.merged]
        # Slices may take layers from models of other depths, and vocabularies may differ: the
        # engine checks their tensors one by one.
        spec = (reference.spec() if (recipe.slices is not None or recipe.modules is not None or vocabulary is not None)
                and recipe.align.method == "none" else compatible(reference, list(sources.values())))
        if spec.unaligned:
            logger.info("%s has no symmetry spec: its tensors are merged by name, without alignment", spec.family)
    with _stage(result, "align"):
        align = recipe.align
        calibration, tokenizer = _calibration(recipe, folders[reference_ref])
        if calibration is not None:
            inputs = prepare_inputs(calibration, tokenizer, max_length=align.calibration.max_length)
            calibration = {k: v.to(device) for k, v in inputs.items()}
        elif align.calibration is not None and align.calibration.generate:
            models = list({id(s.model): s.model for s in [reference, *merged]}.values())
            calibration = sample_calibration(models, align.calibration.generate, align.calibration.max_length,
                                             seed=recipe.seed, progress=progress)
            calibration = {k: v.to(device) for k, v in calibration.items()}
        options = AlignOptions(
            residual=align.residual, solver=align.solver, groups=align.groups, seed=recipe.seed, refine=align.refine,
            calibration=calibration, learn={**align.learn.settings(), "progress": progress},
            mask_token_id=getattr(tokenizer, "mask_token_id", None),
        )
        result.alignments = align_sources(reference, merged, align.method, spec, options, progress=progress)
    with _stage(result, "verify"):
        for source, alignment in zip(merged, result.alignments):
            if alignment.method != "none":
                check_alignment(source, alignment)

    base = sources[recipe.base_model] if recipe.base_model and get_method(recipe.merge.method).base != "none" else None
    slices = None if recipe.slices is None else _slices(recipe, recipe.slices, sources)
    modules = None if recipe.modules is None else _modules(recipe, sources, reference, base)

    def merge(alignments: list[Alignment]) -> MergedModel:
        return plan_merge(
            reference, merged, alignments, recipe.merge.method,
            base=base, model_parameters=recipe.model_parameters(), parameters=recipe.merge.parameters,
            slices=slices, modules=modules,
            seed=recipe.seed, dtype=_stored_dtype(recipe.dtype, folders[reference_ref]), vocabulary=vocabulary,
        )

    plan = merge(result.alignments)
    tensors = plan.tensors()
    if recipe.evaluate:
        with _stage(result, "merge"):
            model = reference.model
            merged_model = plan.into(output_skeleton(model, plan.basis))
        with _stage(result, "evaluate"):
            candidates = {ref: source.model for ref, source in sources.items()}
            if recipe.align.method != "none":
                # What a user means by naive: the models averaged as they are (mergekit's merge).
                candidates["naive"] = merge([basis_identity(m) for m in merged]).into(model)
            candidates["merged"] = merged_model
            result.scores = _evaluate(recipe, candidates, folders[reference_ref])
        state = merged_model.state_dict()
        tensors = ((name, state[name]) for name in plan.names)
    with _stage(result, "write" if recipe.evaluate else "merge+write"):
        result.output = write_tensor_folder(
            tqdm(tensors, total=len(plan.names), desc="merging", disable=not progress or bool(recipe.evaluate)),
            plan.layout, plan.config, target, shard_size=recipe.output.shard_size,
            dtype=_stored_dtype(recipe.out_dtype or recipe.dtype, folders[reference_ref]),
            generation_config=_generation_config(folders[reference_ref]),
            tokenizer_from=output_tokenizer,
            extra_files=_extra_files(recipe, result), overwrite=overwrite,
        )


def _source(folder: Path, recipe: Recipe, device: torch.device, *, whole: bool) -> TensorSource:
    """A model folder as a tensor source: lazily opened, or loaded whole (in float32: matching and
    merging accumulate in float32 whatever the checkpoint's dtype)."""
    if not whole:
        return ModelTensors(Checkpoint(folder, allow_pickle=recipe.allow_pickle,
                                       trust_remote_code=recipe.trust_remote_code), device)
    model = load_model(folder, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code,
                       dtype=torch.float32)
    return StateTensors(model.to(device))


def _card_notes(recipe: Recipe, alignments: list[Alignment]) -> list[str]:
    rotated = any(a.basis == "rotation" for a in alignments)
    notes = []
    if rotated:
        notes.append("Before matching, every norm's gain and bias were folded into the layers that read it, and the "
                     "residual stream of each model was rotated onto the reference's (orthogonal Procrustes, "
                     "alternated with the permutations). The merged model computes in that folded basis: its norms "
                     "have unit gains and its LM head is untied.")
    learned = [a for a in alignments if a.method == "learned"]
    if learned:
        learn = recipe.align.learn
        given = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in learn.settings().items() if k != "heads")
        what = (f"The residual map{' and within-head maps' if learn.heads else ''} were" if rotated else
                "The permutations (weight matching's at the start) were")
        how = "" if rotated else ", by a straight-through estimator (hard permutations forward, Sinkhorn backward)"
        cal = recipe.align.calibration
        text = (f"{cal.generate} sequences sampled from the models themselves (no data)" if cal.generate
                else "the calibration text")
        notes.append(f"{what} then learned on {text}{how}: {len(learned[0].loss_curve)} Adam steps"
                     f"{f' ({given})' if given else ''} on the loss of the interpolated models, each model's own "
                     "function unchanged.")
    return notes


@contextmanager
def _stage(result: RunResult, name: str) -> Iterator[None]:
    start = time.perf_counter()
    logger.info("%s ...", name)
    meter = PeakRSS()
    try:
        with meter:
            yield
    finally:
        result.stage_seconds[name] = time.perf_counter() - start
        result.stage_peak_rss[name] = meter.peak
        logger.info("%s: %.1fs, peak RSS %.2f GB", name, result.stage_seconds[name], meter.peak / 1e9)


def _resolve_all(recipe: Recipe) -> dict[str, Path]:
    """Every model reference of the recipe as a local folder (Hub ids are downloaded)."""
    return {ref: resolve(ref, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
            for ref in recipe.refs()}


def _extra_files(recipe: Recipe, result: RunResult) -> dict[str, str]:
    """The recipe and the model card, written beside the weights."""
    card = model_card(
        base_models=recipe.refs(), merge_method=recipe.merge.method, align_method=recipe.align.method,
        parameters=recipe.merge.parameters, alignment_summary=_summary(result.alignments),
        recipe_yaml=recipe.to_yaml(), scores=result.scores, notes=_card_notes(recipe, result.alignments),
    )
    return {"merge-graphs.yaml": recipe.to_yaml(), "README.md": card}


def _generation_config(folder: Path) -> Any:
    """The reference's generation config, written again beside the merge (None if it has none)."""
    if not (folder / "generation_config.json").is_file():
        return None

    return GenerationConfig.from_pretrained(folder)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise RecipeError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device 'cuda' asked for but torch sees no GPU; use --device cpu")
    return torch.device(device)


def _plan(recipe: Recipe, target: Path | None, repo_id: str | None, result: RunResult) -> list[str]:
    plan = []
    for ref in recipe.refs():
        parsed = parse_model_ref(ref)
        if not parsed.is_local:
            plan.append(f"download {ref} from the Hub")
            continue
        ckpt = Checkpoint(parsed.path, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
        spec = ModelTensors(ckpt).spec()
        get_aligner(recipe.align.method).check(spec)
        if recipe.align.residual == "rotation":
            rotation_kind(spec)  # post-LN families refuse here, before anything is loaded
        symmetry = ("no symmetry spec, merged by tensor name" if spec.unaligned
                    else f"{spec.family}, {len(spec.groups)} groups")
        plan.append(f"{ref}: {ckpt.architecture} ({symmetry}), {len(ckpt.names())} tensors")
    align = recipe.align
    residual = ("as the family admits" if get_aligner(align.method).basis == FAMILY
                else align.residual)
    plan.append(f"align with {align.method}" + (f" ({align.solver}, residual {residual})"
                                                if align.method != "none" else ""))
    plan.append(f"merge with {recipe.merge.method} {recipe.merge.parameters or ''}".rstrip())
    plan.append(f"path: {result.path} ({result.path_reason})")
    if target is not None:
        plan.append(f"write {target}")
    if repo_id:
        plan.append(f"push to {repo_id}")
    return plan


def _calibration(recipe: Recipe, reference_folder: Path):
    cal = recipe.align.calibration
    if cal is None:
        return None, None
    if cal.generate:
        return None, AutoTokenizer.from_pretrained(reference_folder)

    tokenizer = AutoTokenizer.from_pretrained(reference_folder)
    tokenizer.model_max_length = cal.max_length
    if not cal.file:
        return list(cal.texts)[: cal.max_samples], tokenizer
    path = Path(cal.file)
    if not path.is_file():
        raise RecipeError(f"align.calibration.file {cal.file!r} not found; give a text file (one sample a line, "
                          "or a corpus with split: windows)")
    text = path.read_text(encoding="utf-8")
    if cal.split == "lines":
        return [line for line in text.splitlines() if line.strip()][: cal.max_samples], tokenizer
    ids = torch.tensor(tokenizer(text, truncation=False)["input_ids"])
    count = min(cal.max_samples, len(ids) // cal.max_length)
    if count == 0:
        raise RecipeError(f"align.calibration.file {cal.file!r} holds {len(ids)} tokens, less than one window of "
                          f"max_length {cal.max_length}; give more text or a smaller max_length")
    windows = ids[: count * cal.max_length].reshape(count, cal.max_length)
    return {"input_ids": windows, "attention_mask": torch.ones_like(windows)}, tokenizer


def _evaluate(recipe: Recipe, candidates: Mapping[str, torch.nn.Module], reference_folder: Path) -> dict[str, float]:

    text = Path(recipe.evaluate.data)
    if not text.is_file():
        raise RecipeError(f"evaluate.data {recipe.evaluate.data!r} not found; give a held-out text file")
    tokenizer = AutoTokenizer.from_pretrained(reference_folder)
    return {name: text_loss(m, tokenizer, text, max_windows=recipe.evaluate.max_windows)
            for name, m in candidates.items()}


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


def _stored_dtype(dtype: str | None, reference_folder: Path) -> torch.dtype:
    """``dtype``, or by default the dtype the reference checkpoint stores (mergekit's default for
    both the arithmetic and the output)."""
    if dtype:
        return getattr(torch, dtype)
    stored = [i.dtype for i in Checkpoint(reference_folder).infos().values() if i.dtype.is_floating_point]
    return stored[0] if stored else torch.float32


def _tokenizer(recipe: Recipe, folders: Mapping[str, Path], sources: Mapping[str, TensorSource],
               reference: TensorSource) -> tuple[Any, Vocabulary | None]:
    """What the output's tokenizer is written from (a folder whose files are copied, or a
    tokenizer), and, when the recipe's tokenizer source changes the vocabulary of some model, the
    vocabulary its token-indexed tensors are moved onto (mergekit's rule); None if none changes."""
    vocabulary = _vocabulary(recipe, folders, sources, reference)
    folder = None if vocabulary is not None else _tokenizer_folder(recipe, folders)
    if recipe.chat_template is None:
        return (vocabulary.tokenizer if vocabulary is not None else folder), vocabulary
    if vocabulary is None and folder is None:
        raise RecipeError("chat_template needs a tokenizer, and the reference has no tokenizer files; set "
                          "tokenizer_source to a model that has one")
    tokenizer = vocabulary.tokenizer if vocabulary is not None else \
        AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.trust_remote_code)
    template = CHAT_TEMPLATES.get(recipe.chat_template, recipe.chat_template)
    if template == "auto":
        # mergekit's rule: the template most of the models have (the first listed of the most common)
        found = [_chat_template(folders[ref], recipe) for ref in recipe.refs()]
        found = [t.strip() for t in found if t]
        if not found:
            logger.warning("chat_template auto: none of the models has a chat template; the output has none")
            return (tokenizer if vocabulary is not None else folder), vocabulary
        template = Counter(found).most_common(1)[0][0]
    tokenizer.chat_template = template
    return tokenizer, vocabulary


def _chat_template(folder: Path, recipe: Recipe) -> str | None:
    if not tokenizer_files(folder):
        return None
    template = AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.trust_remote_code).chat_template
    return template.get("default") if isinstance(template, dict) else template


def _vocabulary(recipe: Recipe, folders: Mapping[str, Path], sources: Mapping[str, TensorSource],
                reference: TensorSource) -> Vocabulary | None:
    """mergekit builds the output tokenizer from ``tokenizer_source`` and moves every model's
    token-indexed tensors onto its vocabulary (:mod:`merge_graphs.vocabulary`); None when no
    tensor would change, so that the tokenizer files are copied as they are."""
    source = recipe.tokenizer_source
    if source is None:
        return None
    first = recipe.base_model or recipe.first_model
    source = {"first": recipe.first_model}.get(source, source)
    tokenizers = {ref: AutoTokenizer.from_pretrained(folders[ref], trust_remote_code=recipe.trust_remote_code)
                  for ref in dict.fromkeys([first, *recipe.refs()]) if tokenizer_files(folders[ref])}
    if source not in ("base", "union") and source not in tokenizers:
        tokenizers[source] = AutoTokenizer.from_pretrained(folders.get(source) or resolve(source),
                                                           trust_remote_code=recipe.trust_remote_code)
    if first not in tokenizers:
        if source in ("base", "union"):
            raise RecipeError(f"tokenizer_source {recipe.tokenizer_source}: {first} has no tokenizer files, and the "
                              "output vocabulary is built on its tokenizer; give a base_model that has one, or name "
                              "a model as tokenizer_source")
        # a model without a tokenizer reads as the named one's (mergekit assumes the base's)
        tokenizers = {first: tokenizers[source], **tokenizers}
    section = recipe.tokenizer
    sizes = {ref: _vocab_size(src.config) for ref, src in sources.items()}
    try:
        vocabulary = build_vocabulary(
            tokenizers, sizes, source, first,
            tokens={t: e.embedding() for t, e in section.tokens.items()} if section else None,
            pad_to_multiple_of=section.pad_to_multiple_of if section else None)
        axes = token_indexed(reference.config, reference.architecture)
    except ValueError as e:
        raise RecipeError(f"tokenizer_source {recipe.tokenizer_source}: {e}") from None
    rows = {}
    for ref, src in sources.items():
        infos = src.infos()
        rows[ref] = next((infos[n].shape[a] for n, a in axes.items() if n in infos), None)
    if not any(vocabulary.moves(ref, n) for ref, n in rows.items() if n is not None):
        return None
    if recipe.align.method != "none":
        raise RecipeError(f"tokenizer_source {recipe.tokenizer_source} changes the vocabulary of some models, and "
                          "aligned models must share one vocabulary; merge with align: {method: none}, or use a "
                          "tokenizer source whose vocabulary every model has")
    most = max((n for n in rows.values() if n is not None), default=0)
    if vocabulary.size < most:
        logger.warning("the output tokenizer has %d tokens and the embeddings up to %d rows: as in mergekit, the output "
                       "keeps %d rows (tokenizer: {pad_to_multiple_of: N} pads it)", len(vocabulary.tokens), most,
                       vocabulary.size)
    vocabulary.axes = axes
    vocabulary.owners = {id(src): ref for ref, src in sources.items()}
    vocabulary.base = recipe.base_model
    return vocabulary


def _vocab_size(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def _tokenizer_folder(recipe: Recipe, folders: Mapping[str, Path]) -> Path | None:
    source = recipe.tokenizer_source
    if source in (None, "base", "union"):
        folder = folders[recipe.base_model or recipe.first_model]
    elif source == "first":
        folder = folders[recipe.first_model]
    else:
        folder = folders.get(source) or resolve(source)
    if source is None and not tokenizer_files(Path(folder)):
        logger.warning("%s has no tokenizer files; the output folder will have none", folder)
        return None
    return folder
