"""EarlyTom: temporal ops, selection ops and both strategies, on hand-computable cases and the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokcomp.strategies.earlytom import EARLYTOM_STRATEGIES, DecoupledSelect, FrameMerge

from tests.conftest import run_info, run_with
from tokcomp.errors import ConfigError
from tokcomp.ops import temporal, windows
from tokcomp.state import EncoderState, VisualTokens

# ---------------------------------------------------------------------------------------------
# hand-built frames: token p of frame f is a 2-D vector at angle theta_f + phi_p (degrees) with a
# random length, so the token-aligned similarity of frames i, j is exactly cos(theta_i - theta_j)

ANGLES = [0.0, 10.0, 12.0, 30.0, 35.0, 39.0]


def frames_at(angles, tokens=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.tensor([0.0, 100.0, 230.0, 310.0][:tokens])
    rad = torch.deg2rad(torch.tensor(angles, dtype=torch.float64)[:, None] + phi[None, :].double())
    length = torch.rand(len(angles), tokens, 1, generator=g, dtype=torch.float64) + 0.5
    return (torch.stack([rad.cos(), rad.sin()], dim=-1) * length).float()


def cosd(deg):
    return math.cos(math.radians(deg))


def flat(rows):
    """A merge plan as (frame, weight) pairs rounded for comparison, rows separated by None."""
    out = []
    for row in rows:
        out += [None] * bool(out) + [(f, round(w, 9)) for f, w in row]
    return out


def angle_sim(angles):
    return lambda i, j: cosd(angles[j] - angles[i])


def test_frame_similarity_compares_tokens_at_the_same_position_only():
    frames = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]]])
    sim = temporal.FrameSimilarity(frames, width=2)
    assert sim(0, 1) == pytest.approx(1.0)  # same directions at each position, other lengths
    assert sim(0, 2) == pytest.approx(0.0)  # the same directions, swapped between positions


def test_frame_similarity_of_hand_built_frames_is_the_cosine_of_their_angle_difference():
    sim = temporal.FrameSimilarity(frames_at(ANGLES), width=2)
    assert sim(2, 3) == pytest.approx(cosd(18.0), abs=1e-6) and sim(3, 5) == pytest.approx(cosd(9.0), abs=1e-6)
    with pytest.raises(IndexError):
        sim(0, 3)


def test_official_segmentation_compares_with_the_segment_start_and_the_paper_with_the_previous_frame():
    drift = [0.0, 25.0, 50.0, 75.0, 100.0, 125.0]  # every step 25 degrees: neighbours stay similar
    sim = angle_sim(drift)
    assert temporal.segment_official(sim, 6, tau=0.5, alpha=0.9, max_len=6) == [(0, 2), (3, 5)]
    assert temporal.segment_paper(sim, 6, tau=0.5, alpha=0.9) == [(0, 5)]


def test_official_segmentation_caps_segments_at_m_minus_one_frames_and_the_paper_has_no_cap():
    same = lambda i, j: 1.0  # noqa: E731
    assert temporal.segment_official(same, 8, tau=0.5, alpha=0.9, max_len=3) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert temporal.segment_official(same, 8, tau=0.5, alpha=0.9, max_len=6) == [(0, 4), (5, 7)]
    assert temporal.segment_paper(same, 8, tau=0.5, alpha=0.9) == [(0, 7)]


def test_alpha_weights_the_current_similarity_in_the_ema():
    dip = {(0, 1): 1.0, (0, 2): 0.3, (0, 3): 1.0, (2, 3): 1.0}
    sim = lambda i, j: dip[(i, j)]  # noqa: E731
    assert temporal.segment_official(sim, 4, tau=0.5, alpha=0.5, max_len=10) == [(0, 3)]  # 0.65: no split
    assert temporal.segment_official(sim, 4, tau=0.5, alpha=0.9, max_len=10) == [(0, 1), (2, 3)]  # 0.37


def test_official_segmentation_resets_the_ema_at_a_boundary_and_the_paper_does_not():
    sims = {(0, 1): 0.1, (1, 2): 0.45}
    sim = lambda i, j: sims[(i, j)]  # noqa: E731
    assert temporal.segment_official(sim, 3, tau=0.5, alpha=0.9, max_len=6) == [(0, 0), (1, 2)]  # 0.505
    assert temporal.segment_paper(sim, 3, tau=0.5, alpha=0.9) == [(0, 0), (1, 1), (2, 2)]  # 0.424


def test_middle_pairs_merge_only_when_more_similar_than_the_next_pair_as_in_eq2():
    # Algorithm 1's "s_i > tau and s_{i+1} > tau" would merge (1, 2) here
    assert flat(temporal.scan_middle_official([1, 2, 3, 4], [0.6, 0.9, 0.2], tau=0.5)) == [
        (1, 1.0), None, (2, round(0.9 / 1.1, 9)), (3, round(0.2 / 1.1, 9))]
    assert flat(temporal.scan_middle_paper([1, 2, 3], [0.6, 0.9, 0.2], tau=0.5)) == [
        (1, 1.0), None, (2, round(0.9 / 1.1, 9)), (3, round(0.2 / 1.1, 9))]


def test_official_merge_threshold_is_the_similarity_of_head_and_tail_and_the_paper_uses_tau_merge():
    adjacent = {(1, 2): 0.9, (2, 3): 0.5}
    for head_tail, merged in [(0.95, False), (0.3, True)]:
        sims = {**adjacent, (0, 4): head_tail}
        rows = temporal.plan_merge(lambda i, j: sims[(i, j)], [(0, 4)], "official")  # noqa: B023
        assert (len(rows[1]) == 2) is merged
    sims = {**adjacent, (3, 4): 0.1}
    for tau_merge, merged in [(0.95, False), (0.3, True)]:
        rows = temporal.plan_merge(lambda i, j: sims[(i, j)], [(0, 4)], "paper", tau_merge)
        assert (len(rows[1]) == 2) is merged


def test_official_scan_merges_a_locally_best_pair_with_eq3_weights():
    rows = temporal.scan_middle_official([1, 2, 3, 4], [0.9, 0.6, 0.2], tau=0.5)
    assert flat(rows) == [(1, 0.6), (2, 0.4), None, (3, 1.0)]  # frame 4, the last middle frame, is never emitted


def test_official_scan_drops_the_last_middle_frame_even_when_nothing_is_similar():
    assert temporal.scan_middle_official([1, 2, 3, 4], [0.1, 0.1, 0.1], tau=0.5) == [((1, 1.0),), ((2, 1.0),), ((3, 1.0),)]
    assert temporal.scan_middle_official([1], [], tau=0.5) == [((1, 1.0),)]  # a single middle frame survives


def test_official_last_pair_merges_with_weight_one_so_its_second_frame_counts_for_nothing():
    rows = temporal.scan_middle_official([1, 2, 3], [0.1, 0.9], tau=0.5)
    assert rows == [((1, 1.0),), ((2, 1.0), (3, 0.0))]
    assert temporal.plan_sources(rows, [[0], [1], [2], [3]]) == [[1], [2]]


def test_paper_scan_keeps_every_frame_and_never_pairs_with_the_tail():
    # middle frames 1..3; the last similarity is frame 3 with the tail and only serves as s_{i+1}
    assert temporal.scan_middle_paper([1, 2, 3], [0.1, 0.1, 0.1], tau=0.5) == [((1, 1.0),), ((2, 1.0),), ((3, 1.0),)]
    rows = temporal.scan_middle_paper([1, 2, 3], [0.2, 0.9, 0.95], tau=0.5)  # s_2 > tau but s_2 < s_3: no merge
    assert rows == [((1, 1.0),), ((2, 1.0),), ((3, 1.0),)]
    rows = temporal.scan_middle_paper([1, 2, 3], [0.2, 0.9, 0.6], tau=0.5)
    assert flat(rows) == [(1, 1.0), None, (2, 0.6), (3, 0.4)]


def six_frame_state(attention=True):
    hidden = frames_at(ANGLES)
    att = torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) if attention else None
    return EncoderState(layer=0, num_layers=4, hidden=hidden, grid=(0, 0), frame_sources=[[f] for f in range(6)],
                        attention=att)


def test_official_frame_merge_on_six_hand_built_frames():
    """Cap M=6 closes [0..4]; tau_merge = cos 35; (1,2) merges (cos 2 > cos 18); frame 3 is dropped."""
    state = six_frame_state()
    hidden, att = state.hidden.clone(), state.attention.clone()
    FrameMerge(layers=[0]).tokcomp_intra_encoder(state)
    w = cosd(2) / (cosd(2) + cosd(18))
    assert state.frame_sources == [[0], [1, 2], [4], [5]]
    torch.testing.assert_close(state.hidden, torch.stack([hidden[0], w * hidden[1] + (1 - w) * hidden[2], hidden[4], hidden[5]]))
    torch.testing.assert_close(state.attention, torch.stack([att[0], w * att[1] + (1 - w) * att[2], att[4], att[5]]))
    assert state.meta["earlytom.segments"] == [(0, 3)]  # refined on the merged frames: all similar
    assert state.meta["earlytom.input_frames"] == 6 and state.meta["earlytom.score_layer"] == 0


def test_paper_frame_merge_on_the_same_frames_keeps_one_segment_and_drops_nothing():
    state = six_frame_state()
    hidden = state.hidden.clone()
    FrameMerge(layers=[0], variant="paper", tau_merge=0.8).tokcomp_intra_encoder(state)
    w = cosd(2) / (cosd(2) + cosd(18))  # (1,2) merges; (3,4) does not: cos 5 < cos 4 (frame 4 with the tail)
    assert state.frame_sources == [[0], [1, 2], [3], [4], [5]]
    torch.testing.assert_close(state.hidden[1], w * hidden[1] + (1 - w) * hidden[2])
    assert state.meta["earlytom.segments"] == [(0, 4)]


def test_segment_heads_and_tails_are_the_dynamic_frames():
    assert temporal.segment_ends([(0, 3), (4, 4), (5, 6)], 7).tolist() == [True, False, False, True, True, True, True]


def test_segments_tile_the_frames_only_when_contiguous_and_complete():
    assert temporal.tiles([(0, 2), (3, 5)], 6)
    assert not any(temporal.tiles(segs, 6) for segs in ([(0, 1), (3, 5)], [(0, 2), (2, 5)], [(0, 2)], [(1, 5)], []))


def test_without_weighted_merging_merged_frames_are_plain_means_and_drops_stay_drops():
    rows = [((0, 1.0),), ((1, 0.6), (2, 0.4)), ((3, 1.0), (4, 0.0))]
    assert temporal.equal_weights(rows) == [((0, 1.0),), ((1, 0.5), (2, 0.5)), ((3, 1.0),)]
    x = torch.randn(5, 3)
    torch.testing.assert_close(temporal.apply_plan(x, temporal.equal_weights(rows))[1], (x[1] + x[2]) / 2)


def test_apply_plan_copies_kept_frames_bit_exactly():
    x = torch.randn(3, 5, 4, dtype=torch.bfloat16)
    out = temporal.apply_plan(x, [((0, 1.0),), ((1, 0.25), (2, 0.75)), ((2, 1.0), (0, 0.0))])
    assert out.dtype == torch.bfloat16 and torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert torch.equal(out[1], (0.25 * x[1].float() + 0.75 * x[2].float()).bfloat16())


# ---------------------------------------------------------------------------------------------
# selection ops


def test_rescaled_ratio_compensates_for_merged_frames_and_caps_at_one():
    assert windows.rescaled_ratio(0.2, 32, 16) == pytest.approx(0.4)
    assert windows.rescaled_ratio(0.25, 8, 8) == 0.25
    assert windows.rescaled_ratio(0.2, 32, 4) == 1.0


def test_dynamic_frames_round_up_and_static_frames_round_to_nearest():
    assert windows.topk_count(196, 0.2) == 40 and windows.window_count(196, 0.2) == 39
    assert windows.window_count(196, 0.001) == 1 and windows.topk_count(16, 1.0) == 16


def test_window_sizes_put_the_remainder_in_the_first_windows():
    assert windows.split_sizes(10, 3) == [4, 3, 3] and windows.split_sizes(196, 39) == [6] + [5] * 38


def test_raster_window_argmax_takes_the_first_maximum_of_each_window_in_spatial_order():
    scores = torch.tensor([[0.0, 5, 1, 5, 9, 3, 3, 1, 0, 4], [1.0, 0, 0, 0, 0, 0, 2, 0, 0, 3]])
    assert windows.raster_window_argmax(scores, 3).tolist() == [[1, 4, 9], [0, 6, 9]]  # [0..3] [4..6] [7..9]
    assert windows.labelled_window_argmax(scores, torch.tensor([0] * 4 + [1] * 3 + [2] * 3)).tolist() == [
        [1, 4, 9], [0, 6, 9]]


def test_square_windows_tile_the_grid_in_blocks():
    ids = windows.square_windows(4, 4, 4)
    assert ids.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert int(windows.square_windows(14, 14, 20).max()) + 1 == 20
    scores = torch.zeros(1, 16)
    scores[0, [5, 2, 9, 15]] = 1.0  # one peak per block, listed out of raster order
    assert windows.labelled_window_argmax(scores, ids).tolist() == [[2, 5, 9, 15]]


def test_random_positions_are_distinct_ascending_and_seeded():
    a = windows.random_positions(3, 16, 5, torch.Generator().manual_seed(0))
    b = windows.random_positions(3, 16, 5, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and all(torch.unique(r).numel() == 5 for r in a)
    assert torch.equal(a, torch.sort(a, dim=-1).values)


# ---------------------------------------------------------------------------------------------
# decoupled selection on a hand-built 4-frame, 4x4 grid


def grid_tokens(frames=4, side=4, scores=None, features=None, meta=None):
    """Content tokens only: the model's special tokens (LLaVA's newline) never reach a strategy."""
    per = side * side
    n = frames * per
    cells = torch.arange(per).repeat(frames)
    return VisualTokens(
        features=features if features is not None else torch.randn(n, 3),
        frame=torch.arange(frames).repeat_interleave(per), row=cells // side, col=cells % side,
        source=torch.arange(n), frame_sources=[[f] for f in range(frames)],
        grid=(side, side), scores=scores, meta=meta if meta is not None else {},
    )


def hand_scores():
    """Frame f's score at position p: p for even frames, 15 - p for odd ones, except a few peaks."""
    s = torch.stack([torch.arange(16.0) if f % 2 == 0 else 15 - torch.arange(16.0) for f in range(4)])
    s[1, 7] = 50.0  # static frame 1: a peak that wins the window it falls in
    return s.flatten()


