"""Recipes: what to merge and how, validated before anything is loaded.

A merge-graphs recipe::

    models:
      - model: org/model-a            # a Hub id, org/name@revision, or a local folder
      - model: ./model-b
        weight: 0.5
    base_model: org/base              # optional: the reference, and the base of task-vector methods
    align: {method: weight, solver: auto, residual: permutation}
    merge: {method: linear, parameters: {normalize: true}}
    dtype: bfloat16
    output: {path: ./merged, shard_size: 5GB, push_to_hub: {repo_id: me/merged, private: true}}

A mergekit recipe (``merge_method``, ``models``, ``slices`` or ``modules``, ``parameters``, ``base_model``,
``dtype``, ``out_dtype``, ``tokenizer_source``) is accepted as it is and runs without alignment,
as mergekit would (or, with merge-graphs' own ``align:`` section added, aligns every model first
and then merges with the recipe's method); keys and parameters mergekit ignores are ignored too, with a warning naming
them.
Relative folders are resolved against the recipe file's folder. Every error names the field,
the bad value and the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge_graphs.aligners import ALIGNERS, FAMILY
from merge_graphs.errors import MergeParameterError, RecipeError
from merge_graphs.methods import METHODS, get_method
from merge_graphs.parameters import check_setting
from merge_graphs.vocabulary import TokenEmbedding

logger = logging.getLogger(__name__)

MERGEKIT_KEYS = {"merge_method", "models", "parameters", "base_model", "dtype", "out_dtype", "tokenizer_source",
                 "tokenizer", "chat_template", "slices", "modules", "align"}
#: Chat templates known by name (``chat_template: chatml``); ``auto`` takes the one most of the
#: models have, and a template's own text is used as it is.
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """One model to merge and its per-model merge parameters (mergekit's ``weight``, ``density`` ...)."""

    model: str
    weight: float | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    def merge_parameters(self) -> dict[str, Any]:
        return {**self.parameters, **({"weight": self.weight} if self.weight is not None else {})}


class SliceSourceEntry(_Strict):
    """Layers ``layer_range`` ([start, stop)) of a model, and its merge parameters in that slice."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceEntry(_Strict):
    """Output layers made from the same number of layers of each source (mergekit's slices)."""

    sources: list[SliceSourceEntry] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class ModuleEntry(_Strict):
    """One part of a multi-part model (mergekit's ``modules``: ``text_decoder``, ``vision_tower`` ...,
    :mod:`merge_graphs.modules`), made from whole models or from slices, with its own parameters."""

    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceEntry] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self):
        if bool(self.models) == (self.slices is not None):
            raise ValueError("a module gives exactly one of 'models' or 'slices'")
        return self


