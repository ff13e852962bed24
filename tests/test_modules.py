"""The module table (mergekit's ``modules:`` parts of multi-part models) against tiny models built
from transformers' real config classes: every tensor a checkpoint holds lands in exactly one
module, each module holds tensors, and each module's layer-count key counts its stack of layers.
A ``modules:`` frankenmerge of a Qwen2-VL writes a model that transformers loads with the new depth
and the tensors the recipe says."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open

from merge_graphs.cli import main
from merge_graphs.errors import MergeParameterError
from merge_graphs.modules import DEFAULT, MODULES, check_modules, modules_of, split_modules

TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, vocab_size=64)
MROPE = {"rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
QWEN_VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3, patch_size=2,
                   spatial_merge_size=2, temporal_patch_size=2)
QWEN3_VISION = dict(QWEN_VISION, out_hidden_size=16, deepstack_visual_indexes=[0], num_position_embeddings=16)
QWEN3_TEXT = dict(TEXT, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]})


def _qwen2_vl():
    return transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config=dict(TEXT, **MROPE), vision_config=dict(QWEN_VISION, embed_dim=16, mlp_ratio=2)))


BUILDERS = {
    "mistral3": lambda: transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=dict(TEXT, model_type="mistral"),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=16, patch_size=4, head_dim=8),
        spatial_merge_size=2)),
    "gemma3": lambda: transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=dict(TEXT, vocab_size=300, sliding_window=4),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        mm_tokens_per_image=4, boi_token_index=290, eoi_token_index=291, image_token_index=292)),
    "llama4": lambda: transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(
        text_config=dict(TEXT, intermediate_size_mlp=32, num_local_experts=2, num_experts_per_tok=1,
                         interleave_moe_layer_step=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, vision_output_dim=16, projector_input_dim=16,
                           projector_output_dim=16))),
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, **MROPE),
        vision_config=dict(QWEN_VISION, out_hidden_size=16, fullatt_block_indexes=[1], window_size=4))),
    "qwen3_vl": lambda: transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(
        text_config=QWEN3_TEXT, vision_config=QWEN3_VISION)),
    "qwen3_vl_moe": lambda: transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(
        text_config=dict(QWEN3_TEXT, moe_intermediate_size=8, num_experts=2, num_experts_per_tok=1),
        vision_config=QWEN3_VISION)),
}
_LAYER = re.compile(r"^(.*?)\.(\d+)\.")


def saved_names(model, folder) -> list[str]:
    model.save_pretrained(folder)
    return [k for f in sorted(folder.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()]


def test_every_model_type_of_the_table_is_tested():
    assert set(BUILDERS) == set(MODULES)


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_each_checkpoint_tensor_lands_in_one_module_and_layer_keys_count_the_stacks(model_type, tmp_path):
    torch.manual_seed(0)
    model = BUILDERS[model_type]()
    assert model.config.model_type == model_type
    names = saved_names(model, tmp_path)
    parts = split_modules(names, model_type)
    assert list(parts) == list(MODULES[model_type])
    assert sorted(n for part in parts.values() for n in part) == sorted(names)
    for name, part in parts.items():
        assert part, f"{name} holds no tensor"
        key = MODULES[model_type][name].layers_key
        if key is None:
            continue
        holder = model.config
        for attr in key.split("."):
            holder = getattr(holder, attr)
        stacks = {}
        for n in part:
            m = _LAYER.match(n)
            if m:
                stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
        assert len(stacks) == 1 and len(next(iter(stacks.values()))) == holder, (name, stacks, holder)


def test_a_model_without_an_entry_is_one_default_module():
    assert list(modules_of("llama")) == [DEFAULT]
    assert split_modules(["model.embed_tokens.weight", "lm_head.weight"], "llama") == {
        DEFAULT: ["model.embed_tokens.weight", "lm_head.weight"]}


def test_unknown_and_missing_modules_are_refused_with_the_parts_named():
    with pytest.raises(MergeParameterError, match=r"modules \['vision_model'\] are not parts of a qwen2_vl model; "
                                                  r"its modules are \['text_decoder', 'vision_tower', "
                                                  r"'multi_modal_projector'\]"):
        check_modules(["text_decoder", "vision_model"], "qwen2_vl")
    with pytest.raises(MergeParameterError, match=r"also has \['vision_tower', 'multi_modal_projector'\]; give each "
                                                  r"part its models"):
        check_modules(["text_decoder"], "qwen2_vl")
    with pytest.raises(MergeParameterError, match=r"belongs to none of the modules"):
        split_modules(["something.else"], "qwen2_vl")


def test_a_modules_frankenmerge_writes_a_model_of_the_new_depth(tmp_path):
    torch.manual_seed(0)
    a, b = _qwen2_vl(), _qwen2_vl()
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    recipe = {"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 2]}]},
                                    {"sources": [{"model": str(tmp_path / "b"), "layer_range": [1, 3]}]}]},
        "vision_tower": {"models": [{"model": str(tmp_path / "b")}]},
        "multi_modal_projector": {"models": [{"model": str(tmp_path / "a")}]}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main([str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 0
    merged = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert merged.config.text_config.num_hidden_layers == 4 and merged.config.vision_config.depth == 2
    got, sa, sb = merged.state_dict(), a.state_dict(), b.state_dict()
    text = "model.language_model.layers.{}.mlp.up_proj.weight"
    for out, (source, layer) in enumerate([(sa, 0), (sa, 1), (sb, 1), (sb, 2)]):
        assert torch.equal(got[text.format(out)], source[text.format(layer)])
    assert torch.equal(got["model.visual.blocks.1.mlp.fc1.weight"], sb["model.visual.blocks.1.mlp.fc1.weight"])
    assert torch.equal(got["model.visual.merger.mlp.0.weight"], sa["model.visual.merger.mlp.0.weight"])
    assert torch.equal(got["lm_head.weight"], sb["lm_head.weight"])  # after the layers: the last slice's model


def test_slices_of_a_module_without_layers_are_refused(tmp_path):
    torch.manual_seed(0)
    _qwen2_vl().save_pretrained(tmp_path / "a")
    a = str(tmp_path / "a")
    recipe = {"merge_method": "passthrough", "modules": {
        "text_decoder": {"models": [{"model": a}]}, "vision_tower": {"models": [{"model": a}]},
        "multi_modal_projector": {"slices": [{"sources": [{"model": a, "layer_range": [0, 1]}]}]}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main([str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