def select(state, **params):
    strategy = DecoupledSelect(**params)
    strategy.start(0)
    strategy.tokcomp_pre_llm(state)
    return state


def kept_by_frame(state):
    return [(state.source[state.frame == f] % 16).tolist() for f in range(state.num_frames)]


def test_head_and_tail_frames_keep_top_k_and_middle_frames_keep_raster_window_argmax():
    state = select(grid_tokens(scores=hand_scores(), meta={"earlytom.segments": [(0, 2), (3, 3)]}),
                   ratio=0.25, base_frames=4)
    assert kept_by_frame(state) == [[12, 13, 14, 15], [0, 7, 8, 12], [12, 13, 14, 15], [0, 1, 2, 3]]
    assert state.num_tokens == 16
    assert state.frame.tolist() == sorted(state.frame.tolist())  # temporal order


def test_square_windows_pick_the_argmax_of_each_two_by_two_block():
    state = select(grid_tokens(scores=hand_scores(), meta={"earlytom.segments": [(0, 2), (3, 3)]}),
                   ratio=0.25, base_frames=4, window="square")
    assert kept_by_frame(state)[1] == [0, 7, 8, 10]  # blocks {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}


def test_topk_sampling_ranks_the_middle_frames_too():
    state = select(grid_tokens(scores=hand_scores(), meta={"earlytom.segments": [(0, 2), (3, 3)]}),
                   ratio=0.25, base_frames=4, sampling="topk")
    assert kept_by_frame(state)[1] == [0, 1, 2, 7]


