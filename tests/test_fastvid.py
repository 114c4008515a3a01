"""FastVID: DySeg cuts, budget split, anchor frames, DTM merge weights, the final order, and a tiny-model run."""

from __future__ import annotations

import pytest
import torch
from tokcomp.strategies.fastvid import FastVID

from tests.conftest import run_with
from tokcomp.hookspecs import hookimpl
from tokcomp.ops import fastvid as fv
from tokcomp.plan import PlannedTokens, ScheduleUnknown, plan_ledger
from tokcomp.stack import CompressionStack
from tokcomp.state import LLMState, VisualTokens
from tokcomp.strategy import Strategy

FRAMES, POOLED = 8, 16  # tiny model: 8 frames, 4x4 pooled tokens per frame


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=1e-5)

# ---------------------------------------------------------------------------------------------
# DySeg


def test_dyseg_cuts_the_c_minus_one_least_similar_transitions():
    sim = torch.tensor([0.95, 0.93, 0.97, 0.96, 0.99, 0.92])  # none below tau
    assert fv.dyseg_cuts(sim, c=3, tau=0.9).tolist() == [1, 5]
    assert fv.dyseg_cuts(sim, c=1, tau=0.9).tolist() == []


def test_dyseg_also_cuts_every_transition_below_tau():
    sim = torch.tensor([0.95, 0.5, 0.97, 0.85, 0.99, 0.92])
    assert fv.dyseg_cuts(sim, c=2, tau=0.9).tolist() == [1, 3]  # 1: least similar; 3: below tau
    assert fv.dyseg_cuts(sim, c=2, tau=0.4).tolist() == [1]
    assert fv.dyseg_cuts(sim, c=1, tau=0.93).tolist() == [1, 3, 5]


def test_dyseg_with_more_cuts_requested_than_transitions_cuts_them_all():
    assert fv.dyseg_cuts(torch.tensor([0.99, 0.98]), c=8, tau=0.9).tolist() == [0, 1]
    assert fv.dyseg_cuts(torch.zeros(0), c=8, tau=0.9).tolist() == []


def test_segments_from_cuts_are_contiguous_and_tile_the_frames():
    assert fv.segments_from_cuts(torch.tensor([1, 3]), 7) == [(0, 1), (2, 3), (4, 6)]
    assert fv.segments_from_cuts(torch.tensor([], dtype=torch.long), 4) == [(0, 3)]
    assert fv.segments_from_cuts(torch.tensor([0, 1, 2]), 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert fv.segments_from_cuts(torch.tensor([], dtype=torch.long), 1) == [(0, 0)]


def test_dynamic_segments_cut_where_the_global_features_turn():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0], [-1.0, 0.0]])
    assert fv.dynamic_segments(g, c=1, tau=0.9) == [(0, 1), (2, 3), (4, 4)]
    assert fv.dynamic_segments(g, c=2, tau=-1.0) == [(0, 3), (4, 4)]  # cos -0.05 at 3->4 is the lowest


# ---------------------------------------------------------------------------------------------
# budget and anchors


def test_budget_split_at_196_tokens_and_a_quarter_is_30_salient_plus_19_context():
    assert fv.budget(196, 0.25, 0.4) == (49, 30, 19)
    assert fv.budget(196, 0.10, 0.4) == (19, 12, 7)  # int(19.6) = 19, int(7.6) = 7
    assert fv.budget(16, 0.25, 0.4) == (4, 3, 1)  # the tiny model


@pytest.mark.parametrize(
    ("length", "anchors"),
    [(1, [0]), (2, [1]), (3, [2]), (4, [3]), (5, [0, 4]), (6, [1, 5]), (7, [2, 6]), (8, [3, 7]), (9, [0, 4, 8])],
)
def test_anchor_frames_are_every_fourth_frame_counted_back_from_the_last(length, anchors):
    assert fv.anchor_offsets(length, 4) == anchors


def test_context_slots_split_the_segment_budget_evenly_over_anchors():
    assert fv.context_slots(19 * 1, 1) == 19
    assert fv.context_slots(19 * 5, 2) == 47  # 95 // 2
    assert fv.context_slots(19 * 9, 3) == 57
    assert fv.context_slots(1 * 7, 2) == 3


