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

A mergekit recipe (``merge_method``, ``models``, ``parameters``, ``base_model``, ``dtype``,
``tokenizer_source``) is accepted as it is and runs without alignment, as mergekit would.
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
from merge_graphs.errors import RecipeError
from merge_graphs.methods import METHODS, get_method

logger = logging.getLogger(__name__)

MERGEKIT_KEYS = {"merge_method", "models", "parameters", "base_model", "dtype", "tokenizer_source", "slices"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """One model to merge and its per-model merge parameters (mergekit's ``weight``, ``density`` ...)."""

    model: str
    weight: float | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    def merge_parameters(self) -> dict[str, Any]:
        return {**self.parameters, **({"weight": self.weight} if self.weight is not None else {})}


class Calibration(_Strict):
    """Inputs for activation matching and learned alignment: texts inline, or a text file.

    A file is read one sample a line (``split: lines``), or as one corpus cut into consecutive
    windows of ``max_length`` tokens (``split: windows``), of which ``max_samples`` are used.
    """

    texts: list[str] | None = None
    file: str | None = None
    split: Literal["lines", "windows"] = "lines"
    max_samples: int = Field(64, gt=0)
    max_length: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.texts is None) == (self.file is None):
            raise ValueError("give exactly one of 'texts' (a list of strings) or 'file' (a text file, one sample a line)")
        return self


class Learn(_Strict):
    """Settings of learned alignment; unset ones take the family's defaults.

    Pre-norm causal LMs (:func:`merge_graphs.learned.learned_alignment`: 300 steps, lr 2e-3, 16 samples
    a step, ``heads`` (default false): also learn within-head maps); post-LayerNorm encoders
    (:func:`merge_graphs.learned.learned_permutations`: the permutations by a straight-through
    estimator, 300 steps, lr 0.05, 32 samples a step, ``heads`` (default true): also the dims inside
    each head, ``tau``: the Sinkhorn temperature, 1). From a recipe an encoder learns on the masked-LM
    loss of the calibration texts (a ``...ForMaskedLM``); a classifier's task-head loss needs the
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
            raise ValueError(f"method {self.method!r} needs calibration data: add calibration: {{texts: [...]}} or "
                             "{file: path}, or use method 'weight' (data-free)")
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

    models: list[ModelEntry] = Field(min_length=1)
    base_model: str | None = None
    align: Align = Field(default_factory=Align)
    merge: Merge = Field(default_factory=Merge)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    tokenizer_source: str | None = None
    output: Output = Field(default_factory=Output)
    evaluate: Evaluate | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    source_format: Literal["merge-graphs", "mergekit"] = "merge-graphs"

    @model_validator(mode="after")
    def _consistent(self):
        method = get_method(self.merge.method)
        if method.needs_base and self.base_model is None:
            raise ValueError(f"merge method {self.merge.method!r} needs base_model: add base_model: <model>")
        if self.merge.method == "slerp":
            others = [m for m in self.models if m.model != self.base_model]
            if len(others) != 1:
                raise ValueError("slerp merges exactly two models: base_model and one entry of models")
        allowed = set(method.global_parameters) | set(method.model_parameters)
        for where, params in [("merge.parameters", self.merge.parameters)] + [
            (f"models[{i}].parameters", m.merge_parameters()) for i, m in enumerate(self.models)
        ]:
            unknown = set(params) - allowed
            if unknown:
                raise ValueError(f"{where}: {self.merge.method} has no parameter {sorted(unknown)}; "
                                 f"its parameters are {sorted(allowed)}")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source 'union' is not supported: aligned models must share one "
                             "vocabulary; use 'base', 'first' or one of the models")
        return self

    def merged_entries(self) -> list[ModelEntry]:
        """The models that are merged: all of ``models`` but the base of a task-vector method."""
        if not get_method(self.merge.method).needs_base:
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]

    def model_parameters(self) -> list[dict[str, Any]]:
        """Per merged model: its parameters, with ``weight`` 1.0 unless set per model or globally."""
        default = {} if "weight" in self.merge.parameters else {"weight": 1.0}
        wants_weight = "weight" in get_method(self.merge.method).model_parameters
        return [{**(default if wants_weight else {}), **m.merge_parameters()} for m in self.merged_entries()]

    def refs(self) -> list[str]:
        """Every model reference, base first, without repeats."""
        out = [self.base_model] if self.base_model else []
        return out + [m.model for m in self.models if m.model not in out]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True, exclude={"source_format"})
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
    unknown = set(data) - MERGEKIT_KEYS
    if unknown:
        raise RecipeError(f"mergekit recipe keys {sorted(unknown)} are not supported here; "
                          f"supported: {sorted(MERGEKIT_KEYS - {'slices'})}")
    if "slices" in data:
        raise RecipeError("mergekit 'slices' are not supported: list whole models under 'models'")
    logger.warning("mergekit recipe: merging without alignment, as mergekit does "
                   "(write align: {method: weight} in a merge-graphs recipe to align units)")
    models = []
    for i, m in enumerate(data.get("models") or []):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise RecipeError(f"models[{i}]: each entry needs 'model: <id or folder>'")
        models.append({"model": m["model"], "parameters": dict(m.get("parameters") or {})})
    method = data["merge_method"]
    if data.get("base_model") and method in METHODS and METHODS[method].needs_base:
        models = [m for m in models if m["model"] != data["base_model"]]
    out = {
        "models": models,
        "align": {"method": "none"},
        "merge": {"method": method, "parameters": dict(data.get("parameters") or {})},
        "source_format": "mergekit",
    }
    for key in ("base_model", "dtype", "tokenizer_source"):
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
    if recipe.tokenizer_source not in (None, "base", "first"):
        update["tokenizer_source"] = fix(recipe.tokenizer_source)
    if recipe.evaluate:
        update["evaluate"] = recipe.evaluate.model_copy(update={"data": fix(recipe.evaluate.data)})
    cal = recipe.align.calibration
    if cal and cal.file:
        update["align"] = recipe.align.model_copy(update={"calibration": cal.model_copy(update={"file": fix(cal.file)})})
    return recipe.model_copy(update=update)
