"""The Qwen3-VL adapter against the stock transformers model (fp32, random weights).

Exactness without strategies (greedy ids equal to stock ``generate``, prefill logits close, sdpa and
eager), the interleaved video prompt (a timestamp and vision markers around each row), DeepStack
riders following pre-LLM drops and inner-LLM drops (against the stock language model's own DeepStack
injection on the kept entries), loading a saved checkpoint, and the 2B sizes with depth cut (slow).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tokcomp.models import qwen3_vl
from tokcomp.models import qwen_tokenizer as qtok
from tokcomp.models._hf import random_model
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from tests.conftest import PROMPT, causal_mask, model_spec, run_info, run_with
from tokcomp.hookspecs import hookimpl
from tokcomp.ledger import TokenLedger
from tokcomp.pipeline import encode_video, prompt_visual_tokens, splice
from tokcomp.stack import CompressionStack
from tokcomp.strategy import ModelInfo, Strategy
from tokcomp.video import generate_video, uniform_frame_indices

TINY = "qwen3-vl-tiny"


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    frames, _ = generate_video(length=48, height=64, width=64, shots=2, seed=1)
    return frames[uniform_frame_indices(48, 8)]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny(request, plugins, clip):
    adapter = plugins.model(TINY).build(model_spec(attn_implementation=request.param))
    return adapter, adapter.preprocess(clip)


def stock_generate(adapter, video, new_tokens: int) -> list[int]:
    inputs = adapter.stock_inputs(PROMPT, video)
    with torch.no_grad():
        out = adapter.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def stock_logits(adapter, video) -> torch.Tensor:
    with torch.no_grad():
        return adapter.model(**adapter.stock_inputs(PROMPT, video)).logits[0, -1].cpu()  # as RunOutput's


# ---- exactness without strategies -----------------------------------------------------------------
def test_tiny_matches_stock_generate_and_logits(tiny):
    adapter, video = tiny
    out = run_with(adapter, video, [], max_new_tokens=8)
    assert out.new_ids == stock_generate(adapter, video, 8)
    torch.testing.assert_close(out.prefill_logits, stock_logits(adapter, video), rtol=1e-5, atol=1e-5)
    assert out.ledger.visual_tokens_after_pre_llm == video.rows * video.llm_grid[0] * video.llm_grid[1]


def test_deepstack_is_part_of_the_reference(tiny):
    """Without the DeepStack additions the logits differ: the exactness above depends on them."""
    adapter, video = tiny
    full = run_with(adapter, video, [], max_new_tokens=1).prefill_logits
    riders = adapter.decoder_riders
    adapter.decoder_riders = lambda r: {}
    try:
        plain = run_with(adapter, video, [], max_new_tokens=1).prefill_logits
    finally:
        adapter.decoder_riders = riders
    assert (full - plain).abs().max() > 1e-3


def test_prompt_writes_a_timestamp_and_markers_around_each_row(tiny):
    adapter, video = tiny
    per_row = video.llm_grid[0] * video.llm_grid[1]
    layout = adapter.prompt(PROMPT, video, video.rows * per_row)
    text = adapter.tokenizer.decode(layout.ids[0].tolist())
    pads = "<|video_pad|>" * per_row
    # 8 frames at the default 2 fps: rows of frames (0, 1), (2, 3), ... centred at 0.25 s, 1.25 s, ...
    rows = "".join(f"<{t:.1f} seconds><|vision_start|>{pads}<|vision_end|>" for t in (0.25, 1.25, 2.25, 3.25))
    assert text == f"<|im_start|>user\n{rows}{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert layout.slots.numel() == video.rows * per_row
    assert (layout.ids[0, layout.slots] == adapter.config.video_token_id).all()
    runs = (layout.slots.diff() != 1).sum() + 1
    assert int(runs) == video.rows
    text_ids = adapter.description.count_prompt(PROMPT) + adapter.description.video_text_tokens(video)
    assert text_ids == layout.ids.shape[1] - layout.slots.numel()


def test_fps_sets_the_timestamps(plugins, clip):
    adapter = plugins.model(TINY).build(model_spec())
    video = adapter.preprocess(clip, fps=1.0)
    assert qwen3_vl.row_timestamps(video, 2) == [0.5, 2.5, 4.5, 6.5]


# ---- riders follow drops --------------------------------------------------------------------------
@dataclass
class KeepSome(Strategy):
    """Pre-LLM: keep every third token, and none of row 1 (its timestamp and markers stay)."""

    name = "test.keep_some"

    @hookimpl
    def tokcomp_pre_llm(self, state) -> None:
        keep = torch.nonzero((torch.arange(state.num_tokens, device=state.frame.device) % 3 == 0) & (state.frame != 1)).flatten()
        state.keep(keep)


@dataclass
class DropAtLayer(Strategy):
    """Inner-LLM at decoder layer ``layer`` (inside the DeepStack layers): keep every other visual entry."""

    name = "test.drop_at_layer"
    layer: int = 1

    def llm_layers(self, info: ModelInfo) -> set[int]:
        return {self.layer}

    @hookimpl
    def tokcomp_inner_llm(self, state) -> None:
        visual = state.visual_indices()
        state.keep_visual(visual[::2])


def stock_prefill(adapter, video, kept_source: torch.Tensor, drop: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Last-position logits from the stock modules: the uncompressed encoder's features and DeepStack features
    of the tokens ``kept_source``, the prompt's text and those tokens' original positions, the stock DeepStack
    addition (``_deepstack_process``) after decoder layers 0..k-1; ``drop`` = (layer, kept sequence entries)."""
    kept_source = kept_source.to(adapter.device)  # it indexes the features, and is indexed by device tensors
    with torch.no_grad():
        out = adapter.model.model.get_video_features(video.pixels, video.extra["grid_thw"], return_dict=True)
        features = torch.cat(out.pooler_output)
        deepstack = [f if torch.is_tensor(f) else torch.cat(f) for f in out.deepstack_features]  # 5.17: not split
        layout = adapter.prompt(PROMPT, video, features.shape[0])
        slots = layout.slots
        keep = torch.ones(layout.ids.shape[1], dtype=torch.bool, device=layout.ids.device)
        keep[slots] = False
        keep[slots[kept_source]] = True
        ids = layout.ids[:, keep]
        embeds = adapter.embed_tokens(ids)
        visual = ids[0] == adapter.config.video_token_id
        embeds[0, visual] = features[kept_source]
        positions = adapter.full_positions(layout, video)[:, keep][:, None]
        lm = adapter.language_model
        cos, sin = lm.rotary_emb(embeds, positions)
        h = embeds
        for i, layer in enumerate(lm.layers):
            if drop is not None and i == drop[0]:
                h, cos, sin, visual = h[:, drop[1]], cos[:, drop[1]], sin[:, drop[1]], visual[drop[1]]
                alive = drop[1]
            h = layer(h, attention_mask=causal_mask(h), position_embeddings=(cos, sin))
            if i < len(deepstack):
                rows = kept_source if drop is None or i < drop[0] else kept_source[
                    torch.cumsum((ids[0] == adapter.config.video_token_id).long(), 0)[alive][visual] - 1]
                h = lm._deepstack_process(h, visual[None], deepstack[i][rows])
        return adapter.model.lm_head(lm.norm(h))[0, -1].cpu()  # as RunOutput.prefill_logits


