"""mergekit 0.1.5 on models with different vocabularies, stored for offline comparison.

    python -m merge_graphs.lab.bench.mergekit_vocabulary [--out tests/fixtures/mergekit/vocabulary] [--venv DIR]

Three tiny Llamas whose tokenizers differ (:data:`VOCABULARIES`: tokens in another order, tokens
only one model has, an added special token, embeddings with unused padding rows) are merged by
mergekit with each recipe of :data:`RECIPES` (``tokenizer_source: union`` / ``base`` / a model,
the ``tokenizer`` section's ``tokens`` and ``pad_to_multiple_of``). ``OUT/NAME.safetensors``
holds mergekit's tensors and ``OUT/manifest.json`` its output vocabulary per recipe. The models
are rebuilt bit for bit at test time (:func:`build_models`); ``tests/test_vocabulary.py`` needs
neither network nor mergekit. Rerun this script when a recipe changes, and commit what it writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from merge_graphs.lab.bench.mergekit_corpus import TINY, mergekit_exe, run_mergekit, tiny_config
from merge_graphs.lab.bench.mergekit_fixtures import seeded_states

DEFAULT_OUT = Path("tests") / "fixtures" / "mergekit" / "vocabulary"
WORDS = [f"w{i}" for i in range(9)]
#: model -> (its tokens in id order, its embeddings' rows, its added special tokens)
VOCABULARIES: dict[str, tuple[list[str], int, list[str]]] = {
    "root": (["<unk>", "<s>", "</s>", *WORDS], 12, []),
    "a": (["<unk>", "<s>", "</s>", "w3", "w0", "w1", "w2", "w4", "w5", "x0", "x1"], 13, []),
    "b": (["<unk>", "<s>", "</s>", *WORDS, "y0", "x0", "y1"], 16, ["<|im_start|>"]),
}
RECIPES: dict[str, dict[str, Any]] = {
    "union-linear": {"merge_method": "linear", "base_model": "root", "dtype": "float32",
                     "models": [{"model": m, "parameters": {"weight": w}} for m, w in
                                (("root", 0.2), ("a", 0.3), ("b", 0.5))],
                     "tokenizer_source": "union"},
    # a union numbers its added tokens in mergekit's hash order, and TIES's top-k breaks ties by
    # position: a model's tokenizer keeps the comparison exact
    "model-ties-bf16": {"merge_method": "ties", "base_model": "root", "dtype": "bfloat16",
                        "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.6}} for m in ("a", "b")],
                        "tokenizer_source": "b"},
    "model-tokens-padded": {
        "merge_method": "task_arithmetic", "base_model": "root", "dtype": "float32",
        "models": [{"model": m, "parameters": {"weight": 0.7}} for m in ("a", "b")],
        "tokenizer": {"source": "b", "pad_to_multiple_of": 8, "tokens": {
            "<|im_start|>": {"source": {"kind": "model_token", "model": "root", "token": "</s>"}},
            "w1": {"source": "a", "force": True},
            "zz": {"source": {"kind": "zero"}},
        }}},
    "base-linear": {"merge_method": "linear", "base_model": "a", "dtype": "float32",
                    "models": [{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}],
                    "tokenizer_source": "base"},
}


def write_tokenizer(folder: Path, tokens: Sequence[str], special: Sequence[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    fast.save_pretrained(str(folder))


def build_models(folder: str | Path) -> dict[str, Path]:
    """Write the three models (config, weights, tokenizer) under ``folder``: name -> folder."""
    import transformers
    from safetensors.torch import save_file

    paths = {}
    for name, (tokens, rows, special) in VOCABULARIES.items():
        config = tiny_config("llama", 2)
        config.vocab_size = rows
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
        state = seeded_states(shapes, ("vocabulary", name), {name: None})[name]
        path = Path(folder) / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(config.to_json_string(use_diff=True), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        write_tokenizer(path, tokens, special)
        paths[name] = path
    return paths


def rewrite(recipe: Mapping[str, Any], paths: Mapping[str, Path]) -> dict[str, Any]:
    """``recipe`` with every model name replaced by its folder."""
    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        # "base" and "union" are keywords of tokenizer_source, never model names here
        if key in ("model", "base_model", "tokenizer_source", "source") and isinstance(value, str) and value in paths:
            return str(paths[value])
        return value
    return walk(dict(recipe))


def make_outputs(out: str | Path = DEFAULT_OUT, venv: str | Path | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exe = mergekit_exe(venv)
    manifest: dict[str, Any] = {"tiny": TINY, "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp) / "models")
        for name, recipe in RECIPES.items():
            file = Path(tmp) / f"{name}.yaml"
            file.write_text(yaml.safe_dump(rewrite(recipe, paths)), encoding="utf-8")
            merged = Path(tmp) / name
            ok, error = run_mergekit(exe, file, merged)
            if not ok:
                raise RuntimeError(f"mergekit failed on {name}: {error}")
            (out / f"{name}.safetensors").write_bytes((merged / "model.safetensors").read_bytes())
            vocab = AutoTokenizer.from_pretrained(merged).get_vocab()
            config = json.loads((merged / "config.json").read_text())
            manifest["recipes"][name] = {"vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                                         "vocab_size": config["vocab_size"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--venv", default=None, help="a virtual environment with mergekit 0.1.5")
    args = parser.parse_args(argv)
    manifest = make_outputs(args.out, args.venv)
    for name, facts in manifest["recipes"].items():
        print(f"{name}: {len(facts['vocab'])} tokens, vocab_size {facts['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
