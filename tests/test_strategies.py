"""Each built-in strategy changes the ledger the way its parameters say, and leaves no trace after."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import run_info, run_with
from tokcomp.errors import ConfigError
from tokcomp.state import StrategyContractError

FRAMES, POOLED = 8, 16  # tiny model: 8 frames, 4x4 pooled tokens per frame


def make(plugins, name, **params):
    return plugins.strategy(name).from_params(params)


def test_pooling_quarter_ratio_keeps_a_quarter_of_the_visual_tokens(plugins, tiny, pixels):
    ledger = run_with(tiny, pixels, [make(plugins, "pooling", ratio=0.25)]).ledger
    assert ledger.visual_tokens_after_pre_llm == FRAMES * POOLED // 4
    assert ledger.uncompressed_visual_tokens == FRAMES * POOLED
    assert ledger.retained_ratio == pytest.approx((FRAMES * 4) / (FRAMES * 16))
    assert ledger.special_tokens == 1  # the newline still reaches the LLM, after the pooled video
    assert ledger.llm_layers == [ledger.text_tokens + FRAMES * 4 + 1] * tiny.info.llm_layers


def test_pooling_averages_each_two_by_two_block(plugins):
    from tokcomp.state import VisualTokens

    feats = torch.arange(16.0)[:, None].repeat(1, 3)
    state = VisualTokens(
        features=feats, frame=torch.zeros(16, dtype=torch.long),
        row=torch.tensor([i // 4 for i in range(16)]), col=torch.tensor([i % 4 for i in range(16)]),
        source=torch.arange(16), frame_sources=[[0]], grid=(4, 4),
    )
    make(plugins, "pooling", ratio=0.25).tokcomp_pre_llm(state)
    assert state.features[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of {0,1,4,5}, ...
    assert state.grid == (2, 2) and state.source.tolist() == [0, 2, 8, 10]


@pytest.mark.parametrize("name", ["uniform", "random", "topk"])
def test_per_frame_selection_keeps_ratio_of_each_frame_and_the_newline_reaches_the_llm(plugins, tiny, pixels, name):
    out = run_with(tiny, pixels, [make(plugins, name, ratio=0.5)])
    assert out.ledger.visual_tokens_after_pre_llm == FRAMES * POOLED // 2
    assert out.ledger.special_tokens == 1
    assert out.ledger.llm_layers[0] == out.ledger.text_tokens + FRAMES * POOLED // 2 + 1


def small_state(frames=2, per_frame=4, scores=None):
    from tokcomp.state import VisualTokens

    n = frames * per_frame
    return VisualTokens(
        features=torch.randn(n, 3), frame=torch.arange(frames).repeat_interleave(per_frame),
        row=torch.tensor([i // 2 for i in range(per_frame)] * frames),
        col=torch.tensor([i % 2 for i in range(per_frame)] * frames),
        source=torch.arange(n), frame_sources=[[f] for f in range(frames)],
        grid=(2, 2), scores=scores,
    )


def test_topk_keeps_the_highest_scored_tokens_of_each_frame_in_spatial_order(plugins):
    state = small_state(scores=torch.tensor([0.1, 0.9, 0.5, 0.2, 0.7, 0.1, 0.3, 0.8]))
    make(plugins, "topk", ratio=0.5).tokcomp_pre_llm(state)
    assert state.source.tolist() == [1, 2, 4, 7]


def test_topk_scores_are_the_pooled_received_attention_of_the_last_vision_layer(plugins, tiny, pixels):
    from tokcomp.ledger import TokenLedger
    from tokcomp.ops.pooling import bilinear_halve
    from tokcomp.pipeline import encode_video, vision_statistics
    from tokcomp.stack import CompressionStack
    from tokcomp.state import EncoderState

    with torch.no_grad():
        stack = CompressionStack([make(plugins, "topk", ratio=1.0)], run_info(tiny, pixels))
        tokens, _ = encode_video(tiny, pixels, stack, TokenLedger())
        vision = tiny.vision
        h = vision.embeddings(pixels.pixels)
        for layer in vision.encoder.layers[:-1]:
            h = layer(h, None)
        last = len(vision.encoder.layers) - 1
        state = EncoderState(layer=last - 1, num_layers=last + 1, hidden=h, grid=pixels.grid,
                             frame_sources=[[f] for f in range(FRAMES)])
        expected = vision_statistics(tiny, last, state, {"attention"}, pixels)["attention"]
    side = tiny.info.vision_grid[0]
    pooled = bilinear_halve(expected.view(FRAMES, side, side, 1)).reshape(-1)
    torch.testing.assert_close(tokens.scores, pooled)  # one score per content token, none for the newline


def test_random_selection_is_reproducible_with_a_seed(plugins, tiny, pixels):
    a = run_with(tiny, pixels, [make(plugins, "random", ratio=0.5, seed=3)])
    b = run_with(tiny, pixels, [make(plugins, "random", ratio=0.5, seed=3)])
    torch.testing.assert_close(a.prefill_logits, b.prefill_logits, rtol=0, atol=0)


def test_fastv_shortens_the_sequence_from_layer_k_on(plugins, tiny, pixels):
    ledger = run_with(tiny, pixels, [make(plugins, "fastv", layer=2, ratio=0.5)]).ledger
    visual = FRAMES * POOLED  # the newline is kept like text, never dropped
    full = ledger.text_tokens + visual + 1
    assert ledger.special_tokens == 1
    assert ledger.llm_layers == [full, full, full - visual + math.ceil(visual / 2), full - visual + math.ceil(visual / 2)]


def test_fastv_matches_a_manual_forward_over_the_kept_tokens(plugins, tiny, pixels):
    """Layers >= K see only kept tokens at their original positions; text is untouched."""
    from tests.conftest import ManualPrefill

    k, ratio = 2, 0.5
    out = run_with(tiny, pixels, [make(plugins, "fastv", layer=k, ratio=ratio)], max_new_tokens=1)
    with torch.no_grad():
        ref = ManualPrefill(tiny, pixels)
        scores = ref.run_to(k)
        visual = torch.tensor(ref.visual, device=scores.device)
        kept_visual = visual[torch.topk(scores[visual], math.ceil(visual.numel() * ratio)).indices]
        logits = ref.finish(ref.text_around(kept_visual.tolist()), k)
    torch.testing.assert_close(out.prefill_logits, logits, atol=1e-5, rtol=1e-4)


def test_fastv_under_eager_attention_matches_sdpa(plugins, frames):
    """Eager attention passes explicit masks, which must be sliced in prefill and in decoding."""
    from tests.conftest import model_spec

    eager = plugins.model("tiny").build(model_spec(attn_implementation="eager"))
    sdpa = plugins.model("tiny").build(model_spec())
    fastv = [make(plugins, "fastv", layer=1, ratio=0.3)]
    a = run_with(eager, eager.preprocess(frames), fastv, max_new_tokens=5)
    b = run_with(sdpa, sdpa.preprocess(frames), fastv, max_new_tokens=5)
    assert a.new_ids == b.new_ids and a.ledger.llm_layers == b.ledger.llm_layers
    torch.testing.assert_close(a.prefill_logits, b.prefill_logits, atol=1e-5, rtol=1e-4)


def test_frame_avg_halves_the_frames_of_later_vision_layers(plugins, tiny, pixels):
    ledger = run_with(tiny, pixels, [make(plugins, "frame_avg", layer=1)]).ledger
    assert [e.frames for e in ledger.vision_layers] == [8, 8, 4, 4]
    assert ledger.vision_out_frames == 4
    assert ledger.visual_tokens_after_pre_llm == 4 * POOLED and ledger.special_tokens == 1


def test_removing_hooks_restores_bit_exact_outputs(plugins, tiny, pixels):
    before = run_with(tiny, pixels, [])
    for name, params in [("fastv", {"layer": 1}), ("frame_avg", {"layer": 0}), ("topk", {}), ("pooling", {})]:
        run_with(tiny, pixels, [make(plugins, name, **params)])
    assert all(not layer._forward_pre_hooks for layer in tiny.language_model.layers)
    after = run_with(tiny, pixels, [])
    assert before.new_ids == after.new_ids
    assert torch.equal(before.prefill_logits, after.prefill_logits)


def test_two_pre_llm_strategies_run_in_yaml_order(plugins, tiny, pixels):
    pool_then_uniform = [make(plugins, "pooling", ratio=0.25), make(plugins, "uniform", ratio=0.5)]
    assert run_with(tiny, pixels, pool_then_uniform).ledger.visual_tokens_after_pre_llm == FRAMES * 2
    uniform_then_pool = [make(plugins, "uniform", ratio=0.5), make(plugins, "pooling", ratio=0.25)]
    with pytest.raises(ConfigError, match="full token grid"):
        run_with(tiny, pixels, uniform_then_pool)


def test_text_tokens_can_never_be_dropped(tiny):
    from tokcomp.state import LLMState

    state = LLMState(layer=1, num_layers=4, hidden=torch.zeros(1, 5, 2), position_ids=torch.arange(5)[None],
                     visual_mask=torch.tensor([False, True, True, True, False]))
    with pytest.raises(StrategyContractError, match="text tokens"):
        state.keep([1, 2, 3, 4])
    state.keep([0, 2, 4])
    assert state.position_ids.tolist() == [[0, 2, 4]]