# ---------------------------------------------------------------------------------------------
# DTM merge


def test_merge_weight_is_at_least_beta_for_the_anchor():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    others = torch.tensor([[3.0, 0.0], [5.0, 1.0], [0.0, 4.0]])
    assignment = torch.tensor([0, 0, 1])
    out = fv.weighted_merge(anchors, others, assignment, beta=0.6)
    # anchor 0: w = max(1/3, 0.6) = 0.6 -> 0.6*(1,0) + 0.4*(4,0.5); anchor 1: 0.6*(0,1) + 0.4*(0,4); 2 untouched
    close(out, [[2.2, 0.2], [0.0, 2.2], [-1.0, 0.0]])


def test_merge_weight_is_one_over_count_plus_one_when_that_exceeds_beta():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    others = torch.tensor([[3.0, 0.0], [5.0, 1.0], [0.0, 4.0]])
    out = fv.weighted_merge(anchors, others, torch.tensor([0, 0, 1]), beta=0.2)
    # anchor 0: w = 1/3 -> (1,0)/3 + 2/3*(4,0.5) = (3, 1/3); anchor 1: w = 1/2 -> (0, 2.5)
    close(out, [[3.0, 1 / 3], [0.0, 2.5]])


def test_single_frame_segment_merges_into_the_densest_non_salient_token():
    # salient: 0, 2 (saliency); non-salient 1=(1,0), 3=(5,5), 4=(1.1,0): 4 is the density peak
    feats = torch.tensor([[9.0, 9.0], [1.0, 0.0], [7.0, -7.0], [5.0, 5.0], [1.1, 0.0]])
    saliency = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3])
    kept, out = fv.fastvid_select(feats, [torch.arange(5)], saliency, feats.mean(0, keepdim=True),
                                  ratio=0.6, c=8, tau=0.9, d=0.4, p=4, beta=0.6, k=4)
    assert kept.tolist() == [0, 2, 4]  # keep 3 = 2 salient + 1 context
    # 1 and 3 join 4: w = 0.6 -> 0.6*(1.1,0) + 0.4*mean((1,0),(5,5)) = (1.86, 1.0)
    close(out, [[9.0, 9.0], [7.0, -7.0], [1.86, 1.0]])


def test_multi_frame_segment_merges_every_frames_non_salient_tokens_into_the_anchor_frame():
    # two frames, one segment (c=1, tau=-1): the anchor is frame 1, the last; its 4 context slots
    # (2 per frame) are capped by its 2 non-salient tokens 4, 6; frame 0's non-salient 1, 3 merge in
    feats = torch.tensor([[5.0, 5.0], [3.0, 0.0], [6.0, 5.0], [0.0, 2.0],
                          [1.0, 0.0], [5.0, 6.0], [0.0, 1.0], [4.0, 6.0]])
    saliency = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.1, 0.7, 0.2, 0.6])
    members = [torch.arange(4), torch.arange(4, 8)]
    g = torch.stack([feats[m].mean(0) for m in members])
    kept, out = fv.fastvid_select(feats, members, saliency, g, ratio=1.0, c=1, tau=-1.0, d=0.5, p=4,
                                  beta=0.6, k=4)
    assert kept.tolist() == [0, 2, 4, 5, 6, 7]  # original order: salient and context interleaved
    close(out, [[5.0, 5.0], [6.0, 5.0], [1.8, 0.0], [5.0, 6.0], [0.0, 1.4], [4.0, 6.0]])


# ---------------------------------------------------------------------------------------------
# the strategy


def small_state(frames=2, per_frame=5):
    """Content tokens only: the model's special tokens (LLaVA's newline) never reach a strategy."""
    n = frames * per_frame
    g = torch.Generator().manual_seed(0)
    return VisualTokens(
        features=torch.randn(n, 3, generator=g), frame=torch.arange(frames).repeat_interleave(per_frame),
        row=torch.zeros(n, dtype=torch.long), col=torch.arange(per_frame).repeat(frames),
        source=torch.arange(n), frame_sources=[[f] for f in range(frames)],
        grid=(1, per_frame), saliency=torch.rand(n, generator=g),
    )


