"""VisionZip (LLaVA-OV video port): budget rules, dominant/contextual ops on hand-computed cases, the
strategy on a small hand-built state, and the tiny model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tokcomp.strategies.visionzip import VisionZip, frame_budget

from tests.conftest import run_info, run_with
from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.contextual import (
    contextual_merge,
    remaining_positions,
    split_budget,
    stride_targets,
    visionzip_select,
)
from tokcomp.ops.selection import topk_positions
from tokcomp.plan import PlannedTokens, plan_ledger
from tokcomp.stack import CompressionStack
from tokcomp.state import VisualTokens
from tokcomp.strategy import ModelInfo, Strategy

FRAMES, POOLED = 8, 16  # tiny model: 8 frames, 4x4 pooled tokens per frame

# ---------------------------------------------------------------------------------------------
# budget: S per frame and its dominant/contextual split


@pytest.mark.parametrize(("ratio", "s", "dominant", "contextual"), [
    (0.10, 20, 16, 4),  # 20*54/64 = 16.875
    (0.15, 30, 25, 5),  # 30*54/64 = 25.3125
    (0.20, 40, 33, 7),  # 40*54/64 = 33.75
    (0.25, 50, 42, 8),  # 50*54/64 = 42.1875; plain rounding of 196*0.25 would give 49
])
def test_official_ratios_on_196_tokens_give_the_ports_spatial_tokens_and_split(ratio, s, dominant, contextual):
    assert frame_budget(196, ratio) == s
    assert split_budget(s) == (dominant, contextual)


def test_other_ratios_and_grids_round_n_times_ratio_clamped_to_two_and_n():
    assert frame_budget(196, 0.30) == 59  # round(58.8)
    assert frame_budget(169, 0.25) == 42  # LLaVA-Video grid: round(42.25), no table
    assert frame_budget(16, 0.25) == 4
    assert frame_budget(16, 0.05) == 2  # round(0.8) = 1 -> at least 2
    assert frame_budget(1, 0.5) == 1  # a one-token frame keeps it
    assert frame_budget(16, 1.0) == 16


def test_tokens_per_frame_overrides_ratio_and_is_clamped_to_the_frame():
    assert frame_budget(196, 0.25, tokens_per_frame=64) == 64
    assert frame_budget(10, 0.25, tokens_per_frame=64) == 10
    assert VisionZip(ratio=0.25, tokens_per_frame=7).budget(196) == 7
    assert split_budget(2) == (1, 1) and split_budget(64) == (54, 10)


def test_plan_keeps_s_tokens_per_frame():
    planned = PlannedTokens([196] * 32, (14, 14))
    VisionZip(ratio=0.25).plan_pre_llm(None, planned)
    assert planned.per_frame == [50] * 32 and planned.total == 32 * 50  # the framework adds the newline


@pytest.mark.parametrize("params", [{"ratio": 0.0}, {"ratio": 1.5}, {"tokens_per_frame": 1},
                                    {"tokens_per_frame": 0}])
def test_invalid_parameters_are_rejected_by_name(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        VisionZip(**params)
    with pytest.raises(ConfigError, match=next(iter(params))):
        VisionZip.from_params(params)


OV_7B = ModelInfo("llava-ov-7b", vision_layers=26, vision_grid=(27, 27), pooled_grid=(14, 14), llm_layers=28,
                  llm_hidden=3584)


def test_tokens_per_frame_above_the_pooled_grid_is_a_config_error():
    VisionZip(tokens_per_frame=196).check(OV_7B)
    with pytest.raises(ConfigError, match="tokens_per_frame=197 exceeds the 196"):
        VisionZip(tokens_per_frame=197).check(OV_7B)


def test_scores_and_keys_are_requested_from_the_last_vision_layer():
    strategy = VisionZip()
    stack = CompressionStack([strategy], OV_7B)  # index 25 of 26 (LLaVA drops SigLIP's 27th)
    assert stack.statistics["vision.attention"] == stack.statistics["vision.keys"] == {25}


# ---------------------------------------------------------------------------------------------
# ops on hand-computed cases


def test_dominant_positions_are_the_top_scores_in_spatial_order_ties_to_the_lower_position():
    assert topk_positions(torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.2]]), 2).tolist() == [[1, 3]]
    assert topk_positions(torch.tensor([[0.5, 0.5, 0.5, 0.1]]), 2).tolist() == [[0, 1]]
    assert remaining_positions(5, torch.tensor([[1, 3], [4, 0]])).tolist() == [[0, 2, 4], [1, 2, 3]]


def test_contextual_targets_sit_at_a_floor_stride_from_the_first_remaining_token():
    assert stride_targets(8, 3).tolist() == [0, 2, 4]  # step 8 // 3 = 2
    assert stride_targets(10, 3).tolist() == [0, 3, 6]  # step 3; the 4th stride position 9 is cut
    assert stride_targets(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert stride_targets(154, 8).tolist() == [0, 19, 38, 57, 76, 95, 114, 133]  # S = 50 on 196: 154 remaining
    assert stride_targets(180, 4).tolist() == [0, 45, 90, 135]  # S = 20 on 196: 16 dominant, 180 remaining
    assert stride_targets(4, 0).tolist() == []
    with pytest.raises(ValueError, match="3 remaining"):
        stride_targets(3, 4)


def test_contextual_token_is_target_plus_mean_of_its_members_by_cosine_of_keys():
    # 5 remaining tokens, 2 targets at positions 0 and 2 (step 5 // 2 = 2).
    keys = torch.tensor([[1.0, 0.0], [10.0, 9.0], [0.0, 5.0], [1.0, 3.0], [-1.0, 2.0]])[None]
    hidden = torch.tensor([[1.0, 0.0], [4.0, 2.0], [10.0, 10.0], [2.0, 6.0], [4.0, 0.0]])[None]
    out, assignment = contextual_merge(hidden, keys, torch.tensor([0, 2]))
    # token 1: cos 10/sqrt(181) = 0.74 to target 0 vs 9/sqrt(181) = 0.67 to target 2 (a plain dot
    # product would pick target 2: 45 > 10); tokens 3 and 4 are closer to target 2.
    assert assignment.tolist() == [[0, 1, 1]]
    assert out.tolist() == [[[1 + 4, 0 + 2], [10 + (2 + 4) / 2, 10 + (6 + 0) / 2]]]  # [[5, 2], [13, 13]]


def test_a_target_without_members_stays_its_own_hidden_state():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, -0.1]])[None]
    hidden = torch.tensor([[1.0], [2.0], [7.0], [4.0]])[None]
    out, assignment = contextual_merge(hidden, keys, torch.tensor([0, 2]))
    assert assignment.tolist() == [[0, 0]]
    assert out.flatten().tolist() == [1 + (2 + 4) / 2, 7.0]


def test_visionzip_select_keeps_dominant_in_spatial_order_then_contextual_per_frame():
    # frame 0: top-2 scores at 1 and 3; remaining [0, 2, 4, 5], targets every 2nd: frame positions 0 and 4;
    # position 2's key is closer to position 4's, position 5's to position 0's.
    # frame 1: the same tokens with reversed scores: top-2 at 2 and 4; remaining [0, 1, 3, 5], targets 0 and 3;
    # position 1 (key [0, 1], cos 0.71 to both targets) ties and goes to the first, 5 is closer to 0;
    # target 3 gets no member and stays h_3.
    scores = torch.tensor([[0.1, 0.8, 0.3, 0.9, 0.2, 0.05], [0.05, 0.2, 0.9, 0.3, 0.8, 0.1]])
    keys = torch.tensor([[1.0, 0.0], [5.0, 5.0], [1.0, 1.5], [5.0, 5.0], [0.0, 1.0], [3.0, 1.0]])
    keys = torch.stack([keys, torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 1.0], [0.0, 1.0],
                                            [1.0, 0.2]])])
    hidden = torch.arange(1.0, 7.0)[None, :, None].repeat(2, 1, 1)  # h_p = p + 1
    out, positions = visionzip_select(hidden, scores, keys, 2, 2)
    assert positions.tolist() == [[1, 3, 0, 4], [2, 4, 0, 3]]
    assert out[..., 0].tolist() == [[2, 4, 1 + 6, 5 + 3], [3, 5, 1 + (2 + 6) / 2, 4]]


# ---------------------------------------------------------------------------------------------
# the strategy on a small hand-built state


def small_state(scores=None, keys=None):
    """2 frames of 2x2 tokens (content only: the newline never reaches a strategy); features[i] = [i, 10 i]."""
    n = 8
    return VisualTokens(
        features=torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([1.0, 10.0]),
        frame=torch.tensor([0] * 4 + [1] * 4), row=torch.tensor([0, 0, 1, 1] * 2),
        col=torch.tensor([0, 1, 0, 1] * 2), source=torch.arange(n),
        frame_sources=[[0], [1]], grid=(2, 2), scores=scores, keys=keys,
    )


SCORES = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.7, 0.1, 0.3, 0.8])
KEYS = torch.tensor([[1.0, 0.0]] * 8)


def test_strategy_outputs_dominant_then_contextual_per_frame():
    # S = 3 per frame: 2 dominant + 1 contextual; the one target is the first remaining token.
    state = small_state(SCORES.clone(), KEYS.clone())
    VisionZip(tokens_per_frame=3).tokcomp_pre_llm(state)
    # frame 0: dominant 1, 2; remaining 0, 3 -> target 0 + token 3. frame 1: dominant 4, 7; 5 + token 6.
    assert state.source.tolist() == [1, 2, 0, 4, 7, 5]
    assert state.features[:, 0].tolist() == [1, 2, 0 + 3, 4, 7, 5 + 6]
    assert state.features[:, 1].tolist() == [10, 20, 30, 40, 70, 110]
    assert state.frame.tolist() == [0, 0, 0, 1, 1, 1]
    assert state.row.tolist() == [0, 1, 0, 0, 1, 0] and state.col.tolist() == [1, 0, 0, 0, 1, 1]
    assert state.scores.tolist() == pytest.approx(SCORES[[1, 2, 0, 4, 7, 5]].tolist())
    assert state.keys.shape == (6, 2)


@pytest.mark.parametrize(("missing", "message"), [("scores", "received attention"), ("keys", "keys")])
def test_missing_scores_or_keys_is_a_clear_error(missing, message):
    state = small_state(SCORES.clone(), KEYS.clone())
    setattr(state, missing, None)
    with pytest.raises(ConfigError, match=f"no {message} of the last vision layer"):
        VisionZip(tokens_per_frame=3).tokcomp_pre_llm(state)


# ---------------------------------------------------------------------------------------------
# the tiny model


def test_tiny_model_keeps_s_tokens_per_frame_as_planned(tiny, pixels):
    strategy = VisionZip(ratio=0.25)  # 16 tokens per frame -> S = 4: 3 dominant + 1 contextual
    ledger = run_with(tiny, pixels, [strategy]).ledger
    assert ledger.visual_tokens_before_pre_llm == FRAMES * POOLED
    assert ledger.visual_tokens_after_pre_llm == FRAMES * 4
    assert ledger.special_tokens == 1  # the newline still reaches the LLM
    assert ledger.llm_layers == [ledger.text_tokens + FRAMES * 4 + 1] * tiny.info.llm_layers
    planned = plan_ledger(tiny, FRAMES, ledger.text_tokens, [strategy])
    assert planned.visual_tokens_after_pre_llm == ledger.visual_tokens_after_pre_llm
    assert planned.llm_layers == ledger.llm_layers


@dataclass
class Probe(Strategy):
    """Records the pre-LLM state VisionZip will see (same statistics requested)."""

    name = "visionzip_probe"

    def statistics(self, info):
        return {"vision.attention": {info.vision_layers - 1}, "vision.keys": {info.vision_layers - 1}}

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        self.seen = (state.features.clone(), state.scores.clone(), state.keys.clone())


def reference_visionzip(features, scores, keys, dominant, contextual):
    """Straightforward per-frame loops: the outputs and source index of each kept token."""
    out, sources = [], []
    n = features.shape[0] // FRAMES
    for f in range(FRAMES):
        idx = list(range(f * n, (f + 1) * n))
        top = sorted(sorted(idx, key=lambda i: -float(scores[i]))[:dominant])
        rest = [i for i in idx if i not in top]
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        members = {t: [] for t in targets}
        for i in rest:
            if i not in targets:
                members[max(targets, key=lambda t: (float(unit[i] @ unit[t]), -targets.index(t)))].append(i)
        out += [features[i] for i in top]
        out += [features[t] + (torch.stack([features[i] for i in members[t]]).mean(0) if members[t] else 0)
                for t in targets]
        sources += top + targets
    return torch.stack(out), sources


def test_tiny_model_output_matches_a_loop_reference_on_the_adapters_scores_and_keys(tiny, pixels):
    from tokcomp.ledger import TokenLedger
    from tokcomp.pipeline import encode_video
    from tokcomp.stack import CompressionStack

    probe, strategy = Probe(), VisionZip(ratio=0.5)  # S = 8: 6 dominant + 2 contextual (targets 0 and 5 of 10)
    stack = CompressionStack([probe, strategy], run_info(tiny, pixels))
    try:
        with torch.no_grad():
            tokens, specials = encode_video(tiny, pixels, stack, TokenLedger())
    finally:
        stack.close()
    features, scores, keys = probe.seen
    assert keys.shape == (FRAMES * POOLED, 16)  # head_dim 16; content tokens only, no newline row
    expected, sources = reference_visionzip(features, scores, keys, 6, 2)
    assert tokens.source.tolist() == sources
    torch.testing.assert_close(tokens.features, expected)
    # the newline is the framework's: emitted after the video, untouched by the strategy
    torch.testing.assert_close(specials, tiny.model.model.image_newline[None].to(specials.dtype))
