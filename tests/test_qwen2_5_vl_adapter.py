"""The Qwen2.5-VL adapter's primitives against the stock transformers model (fp32, random weights).

Each primitive is checked on its own: preprocessing against a hand-checkable reimplementation of the
processor's patch order, the vision blocks and merger against ``model.model.visual``, the queries and
keys against eager attention weights, positions against ``get_rope_index``, and prefill plus greedy
decoding against the stock forward and ``generate``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tokcomp.models import qwen2_5_vl, qwen_tokenizer, qwen_video
from tokcomp.models._hf import random_model
from transformers import AttentionInterface, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from tests.conftest import model_spec
from tokcomp.errors import ConfigError, InputError

TINY = "qwen2.5-vl-tiny"
PROMPT = "What happens in the video?"


# ---- references ------------------------------------------------------------------------------------
def reference_generate(adapter, video, text: str, max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
    """Greedy ids from the stock ``generate`` on the uncompressed prompt (the exactness reference)."""
    layout = adapter.prompt(text, video, video.rows * video.llm_grid[0] * video.llm_grid[1])
    with torch.no_grad():
        out = adapter.model.generate(**_stock_inputs(adapter, video, layout.ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
    return out[0, layout.ids.shape[1]:].tolist()


def reference_logits(adapter, video, text: str) -> torch.Tensor:
    """Last-position logits (vocab,) of the stock forward on the uncompressed prompt."""
    layout = adapter.prompt(text, video, video.rows * video.llm_grid[0] * video.llm_grid[1])
    with torch.no_grad():
        return adapter.model(**_stock_inputs(adapter, video, layout.ids)).logits[0, -1]


def _stock_inputs(adapter, video, ids: torch.Tensor) -> dict:
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=video.pixels,
                video_grid_thw=video.extra["grid_thw"], second_per_grid_ts=video.extra["second_per_grid_ts"],
                mm_token_type_ids=(ids == adapter.config.video_token_id).int() * 2)


def encode(adapter, video) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The adapter's encoder: features (rows, h, w, D) and the input of every vision block."""
    hidden, inputs = adapter.embed_video(video), []
    for i in range(adapter.info.vision_layers):
        inputs.append(hidden)
        hidden = adapter.vision_layer(i, hidden, None, video)
    return adapter.vision_to_llm(hidden, video.grid, {}, video).features, inputs


