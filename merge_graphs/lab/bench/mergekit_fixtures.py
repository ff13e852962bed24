"""Stored outputs of real mergekit 0.1.5 merges, so that tests compare with mergekit offline.

    python -m merge_graphs.lab.bench.mergekit_fixtures [--out tests/fixtures/mergekit] [--venv DIR]

Builds three tiny Llama models (:data:`CONFIG`: vocab 32, hidden 16, 2 layers, 4 heads / 2 KV
heads, 4,944 parameters, 20 KB each) deterministically: a ``base`` and two "fine-tunes" of it
(``ft1``, ``ft2``: the base plus small noise), every tensor drawn from its own seeded
``torch.Generator`` (O(1) weights, norm gains around 1), so nothing depends on transformers' init.
Then it runs mergekit 0.1.5 (``mergekit-yaml``, in the virtual environment of
:mod:`merge_graphs.lab.bench.mergekit`, made on first use: this step needs the package index) on each
recipe of :data:`RECIPES` and stores, under ``OUT``:

* ``models/{base,ft1,ft2}/``: the inputs (``config.json``, ``model.safetensors``);
* ``outputs/NAME.safetensors``: mergekit's merged tensors for recipe ``NAME``;
* ``manifest.json``: the recipes (model names relative to ``models/``), the versions used
  (mergekit, its torch and transformers, ours), and the SHA-256 of every stored file.

The tests (``tests/test_mergekit_fixtures.py``) rebuild nothing from the network: they run our
tool on the stored recipes and inputs and compare with the stored outputs. Rerun this script only
to add a recipe or move to another mergekit version, and commit what it writes (about 500 KB).
The live comparison with mergekit at scale stays in ``merge-graphs bench scale``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: LlamaConfig fields of the tiny models (untied LM head).
CONFIG: dict[str, Any] = {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "intermediate_size": 24, "max_position_embeddings": 32,
                          "tie_word_embeddings": False}
#: The models: name -> seed of its noise (None for the base).
MODELS: dict[str, int | None] = {"base": None, "ft1": 1, "ft2": 2}
BASE_SEED = 0
#: How far a fine-tune lies from the base (noise std, relative to the base's O(1) entries).
FINETUNE_NOISE = 0.05

#: name -> a mergekit recipe over the models of :data:`MODELS` (by name): one or more for each
#: deterministic method, one float16 recipe, and a random method (:data:`RANDOM`). Weights
#: deliberately do not sum to 1, so that normalisation matters.
RECIPES: dict[str, dict[str, Any]] = {
    "linear": {"merge_method": "linear", "dtype": "float32",
               "models": [{"model": "ft1", "parameters": {"weight": 0.7}},
                          {"model": "ft2", "parameters": {"weight": 0.5}}]},
    "linear-unnormalized": {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
                            "models": [{"model": "ft1", "parameters": {"weight": 0.7}},
                                       {"model": "ft2", "parameters": {"weight": 0.5}}]},
    "slerp": {"merge_method": "slerp", "dtype": "float32", "base_model": "ft1", "parameters": {"t": 0.3},
              "models": [{"model": "ft1"}, {"model": "ft2"}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": "base",
                        "parameters": {"lambda": 0.8},
                        "models": [{"model": "ft1", "parameters": {"weight": 0.6}},
                                   {"model": "ft2", "parameters": {"weight": 0.9}}]},
    "ties": {"merge_method": "ties", "dtype": "float32", "base_model": "base",
             "models": [{"model": "ft1", "parameters": {"density": 0.5, "weight": 0.7}},
                        {"model": "ft2", "parameters": {"density": 0.4, "weight": 0.5}}]},
    # mergekit computes in the recipe's dtype: float16 deltas, weights and sums, and the entries
    # tied at the pruning threshold (many in float16) chosen by its sort
    "ties-float16": {"merge_method": "ties", "dtype": "float16", "base_model": "base",
                     "models": [{"model": "ft1", "parameters": {"density": 0.3, "weight": 0.4}},
                                {"model": "ft2", "parameters": {"density": 0.6, "weight": 0.8}}]},
    "nuslerp": {"merge_method": "nuslerp", "dtype": "float32",
                "models": [{"model": "ft1", "parameters": {"weight": 0.7}},
                           {"model": "ft2", "parameters": {"weight": 0.5}}]},
    "nuslerp-base-rows": {"merge_method": "nuslerp", "dtype": "float32", "base_model": "base",
                          "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                          "models": [{"model": "ft1", "parameters": {"weight": 0.3}},
                                     {"model": "ft2", "parameters": {"weight": 0.5}}]},
    "multislerp": {"merge_method": "multislerp", "dtype": "float32",
                   "models": [{"model": "base", "parameters": {"weight": 0.3}},
                              {"model": "ft1", "parameters": {"weight": 0.7}},
                              {"model": "ft2", "parameters": {"weight": 0.5}}]},
    "karcher": {"merge_method": "karcher", "dtype": "float32",
                "models": [{"model": "base"}, {"model": "ft1"}, {"model": "ft2"}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "dtype": "float32", "base_model": "base",
                    "models": [{"model": "ft1", "parameters": {"density": 0.5, "gamma": 0.05, "weight": 0.7}},
                               {"model": "ft2", "parameters": {"density": 0.4, "weight": 0.5}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "dtype": "float32", "base_model": "base",
                         "parameters": {"lambda": 0.9, "gamma": 0.02},
                         "models": [{"model": "ft1", "parameters": {"density": 0.6, "weight": 0.7}},
                                    {"model": "ft2", "parameters": {"density": 0.5, "weight": 0.5}}]},
    "sce": {"merge_method": "sce", "dtype": "float32", "base_model": "base", "parameters": {"select_topk": 0.4},
            "models": [{"model": "ft1"}, {"model": "ft2"}]},
    "model_stock": {"merge_method": "model_stock", "dtype": "float32", "base_model": "base",
                    "models": [{"model": "ft1"}, {"model": "ft2"}]},
    "nearswap": {"merge_method": "nearswap", "dtype": "float32", "base_model": "base", "parameters": {"t": 0.03},
                 "models": [{"model": "ft1"}]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "dtype": "float32", "base_model": "base",
                     "models": [{"model": "ft1"}]},
    "ram": {"merge_method": "ram", "dtype": "float32", "base_model": "base", "parameters": {"epsilon": 0.03},
            "models": [{"model": "ft1"}, {"model": "ft2"}]},
    "ramplus_tl": {"merge_method": "ramplus_tl", "dtype": "float32", "base_model": "base",
                   "parameters": {"epsilon": 0.04, "r": 0.5, "alpha": 0.7},
                   "models": [{"model": "ft1"}, {"model": "ft2"}]},
    "passthrough": {"merge_method": "passthrough", "dtype": "float32",
                    "models": [{"model": "ft2", "parameters": {"scale": 0.5}}]},
    # random (mergekit draws from torch's unseeded global generator): compared by statistics
    "della_linear": {"merge_method": "della_linear", "dtype": "float32", "base_model": "base",
                     "models": [{"model": "ft1", "parameters": {"density": 0.5, "epsilon": 0.2, "weight": 1.0}}]},
}
#: Recipes of :data:`RECIPES` whose method draws random masks: their stored outputs are compared by
#: statistics (which entries change, how many), not entry by entry.
RANDOM = {"della_linear"}


def _seed(*parts: object) -> int:
    """A seed from names (stable across runs and machines, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:6], "little")


