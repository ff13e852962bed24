"""The one engine (merge_graphs.engine) over its two sources: checkpoints read lazily (streamed) and
models loaded whole give the same tensors; streaming holds a few tensors at a time."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
import transformers as T
from safetensors import safe_open
from tiny_models import FACTORIES, example_input, make, outputs

import merge_graphs as mg
from merge_graphs.errors import AlignmentError
from merge_graphs.io import Checkpoint
from merge_graphs.memory import PeakRSS, rss_bytes
from merge_graphs.methods import METHODS
from merge_graphs.run import run_recipe
from merge_graphs.sources import ModelTensors

# nn.Sequential models have no config.json, so no checkpoint folder: they merge in memory only.
FAMILIES = [name for name in FACTORIES if name not in ("mlp", "cnn")]


def stored(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[name] = f.get_tensor(name)
    return tensors


def save(model, folder, dtype=None, shard="20KB") -> str:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size=shard)
    return str(folder)


def merge_both_ways(tmp_path, recipe: dict):
    """Run ``recipe`` on the in-memory and on the streamed path; both results and outputs."""
    results = {}
    for path in ("in-memory", "streamed"):
        out = tmp_path / path
        results[path] = run_recipe({**recipe, "output": {"path": str(out), "shard_size": "30KB"}},
                                   streaming=path == "streamed", progress=False)
        assert results[path].path == path
    return results, stored(tmp_path / "in-memory"), stored(tmp_path / "streamed")


def assert_identical(memory: dict[str, torch.Tensor], streamed: dict[str, torch.Tensor]) -> None:
    assert memory.keys() == streamed.keys()
    for name, tensor in memory.items():
        assert streamed[name].dtype == tensor.dtype, name
        assert torch.equal(streamed[name], tensor), name


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_and_in_memory_paths_write_identical_tensors(tmp_path, name):
    folders = [save(make(name, seed), tmp_path / f"m{seed}") for seed in (0, 1)]
    results, memory, streamed = merge_both_ways(tmp_path, {"models": [{"model": f} for f in folders]})
    assert_identical(memory, streamed)
    found = [r.alignments[1].permutations for r in results.values()]
    assert all(torch.equal(found[0][g], found[1][g]) for g in found[0])
    assert results["streamed"].alignments[1].method == "weight"
    assert set(results["streamed"].stage_seconds) == {"load", "align", "verify", "merge+write"}


@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_gnn_alignment_streams_to_the_in_memory_result(tmp_path, name, refine):
    folders = [save(make(name, seed), tmp_path / f"m{seed}") for seed in (0, 1)]
    recipe = {"models": [{"model": f} for f in folders], "align": {"method": "gnn", "refine": refine}}
    results, memory, streamed = merge_both_ways(tmp_path, recipe)
    assert results["streamed"].path == "streamed"
    assert_identical(memory, streamed)
    found = [r.alignments[1] for r in results.values()]
    assert found[0].method == found[1].method == ("gnn+weight" if refine else "gnn")
    assert all(torch.equal(found[0].permutations[g], found[1].permutations[g]) for g in found[0].permutations)


PARAMETERS = {"slerp": {"t": 0.3}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
              "dare_ties": {"density": 0.5}, "breadcrumbs": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5},
              "della": {"density": 0.5}, "della_linear": {"density": 0.5}, "sce": {"select_topk": 0.5},
              "nearswap": {"t": 0.05}, "ram": {"epsilon": 0.01}, "ramplus_tl": {"epsilon": 0.01}}


def recipe_models(method: str, folders: list[str]) -> list[str]:
    """As many of ``folders`` as ``method`` merges (METHODS[method].models), the base (folders[0]) left
    out when the method requires one."""
    others = folders[1:] if METHODS[method].needs_base else folders
    return others[:METHODS[method].models[1]]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_merge_method_streams_to_the_in_memory_tensors(tmp_path, method):
    folders = [save(make("llama-lm", seed), tmp_path / f"m{seed}") for seed in (0, 1, 2)]
    parameters = PARAMETERS.get(method, {})
    needs_base = METHODS[method].needs_base
    models = recipe_models(method, folders)
    recipe = {"models": [{"model": f} for f in models], "merge": {"method": method, "parameters": parameters}}
    if needs_base:
        recipe["base_model"] = folders[0]
    _, memory, streamed = merge_both_ways(tmp_path, recipe)
    assert_identical(memory, streamed)


SPLIT = sorted(name for name, m in METHODS.items() if m.rows is not None)


#: Methods merged whole, on purpose: each needs whole-tensor norms, cosines, means or a variance
#: top-k whose float sums a split in row blocks would round differently from mergekit's; passthrough
#: returns its input itself (a block-by-block copy would only cost time).
WHOLE = {"nuslerp", "multislerp", "karcher", "model_stock", "sce", "passthrough"}


def test_every_method_says_how_it_splits():
    assert set(SPLIT) == set(METHODS) - WHOLE, "a method without rows is merged whole: say so here if that is on purpose"


@pytest.mark.parametrize("method", [*SPLIT, "ties-rescaled", "dare_ties-rescaled"])
def test_methods_merge_large_tensors_in_row_blocks_to_the_same_tensors(tmp_path, monkeypatch, method):
    """Merged with blocks of a few rows, and whole: the same tensors, bit for bit."""
    folders = [save(make("gpt2-lm", seed), tmp_path / f"m{seed}") for seed in (0, 1, 2)]
    parameters = {**PARAMETERS.get(method.split("-")[0], {}), **({"rescale": True} if "rescaled" in method else {})}
    method = method.split("-")[0]
    recipe = {"models": [{"model": f} for f in folders], "merge": {"method": method, "parameters": parameters}}
    recipe = {**recipe, "models": [{"model": f} for f in recipe_models(method, folders)]}
    if METHODS[method].needs_base:
        recipe = {**recipe, "base_model": folders[0]}
    whole = run_recipe({**recipe, "output": {"path": str(tmp_path / "whole")}}, progress=False)
    monkeypatch.setattr("merge_graphs.methods.ROW_BLOCK", 100)  # every matrix in blocks of a few rows
    blocks = run_recipe({**recipe, "output": {"path": str(tmp_path / "blocks")}}, progress=False)
    assert whole.path == blocks.path == "streamed"
    assert_identical(stored(tmp_path / "whole"), stored(tmp_path / "blocks"))


@pytest.mark.parametrize("name, method", [("gpt2-lm", "weight"), ("llama-lm", "weight"), ("qwen2-lm-tied", "weight"),
                                          ("llama-lm", "gnn")])
def test_rotation_streams_to_the_in_memory_tensors(tmp_path, name, method):
    """Orthogonal weight matching with folded norms (from the GNN's start with ``method: gnn``) reads
    checkpoints tensor by tensor, and writes what the same recipe writes from models loaded whole; the
    folded head is stored on its own."""
    folders = [save(make(name, seed), tmp_path / f"m{seed}") for seed in (0, 1)]
    recipe = {"models": [{"model": f} for f in folders], "align": {"method": method, "residual": "rotation"}}
    results, memory, streamed = merge_both_ways(tmp_path, recipe)
    assert_identical(memory, streamed)
    found = [r.alignments[1] for r in results.values()]
    assert torch.equal(found[0].rotation, found[1].rotation) and found[0].head_maps.keys() == found[1].head_maps.keys()
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head.weight" in streamed


def test_bf16_checkpoints_round_trip(tmp_path):
    """bf16 in, float32 matching, bf16 out (the reference's dtype): as on the in-memory path."""
    folders = [save(make("qwen2-lm", seed), tmp_path / f"m{seed}", dtype=torch.bfloat16) for seed in (0, 1)]
    results, memory, streamed = merge_both_ways(tmp_path, {"models": [{"model": f} for f in folders]})
    assert_identical(memory, streamed)
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}
    a = results["streamed"].alignments[1]
    assert a.objective_after > a.objective_before
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert loaded.dtype == torch.bfloat16


def test_bf16_checkpoints_rotate_in_float32(tmp_path):
    """Folded and rotated in float32 as read, not rounded to bfloat16 in between: the function check
    (relative tolerance 1e-4) passes and the streamed merge is the in-memory one."""
    folders = [save(make("llama-lm", seed), tmp_path / f"m{seed}", dtype=torch.bfloat16) for seed in (0, 1)]
    recipe = {"models": [{"model": f} for f in folders], "align": {"method": "weight", "residual": "rotation"}}
    results, memory, streamed = merge_both_ways(tmp_path, recipe)
    assert_identical(memory, streamed)
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}