def test_random_sampling_needs_no_scores_and_keeps_the_same_counts():
    state = select(grid_tokens(meta={"earlytom.segments": [(0, 2), (3, 3)]}), ratio=0.25, base_frames=4,
                   sampling="random", seed=1)
    assert [len(k) for k in kept_by_frame(state)] == [4, 4, 4, 4]


def test_input_frame_count_from_stage_one_rescales_the_ratio():
    meta = {"earlytom.segments": [(0, 2), (3, 3)], "earlytom.input_frames": 8}  # 8 frames became 4: r_hat = 0.5
    state = select(grid_tokens(scores=hand_scores(), meta=meta), ratio=0.25)
    assert [len(k) for k in kept_by_frame(state)] == [8, 8, 8, 8]
    assert kept_by_frame(state)[1] == [0, 2, 4, 7, 8, 10, 12, 14]  # windows of two: the first of each but the peak's


def test_without_stage_one_the_pooled_features_are_segmented_by_the_official_rule():
    feats = torch.ones(4 * 16, 2)
    feats[48:64] = torch.tensor([1.0, -1.0])  # frame 3 orthogonal to frames 0..2: segments [0..2], [3]
    state = select(grid_tokens(scores=hand_scores(), features=feats), ratio=0.25, base_frames=4)
    assert kept_by_frame(state)[1] == [0, 7, 8, 12]  # frame 1 is a middle (static) frame