def model_states(config: Mapping[str, Any] = CONFIG) -> dict[str, dict[str, torch.Tensor]]:
    """The inputs: model name -> state dict (float32), deterministic.

    Shapes and names come from transformers' ``LlamaForCausalLM``; every value from a
    ``torch.Generator`` seeded by the tensor's name: matrices ``N(0, 1/fan_in)``, vectors (norm
    gains) ``1 + 0.3 N(0, 1)``; a fine-tune adds ``FINETUNE_NOISE * N(0, 1)`` to every entry.

    Example:
        >>> states = model_states()
        >>> sum(v.numel() for v in states["base"].values())
        4944
        >>> torch.equal(states["ft1"]["lm_head.weight"], model_states()["ft1"]["lm_head.weight"])
        True
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(LlamaConfig(**config)).state_dict().items()}
    return seeded_states(shapes, (BASE_SEED,), MODELS)


def seeded_states(shapes: Mapping[str, tuple[int, ...]], base_key: Sequence[object],
                  finetunes: Mapping[str, object | None]) -> dict[str, dict[str, torch.Tensor]]:
    """A seeded base and its "fine-tunes": name -> state dict (float32), deterministic.

    The base's tensors are drawn from generators seeded by ``base_key`` and the tensor's name
    (matrices ``N(0, 1/fan_in)``, vectors ``1 + 0.3 N(0, 1)``); each entry of ``finetunes`` is the
    base itself (``None``) or the base plus ``FINETUNE_NOISE * N(0, 1)`` seeded by its key and the
    tensor's name.
    """
    base = {}
    for name, shape in sorted(shapes.items()):
        g = torch.Generator().manual_seed(_seed(*base_key, name))
        value = torch.randn(shape, generator=g)
        base[name] = value * shape[-1] ** -0.5 if len(shape) > 1 else 1.0 + 0.3 * value
    return {model: base if key is None else
            {name: value + FINETUNE_NOISE * torch.randn(value.shape, generator=torch.Generator()
                                                        .manual_seed(_seed(key, name)))
             for name, value in base.items()}
            for model, key in finetunes.items()}


def write_models(folder: str | Path, config: Mapping[str, Any] = CONFIG) -> dict[str, Path]:
    """Save the models of :func:`model_states` as Hugging Face folders under ``folder``: name -> path."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = Path(folder)
    paths = {}
    for name, state in model_states(config).items():
        path = folder / name
        path.mkdir(parents=True, exist_ok=True)
        cfg = LlamaConfig(**config, architectures=["LlamaForCausalLM"], dtype="float32")
        (path / "config.json").write_text(cfg.to_json_string(use_diff=True), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        paths[name] = path
    return paths


def recipe(name: str, models: Mapping[str, str | Path]) -> dict[str, Any]:
    """Recipe ``name`` of :data:`RECIPES` with each model name replaced by its folder in ``models``.

    Example:
        >>> recipe("slerp", {"ft1": "/m/ft1", "ft2": "/m/ft2"})["base_model"]
        '/m/ft1'
    """
    out = json.loads(json.dumps(RECIPES[name]))
    if "base_model" in out:
        out["base_model"] = str(models[out["base_model"]])
    for entry in out["models"]:
        entry["model"] = str(models[entry["model"]])
    return out


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mergekit_versions(venv: Path) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'torch', 'transformers', 'safetensors')}))")
    import subprocess

    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def store_mergekit_outputs(recipes: Mapping[str, Mapping[str, Any]], out: Path, venv: Path, *,
                           configs: bool = False) -> None:
    """Run mergekit 0.1.5 on each recipe (its models already folders) and store under ``out/outputs``
    its merged tensors (``NAME.safetensors``) and, with ``configs``, the config it wrote
    (``NAME.config.json``). RuntimeError with mergekit's log when it fails on one."""
    from safetensors.torch import load_file, save_file

    from merge_graphs.lab.bench import mergekit as mk

    (out / "outputs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name, spec in recipes.items():
            run = mk.mergekit_merge(dict(spec), Path(scratch) / name, venv=venv)
            if run.skipped:
                raise RuntimeError(f"mergekit failed on recipe {name!r}: {run.skipped}\n{run.log_tail}")
            merged = {}
            for shard in sorted(run.output.glob("*.safetensors")):
                merged.update(load_file(shard))
            save_file(dict(sorted(merged.items())), str(out / "outputs" / f"{name}.safetensors"),
                      metadata={"format": "pt"})
            if configs:
                config = json.loads((run.output / "config.json").read_text(encoding="utf-8"))
                (out / "outputs" / f"{name}.config.json").write_text(
                    json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            logger.info("%s: %d tensors from mergekit", name, len(merged))


def write_manifest(out: Path, made_by: str, venv: Path, **fields: Any) -> dict:
    """``out/manifest.json``: who made it, the versions (mergekit's environment and ours), ``fields``,
    and the SHA-256 of every other file under ``out``."""
    import merge_graphs

    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {"made_by": made_by, "versions": {**_mergekit_versions(venv), "merge_graphs": merge_graphs.__version__},
                **fields, "sha256": {str(p.relative_to(out)): sha256(p) for p in files}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def make_fixtures(out: str | Path, venv: str | Path | None = None, names: Sequence[str] = tuple(RECIPES)) -> dict:
    """Run mergekit on every recipe and store inputs, outputs and the manifest under ``out``."""
    from merge_graphs.lab.bench import mergekit as mk

    out = Path(out)
    venv = Path(venv) if venv is not None else mk.DEFAULT_VENV
    mk.mergekit_env(venv)  # made now, so that a failure says why before anything is written
    shutil.rmtree(out / "models", ignore_errors=True)
    shutil.rmtree(out / "outputs", ignore_errors=True)
    paths = write_models(out / "models")
    store_mergekit_outputs({name: recipe(name, paths) for name in names}, out, venv)
    return write_manifest(out, "python -m merge_graphs.lab.bench.mergekit_fixtures", venv,
                          config=CONFIG, recipes={n: RECIPES[n] for n in names})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge_graphs.lab.bench.mergekit_fixtures",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path("tests") / "fixtures" / "mergekit"))
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
