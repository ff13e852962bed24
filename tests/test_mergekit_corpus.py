"""The acceptance test of "a drop-in for mergekit": every recipe of a corpus of real mergekit recipes
(``tests/fixtures/mergekit/corpus``: mergekit's own examples and recipes published on model cards, each
unmodified, with its source in ``sources.json``) is run by our CLI on tiny stand-in models and compared
with what mergekit 0.1.5 itself did with the same recipe and models (stored under
``tests/fixtures/mergekit/corpus-outputs`` by ``python -m merge_graphs.lab.bench.mergekit_corpus``).

* Deterministic methods must give mergekit's tensors exactly (same names, dtypes, values).
* Random methods (DARE, DELLA) must give the same tensor names, shapes and dtypes and the same
  statistics of what is kept (the fraction of entries that differ from the base model, and their
  mean size).
* A recipe mergekit itself refuses must be refused by us too, cleanly.
* A recipe that uses a feature we do not support yet must fail cleanly: exit code 1, an error that
  names the feature (:data:`NOT_YET`), nothing written. A traceback, a half-written folder or a
  silently different result fails the test. When a feature lands, its recipes move out of NOT_YET.
* :data:`CRASHES` and :data:`DIFFERS` are today's known bugs, expected to fail (strict xfail: the
  test says so when one is fixed).

No network and no mergekit at test time: the tiny models are rebuilt bit for bit from seeds
(checked against the digests in the manifest).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from merge_graphs.cli import main
from merge_graphs.lab.bench.mergekit_corpus import (
    TINY,
    load_sources,
    model_states,
    plan,
    prepare,
    read_recipe,
    recipe_file,
    tensors_digest,
    tokenizer_facts,
)
from merge_graphs.lab.bench.mergekit_fixtures import sha256

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit"
CORPUS = FIXTURES / "corpus"
OUTPUTS = FIXTURES / "corpus-outputs"
MANIFEST = json.loads((OUTPUTS / "manifest.json").read_text(encoding="utf-8"))
SOURCES = load_sources(CORPUS)
RECIPES = sorted(MANIFEST["recipes"])
#: Methods whose masks are random: compared by names, shapes, dtypes and kept statistics.
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
#: Stored outputs and manifest, in bytes, at most.
SIZE_BUDGET = 2_000_000

#: Recipes using a feature merge-graphs does not support yet -> a phrase its error must contain.
NOT_YET: dict[str, str] = {}
#: Recipes mergekit 0.1.5 itself refuses -> a phrase our (clean) error must contain.
INVALID: dict[str, str] = {
    "NeuralPipe-7B-slerp@16-layer-models": "layer_range [0, 32] of",
    "mergekit-orcamini-platy-44layer@24-layer-models": "is out of bounds",
}
#: Recipes on which merge-graphs crashes today (a traceback instead of a clean error) -> what happens.
CRASHES: dict[str, str] = {}
#: Recipes merge-graphs merges today but not as mergekit does -> what differs.
DIFFERS: dict[str, str] = {}


def _method(name):
    return read_recipe(CORPUS, name, SOURCES)["merge_method"]


def _params():
    for name in RECIPES:
        if name in CRASHES:
            yield pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"crash today: {CRASHES[name]}"))
        elif name in DIFFERS:
            yield pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"differs today: {DIFFERS[name]}"))
        else:
            yield name


def test_the_corpus_is_real_recipes_unmodified_with_their_sources():
    files = sorted(p.stem for p in CORPUS.glob("*.yaml"))
    assert len(files) >= 25
    assert sorted(SOURCES) == RECIPES and set(files) <= set(RECIPES)
    # byte for byte what the outputs were made from
    assert MANIFEST["corpus_sha256"] == {name: sha256(CORPUS / f"{name}.yaml") for name in files}
    for name in RECIPES:
        entry = SOURCES[name]
        assert entry["source"] and entry["features"] and entry["models"], name
        assert recipe_file(CORPUS, name, SOURCES).stem in files, name


def test_the_stored_outputs_are_what_the_manifest_says_and_small():
    assert MANIFEST["versions"]["mergekit"] == "0.1.5"
    assert MANIFEST["tiny"] == TINY
    stored = {p.name for p in OUTPUTS.iterdir() if p.is_file()} - {"manifest.json"}
    assert stored == set(MANIFEST["sha256"])
    for file, digest in MANIFEST["sha256"].items():
        assert sha256(OUTPUTS / file) == digest, file
    merged = {n for n, e in MANIFEST["recipes"].items() if e["mergekit"] == "merged"}
    assert stored == {f"{n}.safetensors" for n in merged}
    assert sum(p.stat().st_size for p in OUTPUTS.iterdir()) < SIZE_BUDGET


def test_the_tables_are_consistent_with_the_corpus():
    tables = [NOT_YET, INVALID, CRASHES, DIFFERS]
    for i, a in enumerate(tables):
        assert set(a) <= set(RECIPES)
        for b in tables[i + 1:]:
            assert not set(a) & set(b)
    refused = {n for n, e in MANIFEST["recipes"].items() if e["mergekit"] == "refused"}
    # a recipe mergekit refuses is one we must refuse, cleanly: listed with our error's phrase
    assert set(INVALID) <= refused <= set(INVALID) | set(NOT_YET) | set(CRASHES)


def test_the_tiny_models_are_rebuilt_bit_for_bit():
    for name in RECIPES:
        entry = MANIFEST["recipes"][name]
        p = plan(name, read_recipe(CORPUS, name, SOURCES), SOURCES[name])
        assert (p.family, p.num_layers, p.folders, p.base) == (entry["family"], entry["num_layers"],
                                                               entry["folders"], entry["base"]), name
        assert {f: tensors_digest(s) for f, s in model_states(p).items()} == entry["inputs"], name


def _tensors(folder):
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _assert_fails_cleanly(rc, err, phrase, tmp_path, name):
    assert rc == 1, f"exit code {rc}, expected 1; stderr: {err[-500:]}"
    assert "Traceback" not in err
    assert phrase.lower() in err.lower(), f"the error does not say {phrase!r}: {err[-500:]}"
    # nothing written: no output folder, no leftovers beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["models", f"{name}.yaml"])


def _kept(merged, base):
    """Entries of ``merged`` that differ from ``base``: their count, total count and mean |difference|."""
    kept, total, size = 0, 0, 0.0
    for key, value in merged.items():
        delta = value.float() - base[key].to(value.dtype).float()
        mask = delta != 0
        kept += int(mask.sum())
        total += delta.numel()
        size += float(delta.abs()[mask].sum())
    return kept / total, size / max(kept, 1)


def _assert_same_statistics(ours, theirs, base):
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    (our_fraction, our_size), (their_fraction, their_size) = _kept(ours, base), _kept(theirs, base)
    n = sum(v.numel() for v in theirs.values())
    slack = 0.02 + 4 * math.sqrt(their_fraction * (1 - their_fraction) / n)
    assert abs(our_fraction - their_fraction) <= slack, (our_fraction, their_fraction)
    assert abs(our_size - their_size) <= 0.1 * their_size, (our_size, their_size)


#: Methods whose trigonometry rounds differently from mergekit's (1e-6 in float32, see
#: test_mergekit_fixtures.py), which moves a half-precision result by at most one unit in the last place.
ROUNDS_DIFFERENTLY = {"slerp"}
#: Methods whose mergekit implementation returns float32 whatever the recipe's dtype, which mergekit
#: then writes as it is (no out_dtype casts it back): we write the recipe's dtype; the values must be
#: mergekit's rounded to it.
MERGEKIT_WRITES_FLOAT32 = {"arcee_fusion"}


def _assert_same_tensors(ours, theirs, method):
    assert sorted(ours) == sorted(theirs)
    for key, want in theirs.items():
        got = ours[key]
        if method in MERGEKIT_WRITES_FLOAT32 and want.dtype == torch.float32:
            want = want.to(got.dtype)
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        if torch.equal(got, want):
            continue
        diff = (got.float() - want.float()).abs()
        if method in ROUNDS_DIFFERENTLY and got.dtype != torch.float32:
            ulp = torch.finfo(got.dtype).eps * torch.maximum(got.float().abs(), want.float().abs())
            if bool((diff <= ulp).all()):
                continue
        raise AssertionError(f"{key}: differs from mergekit's by up to {float(diff.max()):.3g}")


def _assert_same_tokenizer(folder, theirs):
    """Our folder has a tokenizer when mergekit's has one, of the same vocabulary size and chat template."""
    if theirs is None:
        return
    ours = tokenizer_facts(folder)
    assert ours is not None, "mergekit wrote a tokenizer, we did not"
    assert ours["vocab_size"] == theirs["vocab_size"]
    if theirs["chat_template"] is not None:
        assert ours["chat_template"] is not None, "mergekit wrote a chat template, we did not"
        # the same conversation rendered by both templates (mergekit's named templates differ from ours
        # in whitespace that Jinja's trim_blocks drops)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]

        def render(template):
            return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)

        assert render(ours["chat_template"]) == render(theirs["chat_template"]), "the chat template differs from mergekit's"


