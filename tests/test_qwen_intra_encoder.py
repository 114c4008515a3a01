"""The intra-encoder hook on Qwen2.5-VL's windowed vision transformer.

What a strategy leaves inside the tower (fewer temporal patches, a pooled patch grid) is what the
tower computes on: windows, sequence boundaries and 2-D rotary positions are rebuilt for it, so the
result equals the stock tower run on exactly that input; the LLM keeps the original M-RoPE
positions of the kept content.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROMPT, model_spec, run_info, run_with
from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ledger import TokenLedger
from tokcomp.pipeline import prefill
from tokcomp.stack import CompressionStack
from tokcomp.state import EncoderState
from tokcomp.strategy import Strategy
from tokcomp.timing import StageClock
from tokcomp.video import generate_video, uniform_frame_indices

FAMILIES = ["qwen2.5-vl-tiny", "qwen3-vl-tiny"]


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(plugins, request):
    adapter = plugins.model(request.param).build(model_spec())
    clip, _ = generate_video(length=48, height=64, width=64, shots=2, seed=3)
    return adapter, adapter.preprocess(clip[uniform_frame_indices(48, 8)])


def _spliced(adapter, video, strategies):
    stack = CompressionStack(strategies, run_info(adapter, video))
    stack.start(0, StageClock())
    try:
        with torch.no_grad():
            done = prefill(adapter, video, PROMPT, stack, TokenLedger(), StageClock())
        if done.hooks is not None:
            done.hooks.remove()
        return done.spliced
    finally:
        stack.close()


class _Capture(Strategy):
    """Test-only: records the hidden states the hook sees after the last vision layer."""

    name = "test.capture"
    seen: list

    def __init__(self, layer: int):
        self.layer, self.seen, self.riders = layer, [], []

    def encoder_layers(self, info):
        return {self.layer}

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        self.seen.append((state.hidden.clone(), state.grid, [list(s) for s in state.frame_sources]))
        self.riders.append(None if state.riders is None else state.riders.clone())


def _stock_tower(adapter, pixels: torch.Tensor, rows: int, grid: tuple[int, int]) -> tuple[torch.Tensor, list]:
    """The stock vision tower's merged features (rows * h/2 * w/2, D_llm) for these pixel patches, and
    its DeepStack features (Qwen3-VL; none for Qwen2.5-VL)."""
    with torch.no_grad():
        out = adapter.visual(pixels, grid_thw=torch.tensor([[rows, *grid]], device=pixels.device))
    return getattr(out, "pooler_output", out), list(getattr(out, "deepstack_features", None) or [])


def test_dropped_temporal_patches_give_the_stock_tower_on_the_kept_ones(plugins, qwen):
    adapter, video = qwen
    sampling = plugins.strategy("input.frame_sampling").from_params({"ratio": 0.5})
    capture = _Capture(adapter.info.vision_layers - 1)
    spliced = _spliced(adapter, video, [sampling, capture])
    hidden, grid, sources = capture.seen[-1]
    kept_rows = [video.row_frames.index(s) for s in sources]
    assert len(kept_rows) == 2 and hidden.shape[0] == 2
    per_row = video.grid[0] * video.grid[1]
    pixels = video.pixels.view(video.rows, per_row, -1)[kept_rows].reshape(2 * per_row, -1)
    stock, deepstack = _stock_tower(adapter, pixels, 2, video.grid)
    riders = capture.riders[-1]
    out = (adapter.vision_to_llm(hidden, grid, {}, video) if riders is None
           else adapter.vision_to_llm(hidden, grid, {}, video, riders=riders))
    torch.testing.assert_close(out.features.reshape(stock.shape), stock, atol=1e-5, rtol=1e-5)
    assert (out.riders is None) == (not deepstack)
    if deepstack:  # the DeepStack states of the kept rows only, as the stock tower gives them
        ours = out.riders.reshape(stock.shape[0], -1).split(stock.shape[-1], dim=-1)
        for mine, theirs in zip(ours, deepstack, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # the LLM sees the kept rows' own M-RoPE positions (time, height, width)
    full = _spliced(adapter, video, [])
    cells = video.llm_grid[0] * video.llm_grid[1]
    expected = full.positions[:, full.visual_mask].view(3, video.rows, cells)[:, kept_rows].reshape(3, -1)
    torch.testing.assert_close(spliced.positions[:, spliced.visual_mask], expected)
    assert spliced.text_tokens == full.text_tokens  # Qwen3-VL: the dropped rows' timestamps stay


def test_merged_rows_keep_the_time_of_their_first_patch(plugins, qwen):
    adapter, video = qwen
    merge = plugins.strategy("frame_avg").from_params({"layer": 1})
    spliced, full = _spliced(adapter, video, [merge]), _spliced(adapter, video, [])
    cells = video.llm_grid[0] * video.llm_grid[1]
    ours = spliced.positions[:, spliced.visual_mask].view(3, -1, cells)
    stock = full.positions[:, full.visual_mask].view(3, video.rows, cells)
    assert ours.shape[1] == (video.rows + 1) // 2
    torch.testing.assert_close(ours, stock[:, ::2])
    torch.testing.assert_close(spliced.positions[:, -1], full.positions[:, -1])  # the text after the video stays put


def test_input_pooling_runs_the_tower_on_a_smaller_even_grid_with_centre_positions(plugins, qwen):
    adapter, video = qwen
    pooling = plugins.strategy("input.pooling").from_params({"ratio": 0.25})
    capture = _Capture(0)
    out = run_with(adapter, video, [pooling, capture], max_new_tokens=2)
    _, grid, _ = capture.seen[-1]
    assert grid == (video.grid[0] // 2, video.grid[1] // 2) and grid[0] % 2 == 0 == grid[1] % 2
    llm = (grid[0] // 2, grid[1] // 2)
    assert out.ledger.visual_tokens_before_pre_llm == video.rows * llm[0] * llm[1]
    windowed = [e.attention_pairs for i, e in enumerate(out.ledger.vision_layers)
                if i not in getattr(adapter.visual, "fullatt_block_indexes", range(len(adapter.visual.blocks)))]
    assert all(p is not None and p <= video.rows * (grid[0] * grid[1]) ** 2 for p in windowed)
    spliced, full = _spliced(adapter, video, [pooling]), _spliced(adapter, video, [])
    H, W = video.llm_grid
    stock = full.positions[:, full.visual_mask].view(3, video.rows, H, W)
    r = [(2 * i + 1) * H // (2 * llm[0]) for i in range(llm[0])]
    c = [(2 * j + 1) * W // (2 * llm[1]) for j in range(llm[1])]
    expected = stock[:, :, r][:, :, :, c].reshape(3, -1)
    torch.testing.assert_close(spliced.positions[:, spliced.visual_mask], expected)


def test_pooling_to_an_odd_grid_is_rounded_to_the_mergers_unit(plugins, qwen):
    adapter, video = qwen
    pooling = plugins.strategy("input.pooling").from_params({"ratio": 0.5})  # 8 x sqrt(.5) = 5.7 -> 6
    assert pooling.pooled_grid((8, 10), 2) == (6, 8)
    assert pooling.pooled_grid((8, 10), 1) == (6, 7)
    ledger = run_with(adapter, video, [pooling], max_new_tokens=1).ledger
    assert ledger.vision_layers[0].tokens_per_frame == 6 * 6


def test_earlytom_stage1_merges_temporal_patches_of_a_still_video(plugins, qwen):
    adapter, _ = qwen
    clip, _ = generate_video(length=8, height=64, width=64, shots=1, seed=3)
    video = adapter.preprocess(clip[[0] * 8])  # four identical temporal patches
    stage1 = plugins.strategy("earlytom.frame_merge").from_params({"layers": [0, 1]})
    reference = run_with(adapter, video, [], max_new_tokens=3)
    out = run_with(adapter, video, [stage1], max_new_tokens=3)
    assert out.ledger.text_tokens == reference.ledger.text_tokens
    assert out.ledger.vision_out_frames < video.rows
    assert out.ledger.visual_tokens_before_pre_llm == out.ledger.vision_out_frames * video.llm_grid[0] * video.llm_grid[1]


def test_intra_encoder_layer_beyond_qwens_tower_is_a_config_error_naming_it(plugins):
    description = plugins.model("qwen2.5-vl-7b").describe(model_spec())
    stage1 = plugins.strategy("earlytom.frame_merge").from_params({"layers": [8, 40]})
    with pytest.raises(ConfigError, match="40"):
        stage1.check(description.info)