def test_segments_that_do_not_tile_the_frames_are_rejected():
    from tokcomp.state import StrategyContractError

    with pytest.raises(StrategyContractError, match="do not tile"):
        select(grid_tokens(scores=hand_scores(), meta={"earlytom.segments": [(0, 1), (3, 3)]}), ratio=0.25)


# ---------------------------------------------------------------------------------------------
# the tiny model: 4 vision layers, 8x8 grid pooled to 4x4, 8 frames

FRAMES, POOLED = 8, 16


def test_frame_counts_fall_at_every_merge_layer_and_the_visual_token_budget_holds(tiny, pixels):
    from tokcomp.ledger import TokenLedger
    from tokcomp.pipeline import encode_video
    from tokcomp.stack import CompressionStack

    merge = FrameMerge(layers=[1, 2, 3], tau_seg=0.0)  # boundaries from the cap M=6 only: a fixed schedule
    ratio = 0.25
    out = run_with(tiny, pixels, [merge, DecoupledSelect(ratio=ratio)])
    frames = [e.frames for e in out.ledger.vision_layers] + [out.ledger.vision_out_frames]
    assert frames[:2] == [FRAMES, FRAMES] and frames[1] > frames[2] > frames[3] > frames[4]
    with torch.no_grad():
        stack = CompressionStack([merge, DecoupledSelect(ratio=ratio)], run_info(tiny, pixels))
        tokens, specials = encode_video(tiny, pixels, stack, TokenLedger())
    n, r_hat = frames[-1], windows.rescaled_ratio(ratio, FRAMES, frames[-1])
    dynamic = len({f for seg in tokens.meta["earlytom.segments"] for f in seg})
    expected = dynamic * math.ceil(POOLED * r_hat) + (n - dynamic) * round(POOLED * r_hat)
    assert out.ledger.visual_tokens_after_pre_llm == tokens.num_tokens == expected
    assert out.ledger.special_tokens == specials.shape[0] == 1  # the newline is the framework's, kept
    assert abs(expected - ratio * FRAMES * POOLED) <= n
    assert out.ledger.text_tokens == run_with(tiny, pixels, []).ledger.text_tokens
    assert len(out.new_ids) == 6


