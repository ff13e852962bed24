"""Real mergekit recipes run by mergekit 0.1.5 on tiny stand-in models, stored for offline comparison.

    python -m merge_graphs.lab.bench.mergekit_corpus [--corpus tests/fixtures/mergekit/corpus]
        [--out tests/fixtures/mergekit/corpus-outputs] [--venv DIR] [--recipe NAME ...]

The corpus (``tests/fixtures/mergekit/corpus/NAME.yaml``) holds recipes collected from mergekit's
own examples and from published model cards, each byte for byte as published; ``sources.json``
beside them says where each came from, which model family its models are, and what it exercises.
This script, for each recipe:

1. maps every model the recipe names (``models``, ``base_model``, ``slices[].sources``, a
   ``tokenizer_source`` / ``tokenizer.source`` that names a model) to a tiny local model of the
   recipe's family (:data:`FAMILIES`: a config of transformers' real config class for that
   family, :data:`TINY` widths, as many layers as the recipe's ``layer_range`` needs and at least
   :data:`MIN_LAYERS`). The recipe's ``base_model`` is a shared seeded base; every other model is
   that base plus small seeded noise (a "fine-tune"), so task-vector methods are meaningful. Every
   tensor comes from its own seeded ``torch.Generator`` (:func:`mergekit_fixtures.seeded_states`), so the
   models are rebuilt bit for bit at test time instead of being stored (:func:`build_models`);
2. rewrites only the model references of the recipe to those folders (:func:`rewrite`);
3. runs mergekit 0.1.5's ``mergekit-yaml`` on it (its own virtual environment, see
   :mod:`merge_graphs.lab.bench.mergekit`), and stores under ``OUT`` mergekit's merged tensors
   (``NAME.safetensors``), or, when mergekit itself refuses the recipe, its error message;
4. writes ``OUT/manifest.json``: versions, the tiny config, per recipe the family, layer count,
   model-name-to-folder map, a digest of every rebuilt input model's tensors (the test checks the
   rebuild against it), mergekit's outcome, the files it wrote and its tokenizer (vocabulary size,
   chat template), and the SHA-256 of every stored file and of every corpus recipe.

The stand-ins of one recipe share one tokenizer (:func:`_write_tokenizer`, the vocabulary of the
tiny embeddings), so ``tokenizer_source`` decides which files are copied, not the embeddings.

Tests (``tests/test_mergekit_corpus.py``) need neither network nor mergekit. Rerun this script
when a recipe is added to the corpus, and commit what it writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from merge_graphs.lab.bench.mergekit_fixtures import FINETUNE_NOISE, seeded_states, sha256

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = Path("tests") / "fixtures" / "mergekit" / "corpus"
DEFAULT_OUT = Path("tests") / "fixtures" / "mergekit" / "corpus-outputs"
#: Widths shared by every family (head_dim 4): small enough that 40 layers stay a few KB a model.
TINY: dict[str, Any] = {"vocab_size": 32, "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
                        "intermediate_size": 12, "max_position_embeddings": 32}
MIN_LAYERS = 8
#: family -> (transformers config class, model class, extra config fields).
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": False, "head_dim": 4}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 4}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1,
                                               "eos_token_id": 2}),
}
#: Model-name patterns -> family, first match wins; a recipe's ``family`` in sources.json overrides.
NAME_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"gemma-?2", "gemma2"), (r"gemma", "gemma"), (r"qwen-?3", "qwen3"), (r"qwen", "qwen2"),
    (r"phi-?3", "phi3"), (r"mistral|nemo|\bMN-|mixtral", "mistral"),
)
#: Values of ``tokenizer_source`` / ``tokenizer.source`` that are not model names.
TOKENIZER_KEYWORDS = {"base", "union", "first"}
BASE_SEED = "corpus-base"


@dataclass
class Plan:
    """How one recipe is run: its models and their tiny stand-ins."""

    name: str
    recipe: dict[str, Any]
    family: str
    num_layers: int
    #: model name as written in the recipe -> local folder name.
    folders: dict[str, str]
    base: str | None
    tokenizer: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def load_sources(corpus: str | Path = DEFAULT_CORPUS) -> dict[str, dict[str, Any]]:
    """``sources.json`` of the corpus: recipe name -> its source, family and features."""
    return json.loads((Path(corpus) / "sources.json").read_text(encoding="utf-8"))


def recipe_file(corpus: str | Path, name: str, sources: Mapping[str, Any] | None = None) -> Path:
    """The corpus file of entry ``name``: ``NAME.yaml``, or the file its ``recipe`` field names (an entry that
    runs a corpus recipe on other stand-in models, e.g. too few layers for its ``layer_range``)."""
    entry = (sources or {}).get(name) or {}
    return Path(corpus) / f"{entry.get('recipe', name)}.yaml"


def read_recipe(corpus: str | Path, name: str, sources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return yaml.safe_load(recipe_file(corpus, name, sources).read_text(encoding="utf-8"))


def _ref(value: Any) -> str | None:
    """The model name in a model reference (a string, or mergekit's ``{model: ...}`` form)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("model"), str):
        return value["model"]
    return None


def _tokenizer_refs(recipe: Mapping[str, Any]) -> Iterable[str]:
    source = recipe.get("tokenizer_source")
    if isinstance(source, str) and source not in TOKENIZER_KEYWORDS:
        yield source.removeprefix("model:")
    tokenizer = recipe.get("tokenizer")
    if isinstance(tokenizer, Mapping):
        source = tokenizer.get("source")
        if isinstance(source, str) and source not in TOKENIZER_KEYWORDS:
            yield source.removeprefix("model:")


def model_names(recipe: Mapping[str, Any]) -> list[str]:
    """Every model a recipe names, in order of first mention (base model first)."""
    names: list[str] = []

    def add(value: Any) -> None:
        ref = _ref(value)
        if ref is not None and ref not in names:
            names.append(ref)

    add(recipe.get("base_model"))
    for entry in recipe.get("models") or []:
        add(entry)
    for piece in recipe.get("slices") or []:
        for source in (piece or {}).get("sources") or []:
            add(source)
    for ref in _tokenizer_refs(recipe):
        add(ref)
    return names


def layers_needed(recipe: Mapping[str, Any]) -> int:
    """How many layers the tiny models need: the largest ``layer_range`` end, at least :data:`MIN_LAYERS`."""
    ends = [int(source["layer_range"][1]) for piece in recipe.get("slices") or []
            for source in (piece or {}).get("sources") or [] if isinstance(source, Mapping) and source.get("layer_range")]
    return max([MIN_LAYERS, *ends])


def family_of(names: Sequence[str], override: str | None = None) -> str:
    """The recipe's model family: ``override`` if given, else the first name pattern of :data:`NAME_FAMILIES`
    that matches, else llama.

    Example:
        >>> family_of(["Qwen/Qwen2.5-7B-Instruct"]), family_of(["org/some-llama"]), family_of(["x"], "gemma2")
        ('qwen2', 'llama', 'gemma2')
    """
    if override:
        if override not in FAMILIES:
            raise ValueError(f"unknown family {override!r}; known: {sorted(FAMILIES)}")
        return override
    for name in names:
        for pattern, family in NAME_FAMILIES:
            if re.search(pattern, name, flags=re.IGNORECASE):
                return family
    return "llama"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[-48:] or "model"


def plan(name: str, recipe: Mapping[str, Any], source: Mapping[str, Any] | None = None) -> Plan:
    """The tiny models a recipe needs: family, layer count, one folder per model name."""
    source = source or {}
    names = model_names(recipe)
    folders = {model: f"{i:02d}-{_slug(model)}" for i, model in enumerate(names)}
    base = recipe.get("base_model") if isinstance(recipe.get("base_model"), str) else None
    return Plan(name, dict(recipe), family_of(names, source.get("family")),
                int(source.get("num_layers") or layers_needed(recipe)), folders, base)


def tiny_config(family: str, num_layers: int):
    """A transformers config of ``family`` (its real config class) with :data:`TINY` widths."""
    import transformers

    config_class, model_class, extra = FAMILIES[family]
    return getattr(transformers, config_class)(**TINY, **extra, num_hidden_layers=num_layers,
                                               architectures=[model_class], dtype="float32")


def _shapes(family: str, num_layers: int) -> dict[str, tuple[int, ...]]:
    import transformers

    config = tiny_config(family, num_layers)
    with torch.device("meta"):
        model = getattr(transformers, FAMILIES[family][1])(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def model_states(p: Plan) -> dict[str, dict[str, torch.Tensor]]:
    """Folder name -> state dict (float32): the recipe's base model is the shared seeded base, every other
    model the base plus the fine-tune noise seeded by its name; deterministic."""
    return seeded_states(_shapes(p.family, p.num_layers), (BASE_SEED, p.family),
                         {folder: None if model == p.base else model for model, folder in p.folders.items()})


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))


