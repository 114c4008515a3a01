"""Model presets: real dimensions from the bundled configs, and clear errors for impossible requests."""

from __future__ import annotations

import pytest

from tests.conftest import model_spec
from tokcomp.errors import ConfigError


@pytest.mark.parametrize(
    ("preset", "llm_layers", "hidden", "heads", "kv_heads", "ffn"),
    [("llava-onevision-0.5b", 24, 896, 14, 2, 4864), ("llava-onevision-7b", 28, 3584, 28, 4, 18944)],
)
def test_bundled_configs_have_the_published_dimensions(preset, llm_layers, hidden, heads, kv_heads, ffn):
    from tokcomp.models.llava_onevision import bundled_config

    config = bundled_config(preset)
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (llm_layers, hidden, heads)
    assert (text.num_key_value_heads, text.intermediate_size) == (kv_heads, ffn)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (26, 1152, 384, 14)
    assert config.video_token_id == 151647 and config.vision_feature_layer == -1


def test_presets_are_registered_with_their_checkpoints(plugins):
    assert plugins.model("llava-onevision-0.5b").hub_id == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    assert plugins.model("tiny").hub_id is None


def test_tiny_has_no_public_checkpoint(plugins):
    with pytest.raises(ConfigError, match="'tiny' has no public checkpoint"):
        plugins.model("tiny").build(model_spec(weights="pretrained"))


def test_image_size_applies_only_to_random_weights(plugins, tmp_path):
    with pytest.raises(ConfigError, match="image_size=112 only applies to weights: random"):
        plugins.model("tiny").build(model_spec(weights=str(tmp_path), image_size=112))


def test_unknown_dtype_is_named(plugins):
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        plugins.model("tiny").build(model_spec(dtype="float8"))


def test_tiny_model_geometry(tiny):
    assert tiny.info.vision_grid == (8, 8) and tiny.info.pooled_grid == (4, 4)
    assert tiny.info.vision_layers == 4 and tiny.info.llm_layers == 4


def test_cuda_device_without_a_gpu_is_named(plugins, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.device='cuda'"):
        plugins.model("tiny").build(model_spec(device="cuda"))


def test_ids_outside_the_tokenizer_are_shown_not_dropped(tiny):
    byte_h = tiny.tokenizer("h", add_special_tokens=False).input_ids
    assert tiny.decode_text([*byte_h, 151000, *byte_h]) == "h<151000>h"


@pytest.mark.parametrize("preset", ["llava-onevision-7b", "llava-video-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "tiny"])
def test_random_weights_are_drawn_on_the_device_they_run_on(plugins, preset):
    """A 7B model's random weights drawn on the CPU and copied to a GPU cost minutes; drawn on the model's
    device they cost a second. The meta device shows every parameter and buffer is created there."""
    adapter = plugins.model(preset).build(model_spec(device="meta", dtype="bfloat16"))
    tensors = [*adapter.model.parameters(), *adapter.model.buffers()]
    assert tensors and {t.device.type for t in tensors} == {"meta"}