def test_scores_are_the_last_merge_layers_attention_merged_with_the_frames(tiny, pixels):
    """Layer 2 is the last merge layer: its received attention, merged and pooled, is the only statistic."""
    from tokcomp.ledger import TokenLedger
    from tokcomp.ops.pooling import bilinear_halve
    from tokcomp.pipeline import encode_video, vision_statistics
    from tokcomp.stack import CompressionStack

    merge = FrameMerge(layers=[1, 2], tau_seg=0.0)
    ledger = TokenLedger()
    with torch.no_grad():
        tokens, _ = encode_video(tiny, pixels, CompressionStack([merge], run_info(tiny, pixels)), ledger)
        vision = tiny.vision
        h = vision.embeddings(pixels.pixels)
        for i, layer in enumerate(vision.encoder.layers[:3]):
            if i == 2:
                state = EncoderState(layer=1, num_layers=4, hidden=h, grid=pixels.grid,
                                     frame_sources=[[f] for f in range(h.shape[0])])
                att = vision_statistics(tiny, 2, state, {"attention"}, pixels)["attention"]
            h = layer(h, None)
            if i in (1, 2):
                rows = temporal.merge_plan(h, "official", 0.0, 0.9, 6)
                h = temporal.apply_plan(h, rows)
        att = temporal.apply_plan(att, rows)
    side = tiny.info.vision_grid[0]
    expected = bilinear_halve(att.view(att.shape[0], side, side, 1)).reshape(-1)
    torch.testing.assert_close(tokens.scores, expected)
    assert [s["layer"] for s in ledger.attention_stats] == [2]