def adapter_generate(adapter, video, text: str, new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill through ``forward_llm`` with ``full_positions``, then greedy decoding at max + 1 + step
    (EOS suppressed, as ``min_new_tokens=new_tokens`` does)."""
    features, _ = encode(adapter, video)
    n = features.shape[0] * features.shape[1] * features.shape[2]
    layout = adapter.prompt(text, video, n)
    embeds = adapter.embed_tokens(layout.ids)
    embeds[0, layout.start : layout.start + n] = features.reshape(n, -1)
    positions, cache, eos = adapter.full_positions(layout, video), adapter.new_cache(), sorted(adapter.eos_ids())
    logits = first = adapter.forward_llm(embeds, positions, cache)
    ids = []
    for step in range(new_tokens):
        masked = logits.clone()
        masked[:, eos] = float("-inf")
        ids.append(int(masked.argmax(-1)))
        if step + 1 < new_tokens:
            position = torch.full((3, 1), int(positions.max()) + 1 + step, device=adapter.device)
            logits = adapter.forward_llm(adapter.embed_tokens(torch.tensor([[ids[-1]]], device=adapter.device)), position, cache)
    return first[0], ids


# ---- fixtures ----------------------------------------------------------------------------------------
def clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (frames, height, width, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def adapter(plugins):
    return plugins.model(TINY).build(model_spec())


@pytest.fixture(scope="module")
def eager(plugins):
    return plugins.model(TINY).build(model_spec(attn_implementation="eager"))


@pytest.fixture(scope="module")
def video(adapter):
    """5 frames of 64x96 px -> 112x140 px: 3 rows (the last padded) of 8x10 patches, 4x5 merge units,
    windows of 2x2 units (the last column and row of windows padded)."""
    return adapter.preprocess(clip(5, 64, 96))


# ---- preprocessing -----------------------------------------------------------------------------------
def test_smart_resize_matches_transformers():
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    for h, w in [(64, 96), (112, 112), (480, 640), (1080, 1920), (30, 500), (2000, 60)]:
        for bounds in [(qwen_video.MIN_PIXELS, qwen_video.MAX_PIXELS), (3136, 12544), (12544, 12544)]:
            assert qwen_video.smart_resize(h, w, 28, *bounds) == pil.smart_resize(h, w, 28, *bounds)


def test_patchify_follows_the_processor_order():
    """Patch n = (row, unit_y, unit_x, y in unit, x in unit) in raster order; inside a patch the values
    run over (channel, frame in the temporal patch, py, px)."""
    t, c, h, w, p = 4, 3, 56, 84, 14
    frames = torch.arange(t * c * h * w, dtype=torch.float32).view(t, c, h, w)
    patches, grid = qwen_video.patchify(frames, patch=p, temporal=2, merge=2)
    assert grid == (2, 4, 6) and patches.shape == (2 * 4 * 6, c * 2 * p * p)
    n = 0
    for row in range(2):
        for uy in range(2):
            for ux in range(3):
                for my in range(2):
                    for mx in range(2):
                        y, x = (2 * uy + my) * p, (2 * ux + mx) * p
                        expected = frames[2 * row : 2 * row + 2, :, y : y + p, x : x + p].transpose(0, 1)
                        assert torch.equal(patches[n], expected.reshape(-1)), (row, uy, ux, my, mx)
                        n += 1


def test_preprocess_geometry_and_values(adapter, video):
    assert (video.frames, video.rows, video.grid, video.llm_grid) == (5, 3, (8, 10), (4, 5))
    assert video.extra["size"] == (112, 140) and video.extra["grid_thw"].tolist() == [[3, 8, 10]]
    assert video.extra["second_per_grid_ts"].tolist() == [1.0]  # 2 frames at the default 2 fps
    assert video.row_frames == [[0, 1], [2, 3], [4]]
    assert video.pixels.shape == (3 * 8 * 10, 3 * 2 * 14 * 14)
    # the first patch: frames 0 and 1, resized (uint8 bicubic, antialiased), CLIP-normalised
    resized = F.interpolate(clip(5, 64, 96).permute(0, 3, 1, 2), size=(112, 140), mode="bicubic",
                            align_corners=False, antialias=True).float() / 255
    mean, std = (torch.tensor(x)[:, None, None] for x in (qwen_video.OPENAI_CLIP_MEAN, qwen_video.OPENAI_CLIP_STD))
    expected = ((resized[:2, :, :14, :14] - mean) / std).transpose(0, 1).reshape(-1)
    torch.testing.assert_close(video.pixels[0].cpu(), expected, atol=1e-5, rtol=0)


def test_odd_frame_count_repeats_the_last_frame(video):
    last_row = video.pixels.view(3, 80, 3, 2, 14, 14)[2]  # (patches, channel, frame, py, px)
    assert torch.equal(last_row[:, :, 0], last_row[:, :, 1])
    assert not torch.equal(video.pixels.view(3, 80, 3, 2, 14, 14)[1][:, :, 0], last_row[:, :, 0])


def test_too_short_video_is_an_input_error(adapter):
    with pytest.raises(InputError, match=r"qwen2.5-vl-tiny needs at least 2 frames .*got 1"):
        adapter.preprocess(clip(1, 64, 64))


def test_fps_sets_the_seconds_per_row(adapter):
    assert adapter.preprocess(clip(4, 64, 64), fps=1.0).extra["second_per_grid_ts"].tolist() == [2.0]


def test_image_size_caps_the_frame_size(plugins):
    assert qwen2_5_vl.pixel_bounds(model_spec(image_size=224), "qwen2.5-vl-3b") == (37632, 224 * 224)
    assert qwen2_5_vl.pixel_bounds(model_spec(image_size=56), "qwen2.5-vl-3b") == (56 * 56, 56 * 56)
    with pytest.raises(ConfigError, match="image_size=20"):
        qwen2_5_vl.pixel_bounds(model_spec(image_size=20), TINY)


# ---- vision encoder ----------------------------------------------------------------------------------
def test_vision_primitives_reproduce_the_stock_vision_tower(adapter, video):
    with torch.no_grad():
        features, _ = encode(adapter, video)
        stock = adapter.visual(video.pixels, grid_thw=video.extra["grid_thw"]).pooler_output
    assert features.shape == (3, 4, 5, 64)
    assert torch.equal(features.reshape(-1, 64), stock)


def test_attention_pairs_follow_the_stock_segments(adapter, video):
    lengths = {}

    def record(index):
        def hook(module, args, kwargs):
            lengths[index] = kwargs["cu_seqlens"].diff().tolist()
        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(adapter.visual.blocks)]
    try:
        with torch.no_grad():
            adapter.visual(video.pixels, grid_thw=video.extra["grid_thw"])
    finally:
        for handle in handles:
            handle.remove()
    assert lengths[1] == [80] * 3 and lengths[0] == [16, 16, 8, 16, 16, 8] * 3  # 2x2-unit windows, padded
    for i in range(4):
        assert adapter.vision_attention_pairs(i, 3, 80, video) == sum(n * n for n in lengths[i])
        assert adapter.description.attention_pairs(i, 3, 80, video, video.grid) == sum(n * n for n in lengths[i])


def _captured_vision_attention(adapter, video) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(attention module, weights (1, heads, n, n)) of every segment the stock tower attends within, eager."""
    captured = []

    def capture(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = qwen.eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                                    dropout=dropout)
        captured.append((module, weights))
        return out, weights

    AttentionInterface.register("tokcomp_capture", capture)
    config = adapter.visual.config
    previous, config._attn_implementation = config._attn_implementation, "tokcomp_capture"
    try:
        with torch.no_grad():
            adapter.visual(video.pixels, grid_thw=video.extra["grid_thw"])
    finally:
        config._attn_implementation = previous
    return captured


@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "full"])
def test_vision_qk_reproduces_eager_attention(adapter, video, index):
    captured = _captured_vision_attention(adapter, video)
    segments = [w[0] for module, w in captured if module is adapter.visual.blocks[index].attn]
    with torch.no_grad():
        _, inputs = encode(adapter, video)
        qk = adapter.vision_qk(index, inputs[index], True, video)
    rows, heads, tokens, _ = qk.q.shape
    assert (rows, heads, tokens) == (3, 2, 80) and qk.k.shape == qk.q.shape
    assert adapter.vision_qk(index, inputs[index], False, video).q is None
    g = video.extra["qwen_geometry"][3, tuple(video.grid)]
    q, k = (x.transpose(1, 2).reshape(rows * tokens, heads, -1) for x in (qk.q, qk.k))
    cu = (g["cu_full"] if index == 1 else g["cu_window"]).tolist()
    assert len(segments) == len(cu) - 1
    for weights, start, end in zip(segments, cu[:-1], cu[1:], strict=True):
        members = g["order"][start:end]  # spatial indices of the segment's tokens, in window order
        ours = torch.softmax(torch.einsum("qhd,khd->hqk", q[members], k[members]) * qk.scale, dim=-1)
        torch.testing.assert_close(ours, weights, atol=1e-6, rtol=1e-5)
        if qk.segments is not None:
            assert len(set(qk.segments.reshape(-1)[members].tolist())) == 1
    if index == 1:
        assert qk.segments is None
    else:  # per-row window ids 0..5 in raster order, windows of 2x2 merge units (16 tokens)
        assert qk.segments.shape == (3, 80) and qk.segments.max() == 5
        units = qk.segments.view(3, 8, 10)[0, ::2, ::2]
        assert units.tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5], [3, 3, 4, 4, 5]]


