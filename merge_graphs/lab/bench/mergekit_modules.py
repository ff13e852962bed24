"""Stored outputs of real mergekit 0.1.5 merges of ``modules:`` recipes, for offline comparison.

    python -m merge_graphs.lab.bench.mergekit_modules [--out tests/fixtures/mergekit/modules] [--venv DIR]

A vision-language model has parts (mergekit's modules: ``text_decoder``, ``vision_tower``,
``multi_modal_projector``), and a recipe's ``modules:`` section gives each its own ``models:`` or
``slices:`` and ``parameters:`` (:mod:`merge_graphs.modules`). This script builds three tiny
``Mistral3ForConditionalGeneration`` checkpoints (:data:`CONFIG`: a Mistral text decoder of 3
layers, a Pixtral vision tower of 2 layers, the projector; 9,808 parameters, tied embeddings),
``base`` and two "fine-tunes" of it (``a``, ``b``: the base plus small noise), deterministically
(:func:`~merge_graphs.lab.bench.mergekit_fixtures.seeded_states`, seeded by the tensors'
checkpoint names, stored in float16 to keep the fixtures small), runs mergekit on each recipe of
:data:`RECIPES` and stores, under ``OUT``:

* ``models/{base,a,b}/``: the inputs (``config.json``, ``model.safetensors``), under the
  checkpoint names transformers 5 writes (``language_model.model.layers.0...``,
  ``vision_tower.transformer.layers.0...``, ``multi_modal_projector...``; checked against
  ``save_pretrained`` when the script runs);
* ``outputs/NAME.safetensors``: mergekit's merged tensors for recipe ``NAME``, and
  ``outputs/NAME.config.json``: the config mergekit wrote (its layer counts);
* ``manifest.json``: the recipes (model names relative to ``models/``), the versions used and the
  SHA-256 of every stored file.

mergekit 0.1.5 runs Mistral3 checkpoints with transformers 5 (Qwen2-VL and Gemma3 fail inside
mergekit itself), so Mistral3 is the family compared. The recipes compute in float32; all but the
slerp one write float16 (``out_dtype``), the same rounding of the same float32 result in both
tools, which keeps the fixtures under 300 KB. ``tests/test_mergekit_modules.py`` needs neither
network nor mergekit. Rerun this script only to add a recipe or move to another mergekit version,
and commit what it writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge_graphs.lab.bench.mergekit_fixtures import seeded_states, store_mergekit_outputs, write_manifest

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("tests") / "fixtures" / "mergekit" / "modules"
#: Mistral3Config fields of the tiny models (transformers' default: embeddings tied to the head).
CONFIG: dict[str, Any] = {
    "text_config": {"model_type": "mistral", "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 3,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 64,
                    "max_position_embeddings": 32},
    "vision_config": {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 16, "patch_size": 4, "head_dim": 8},
    "spatial_merge_size": 2,
}
#: The models: name -> key of its noise (None for the base).
MODELS: dict[str, str | None] = {"base": None, "a": "mistral3-a", "b": "mistral3-b"}
BASE_KEY = ("mistral3-base",)
#: The inputs' stored dtype.
DTYPE = torch.float16
#: transformers 5's checkpoint names of a Mistral3 model's state-dict names (the reverse of its
#: "llava" loading conversion): prefix in the module -> prefix in the checkpoint.
CHECKPOINT_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                       ("model.vision_tower.", "vision_tower."),
                       ("model.multi_modal_projector.", "multi_modal_projector."))

#: name -> a mergekit recipe over the models of :data:`MODELS` (by name), each exercising ``modules:``
#: (and one plain ``models:`` recipe, which mergekit expands to every module).
RECIPES: dict[str, dict[str, Any]] = {
    # gradients: the text decoder's own t runs 0 -> 1 inside each of its two slices (one layer: t = 1),
    # the projector's t is its own, the vision tower takes the recipe's gradient over its layers
    "slerp-gradients": {
        "merge_method": "slerp", "base_model": "a", "dtype": "float32", "parameters": {"t": [0.1, 0.9]},
        "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": "a", "layer_range": [0, 1]},
                                                     {"model": "b", "layer_range": [0, 1]}]},
                                        {"sources": [{"model": "a", "layer_range": [1, 3]},
                                                     {"model": "b", "layer_range": [1, 3]}]}],
                             "parameters": {"t": [0, 1]}},
            "vision_tower": {"models": [{"model": "a"}, {"model": "b"}]},
            "multi_modal_projector": {"models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 0.2}},
        }},
    # a frankenmerge: 4 text layers (a's 0-1, then b's 1-2), b's vision tower, a's projector
    "passthrough-frankenmerge": {
        "merge_method": "passthrough", "dtype": "float16",
        "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                                        {"sources": [{"model": "b", "layer_range": [1, 3]}]}]},
            "vision_tower": {"models": [{"model": "b"}]},
            "multi_modal_projector": {"models": [{"model": "a"}]},
        }},
    # per-module density (a filter on the text decoder's MLPs), per-model weights, base added by mergekit
    "ties-per-module": {
        "merge_method": "ties", "base_model": "base", "dtype": "float32", "out_dtype": "float16",
        "parameters": {"density": 0.9},
        "modules": {
            "text_decoder": {"models": [{"model": "a", "parameters": {"weight": 0.7}},
                                        {"model": "b", "parameters": {"weight": 0.5}}],
                             "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}},
            "vision_tower": {"models": [{"model": "a", "parameters": {"weight": 0.4, "density": 0.8}},
                                        {"model": "b", "parameters": {"weight": 0.6}}],
                             "parameters": {"density": 0.5}},
            "multi_modal_projector": {"models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 1.0}},
                                                 {"model": "b", "parameters": {"weight": 0.3}}]},
        }},
    # a vision tower cut to its second layer (vision_config.num_hidden_layers 1), the base among
    # the slice's sources, the weight set for the slice; the projector's weight and lambda set for
    # the module; no weight in the recipe's parameters (a weight above the model applies to it)
    "task_arithmetic-subrange": {
        "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32", "out_dtype": "float16",
        "parameters": {"lambda": 0.9},
        "modules": {
            "text_decoder": {"models": [{"model": "a", "parameters": {"weight": 0.6}},
                                        {"model": "b", "parameters": {"weight": [0.2, 1.0]}}]},
            "vision_tower": {"slices": [{"sources": [{"model": "base", "layer_range": [1, 2]},
                                                     {"model": "a", "layer_range": [1, 2]},
                                                     {"model": "b", "layer_range": [1, 2]}],
                                         "parameters": {"weight": 0.5}}]},
            "multi_modal_projector": {"models": [{"model": "b"}], "parameters": {"lambda": 1.2, "weight": 0.8}},
        }},
    # weights from the model, else its slice or module, else the recipe; the text decoder's first two
    # output layers from a's 0-1 and b's 1-2, b's weight filtered by b's own layer name (mergekit
    # matches a filter against each input's tensor name, so b's layer 1 gets 3 in output layer 0)
    "linear-precedence": {
        "merge_method": "linear", "dtype": "float32", "out_dtype": "float16", "parameters": {"weight": 0.25},
        "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": "a", "layer_range": [0, 2],
                                                      "parameters": {"weight": 0.3}},
                                                     {"model": "b", "layer_range": [1, 3]}],
                                         "parameters": {"weight": [{"filter": "layers.1.", "value": 3.0},
                                                                   {"value": [1.0, 2.0]}]}}]},
            "vision_tower": {"models": [{"model": "a", "parameters": {"weight": 2.0}}, {"model": "b"},
                                        {"model": "base"}],
                             "parameters": {"weight": 1.0}},
            "multi_modal_projector": {"models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.75}}]},
        }},
    # plain models: at the top of a VLM recipe: mergekit merges every module with them
    "ties-toplevel": {
        "merge_method": "ties", "base_model": "base", "dtype": "float32", "out_dtype": "float16",
        "parameters": {"normalize": True},
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "b", "parameters": {"weight": [0.2, 1.0], "density": 0.7}}]},
}
#: Recipes whose arithmetic rounds differently from mergekit's (slerp's trigonometry): compared
#: within this absolute tolerance; every other recipe bit for bit.
TOLERANCE = {"slerp-gradients": 1e-6}


def mistral3_config(**extra: Any):
    """The tiny models' ``Mistral3Config`` (:data:`CONFIG`), with ``extra`` fields."""
    from transformers import Mistral3Config

    return Mistral3Config(**json.loads(json.dumps(CONFIG)), **extra)