def test_pre_llm_drop_keeps_each_token_its_own_deepstack_features(plugins, clip):
    adapter = plugins.model(TINY).build(model_spec())
    video = adapter.preprocess(clip)
    strategy = KeepSome()
    out = run_with(adapter, video, [strategy], max_new_tokens=1)
    n = video.rows * video.llm_grid[0] * video.llm_grid[1]
    index = torch.arange(n)
    kept = index[(index % 3 == 0) & (index // (video.llm_grid[0] * video.llm_grid[1]) != 1)]
    assert out.ledger.visual_tokens_after_pre_llm == kept.numel()
    assert out.ledger.text_tokens == adapter.description.count_prompt(PROMPT) + adapter.description.video_text_tokens(video)
    torch.testing.assert_close(out.prefill_logits, stock_prefill(adapter, video, kept), rtol=1e-5, atol=1e-5)


def test_inner_llm_drop_inside_deepstack_layers_follows_the_alive_entries(plugins, clip):
    adapter = plugins.model(TINY).build(model_spec())
    video = adapter.preprocess(clip)
    out = run_with(adapter, video, [DropAtLayer(layer=1)], max_new_tokens=1)
    n = video.rows * video.llm_grid[0] * video.llm_grid[1]
    layout = adapter.prompt(PROMPT, video, n)
    visual = torch.nonzero(layout.ids[0] == adapter.config.video_token_id).flatten()
    is_visual = torch.zeros(layout.ids.shape[1], dtype=torch.bool, device=visual.device)
    is_visual[visual] = True
    alive = torch.sort(torch.cat([torch.nonzero(~is_visual).flatten(), visual[::2]])).values
    assert out.ledger.llm_layers == [layout.ids.shape[1]] + [alive.numel()] * 3
    reference = stock_prefill(adapter, video, torch.arange(n), drop=(1, alive))
    torch.testing.assert_close(out.prefill_logits, reference, rtol=1e-5, atol=1e-5)


def test_splice_places_kept_tokens_in_their_rows_runs(plugins, clip):
    """Kept tokens given out of order land in their own rows' runs; riders move with them."""
    adapter = plugins.model(TINY).build(model_spec())
    video = adapter.preprocess(clip)
    ledger = TokenLedger()
    tokens, specials = encode_video(adapter, video, CompressionStack([], run_info(adapter, video)), ledger)
    riders = tokens.riders.clone()
    order = torch.tensor([40, 3, 17, 2, 63])
    tokens.keep(order)
    spliced = splice(adapter, video, PROMPT, tokens, specials, prompt_visual_tokens(adapter, ledger))
    entries = torch.nonzero(spliced.visual_mask).flatten()
    # rows 0 (tokens 3, 2 in the given order), 1 (17), 2 (40), 3 (63)
    expected = torch.tensor([3, 2, 17, 40, 63])
    torch.testing.assert_close(spliced.riders, riders[expected])
    torch.testing.assert_close(spliced.embeds[0, entries], tokens.features[torch.tensor([1, 3, 2, 0, 4])])
    layout = adapter.prompt(PROMPT, video, 64)
    full = adapter.full_positions(layout, video)
    torch.testing.assert_close(spliced.positions[:, entries], full[:, layout.slots[expected]])
    assert spliced.text_tokens == layout.ids.shape[1] - 64


# ---- checkpoints and real sizes -------------------------------------------------------------------
def test_from_pretrained_loads_a_saved_checkpoint(plugins, clip, tmp_path):
    adapter = plugins.model(TINY).build(model_spec())
    adapter.model.save_pretrained(tmp_path)
    adapter.tokenizer.save_pretrained(tmp_path)
    loaded = plugins.model(TINY).build(model_spec(weights=str(tmp_path)))
    video = adapter.preprocess(clip)
    assert loaded.config.vision_config.deepstack_visual_indexes == [1, 2, 3]
    a = run_with(adapter, video, [], max_new_tokens=4)
    b = run_with(loaded, loaded.preprocess(clip), [], max_new_tokens=4)
    assert a.new_ids == b.new_ids
    torch.testing.assert_close(a.prefill_logits, b.prefill_logits)


def test_bundled_configs_describe_the_real_sizes():
    for preset, (layers, hidden, deepstack) in {"qwen3-vl-2b": (28, 2048, [5, 11, 17]),
                                                "qwen3-vl-4b": (36, 2560, [5, 11, 17]),
                                                "qwen3-vl-8b": (36, 4096, [8, 16, 24])}.items():
        config = qwen3_vl.bundled_config(preset)
        assert (config.text_config.num_hidden_layers, config.text_config.hidden_size) == (layers, hidden)
        assert list(config.vision_config.deepstack_visual_indexes) == deepstack
        assert config.vision_config.out_hidden_size == hidden
        assert config.video_token_id == 151656


@pytest.mark.slow
def test_2b_sizes_cut_match_stock_generate(clip):
    """Qwen3-VL-2B's layer sizes (vision 1024/4096/16 heads, 2304-entry position table; Qwen3 2048/6144,
    GQA 16/8, head_dim 128), depth cut to 3 vision blocks (DeepStack from 0, 1, 2) and 3 decoder layers."""
    tokenizer = qtok.build_qwen_tokenizer()
    data = qwen3_vl.bundled_config("qwen3-vl-2b", tokenizer).to_dict()
    data["vision_config"].update(depth=3, deepstack_visual_indexes=[0, 1, 2])
    data["text_config"].update(num_hidden_layers=3, vocab_size=len(tokenizer))
    config = Qwen3VLConfig(**{k: data[k] for k in ("vision_config", "text_config", "tie_word_embeddings",
                                                   "video_token_id", "image_token_id", "vision_start_token_id",
                                                   "vision_end_token_id")})
    model = random_model(Qwen3VLForConditionalGeneration, config, torch.float32, "sdpa", 0).eval()
    adapter = qwen3_vl.Qwen3VLAdapter(model, tokenizer, "qwen3-vl-2b", 128 * 128, 128 * 128)
    video = adapter.preprocess(clip[:4])
    out = run_with(adapter, video, [], max_new_tokens=4)
    assert out.new_ids == stock_generate(adapter, video, 4)
    torch.testing.assert_close(out.prefill_logits, stock_logits(adapter, video), rtol=1e-4, atol=1e-4)


def test_decoder_qk_with_qwen3s_qk_norms_reproduces_the_eager_attention_row(plugins, clip):
    """FastV's and PyramidDrop's statistic: the last token's attention row in decoder layer 2 (q/k normed per head)."""
    adapter = plugins.model(TINY).build(model_spec(attn_implementation="eager"))
    video = adapter.preprocess(clip)
    spliced = splice(adapter, video, PROMPT, *_encoded(adapter, video))
    layer, seen = adapter.decoder_layers[2], []
    handle = layer.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw["position_embeddings"])),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            out = adapter.language_model(inputs_embeds=spliced.embeds, position_ids=adapter.llm_positions(spliced.positions),
                                         output_attentions=True)
    finally:
        handle.remove()
    hidden, rope = seen[0]
    qk = adapter.decoder_qk(layer, hidden, rope, torch.tensor([hidden.shape[1] - 1]))
    ours = torch.softmax(torch.einsum("hd,hkd->hk", qk.q[:, 0], qk.k) * qk.scale, dim=-1)
    torch.testing.assert_close(ours, out.attentions[2][0, :, -1], atol=1e-6, rtol=1e-5)


def _encoded(adapter, video):
    """(visual tokens, specials, prompt tokens) of the uncompressed video, as the pipeline splices them."""
    ledger = TokenLedger()
    stack = CompressionStack([], run_info(adapter, video))
    with torch.no_grad():
        tokens, specials = encode_video(adapter, video, stack, ledger)
    return tokens, specials, prompt_visual_tokens(adapter, ledger)