def test_recipe_dtype_is_written(tmp_path):
    folders = [save(make("llama-lm", seed), tmp_path / f"m{seed}") for seed in (0, 1)]
    _, memory, streamed = merge_both_ways(tmp_path, {"models": [{"model": f} for f in folders],
                                                     "align": {"method": "none"}, "dtype": "float16"})
    assert_identical(memory, streamed)
    assert {t.dtype for t in streamed.values()} == {torch.float16}


def test_a_permuted_copy_merges_back_and_the_sharded_folder_loads(tmp_path):
    a = make("llama-lm-mha-tied-bias")
    spec = mg.symmetry_spec(a)
    b = mg.permute(a, mg.random_permutations(spec, seed=3), spec)
    folders = [save(a, tmp_path / "a"), save(b, tmp_path / "b")]
    result = run_recipe({"models": [{"model": f} for f in folders],
                         "output": {"path": str(tmp_path / "out"), "shard_size": "10KB"}}, progress=False)
    assert result.path == "streamed"
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(Checkpoint(folders[0]).names())
    assert {"config.json", "generation_config.json", "README.md", "merge-graphs.yaml"} <= set(files)
    merged = T.AutoModel.from_pretrained(tmp_path / "out")  # the bare model from the causal LM's folder
    causal = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert causal.lm_head.weight.data_ptr() == causal.model.embed_tokens.weight.data_ptr()  # still tied
    inputs = example_input(a)
    want, got = outputs(a, inputs), outputs(causal, inputs)
    assert torch.allclose(want["logits"], got["logits"], atol=1e-5)
    assert torch.allclose(merged.embed_tokens.weight, a.model.embed_tokens.weight)