@pytest.mark.parametrize("name", list(_params()))
def test_our_cli_on_a_real_recipe_does_what_mergekit_does(tmp_path, name, capsys):
    p, recipe_file = prepare(CORPUS, name, tmp_path, SOURCES)
    capsys.readouterr()
    rc = main([str(recipe_file), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    entry = MANIFEST["recipes"][name]
    if name in INVALID:
        return _assert_fails_cleanly(rc, err, INVALID[name], tmp_path, name)
    if name in NOT_YET:
        return _assert_fails_cleanly(rc, err, NOT_YET[name], tmp_path, name)
    if name in CRASHES:
        # reached only once it no longer crashes, and then passes, so that the strict xfail says so:
        # move it to NOT_YET (a clean refusal), DIFFERS, or out of the tables
        if rc == 1:
            return _assert_fails_cleanly(rc, err, "", tmp_path, name)
        assert rc == 0 and (tmp_path / "out").is_dir()
        return
    assert entry["mergekit"] == "merged"
    assert rc == 0, f"exit code {rc}; stderr: {err[-500:]}"
    _assert_same_tokenizer(tmp_path / "out", entry["tokenizer"])
    ours, theirs = _tensors(tmp_path / "out"), load_file(OUTPUTS / f"{name}.safetensors")
    if _method(name) in RANDOM_METHODS:
        base = model_states(p)[p.folders[p.base]]
        _assert_same_statistics(ours, theirs, base)
    else:
        _assert_same_tensors(ours, theirs, _method(name))