def test_vision_to_llm_pools_statistics_per_merge_unit(adapter, video):
    hidden = torch.randn(3, 80, 32).to(adapter.device)  # as the encoder hands them over: on the model's device
    stats = {"attention": torch.arange(240.0).view(3, 80).to(adapter.device), "keys": torch.randn(3, 80, 16).to(adapter.device)}
    out = adapter.vision_to_llm(hidden, video.grid, stats, video)
    assert out.features.shape == (3, 4, 5, 64) and out.specials.shape == (0, 64)
    assert out.stats["attention"].shape == (3, 4, 5) and out.stats["keys"].shape == (3, 4, 5, 16)
    # raster order of the 8x10 patch grid: merge unit (i, j) holds patches (2i..2i+1, 2j..2j+1)
    assert out.stats["attention"][0, 0, 0] == (0 + 1 + 10 + 11) / 4
    assert out.stats["attention"][1, 0, 1] == 80 + (2 + 3 + 12 + 13) / 4
    torch.testing.assert_close(out.stats["keys"][2, 3, 4], stats["keys"][2, [68, 69, 78, 79]].mean(0))


def test_a_changed_token_set_is_refused_with_a_clear_error(adapter, video):
    from tokcomp.state import StrategyContractError

    with pytest.raises(StrategyContractError, match="full"):
        adapter.vision_layer(0, torch.randn(3, 60, 32), None, video)
    with pytest.raises(NotImplementedError, match="proportional attention"):
        adapter.vision_layer(0, torch.randn(3, 80, 32), torch.zeros(3, 80), video)


# ---- prompt, positions, language model -------------------------------------------------------------
def test_prompt_is_qwen_chat_template(adapter, video):
    layout = adapter.prompt(PROMPT, video, 60)
    text = adapter.tokenizer.decode(layout.ids[0].tolist())
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    + "<|video_pad|>" * 60 + f"<|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert layout.ids[0, layout.start - 1] == adapter.config.vision_start_token_id
    assert (layout.ids[0, layout.start : layout.start + 60] == adapter.config.video_token_id).all()
    assert layout.ids.shape[1] - 60 == adapter.description.count_prompt(PROMPT)


