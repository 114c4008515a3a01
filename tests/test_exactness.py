"""With no strategies the pipeline is the stock transformers model: same logits, same tokens."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROMPT, model_spec, run_with
from tokcomp.video import generate_video, uniform_frame_indices


def stock_outputs(adapter, video, max_new_tokens):
    """Last-position logits of the stock forward and the stock greedy ``generate`` ids, uncompressed."""
    inputs = adapter.stock_inputs(PROMPT, video)
    with torch.no_grad():
        logits = adapter.model(**inputs).logits[0, -1].float().cpu()  # RunOutput.prefill_logits is on the CPU
        generated = adapter.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                           min_new_tokens=max_new_tokens)
    return logits, generated[0, inputs["input_ids"].shape[1]:].tolist()


def assert_matches_stock(adapter, video, max_new_tokens=6, atol=1e-5):
    out = run_with(adapter, video, [], max_new_tokens=max_new_tokens)
    logits, ids = stock_outputs(adapter, video, max_new_tokens)
    assert out.new_ids == ids
    torch.testing.assert_close(out.prefill_logits, logits, atol=atol, rtol=1e-4)


def test_tiny_pipeline_reproduces_stock_transformers(tiny, pixels):
    assert_matches_stock(tiny, pixels)


def test_tiny_eager_attention_reproduces_stock_transformers(plugins, frames):
    adapter = plugins.model("tiny").build(model_spec(attn_implementation="eager"))
    assert_matches_stock(adapter, adapter.preprocess(frames))


def test_ledger_of_uncompressed_run_counts_every_token(tiny, pixels):
    ledger = run_with(tiny, pixels, []).ledger
    side = tiny.info.vision_grid[0]
    assert [(e.frames, e.tokens_per_frame) for e in ledger.vision_layers] == [(8, side * side)] * tiny.info.vision_layers
    assert ledger.visual_tokens_after_pre_llm == 8 * 16 and ledger.special_tokens == 1
    assert ledger.llm_layers == [ledger.text_tokens + 8 * 16 + 1] * tiny.info.llm_layers
    assert ledger.retained_ratio == 1.0


@pytest.mark.slow
def test_real_size_half_billion_preset_reproduces_stock_transformers(plugins, frames):
    """The 0.5B dimensions (26 SigLIP layers, 24 Qwen2 layers) at 112 px and 2 frames, fp32."""
    adapter = plugins.model("llava-onevision-0.5b").build(model_spec(image_size=112))
    assert adapter.info.vision_layers == 26 and adapter.info.llm_layers == 24
    assert_matches_stock(adapter, adapter.preprocess(frames[:2]), max_new_tokens=3, atol=1e-4)


def test_pretrained_weights_load_from_a_local_checkpoint(tiny, pixels, plugins, tmp_path):
    """The from_pretrained path, exercised on a checkpoint written to disk (no hub access here)."""
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = plugins.model("tiny").build(model_spec(weights=str(tmp_path)))
    a = run_with(tiny, pixels, [])
    b = run_with(loaded, pixels, [])
    assert a.new_ids == b.new_ids
    torch.testing.assert_close(a.prefill_logits, b.prefill_logits)


def test_missing_checkpoint_is_a_clear_error(plugins, tmp_path):
    from tokcomp.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot load weights"):
        plugins.model("tiny").build(model_spec(weights=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_qwen2_5_vl_pipeline_reproduces_stock_transformers(plugins, frames, attn):
    adapter = plugins.model("qwen2.5-vl-tiny").build(model_spec(attn_implementation=attn))
    assert_matches_stock(adapter, adapter.preprocess(frames))


@pytest.mark.slow
def test_qwen2_5_vl_3b_dimensions_reproduce_stock_transformers(plugins):
    """Qwen2.5-VL-3B's widths, heads, 112-px windows and vocab, random weights, fp32; depth cut to 4
    vision blocks (blocks 1 and 3 full attention, the others windowed) and 2 decoder layers to keep
    a 2-core run short; 4 frames of 168x224 px -> 2 rows of 12x16 patches (windows of 8x8 and less)."""
    from tokcomp.models import qwen2_5_vl, qwen_tokenizer
    from tokcomp.models._hf import random_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer.build_qwen_tokenizer()
    config = qwen_tokenizer.bundled_config("qwen2.5-vl-3b", tokenizer)
    assert (config.vision_config.hidden_size, config.vision_config.window_size) == (1280, 112)
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = 4, [1, 3]
    config.text_config.num_hidden_layers = 2
    config.text_config.layer_types = config.text_config.layer_types[:2]
    model = random_model(Qwen2_5_VLForConditionalGeneration, config, torch.float32, "sdpa", seed=0,
                         device=model_spec().device).eval()
    adapter = qwen2_5_vl.Qwen2_5_VLAdapter(model, tokenizer, "qwen2.5-vl-3b", 168 * 224, 168 * 224)
    clip, _ = generate_video(length=16, height=168, width=224, seed=2)
    video = adapter.preprocess(clip[uniform_frame_indices(16, 4)])
    assert (video.rows, video.grid) == (2, (12, 16))
    assert_matches_stock(adapter, video, max_new_tokens=3, atol=1e-4)
