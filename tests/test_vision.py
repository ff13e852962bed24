"""Vision transformers (ViT, CLIP) beyond the parametrized family tests: checkpoints stored under
older names, the command's report, inputs built from the config, and recipes that write models
transformers loads back."""

import json

import pytest
import torch
import transformers as T
from test_symmetry import assert_one_tensor_left_behind_changes_the_function
from tiny_models import FACTORIES, example_input, make, outputs

import merge_graphs as mg
from merge_graphs.cli import main
from merge_graphs.errors import UnsupportedArchitectureError
from merge_graphs.io import Checkpoint
from merge_graphs.run import run_recipe
from merge_graphs.sources import ModelTensors
from merge_graphs.verify import random_input, truncated_config


def assert_same_outputs(model, other, inputs):
    before, after = outputs(model, inputs), outputs(other, inputs)
    assert before.keys() == after.keys()
    for key, a in before.items():
        assert (a - after[key]).abs().max() <= 1e-4 * a.abs().max(), key


def test_a_vit_checkpoint_is_read_under_the_model_names(tmp_path):
    model = make("vit-cls")
    model.save_pretrained(tmp_path)
    # transformers 5 saves ViT under its older names and renames them on loading.
    on_disk = Checkpoint(tmp_path).names()
    assert "vit.encoder.layer.0.attention.attention.query.weight" in on_disk
    tensors = ModelTensors(Checkpoint(tmp_path))
    state = model.state_dict()
    assert list(tensors) == list(state)
    assert all(torch.equal(tensors[k], v) for k, v in state.items())
    assert "vit.encoder.layer.0.attention.attention.query.weight" not in tensors
    assert tensors.spec().family == "vit"


@pytest.mark.parametrize("name", ["vit-cls", "clip"])
def test_inspect_a_saved_vision_model(tmp_path, capsys, name):
    make(name).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    if name == "vit-cls":
        assert report["family"] == "vit" and report["groups"]["residual"]["size"] == 20
        assert report["groups"]["layers.1.attn.qk"] == {"size": 5, "parent": "layers.1.attn.heads"}
    else:
        assert report["family"] == "clip"
        assert report["groups"]["text.residual"]["size"] == 18 and report["groups"]["vision.residual"]["size"] == 20
    assert report["graph"]["edges"] > 0


def test_random_input_is_built_from_the_config():
    vit = random_input(make("vit"))
    assert set(vit) == {"pixel_values"} and vit["pixel_values"].shape == (2, 3, 12, 12)
    clip = random_input(make("clip"))
    assert set(clip) == {"input_ids", "attention_mask", "pixel_values"}
    assert int(clip["input_ids"].max()) < make("clip").config.text_config.vocab_size
    assert set(random_input(make("clip-text"))) == {"input_ids", "attention_mask"}
    cfg = truncated_config(make("clip").config, layers=1, vocab=7)
    assert cfg.text_config.num_hidden_layers == cfg.vision_config.num_hidden_layers == 1
    assert cfg.text_config.vocab_size == 7


@pytest.mark.parametrize("name", ["vit-cls", "clip"])
def test_a_recipe_merges_a_permuted_copy_back_and_writes_a_loadable_model(tmp_path, name):
    a = make(name)
    spec = mg.symmetry_spec(a)
    b = mg.permute(a, mg.random_permutations(spec, seed=4), spec)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    recipe = {"models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}],
              "align": {"method": "weight"}, "output": {"path": str(tmp_path / "out")}}
    result = run_recipe(recipe, progress=False)
    assert result.path == "streamed" and result.alignments[1].method == "weight"
    merged = type(a).from_pretrained(tmp_path / "out").eval()
    assert_same_outputs(a, merged, example_input(a))


@pytest.mark.parametrize("name", ["vit-cls", "clip"])
def test_a_recipe_merges_two_seeds_into_a_loadable_model(tmp_path, name):
    folders = []
    for seed in (0, 1):
        make(name, seed).save_pretrained(tmp_path / f"m{seed}")
        folders.append(str(tmp_path / f"m{seed}"))
    recipe = {"models": [{"model": f} for f in folders], "align": {"method": "weight"},
              "output": {"path": str(tmp_path / "out")}}
    result = run_recipe(recipe, progress=False)
    assert result.alignments[1].objective_after > result.alignments[1].objective_before
    merged = T.AutoModel.from_pretrained(tmp_path / "out") if name == "clip" else \
        T.AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert type(merged).__name__ == type(make(name)).__name__
    got = outputs(merged.eval(), example_input(merged))
    assert all(torch.isfinite(v).all() for v in got.values())


VISION = [name for name in FACTORIES if name.startswith(("vit", "clip"))]


@pytest.mark.parametrize("name", VISION)
def test_every_group_shows_in_the_outputs(name):
    """The tiny configs hide no group: moving every unit of any one group in all tensors but one
    changes the outputs (CLIP's text tower pools a token that sees the whole text)."""
    model = make(name)
    spec = mg.symmetry_spec(model)
    perms = mg.random_permutations(spec, seed=1)
    for group, g in spec.groups.items():
        if g.parent is None:
            assert_one_tensor_left_behind_changes_the_function(model, spec, perms, example_input(model), group)


def test_clip_towers_are_separate_groups_and_the_shared_embedding_is_fixed():
    spec = mg.symmetry_spec(make("clip"))
    assert "residual" not in spec.groups
    assert spec.groups["text.residual"].size == 18 and spec.groups["vision.residual"].size == 20
    assert spec.groups["text.layers.0.attn.qk"].size == 6 and spec.groups["vision.layers.0.attn.qk"].size == 5
    text, image = spec.tensors["text_projection.weight"], spec.tensors["visual_projection.weight"]
    assert text.axes[0] == image.axes[0] and not text.axes[0][0].groups  # one fixed space, 11 units
    assert (text.axes[1][0].groups, image.axes[1][0].groups) == (("text.residual",), ("vision.residual",))
    assert spec.tensors["logit_scale"].axes == ()
    assert spec.outputs == {"text_model_output.last_hidden_state": "text.residual",
                            "vision_model_output.last_hidden_state": "vision.residual"}
    # pre_layrnorm normalizes into the stream: not a pre-norm. post_layernorm folds into the projection;
    # the text tower's final norm is returned (text_model_output.last_hidden_state): kept.
    readers = {n.weight: n.readers for n in spec.norms}
    assert "vision_model.pre_layrnorm.weight" not in readers
    assert readers["vision_model.post_layernorm.weight"] == (("visual_projection.weight", None),)
    assert readers["text_model.final_layer_norm.weight"] == ()
    single = mg.symmetry_spec(make("clip-text-proj"))
    assert single.outputs == {"last_hidden_state": "text.residual"}
    assert set(single.groups) == {g for g in spec.groups if g.startswith("text.")}
    assert {n.weight: n.readers for n in mg.symmetry_spec(make("clip-vision")).norms}["post_layernorm.weight"] == ()


def test_a_recipe_asking_clip_for_a_residual_rotation_is_refused_with_the_reason(tmp_path):
    for seed in (0, 1):
        make("clip", seed).save_pretrained(tmp_path / f"m{seed}")
    recipe = {"models": [{"model": str(tmp_path / f"m{seed}")} for seed in (0, 1)],
              "align": {"method": "weight", "residual": "rotation"}, "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(UnsupportedArchitectureError, match="pre_layrnorm"):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "out").exists()