def checkpoint_name(name: str) -> str:
    """The name transformers 5 writes for a Mistral3 state-dict name (:data:`CHECKPOINT_PREFIXES`).

    Example:
        >>> checkpoint_name("model.language_model.layers.0.mlp.up_proj.weight")
        'language_model.model.layers.0.mlp.up_proj.weight'
    """
    for prefix, stored in CHECKPOINT_PREFIXES:
        if name.startswith(prefix):
            return stored + name[len(prefix):]
    raise ValueError(f"no checkpoint name known for {name!r}")


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor the tiny model stores (a tied head is not stored)."""
    from transformers import Mistral3ForConditionalGeneration

    config = mistral3_config()
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    return {checkpoint_name(k): tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def model_states() -> dict[str, dict[str, torch.Tensor]]:
    """The inputs: model name -> checkpoint name -> tensor (:data:`DTYPE`), deterministic.

    Example:
        >>> states = model_states()
        >>> sum(v.numel() for v in states["base"].values())
        9808
        >>> torch.equal(states["a"]["vision_tower.ln_pre.weight"], model_states()["a"]["vision_tower.ln_pre.weight"])
        True
    """
    states = seeded_states(checkpoint_shapes(), BASE_KEY, MODELS)
    return {model: {k: v.to(DTYPE) for k, v in state.items()} for model, state in states.items()}


def write_models(folder: str | Path) -> dict[str, Path]:
    """Save the models of :func:`model_states` as Hugging Face folders under ``folder``: name -> path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    paths = {}
    for name, state in model_states().items():
        path = folder / name
        path.mkdir(parents=True, exist_ok=True)
        config = mistral3_config(architectures=["Mistral3ForConditionalGeneration"], dtype=str(DTYPE).split(".")[-1])
        (path / "config.json").write_text(config.to_json_string(use_diff=True), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        paths[name] = path
    return paths


def saved_names() -> set[str]:
    """The names ``save_pretrained`` writes for the tiny model (to check :func:`checkpoint_name` against)."""
    from safetensors import safe_open
    from transformers import Mistral3ForConditionalGeneration

    with tempfile.TemporaryDirectory() as scratch:
        Mistral3ForConditionalGeneration(mistral3_config()).save_pretrained(scratch)
        with safe_open(str(Path(scratch) / "model.safetensors"), "pt") as f:
            return set(f.keys())


def recipe(name: str, models: Mapping[str, str | Path]) -> dict[str, Any]:
    """Recipe ``name`` of :data:`RECIPES` with every model name (``model``, ``base_model``, at any
    depth) replaced by its folder in ``models``.

    Example:
        >>> r = recipe("passthrough-frankenmerge", {"a": "/m/a", "b": "/m/b", "base": "/m/base"})
        >>> r["modules"]["vision_tower"]["models"][0]["model"]
        '/m/b'
    """
    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if key in ("model", "base_model"):
            return str(models[value])
        return value

    return walk(RECIPES[name])


def make_fixtures(out: str | Path = DEFAULT_OUT, venv: str | Path | None = None,
                  names: Sequence[str] = tuple(RECIPES)) -> dict:
    """Run mergekit on every recipe and store inputs, outputs, configs and the manifest under ``out``."""
    from merge_graphs.lab.bench import mergekit as mk

    saved, ours = saved_names(), set(checkpoint_shapes())
    if saved != ours:
        raise RuntimeError(f"save_pretrained writes other names than checkpoint_name: only saved "
                           f"{sorted(saved - ours)[:5]}, only ours {sorted(ours - saved)[:5]}")
    out = Path(out)
    venv = Path(venv) if venv is not None else mk.DEFAULT_VENV
    mk.mergekit_env(venv)  # made now, so that a failure says why before anything is written
    shutil.rmtree(out / "models", ignore_errors=True)
    shutil.rmtree(out / "outputs", ignore_errors=True)
    paths = write_models(out / "models")
    store_mergekit_outputs({name: recipe(name, paths) for name in names}, out, venv, configs=True)
    return write_manifest(out, "python -m merge_graphs.lab.bench.mergekit_modules", venv, config=CONFIG,
                          dtype=str(DTYPE).split(".")[-1], recipes={n: RECIPES[n] for n in names})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge_graphs.lab.bench.mergekit_modules",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--venv", default=None, help="mergekit's virtual environment (made if missing)")
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="only these (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = make_fixtures(args.out, args.venv, args.recipe or tuple(RECIPES))
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    print(f"wrote {len(manifest['sha256'])} files ({size / 1e3:.0f} KB) under {args.out} with mergekit "
          f"{manifest['versions']['mergekit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