def build_models(p: Plan, folder: str | Path) -> dict[str, Path]:
    """Write the plan's tiny models (config.json, model.safetensors, a tokenizer) under ``folder``:
    model name -> its folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = tiny_config(p.family, p.num_layers)
    paths = {}
    states = model_states(p)
    for model, name in p.folders.items():
        path = folder / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(config.to_json_string(use_diff=True), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in states[name].items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        if p.tokenizer:
            _write_tokenizer(path, TINY["vocab_size"])
        paths[model] = path
    return paths


def rewrite(recipe: Mapping[str, Any], paths: Mapping[str, str | Path]) -> dict[str, Any]:
    """The recipe with each model reference replaced by its local folder; nothing else changes.

    Example:
        >>> rewrite({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
        ...          "parameters": {"t": 0.5}}, {"a": "/m/a", "b": "/m/b"})["models"]
        [{'model': '/m/a'}, {'model': '/m/b'}]
    """
    out = json.loads(json.dumps(recipe))

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value in paths:
            return str(paths[value])
        if isinstance(value, dict) and isinstance(value.get("model"), str) and value["model"] in paths:
            return {**value, "model": str(paths[value["model"]])}
        return value

    if "base_model" in out:
        out["base_model"] = fix(out["base_model"])
    if isinstance(out.get("models"), list):
        out["models"] = [fix(m) for m in out["models"]]
    for piece in out.get("slices") or []:
        if isinstance(piece, dict) and isinstance(piece.get("sources"), list):
            piece["sources"] = [fix(s) for s in piece["sources"]]
    source = out.get("tokenizer_source")
    if isinstance(source, str):
        bare = source.removeprefix("model:")
        if bare in paths:
            out["tokenizer_source"] = source.replace(bare, str(paths[bare]))
    if isinstance(out.get("tokenizer"), dict) and isinstance(out["tokenizer"].get("source"), str):
        bare = out["tokenizer"]["source"].removeprefix("model:")
        if bare in paths:
            out["tokenizer"]["source"] = out["tokenizer"]["source"].replace(bare, str(paths[bare]))
    return out


def prepare(corpus: str | Path, name: str, folder: str | Path,
            sources: Mapping[str, Any] | None = None) -> tuple[Plan, Path]:
    """Build recipe ``name``'s tiny models under ``folder/models`` and write the rewritten recipe to
    ``folder/NAME.yaml``: the plan and that recipe file."""
    sources = sources if sources is not None else load_sources(corpus)
    p = plan(name, read_recipe(corpus, name, sources), sources.get(name))
    paths = build_models(p, Path(folder) / "models")
    rewritten = Path(folder) / f"{name}.yaml"
    rewritten.write_text(yaml.safe_dump(rewrite(p.recipe, paths), sort_keys=False), encoding="utf-8")
    return p, rewritten


def tokenizer_facts(folder: str | Path) -> dict[str, Any] | None:
    """What a merged folder's tokenizer is: its vocabulary size and chat template (None when it has none).

    Example:
        >>> tokenizer_facts(tempfile.mkdtemp()) is None
        True
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return None
    vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    return {"vocab_size": len(vocab), "chat_template": template}