def test_strategy_keeps_sources_ascending_and_original_positions():
    state = small_state()
    FastVID(ratio=0.6).tokcomp_pre_llm(state)  # keep 3 of 5 per frame, two single-frame segments
    assert state.original_positions  # the splice takes each kept token's position id from its source
    assert state.num_tokens == 2 * 3
    assert state.source.tolist() == sorted(set(state.source.tolist())) and state.source[-1].item() < 10
    assert state.frame.tolist() == [0] * 3 + [1] * 3


@pytest.mark.parametrize(("name", "value"), [("ratio", 0.0), ("dyseg_c", 0), ("dyseg_tau", 1.5),
                                             ("stprune_d", -0.1), ("dtm_p", 0), ("dtm_beta", 2.0),
                                             ("density_k", 0)])
def test_bad_parameters_are_rejected_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        FastVID(**{name: value})


def test_fastvid_declares_no_plan_but_a_nominal_budget_of_int_p_r_per_frame(tiny):
    with pytest.raises(ScheduleUnknown):
        plan_ledger(tiny, FRAMES, 10, [FastVID()])
    planned = PlannedTokens([196] * 32, (14, 14))
    FastVID(ratio=0.25).nominal_pre_llm(tiny.info, planned)
    assert planned.per_frame == [49] * 32 and planned.total == 49 * 32


def test_fastvid_requests_the_last_vision_layers_saliency(tiny):
    assert CompressionStack([FastVID()], tiny.info).statistics["vision.saliency"] == {tiny.info.vision_layers - 1}


class PositionProbe(Strategy):
    """Records the prompt's position ids as decoder layer 1 sees them."""

    name = "test.position_probe"

    def llm_layers(self, info):
        return {1}

    @hookimpl
    def tokcomp_inner_llm(self, state: LLMState) -> None:
        self.positions, self.visual = state.position_ids[0].tolist(), state.visual_mask.tolist()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # c=8 > 7 transitions: every frame its own segment -> exactly int(16 * 0.25) = 4 per frame
        ({}, FRAMES * 4),
        # one segment of 8 frames, p=3: anchors 1, 4, 7 get 8 // 3 = 2 slots -> 8*3 salient + 6 context
        ({"dyseg_c": 1, "dyseg_tau": -1.0, "dtm_p": 3}, FRAMES * 3 + 6),
    ],
)
def test_tiny_model_run_keeps_the_budget_and_the_text(tiny, pixels, params, expected):
    out = run_with(tiny, pixels, [FastVID(ratio=0.25, **params)])
    ledger = out.ledger
    assert ledger.visual_tokens_before_pre_llm == FRAMES * POOLED
    assert ledger.visual_tokens_after_pre_llm == expected <= FRAMES * 4
    assert ledger.special_tokens == 1  # the newline still reaches the LLM
    assert ledger.llm_layers == [ledger.text_tokens + expected + 1] * tiny.info.llm_layers
    assert len(out.new_ids) == 6


def test_tiny_model_run_keeps_original_positions_with_gaps(tiny, pixels):
    probe = PositionProbe()
    run_with(tiny, pixels, [FastVID(ratio=0.25), probe], max_new_tokens=1)
    start, total = probe.visual.index(True), FRAMES * POOLED
    visual = [p for p, v in zip(probe.positions, probe.visual, strict=True) if v]
    after = probe.positions[start + len(visual):]
    assert probe.positions[:start] == list(range(start))
    assert probe.visual[start:start + len(visual)] == [True] * len(visual) and not any(probe.visual[start + len(visual):])
    assert len(visual) == FRAMES * 4 and visual == sorted(set(visual))
    assert visual[0] >= start and visual[-1] < start + total
    assert visual[-1] - visual[0] + 1 > len(visual)  # gaps
    # the newline (not visual) keeps its position right after the uncompressed video; the text follows it
    assert after == list(range(start + total, start + total + len(after)))