def test_stage_two_alone_segments_itself_and_keeps_the_ratio(tiny, pixels):
    out = run_with(tiny, pixels, [DecoupledSelect(ratio=0.25, score_layer=-1)])
    assert out.ledger.vision_out_frames == FRAMES
    assert out.ledger.visual_tokens_after_pre_llm == FRAMES * POOLED // 4
    assert out.ledger.special_tokens == 1
    assert [s["layer"] for s in out.ledger.attention_stats if s["where"] == "vision"] == [3]


def test_stage_two_alone_without_a_score_layer_says_how_to_get_scores(tiny, pixels):
    with pytest.raises(ConfigError, match="score_layer"):
        run_with(tiny, pixels, [DecoupledSelect(ratio=0.25)])


def test_a_score_layer_below_the_last_merge_layer_is_an_error_not_a_silent_substitution(tiny, pixels):
    with pytest.raises(ConfigError, match="score_layer=1"):
        run_with(tiny, pixels, [FrameMerge(layers=[2, 3]), DecoupledSelect(score_layer=1)])


def test_paper_variant_runs_end_to_end(tiny, pixels):
    out = run_with(tiny, pixels, [FrameMerge(layers=[1, 3], variant="paper"), DecoupledSelect(ratio=0.5)])
    assert out.ledger.vision_out_frames <= FRAMES and len(out.new_ids) == 6


@pytest.mark.parametrize(("cls", "params", "bad"), [
    (FrameMerge, {"tau_seg": 1.5}, "tau_seg=1.5"),
    (FrameMerge, {"alpha": 0.0}, "alpha=0.0"),
    (FrameMerge, {"M": 1}, "M=1"),
    (FrameMerge, {"tau_merge": 0.7}, "tau_merge=0.7"),
    (FrameMerge, {"variant": "paper", "tau_merge": -0.1}, "tau_merge=-0.1"),
    (DecoupledSelect, {"ratio": 0}, "ratio=0"),
    (DecoupledSelect, {"ratio": 0.2, "tau_seg": -0.5}, "tau_seg=-0.5"),
    (DecoupledSelect, {"base_frames": 0}, "base_frames=0"),
    (DecoupledSelect, {"sampling": "best"}, "'best'"),
])
def test_bad_parameters_are_config_errors_naming_the_value(cls, params, bad):
    with pytest.raises(ConfigError, match=bad):
        cls.from_params(params)


@pytest.mark.parametrize(("strategy", "bad"), [
    (FrameMerge(layers=[1, 4]), "layers=4"),
    (FrameMerge(layers=[-1, 2]), "layers=-1"),
    (FrameMerge(layers=[2, 1]), r"layers=\[2, 1\]"),
    (FrameMerge(layers=[]), r"layers=\[\]"),
    (DecoupledSelect(score_layer=4), "score_layer=4"),
])
def test_layers_outside_the_model_are_config_errors_naming_the_value(tiny, strategy, bad):
    with pytest.raises(ConfigError, match=bad):
        strategy.check(tiny.info)


def test_both_strategies_are_exported_for_registration_with_their_hook_points():
    assert [(c.name, c.hook_points()) for c in EARLYTOM_STRATEGIES] == [
        ("earlytom.frame_merge", ["intra_encoder"]), ("earlytom.decoupled_select", ["pre_llm"])]