def mergekit_exe(venv: str | Path | None) -> Path:
    """``mergekit-yaml`` of ``venv`` when it already has mergekit 0.1.5, else the one
    :func:`merge_graphs.lab.bench.mergekit.mergekit_env` makes."""
    from merge_graphs.lab.bench import mergekit as mk

    if venv is not None:
        exe = Path(venv) / "bin" / "mergekit-yaml"
        check = [str(Path(venv) / "bin" / "python"), "-c",
                 "import importlib.metadata as m; print(m.version('mergekit'))"]
        if exe.is_file() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == mk.MERGEKIT_VERSION:
            return exe
    return mk.mergekit_env(venv)


def _failure(log: str) -> str:
    """The line of mergekit's output that says why it stopped (its last error line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception)\b", line) and not line.startswith("File ")]
    return (errors or lines or ["(no output)"])[-1][:400]


def run_mergekit(exe: Path, recipe: Path, out: Path) -> tuple[bool, str]:
    """Run ``mergekit-yaml`` offline: (merged?, the error line when it did not)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(exe), str(recipe), str(out), "--copy-tokenizer"], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode == 0:
        return True, ""
    return False, _failure(done.stdout + "\n" + done.stderr)


def _versions(exe: Path) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'torch', 'transformers', 'safetensors')}))")
    done = subprocess.run([str(exe.parent / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def make_outputs(corpus: str | Path = DEFAULT_CORPUS, out: str | Path = DEFAULT_OUT,
                 venv: str | Path | None = None, names: Sequence[str] | None = None) -> dict:
    """Run mergekit on every corpus recipe (or ``names``), store its tensors and the manifest under ``out``."""
    from safetensors.torch import load_file, save_file

    import merge_graphs

    corpus, out = Path(corpus), Path(out)
    sources = load_sources(corpus)
    files = sorted(p.stem for p in corpus.glob("*.yaml"))
    recipes = sorted(sources)
    missing = set(files) ^ {recipe_file(corpus, n, sources).stem for n in recipes}
    if missing or not set(files) <= set(recipes):
        raise ValueError(f"corpus recipes and sources.json disagree on {sorted(missing or set(files) - set(recipes))}")
    exe = mergekit_exe(venv)
    out.mkdir(parents=True, exist_ok=True)
    manifest_file = out / "manifest.json"
    old = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
    entries = {k: v for k, v in old.get("recipes", {}).items() if k in recipes}
    for name in names or recipes:
        (out / f"{name}.safetensors").unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            p, rewritten = prepare(corpus, name, scratch, sources)
            states = model_states(p)
            merged, message = run_mergekit(exe, rewritten, Path(scratch) / "merged")
            message = message.replace(str(Path(scratch).resolve()), "<tmp>").replace(str(scratch), "<tmp>")
            entry = {"family": p.family, "num_layers": p.num_layers, "folders": p.folders, "base": p.base,
                     "inputs": {f: tensors_digest(s) for f, s in states.items()},
                     "mergekit": "merged" if merged else "refused"}
            if merged:
                tensors = {}
                for shard in sorted((Path(scratch) / "merged").glob("*.safetensors")):
                    tensors.update(load_file(shard))
                save_file(dict(sorted(tensors.items())), str(out / f"{name}.safetensors"), metadata={"format": "pt"})
                entry["files"] = sorted(str(f.relative_to(Path(scratch) / "merged"))
                                        for f in (Path(scratch) / "merged").rglob("*") if f.is_file())
                entry["tokenizer"] = tokenizer_facts(Path(scratch) / "merged")
                logger.info("%s: mergekit merged (%d tensors)", name, len(tensors))
            else:
                entry["message"] = message
                logger.info("%s: mergekit refused: %s", name, message)
            entries[name] = entry
    stored = sorted(p for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {"made_by": "python -m merge_graphs.lab.bench.mergekit_corpus",
                "versions": {**_versions(exe), "merge_graphs": merge_graphs.__version__},
                "tiny": TINY, "min_layers": MIN_LAYERS, "finetune_noise": FINETUNE_NOISE,
                "corpus_sha256": {n: sha256(corpus / f"{n}.yaml") for n in files},
                "recipes": dict(sorted(entries.items())),
                "sha256": {p.name: sha256(p) for p in stored}}
    manifest_file.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge_graphs.lab.bench.mergekit_corpus",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--venv", default=None, help="mergekit's virtual environment (made if missing)")
    parser.add_argument("--recipe", action="append", help="only these (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = make_outputs(args.corpus, args.out, args.venv, args.recipe)
    size = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file())
    merged = sum(e["mergekit"] == "merged" for e in manifest["recipes"].values())
    print(f"{len(manifest['recipes'])} recipes, {merged} merged by mergekit {manifest['versions']['mergekit']}; "
          f"{size / 1e3:.0f} KB under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