def test_a_failing_check_writes_nothing(tmp_path, monkeypatch):
    folders = [save(make("gpt2-lm", seed), tmp_path / f"m{seed}") for seed in (0, 1)]

    def broken(ckpt, alignment, **kwargs):
        raise AlignmentError("permuting changed the output")

    monkeypatch.setattr("merge_graphs.run.check_alignment", broken)
    with pytest.raises(AlignmentError):
        run_recipe({"models": [{"model": f} for f in folders], "output": {"path": str(tmp_path / "out")}},
                   progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1"]


def test_the_check_catches_a_wrong_permutation(tmp_path):
    """A permutation the model does not admit (MLP units moved in one tensor only) is refused."""
    from merge_graphs.verify import check_alignment

    folders = [save(make("llama-lm", seed), tmp_path / f"m{seed}") for seed in (0, 1)]
    a, b = (ModelTensors(Checkpoint(f)) for f in folders)
    alignment = mg.match.weight_matching(a.spec(), a, b)
    assert check_alignment(b, alignment) < 1e-5
    spec = alignment.spec
    bad = {**spec.tensors}
    bad.pop("model.layers.1.mlp.down_proj.weight")  # its MLP axis no longer follows the permutation
    alignment.spec = mg.symmetry.SymmetrySpec(spec.family, spec.groups, bad, spec.carried, spec.outputs)
    with pytest.raises(AlignmentError, match="changed its output"):
        check_alignment(b, alignment)


def test_the_check_holds_one_truncated_copy_at_a_time(tmp_path, monkeypatch):
    """At 70B two layers are ~7 GB in float32: B and B permuted must not be in memory together."""
    from merge_graphs import verify

    folders = [save(make("llama-lm", seed), tmp_path / f"m{seed}") for seed in (0, 1)]
    a, b = (ModelTensors(Checkpoint(f)) for f in folders)
    alignment = mg.match.weight_matching(a.spec(), a, b)
    made, alive_when_made = [], []
    real = verify.truncated_model

    def tracked(*args, **kwargs):
        alive_when_made.append(sum(ref() is not None for ref in made))
        model = real(*args, **kwargs)
        made.append(weakref.ref(model))
        return model

    monkeypatch.setattr(verify, "truncated_model", tracked)
    assert verify.check_alignment(b, alignment) < 1e-5
    assert alive_when_made == [0, 0]


class LiveTensors:
    """Counts the tensors read from checkpoints that are still alive, and their bytes."""

    def __init__(self):
        self.count = self.bytes = self.max_count = self.max_bytes = self.reads = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        self.count, self.bytes, self.reads = self.count + 1, self.bytes + size, self.reads + 1
        self.max_count, self.max_bytes = max(self.max_count, self.count), max(self.max_bytes, self.bytes)
        weakref.finalize(tensor, self.release, size)
        return tensor

    def release(self, size: int) -> None:
        self.count, self.bytes = self.count - 1, self.bytes - size


def deep_llama(seed: int) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return T.LlamaForCausalLM(cfg).eval()


def test_memory_stays_bounded_by_a_few_tensors(tmp_path, monkeypatch):
    """Inputs of 2 x 32 MB merged (weight matching, linear) while holding a few tensors read from
    them at a time, and less extra resident memory than one input model."""
    # Imports and first-call allocations of these shapes, outside the measurement (with tiny
    # warm-up models instead, the measured extra ranged over 3-27 MB with the tests run before).
    warm = [save(deep_llama(seed), tmp_path / f"w{seed}", shard="8MB") for seed in (2, 3)]
    run_recipe({"models": [{"model": f} for f in warm], "output": {"path": str(tmp_path / "warm"), "shard_size": "8MB"}},
               progress=False)
    folders = [save(deep_llama(seed), tmp_path / f"m{seed}", shard="8MB") for seed in (0, 1)]
    ckpt = Checkpoint(folders[0])
    sizes = [i.dtype.itemsize * torch.Size(i.shape).numel() for i in ckpt.infos().values()]
    model_bytes, largest = sum(sizes), max(sizes)
    assert model_bytes > 30e6 and len(sizes) > 100

    live = LiveTensors()
    get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name, **kw: live.track(get(self, name, **kw)))
    baseline = rss_bytes()
    with PeakRSS(interval=0.002) as meter:
        result = run_recipe({"models": [{"model": f} for f in folders],
                             "output": {"path": str(tmp_path / "out"), "shard_size": "8MB"}}, progress=False)
    assert result.path == "streamed" and result.alignments[1].iterations > 1
    assert live.reads > 3 * len(sizes)  # coordinate descent re-reads from the files ...
    assert live.max_count <= 4 and live.max_bytes <= 4 * largest  # ... and holds a few tensors
    assert meter.peak - baseline < model_bytes / 2  # measured: 2.5-9 MB for two 32 MB models
    assert max(result.stage_peak_rss.values()) >= baseline
    merged = stored(tmp_path / "out")
    assert len(merged) == len(sizes)