class ModelToken(_Strict):
    """A token's row taken from another token of one model (by text or by id)."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("a model_token source gives one of token or token_id")
        return self


class ZeroToken(_Strict):
    kind: Literal["zero"]


class TokenEntry(_Strict):
    """Where one output token's row comes from (mergekit's ``tokenizer.tokens`` entry): a model's
    own row of it, another token of a model, or zero; ``force``: in every model, not only those
    that lack it."""

    source: ModelToken | ZeroToken | str | None = None
    force: bool = False

    def embedding(self) -> TokenEmbedding:
        source = self.source
        if isinstance(source, ModelToken):
            return TokenEmbedding(source.model, source.token, source.token_id, self.force)
        return TokenEmbedding("zero" if isinstance(source, ZeroToken) else source, force=self.force)


class TokenizerSection(_Strict):
    """The output's tokenizer (mergekit's ``tokenizer`` section): ``source`` (``base``, ``union``
    or a model), tokens to add and where their rows come from, and a padded vocabulary size."""

    source: str = "union"
    tokens: dict[str, TokenEntry] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(None, gt=0)


class Calibration(_Strict):
    """Inputs for activation matching and learned alignment: texts inline, a text file, or text
    sampled from the models themselves.

    A file is read one sample a line (``split: lines``), or as one corpus cut into consecutive
    windows of ``max_length`` tokens (``split: windows``), of which ``max_samples`` are used.
    ``generate: N`` needs no data: N sequences of ``max_length`` tokens are sampled from the causal
    LMs being merged, in equal shares (:func:`merge_graphs.sampled_text.sample_calibration`).
    """

    texts: list[str] | None = None
    file: str | None = None
    generate: int | None = Field(None, gt=0)
    split: Literal["lines", "windows"] = "lines"
    max_samples: int = Field(64, gt=0)
    max_length: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.texts, self.file, self.generate)) != 1:
            raise ValueError("give exactly one of 'texts' (a list of strings), 'file' (a text file, one sample a "
                             "line) or 'generate' (how many sequences to sample from the models themselves)")
        return self


class Learn(_Strict):
    """Settings of learned alignment; unset ones take the family's defaults.

    Pre-norm causal LMs (:func:`merge_graphs.learned.learned_alignment`: 600 steps, lr 1e-2 decayed to 0
    on a cosine, 16 samples a step, ``heads`` (default true): also learn within-head maps); post-LayerNorm encoders
    (:func:`merge_graphs.learned.learned_permutations`: the permutations by a straight-through
    estimator, 300 steps, lr 0.05, 32 samples a step, ``heads`` (default true): also the dims inside
    each head, ``tau``: the Sinkhorn temperature, 1; so do post-norm decoders, Gemma 2/3 and OLMo 2). From
    a recipe an encoder learns on the masked-LM loss of the calibration texts (a ``...ForMaskedLM``), a
    post-norm decoder on their next-token loss; a classifier's task-head loss needs the
    labels, which only the API takes (``merge_graphs.align(a, b, "learned", calibration={..., "labels": y})``).
    """

    steps: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    heads: bool | None = None
    tau: float | None = Field(None, gt=0)

    def settings(self) -> dict[str, Any]:
        """The settings given, as keyword arguments."""
        return self.model_dump(exclude_none=True)


class Align(_Strict):
    """How to align every model to the reference before merging."""

    method: str = "weight"
    solver: Literal["auto", "exact", "emd", "sinkhorn", "torch"] = "auto"
    refine: bool = False
    residual: Literal["permutation", "rotation"] = "permutation"
    groups: list[str] | None = None
    calibration: Calibration | None = None
    learn: Learn = Field(default_factory=Learn)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ALIGNERS:
            raise ValueError(f"choose one of {', '.join(repr(a) for a in ALIGNERS)} (got {v!r})")
        return v

    @model_validator(mode="after")
    def _needs(self):
        aligner = ALIGNERS[self.method]
        if aligner.needs_models and self.calibration is None:
            raise ValueError(f"method {self.method!r} needs calibration data: add calibration: {{texts: [...]}}, "
                             "{file: path}, or {generate: 4096} (text sampled from the causal LMs themselves), or "
                             "use method 'weight' (data-free)")
        if aligner.basis == FAMILY:
            # residual: rotation insists on a rotation (a post-LN family then refuses with the reason).
            if "residual" in self.model_fields_set and self.residual != "rotation":
                raise ValueError(f"method {self.method!r} aligns the residual stream as the family admits (a rotation "
                                 "for pre-norm transformers, a permutation for post-LayerNorm encoders): drop "
                                 f"residual: {self.residual}")
        elif aligner.basis is not None:
            if "residual" in self.model_fields_set and self.residual != aligner.basis:
                raise ValueError(f"method {self.method!r} aligns the residual stream by {aligner.basis}: drop "
                                 f"residual: {self.residual} (or write residual: {aligner.basis})")
            self.residual = aligner.basis
        if self.residual not in aligner.residuals:
            able = [name for name, a in ALIGNERS.items() if self.residual in a.residuals]
            raise ValueError(f"residual {self.residual!r} needs method {', '.join(able[:-1])} or {able[-1]}")
        return self


class Merge(_Strict):
    """The merge method (mergekit's definitions and parameter names) and its global parameters."""

    method: str = "linear"
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown merge method {v!r}; choose one of {', '.join(sorted(METHODS))}")
        return v


class PushToHub(_Strict):
    repo_id: str
    private: bool | None = None
    revision: str | None = None
    commit_message: str | None = None

    @field_validator("repo_id")
    @classmethod
    def _namespaced(cls, v: str) -> str:
        if v.count("/") != 1 or not all(v.split("/")):
            raise ValueError(f"repo_id must look like 'your-name/model-name', got {v!r}")
        return v


class Output(_Strict):
    path: str | None = None
    shard_size: int | str = "5GB"
    overwrite: bool = False
    push_to_hub: PushToHub | None = None


class Evaluate(_Strict):
    """Held-out scoring of the parents, naive averaging and the aligned merge (causal LMs)."""

    data: str
    task: Literal["causal_lm"] = "causal_lm"
    max_windows: int = Field(64, gt=0)


class Recipe(_Strict):
    """A validated merge-graphs recipe. Build one with :func:`load_recipe`."""

    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceEntry] | None = None
    modules: dict[str, ModuleEntry] | None = None
    base_model: str | None = None
    align: Align = Field(default_factory=Align)
    merge: Merge = Field(default_factory=Merge)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    output: Output = Field(default_factory=Output)
    evaluate: Evaluate | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    source_format: Literal["merge-graphs", "mergekit"] = "merge-graphs"

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_source(cls, data: Any) -> Any:
        section = data.get("tokenizer") if isinstance(data, dict) else None
        if isinstance(section, dict):
            if data.get("tokenizer_source") is not None:
                raise ValueError("give tokenizer_source or a tokenizer section, not both (mergekit refuses both too)")
            data = {**data, "tokenizer_source": section.get("source", "union")}
        return data

    def parts(self) -> list[tuple[str, list[ModelEntry], list[SliceEntry] | None, dict[str, Any]]]:
        """``(where, models, slices, parameters)`` of each part the recipe builds: the whole model,
        or each of its ``modules``."""
        if self.modules is not None:
            return [(f"modules.{name}", m.models, m.slices, m.parameters) for name, m in self.modules.items()]
        return [("", self.models, self.slices, {})]

    @model_validator(mode="after")
    def _consistent(self):
        method = get_method(self.merge.method)
        if [bool(self.models), self.slices is not None, self.modules is not None].count(True) != 1:
            raise ValueError("give exactly one of 'models' (whole models, e.g. models: [{model: org/name}]), "
                             "'slices' (ranges of layers) or 'modules' (the parts of a multi-part model)")
        if self.modules is not None:
            if not self.modules:
                raise ValueError("'modules' is empty; name each part with its models, e.g. "
                                 "modules: {text_decoder: {models: [...]}}")
            if self.align.method != "none":
                raise ValueError("align works on whole models, and this recipe merges modules: remove align "
                                 "(or give align: {method: none}), or merge whole models with models:")
        parts = self.parts()
        every_slice_has_a_base = all(not models and all(sl.base_model for sl in slices) for _, models, slices, _ in parts)
        if method.base == "required" and not self.base_model and not every_slice_has_a_base:
            raise ValueError(f"merge method {self.merge.method!r} needs base_model: add base_model: <model>")
        try:
            for _, models, slices, _ in parts:
                if models:
                    method.check_count(len([m for m in models if method.base == "none" or m.model != self.base_model]))
                for sl in slices or []:
                    base = sl.base_model or self.base_model
                    separate = method.base != "none" and base in [src.model for src in sl.sources]
                    method.check_count(len(sl.sources) - separate)
        except MergeParameterError as e:
            raise ValueError(str(e)) from None
        allowed = set(method.global_parameters) | set(method.model_parameters)
        settings = [("merge.parameters", self.merge.parameters)]
        for where, models, slices, parameters in parts:
            at = f"{where}." if where else ""
            if where:
                settings.append((f"{where}.parameters", parameters))
            settings += [(f"{at}models[{i}].parameters", m.merge_parameters()) for i, m in enumerate(models)]
            for i, sl in enumerate(slices or []):
                settings.append((f"{at}slices[{i}].parameters", sl.parameters))
                settings += [(f"{at}slices[{i}].sources[{j}].parameters", src.parameters)
                             for j, src in enumerate(sl.sources)]
        for where, params in settings:
            unknown = set(params) - allowed
            if unknown:
                raise ValueError(f"{where}: {self.merge.method} has no parameter {sorted(unknown)}; "
                                 f"its parameters are {sorted(allowed)}")
            for name, setting in params.items():
                try:
                    check_setting(setting)
                except ValueError as e:
                    raise ValueError(f"{where}.{name}: {e}") from None
        if self.tokenizer_source == "union" and self.align.method != "none":
            raise ValueError("tokenizer_source 'union' needs align: {method: none}: aligned models share one "
                             "vocabulary; use 'base', 'first' or one of the models")
        template = self.chat_template
        if template is not None and template != "auto" and template not in CHAT_TEMPLATES and (
                len(template) < 20 or "{" not in template):
            raise ValueError(f"chat_template {template!r} is neither 'auto', a known name "
                             f"({', '.join(CHAT_TEMPLATES)}) nor a Jinja template; give the template's text")
        return self

    def merged_entries(self) -> list[ModelEntry]:
        """The models that are merged: all of ``models`` (or the slices' sources, or the modules')
        but the base of a task-vector method."""
        if self.models:
            models = self.models
        else:
            listed = [m.model for _, entries, slices, _ in self.parts()
                      for m in [*entries, *(src for s in slices or [] for src in s.sources)]]
            models = [ModelEntry(model=ref) for ref in dict.fromkeys(listed)]
        if get_method(self.merge.method).base == "none":
            return list(models)
        return [m for m in models if m.model != self.base_model]

    def with_default_weight(self, parameters: Mapping[str, Any], *levels: Mapping[str, Any]) -> dict[str, Any]:
        """A model's parameters, with ``weight`` 1.0 unless set for the model, in one of ``levels``
        (its slice's and its module's parameters) or globally; as in mergekit, a weight set above
        the model applies to it."""
        wants_weight = "weight" in get_method(self.merge.method).model_parameters
        if not wants_weight or any("weight" in level for level in (*levels, self.merge.parameters)):
            return dict(parameters)
        return {"weight": 1.0, **parameters}

    def model_parameters(self) -> list[dict[str, Any]]:
        """Per merged model: its parameters (:meth:`with_default_weight`)."""
        return [self.with_default_weight(m.merge_parameters()) for m in self.merged_entries()]

    @property
    def first_model(self) -> str:
        """The first model the recipe lists (in its first slice, with slices; in its first module, with modules)."""
        _, models, slices, _ = self.parts()[0]
        return models[0].model if models else slices[0].sources[0].model

    def refs(self) -> list[str]:
        """Every model reference, base first, without repeats."""
        out = [self.base_model] if self.base_model else []
        listed = []
        for _, models, slices, _ in self.parts():
            listed += [m.model for m in models]
            for s in slices or []:
                listed += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        return out + list(dict.fromkeys(m for m in listed if m not in out))

    def to_yaml(self) -> str:
        hidden = {"source_format"} | ({"tokenizer_source"} if self.tokenizer is not None else set())
        data = self.model_dump(mode="json", exclude_defaults=True, exclude=hidden)
        return yaml.safe_dump(data, sort_keys=False)