# ---------------------------------------------------------------------------------------------
# the shipped experiments

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TABLE8_05B = {  # paper Table 8, LLaVA-OneVision-0.5B: (tau_seg, first merge layer) per benchmark, per ratio
    25: {"mvbench": (0.8, 8), "egoschema": (0.7, 10), "longvideobench": (0.8, 6), "videomme": (0.6, 8)},
    20: {"mvbench": (0.8, 8), "egoschema": (0.6, 10), "longvideobench": (0.6, 10), "videomme": (0.5, 8)},
    15: {"mvbench": (0.8, 8), "egoschema": (0.5, 10), "longvideobench": (0.5, 10), "videomme": (0.4, 8)},
    10: {"mvbench": (0.65, 8), "egoschema": (0.3, 10), "longvideobench": (0.3, 10), "videomme": (0.3, 8)},
}


def experiment_strategies(name, tmp_path):
    """Strategies of a shipped experiment, checked against its model (EarlyTom registered if it is not yet)."""
    from tests.conftest import model_spec
    from tokcomp.config import load_experiment
    from tokcomp.errors import UnknownNameError
    from tokcomp.plugins import Plugins
    from tokcomp.runner import build_strategies

    plugins = Plugins()
    try:
        plugins.strategy("earlytom.frame_merge")
    except UnknownNameError:
        plugin = tmp_path / "earlytom_plugin.py"
        plugin.write_text("from tokcomp.hookspecs import hookimpl\n"
                          "from tokcomp.strategies.earlytom import EARLYTOM_STRATEGIES\n\n\n"
                          "@hookimpl\ndef tokcomp_register_strategies(register):\n"
                          "    for cls in EARLYTOM_STRATEGIES:\n        register(cls)\n")
        plugins = Plugins([plugin])
    cfg = load_experiment(EXPERIMENTS / f"{name}.yaml")
    built = build_strategies(plugins, cfg)
    info = plugins.model(cfg.model.preset).describe(model_spec(dtype=cfg.model.dtype)).info
    for strategies in built.values():
        for strategy in strategies:
            strategy.check(info)
    return built


@pytest.mark.parametrize("name", ["earlytom", "earlytom_table8", "ablation_stages"])
def test_shipped_experiments_build_and_fit_their_model(name, tmp_path):
    assert experiment_strategies(name, tmp_path)


def test_table8_experiment_has_one_configuration_per_cell_of_the_05b_table(tmp_path):
    built = experiment_strategies("earlytom_table8", tmp_path)
    cells = {}
    for conf, strategies in built.items():
        if strategies:
            merge, select, inner = strategies
            cells[conf] = (merge.tau_seg, list(merge.layers), select.ratio, inner.name)
    assert cells == {f"{bench}_{ratio}": (tau, [first, 21, 23], ratio / 100, "holitom.inner_merge")
                     for ratio, row in TABLE8_05B.items() for bench, (tau, first) in row.items()}


def test_ablation_experiment_isolates_each_stage(tmp_path):
    built = experiment_strategies("ablation_stages", tmp_path)
    names = {conf: [s.name for s in strategies] for conf, strategies in built.items()}
    assert list(names)[0] == "neither" and names["neither"] == []
    assert names["stage1_only"] == ["earlytom.frame_merge"] and names["stage2_only"] == ["earlytom.decoupled_select"]
    assert {built[c][-1].sampling for c in ("both", "sampling_random", "sampling_topk")} == {"decoupled", "random", "topk"}


@pytest.mark.parametrize("window", ["raster", "square"])
def test_cpu_offload_of_static_frames_selects_the_same_tokens(tiny, pixels, window):
    stage1 = dict(layers=(1, 2), tau_seg=0.5)
    plain = run_with(tiny, pixels, [FrameMerge(**stage1), DecoupledSelect(ratio=0.25, window=window)], max_new_tokens=2)
    offload = run_with(tiny, pixels, [FrameMerge(**stage1), DecoupledSelect(ratio=0.25, window=window,
                                                                            offload_static=True)], max_new_tokens=2)
    assert offload.ledger.to_dict() == plain.ledger.to_dict()
    assert torch.equal(offload.prefill_logits, plain.prefill_logits)
