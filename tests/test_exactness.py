"""With no strategies the pipeline is the stock transformers model: same logits, same tokens."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROMPT, model_spec, run_with


def stock_outputs(adapter, video, n_visual, max_new_tokens):
    ids = adapter.prompt(PROMPT, video, n_visual).ids
    pixels = video.pixels
    with torch.no_grad():
        logits = adapter.model(input_ids=ids, pixel_values_videos=pixels[None]).logits[0, -1].float()
        generated = adapter.model.generate(input_ids=ids, pixel_values_videos=pixels[None], do_sample=False,
                                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    return logits, generated[0, ids.shape[1]:].tolist()


def assert_matches_stock(adapter, pixels, max_new_tokens=6, atol=1e-5):
    out = run_with(adapter, pixels, [], max_new_tokens=max_new_tokens)
    n_visual = out.ledger.visual_tokens_after_pre_llm + out.ledger.special_tokens
    logits, ids = stock_outputs(adapter, pixels, n_visual, max_new_tokens)
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