def test_full_positions_are_the_models_m_rope_grid(adapter, video):
    layout = adapter.prompt(PROMPT, video, 60)
    positions = adapter.full_positions(layout, video)
    types = (layout.ids == adapter.config.video_token_id).int() * 2
    stock, _ = adapter.model.model.get_rope_index(layout.ids, mm_token_type_ids=types,
                                                  video_grid_thw=video.extra["grid_thw"],
                                                  second_per_grid_ts=video.extra["second_per_grid_ts"])
    assert torch.equal(positions, stock[:, 0])
    # by hand: text 0..s-1; video (s + 2 t, s + y, s + x) (tokens_per_second 2 x 1 s); text from s + 5
    s, length = layout.start, layout.ids.shape[1]
    t, y, x = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    video_part = torch.stack([s + 2 * t, s + y, s + x]).reshape(3, -1)
    after = (s + 5 + torch.arange(length - s - 60)).expand(3, -1)
    assert torch.equal(positions.cpu(), torch.cat([torch.arange(s).expand(3, -1), video_part, after], dim=1))
    with pytest.raises(ValueError, match="uncompressed prompt"):
        adapter.full_positions(adapter.prompt(PROMPT, video, 59), video)


def test_prefill_and_greedy_decoding_reproduce_stock_generate(adapter, video):
    with torch.no_grad():
        logits, ids = adapter_generate(adapter, video, PROMPT, 6)
    torch.testing.assert_close(logits, reference_logits(adapter, video, PROMPT), atol=1e-5, rtol=1e-4)
    assert ids == reference_generate(adapter, video, PROMPT, 6, min_new_tokens=6)
    assert adapter.decode_text(ids) == adapter.tokenizer.decode(ids, skip_special_tokens=True)


def test_decoder_qk_reproduces_the_eager_attention_row(eager, video):
    """Last token's attention row in decoder layer 2, from the whole prompt and from a cache of all but it."""
    features, _ = encode(eager, video)
    layout = eager.prompt(PROMPT, video, 60)
    embeds = eager.embed_tokens(layout.ids)
    embeds[0, layout.start : layout.start + 60] = features.reshape(60, -1)
    positions, length, layer = eager.full_positions(layout, video), layout.ids.shape[1], eager.decoder_layers[2]
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw["position_embeddings"])),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            out = eager.language_model(inputs_embeds=embeds, position_ids=positions[:, None], output_attentions=True)
            cache = eager.new_cache()
            eager.forward_llm(embeds[:, :-1], positions[:, :-1], cache)
            keys = cache.layers[2].keys.clone()
            eager.forward_llm(embeds[:, -1:], positions[:, -1:], cache)
    finally:
        handle.remove()
    stock = out.attentions[2][0, :, -1]  # (heads, L)
    (hidden, rope), _, (last_hidden, last_rope) = seen
    last = torch.tensor([length - 1])
    qk = eager.decoder_qk(layer, hidden, rope, last)
    assert qk.q.shape == (4, 1, 16) and qk.k.shape == (4, length, 16)
    ours = torch.softmax(torch.einsum("hd,hkd->hk", qk.q[:, 0], qk.k) * qk.scale, dim=-1)
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=1e-5)
    cached = eager.decoder_qk(layer, last_hidden, last_rope, torch.tensor([0]), past_keys=keys)
    assert cached.k.shape == (4, length, 16)
    ours = torch.softmax(torch.einsum("hd,hkd->hk", cached.q[:, 0], cached.k) * cached.scale, dim=-1)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)