def load_recipe(source: str | os.PathLike | Mapping[str, Any] | Recipe) -> Recipe:
    """Read and validate a recipe from a YAML file, a YAML string, or a dict.

    Relative model folders in a recipe file are resolved against the file's folder.

    Raises:
        RecipeError: the message names the field, the bad value and the fix.

    Example:
        >>> r = load_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
        ...                                                        {"model": "b", "parameters": {"weight": 1}}]})
        >>> r.align.method, r.merge.method, r.source_format
        ('none', 'linear', 'mergekit')
    """
    if isinstance(source, Recipe):
        return source
    base_dir = None
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        text = str(source)
        path = Path(text)
        if "\n" not in text and path.suffix.lower() in (".yaml", ".yml", ".json"):
            if not path.is_file():
                raise RecipeError(f"recipe file {text!r} not found; check the path")
            text, base_dir = path.read_text(), path.resolve().parent
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"the recipe is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise RecipeError("a recipe is a YAML mapping with at least a 'models' list")
    if "merge_method" in data:
        data = _from_mergekit(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_describe(e)) from None
    return _resolve_paths(recipe, base_dir) if base_dir else recipe


def _from_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    if "align" not in data:
        logger.warning("mergekit recipe: merging without alignment, as mergekit does "
                       "(add align: {method: weight} to align units first)")
    method = data["merge_method"]
    known = METHODS.get(method)
    ignored = [k for k in data if k not in MERGEKIT_KEYS]

    def parameters(where: str, value: Any) -> dict[str, Any]:
        value = dict(value or {})
        if known is None:
            return value
        allowed = {*known.global_parameters, *known.model_parameters}
        ignored.extend(f"{where}.{k}" for k in value if k not in allowed)
        return {k: v for k, v in value.items() if k in allowed}

    def entry(where: str, m: Any, keys: tuple[str, ...]) -> dict[str, Any]:
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise RecipeError(f"{where}: each entry needs 'model: <id or folder>'")
        ignored.extend(f"{where}.{k}" for k in m if k not in (*keys, "parameters"))
        return {**{k: m[k] for k in keys if k in m}, "parameters": parameters(f"{where}.parameters", m.get("parameters"))}

    base = data.get("base_model")

    def models_of(where: str, listed: Any) -> list[dict[str, Any]]:
        models = [entry(f"{where}models[{i}]", m, ("model",)) for i, m in enumerate(listed or [])]
        if base and known is not None:
            if known.base != "none":
                models = [m for m in models if m["model"] != base]
            elif models and base not in [m["model"] for m in models]:
                models.append({"model": base, "parameters": {}})  # mergekit merges an unlisted base like the rest
        return models

    def slices_of(where: str, listed: Any) -> list[dict[str, Any]] | None:
        if listed is None:
            return None
        slices = []
        for i, sl in enumerate(listed):
            if not isinstance(sl, dict):
                raise RecipeError(f"{where}slices[{i}]: a slice is a mapping with 'sources: [{{model, layer_range}}, ...]'")
            ignored.extend(f"{where}slices[{i}].{k}" for k in sl if k not in ("sources", "base_model", "parameters"))
            slices.append({
                "sources": [entry(f"{where}slices[{i}].sources[{j}]", src, ("model", "layer_range"))
                            for j, src in enumerate(sl.get("sources") or [])],
                **({"base_model": sl["base_model"]} if sl.get("base_model") else {}),
                "parameters": parameters(f"{where}slices[{i}].parameters", sl.get("parameters")),
            })
        return slices

    models = models_of("", data.get("models"))
    slices = slices_of("", data.get("slices"))
    modules = None
    if data.get("modules") is not None:
        if not isinstance(data["modules"], dict):
            raise RecipeError("modules: a mapping from each part's name to its models or slices, e.g. "
                              "modules: {text_decoder: {models: [...]}, vision_tower: {models: [...]}}")
        modules = {}
        for name, module in data["modules"].items():
            where = f"modules.{name}."
            if not isinstance(module, dict):
                raise RecipeError(f"modules.{name}: a module is a mapping with 'models' or 'slices'")
            ignored.extend(f"{where}{k}" for k in module if k not in ("models", "slices", "parameters"))
            module_slices = slices_of(where, module.get("slices"))
            modules[name] = {"models": models_of(where, module.get("models")),
                             **({"slices": module_slices} if module_slices is not None else {}),
                             "parameters": parameters(f"{where}parameters", module.get("parameters"))}
    top = parameters("parameters", data.get("parameters"))
    if data.get("tokenizer") is not None and data.get("tokenizer_source") is not None:
        raise RecipeError("give tokenizer_source or a tokenizer section, not both (mergekit refuses both too)")
    if ignored:
        logger.warning("mergekit recipe: ignoring %s, which mergekit 0.1.5 ignores too (unknown keys, or parameters "
                       "that %s does not take)", ", ".join(ignored), method)
    out = {
        "models": models,
        **({"slices": slices} if slices is not None else {}),
        **({"modules": modules} if modules is not None else {}),
        "align": data.get("align") or {"method": "none"},
        "merge": {"method": method, "parameters": top},
        "source_format": "mergekit",
    }
    for key in ("base_model", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
        if data.get(key) is not None:
            out[key] = data[key]
    return out


def _describe(error: ValidationError) -> str:
    fixes = {
        "extra_forbidden": "unknown field; check the spelling against the README's recipe reference",
        "missing": "required field is missing; add it",
        "too_short": "list at least one model, e.g. models: [{model: org/name}]",
    }
    lines = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = fixes.get(e["type"], e["msg"].removeprefix("Value error, "))
        got = e.get("input")
        custom = e["type"] == "value_error"
        shown = "" if custom or e["type"] in fixes or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"recipe field '{field}': {msg}{shown}" if field else f"recipe: {msg}")
    return "\n".join(lines)


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    def fix(ref: str | None) -> str | None:
        if ref is None or Path(ref).is_absolute():
            return ref
        candidate = base_dir / ref
        return str(candidate) if candidate.exists() else ref

    update: dict[str, Any] = {
        "models": [m.model_copy(update={"model": fix(m.model)}) for m in recipe.models],
        "base_model": fix(recipe.base_model),
    }
    if recipe.slices is not None:
        update["slices"] = [sl.model_copy(update={
            "base_model": fix(sl.base_model),
            "sources": [src.model_copy(update={"model": fix(src.model)}) for src in sl.sources]}) for sl in recipe.slices]
    if recipe.tokenizer_source not in (None, "base", "first", "union"):
        update["tokenizer_source"] = fix(recipe.tokenizer_source)
    if recipe.tokenizer is not None:
        tokens = {}
        for token, entry in recipe.tokenizer.tokens.items():
            source = entry.source
            if isinstance(source, ModelToken):
                source = source.model_copy(update={"model": fix(source.model)})
            elif isinstance(source, str):
                source = fix(source)
            tokens[token] = entry.model_copy(update={"source": source})
        update["tokenizer"] = recipe.tokenizer.model_copy(update={
            "source": update.get("tokenizer_source", recipe.tokenizer_source), "tokens": tokens})
    if recipe.evaluate:
        update["evaluate"] = recipe.evaluate.model_copy(update={"data": fix(recipe.evaluate.data)})
    cal = recipe.align.calibration
    if cal and cal.file:
        update["align"] = recipe.align.model_copy(update={"calibration": cal.model_copy(update={"file": fix(cal.file)})})
    return recipe.model_copy(update=update)