def test_gnn_alignment_holds_a_few_tensors_at_a_time(tmp_path, monkeypatch):
    folders = [save(deep_llama(seed), tmp_path / f"m{seed}", shard="8MB") for seed in (0, 1)]
    largest = max(i.dtype.itemsize * torch.Size(i.shape).numel() for i in Checkpoint(folders[0]).infos().values())
    live = LiveTensors()
    get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name, **kw: live.track(get(self, name, **kw)))
    result = run_recipe({"models": [{"model": f} for f in folders], "align": {"method": "gnn", "refine": True},
                         "output": {"path": str(tmp_path / "out"), "shard_size": "8MB"}}, progress=False)
    assert result.path == "streamed" and result.alignments[1].method == "gnn+weight"
    assert live.max_count <= 4 and live.max_bytes <= 4 * largest


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_the_torch_solver_aligns_a_permuted_copy_back_like_the_exact_one(tmp_path, device):
    # The solver a GPU run picks ("auto" -> "torch" on CUDA), exercised end to end on the streamed path.
    a = make("llama-lm")
    spec = mg.symmetry_spec(a)
    b = mg.permute(a, mg.random_permutations(spec, seed=5), spec)
    folders = [save(a, tmp_path / "a"), save(b, tmp_path / "b")]
    outs = {}
    for solver in ("exact", "torch"):
        result = run_recipe({"models": [{"model": f} for f in folders], "align": {"solver": solver},
                             "output": {"path": str(tmp_path / solver)}}, device=device, progress=False)
        assert result.path == "streamed"
        outs[solver] = stored(tmp_path / solver)
    assert_identical(outs["exact"], outs["torch"])
    for name, value in a.state_dict().items():
        if name in outs["torch"]:
            assert torch.allclose(outs["torch"][name], value, atol=1e-6), name