# ---- presets, checkpoints, real sizes ----------------------------------------------------------------
def test_presets_describe_the_real_sizes(plugins):
    expected = {"qwen2.5-vl-3b": (36, 2048, 151936, True), "qwen2.5-vl-7b": (28, 3584, 152064, False)}
    tokenizer = qwen_tokenizer.build_qwen_tokenizer()
    for name, (layers, hidden, vocab, tied) in expected.items():
        description = plugins.model(name).describe(model_spec())
        info = description.info
        assert (info.vision_layers, info.llm_layers, info.llm_hidden, info.family) == (32, layers, hidden, "qwen2_5_vl")
        assert info.vision_grid == (14, 14) and info.pooled_grid == (7, 7)  # 128x128 px frames -> 196x196 px
        assert (description.specials, description.position_rank, description.contiguous_positions) == (0, 3, False)
        assert description.video(8, 480, 640).grid == (26, 36)  # 364x504 px: at most 200704 px
        config = qwen2_5_vl.preset_config(model_spec(), name)
        v, t = config.vision_config, config.text_config
        assert (v.hidden_size, v.intermediate_size, v.num_heads, v.window_size, v.tokens_per_second) == (
            1280, 3420, 16, 112, 2)
        assert list(v.fullatt_block_indexes) == [7, 15, 23, 31] and v.out_hidden_size == hidden
        assert (t.vocab_size, config.tie_word_embeddings, t.rope_parameters["mrope_section"]) == (vocab, tied,
                                                                                                   [16, 24, 24])
        assert t.rope_parameters["rope_theta"] == 1e6
        assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>") < vocab  # random weights
        hub = json.loads((qwen_tokenizer.CONFIG_DIR / f"{name}.json").read_text())
        assert hub["video_token_id"] == 151656 and hub["text_config"]["eos_token_id"] == 151645


def test_tiny_has_no_public_checkpoint_and_a_missing_path_is_named(plugins, tmp_path):
    with pytest.raises(ConfigError, match="'qwen2.5-vl-tiny' has no public checkpoint"):
        plugins.model(TINY).build(model_spec(weights="pretrained"))
    with pytest.raises(ConfigError, match="cannot load weights .*nowhere"):
        plugins.model(TINY).build(model_spec(weights=str(tmp_path / "nowhere")))


def test_weights_load_from_a_saved_checkpoint(adapter, video, plugins, tmp_path):
    adapter.model.save_pretrained(tmp_path)
    adapter.tokenizer.save_pretrained(tmp_path)
    loaded = plugins.model(TINY).build(model_spec(weights=str(tmp_path)))
    assert loaded.tokenizer.convert_tokens_to_ids("<|video_pad|>") == loaded.config.video_token_id
    with torch.no_grad():
        assert torch.equal(encode(loaded, video)[0], encode(adapter, video)[0])
        assert adapter_generate(loaded, video, PROMPT, 3)[1] == adapter_generate(adapter, video, PROMPT, 3)[1]


def test_a_checkpoints_own_video_processor_bounds_set_the_frame_size(adapter, plugins, tmp_path):
    adapter.model.save_pretrained(tmp_path)
    adapter.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 56 * 56, "longest_edge": 84 * 84}}))
    loaded = plugins.model(TINY).build(model_spec(weights=str(tmp_path)))
    assert (loaded.min_pixels, loaded.max_pixels) == (56 * 56, 84 * 84)
    assert loaded.preprocess(clip(2, 112, 112)).grid == (6, 6)  # 112x112 capped to 84x84 px


@pytest.mark.slow
def test_three_b_sizes_reproduce_the_stock_vision_tower_and_logits():
    """Qwen2.5-VL-3B's config (real vocab), depth cut to 2 vision blocks (block 1 full attention) and
    2 decoder layers; 4 frames of 112x112 px -> 196x196 px: 2 rows of 14x14 patches, 4 windows each."""
    tokenizer = qwen_tokenizer.build_qwen_tokenizer()
    config = qwen_tokenizer.bundled_config("qwen2.5-vl-3b", tokenizer)
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = 2, [1]
    config.text_config.num_hidden_layers = 2
    config.text_config.layer_types = config.text_config.layer_types[:2]
    model = random_model(Qwen2_5_VLForConditionalGeneration, config, torch.float32, "sdpa", seed=0).eval()
    adapter = qwen2_5_vl.Qwen2_5_VLAdapter(model, tokenizer, "qwen2.5-vl-3b")
    video = adapter.preprocess(clip(4, 112, 112))
    assert (video.rows, video.grid) == (2, (14, 14))
    assert adapter.vision_attention_pairs(0, 2, 196, video) == 2 * (64**2 + 48**2 + 48**2 + 36**2)
    with torch.no_grad():
        features, _ = encode(adapter, video)
        stock = adapter.visual(video.pixels, grid_thw=video.extra["grid_thw"]).pooler_output
        assert torch.equal(features.reshape(stock.shape), stock)
        logits, _ = adapter_generate(adapter, video, PROMPT, 1)
    torch.testing.assert_close(logits, reference_logits(adapter, video, PROMPT), atol=1e-4, rtol=1e-4)


def test_bundled_configs_load_in_transformers_as_nested_json():
    data = json.loads((qwen_tokenizer.CONFIG_DIR / "qwen2.5-vl-7b.json").read_text())
    data.pop("_source")
    config = Qwen2_5_VLConfig(**data)
    assert config.text_config.num_key_value_heads == 4 and config.vision_config.depth == 32
