"""HoliTom's outer-LLM stage: the static-window DP and its math on hand-checkable cases, the strategy on
hand-built tokens, and the tiny model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tokcomp.strategies.holitom import HOLITOM_STRATEGIES, WINDOWS, InnerMerge, OuterMerge
from tokcomp.strategies.subsample import TopK

from tests.conftest import run_with
from tokcomp.errors import ConfigError
from tokcomp.ops import static_windows as sw
from tokcomp.plan import PlannedTokens
from tokcomp.stack import CompressionStack
from tokcomp.state import VisualTokens
from tokcomp.strategy import ModelInfo

HI, LO = 0.9, 0.5  # similarities above / below tau = 0.8
TAU = 0.8

# the hand example: 5 frames, 3 positions; rows are the 4 consecutive pairs. T = above tau.
#   position 0: T T F T   position 1: F T T T   position 2: T T T T
# (position 1's first pair sits exactly at tau, which is not above it)
HAND_SIM = torch.tensor([
    [HI, TAU, HI],
    [HI, HI, HI],
    [LO, HI, HI],
    [HI, HI, HI],
])
# counts[e, s]: positions static in every pair of frames s..e, written out by hand
HAND_COUNTS = [
    [0, 0, 0, 0, 0],
    [2, 0, 0, 0, 0],
    [2, 3, 0, 0, 0],
    [1, 2, 2, 0, 0],
    [1, 2, 2, 3, 0],
]


# ---------------------------------------------------------------------------------------------
# ops


def test_consecutive_similarity_is_the_cosine_of_each_position_between_neighbouring_frames():
    frames = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0]],
        [[2.0, 0.0], [1.0, 1.0]],
        [[0.0, 3.0], [1.0, 1.0]],
    ])
    sim = sw.consecutive_similarity(frames)
    assert sim.shape == (2, 2)
    assert sim.flatten().tolist() == pytest.approx([1.0, 1 / math.sqrt(2), 0.0, 1.0], abs=1e-6)


def test_run_lengths_count_the_above_tau_pairs_ending_at_each_row():
    run = sw.static_run_lengths(HAND_SIM > TAU)
    assert run.T.tolist() == [[1, 2, 0, 1], [0, 1, 2, 3], [1, 2, 3, 4]]


def test_window_static_counts_match_the_hand_table_and_a_similarity_at_tau_is_not_static():
    counts = sw.window_static_counts(sw.static_run_lengths(HAND_SIM > TAU))
    assert counts.tolist() == HAND_COUNTS


def test_gain_is_the_static_count_times_the_window_length_minus_one():
    gains = sw.window_gains(sw.static_run_lengths(HAND_SIM > TAU))
    assert gains[4, 1] == 2 * 3  # frames 1..4: positions 1 and 2 stay above tau in pairs 1, 2, 3
    assert gains[2, 0] == 2 * 2  # frames 0..2: positions 0 and 2
    assert gains[3, 0] == 1 * 3  # frames 0..3: position 2 only
    assert torch.diagonal(gains).tolist() == [0] * 5  # one frame saves nothing


def test_dp_finds_the_hand_optimum():
    windows, total, _ = sw.static_windows(HAND_SIM, TAU, 1024)
    # by hand: [0..2] + [3..4] = 4 + 3 = 7 beats e.g. [0] + [1..4] = 6 and [0..4] = 4
    assert (windows, total) == ([(0, 2), (3, 4)], 7)


def brute_force_gain(sim: list[list[float]], tau: float, s: int, e: int) -> int:
    positions = len(sim[0]) if sim else 0
    static = sum(all(sim[j][p] > tau for j in range(s, e)) for p in range(positions))
    return static * (e - s)


def all_partitions(frames: int, max_window: int):
    for cuts in itertools.product([False, True], repeat=frames - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [frames]
        windows = [(a, b - 1) for a, b in itertools.pairwise(bounds)]
        if all(e - s + 1 <= max_window for s, e in windows):
            yield windows


HAND_SIMS_6 = {
    "one static stretch": [[HI, HI], [HI, HI], [LO, LO], [HI, LO], [HI, LO]],
    "overlapping stretches": [[HI, LO, HI], [HI, HI, HI], [LO, HI, HI], [HI, HI, LO], [HI, LO, LO]],
    "nothing static": [[LO, LO], [LO, LO], [LO, LO], [LO, LO], [LO, LO]],
    "everything static": [[HI, HI], [HI, HI], [HI, HI], [HI, HI], [HI, HI]],
    "alternating": [[HI, LO, HI, LO], [LO, HI, LO, HI], [HI, LO, HI, LO], [LO, HI, LO, HI], [HI, HI, HI, HI]],
}


@pytest.mark.parametrize("max_window", [1, 2, 3, 6])
@pytest.mark.parametrize("case", [*HAND_SIMS_6, "random 0", "random 1", "random 2", "random 3"])
def test_dp_matches_brute_force_over_all_partitions_of_six_frames(case, max_window):
    if case.startswith("random"):
        g = torch.Generator().manual_seed(int(case.split()[1]))
        sim = (torch.rand(5, 7, generator=g) > 0.35).float() * 0.4 + 0.5  # HI or LO at random
        sim = sim.tolist()
    else:
        sim = HAND_SIMS_6[case]
    best = max(sum(brute_force_gain(sim, TAU, s, e) for s, e in p) for p in all_partitions(6, max_window))
    windows, total, _ = sw.static_windows(torch.tensor(sim), TAU, max_window)
    assert total == best
    assert [s for s, _ in windows] == [0] + [e + 1 for _, e in windows[:-1]] and windows[-1][1] == 5  # a tiling
    assert all(e - s + 1 <= max_window for s, e in windows)
    assert sum(brute_force_gain(sim, TAU, s, e) for s, e in windows) == total


def official_order_dp(sim: list[list[float]], tau: float, max_window: int) -> list[tuple[int, int]]:
    """The DP in HoliTom's order: at each end frame e the one-frame window first, then lengths 2, 3, ...,
    a longer window replacing the best only when strictly better; traced back from the last frame."""
    frames = len(sim) + 1
    best, start = [0] * (frames + 1), [0] * frames
    for e in range(frames):
        best[e + 1], start[e] = best[e], e
        for length in range(2, min(e + 1, max_window) + 1):
            s = e - length + 1
            value = best[s] + brute_force_gain(sim, tau, s, e)
            if value > best[e + 1]:
                best[e + 1], start[e] = value, s
    windows, e = [], frames - 1
    while e >= 0:
        windows.append((start[e], e))
        e = start[e] - 1
    return windows[::-1]


def test_dp_ties_go_to_the_shortest_last_window_as_the_official_strict_comparison_keeps_it():
    # 3 frames, 2 positions: both static in pair 0, only position 0 in pair 1.
    # [0..2] keeps position 0 once: saves 1 * 2 = 2; [0..1] + [2] keeps both once: saves 2 * 1 = 2.
    # Equal totals: the official loop meets the one-frame window [2] first and keeps it.
    tie = torch.tensor([[HI, HI], [HI, LO]])
    assert sw.static_windows(tie, TAU, 1024)[:2] == ([(0, 1), (2, 2)], 2)
    nothing = torch.full((5, 2), LO)  # every window saves 0: one-frame windows throughout
    assert sw.static_windows(nothing, TAU, 1024)[:2] == ([(t, t) for t in range(6)], 0)
    everything = torch.full((4, 1), HI)  # 5 frames, windows of at most 2: three optima worth 2
    assert sw.static_windows(everything, TAU, 2)[:2] == ([(0, 1), (2, 3), (4, 4)], 2)


@pytest.mark.parametrize("seed", range(40))
def test_dp_windows_match_the_official_order_loop_ties_included(seed):
    g = torch.Generator().manual_seed(seed)
    frames, positions = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    sim = ((torch.rand(frames - 1, positions, generator=g) > 0.4).float() * 0.4 + 0.5).tolist()
    for max_window in (2, 3, 1024):
        assert sw.static_windows(torch.tensor(sim).reshape(frames - 1, positions), TAU, max_window)[0] == \
            official_order_dp(sim, TAU, max_window)


def test_a_single_frame_is_one_window_with_nothing_static():
    windows, total, run = sw.static_windows(torch.zeros(0, 4), TAU, 1024)
    assert (windows, total) == ([(0, 0)], 0)
    assert sw.static_masks(run, windows).tolist() == [[False] * 4]


def test_static_masks_are_the_positions_above_tau_in_every_pair_of_the_window():
    run = sw.static_run_lengths(HAND_SIM > TAU)
    masks = sw.static_masks(run, [(0, 2), (3, 4)])
    assert masks.tolist() == [[True, False, True], [True, True, True]]
    assert sw.static_masks(run, [(0, 0), (1, 4)]).tolist() == [[False, False, False], [False, True, True]]


def test_ratio_is_rescaled_by_the_fraction_left_after_static_reduction():
    assert sw.retained_ratio(0.1, 100, 50) == pytest.approx(0.2)
    assert sw.retained_ratio(0.1, 6272, 0) == pytest.approx(0.1)
    assert sw.retained_ratio(0.5, 100, 60) == 1.0  # 1.25, capped


def test_dynamic_counts_round_up_and_static_counts_round_to_even_with_at_least_one():
    assert sw.dynamic_keep_count(196, 0.1) == 20  # ceil(19.6)
    assert sw.dynamic_keep_count(5, 0.3) == 2  # ceil(1.5)
    assert sw.dynamic_keep_count(0, 0.5) == 0
    assert sw.static_cluster_count(5, 0.5) == 2  # round(2.5) = 2
    assert sw.static_cluster_count(7, 0.5) == 4  # round(3.5) = 4
    assert sw.static_cluster_count(3, 0.1) == 1  # round(0.3) = 0, but a window keeps one
    assert sw.static_cluster_count(0, 0.5) == 0


def test_beta_merge_is_beta_centre_plus_one_minus_beta_mean_of_the_non_centre_members():
    x = torch.tensor([[0.0], [1.0], [4.0]])
    # tokens 0, 1, 4, centre 0, beta 0.6: 0.6 * 0 + 0.4 * (1 + 4) / 2 = 1.0 (the centre-included mean gave 0.667)
    assert sw.beta_merge(x, torch.tensor([0]), torch.tensor([0, 0, 0]), 0.6).item() == pytest.approx(1.0)
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [10.0, 10.0]])
    merged = sw.beta_merge(x, torch.tensor([0, 3]), torch.tensor([0, 0, 0, 1]), 0.6)
    # cluster 0 = centre 0 with members 1, 2: 0.6 * (0, 0) + 0.4 * (3, 0); cluster 1 = centre 3 alone: itself
    assert merged.flatten().tolist() == pytest.approx([1.2, 0.0, 10.0, 10.0])
    assert sw.beta_merge(x, torch.tensor([1]), torch.zeros(4, dtype=torch.long), 1.0).tolist() == [[2.0, 0.0]]


def test_a_centre_no_other_token_joined_is_kept_as_it_is_not_scaled_by_beta():
    x = torch.tensor([[3.0, -1.0], [5.0, 5.0]])
    merged = sw.beta_merge(x, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.6)
    assert merged.tolist() == [[3.0, -1.0], [5.0, 5.0]]  # not 0.6 * centre (no members to average)


def test_static_neighbours_are_min_of_k_and_the_cluster_count():
    assert sw.static_neighbours(7, 2) == 2
    assert sw.static_neighbours(7, 13) == 7
    assert sw.static_neighbours(20, 13) == 13  # the cluster count, not the 16 tokens clustered
    assert sw.static_neighbours(7, 0) == 1


def test_topk_rank_mask_keeps_the_best_eligible_positions_per_row():
    scores = torch.tensor([[5.0, 1.0, 9.0, 4.0], [1.0, 1.0, 1.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    eligible = torch.tensor([[True, True, False, True], [True] * 4, [False] * 4])
    keep = sw.topk_rank_mask(scores, eligible, torch.tensor([2, 2, 0]))
    assert keep.tolist() == [[True, False, False, True], [True, True, False, False], [False] * 4]


# ---------------------------------------------------------------------------------------------
# the strategy on hand-built tokens


def hand_tokens(features: torch.Tensor, scores: torch.Tensor, width: int) -> VisualTokens:
    """Tokens of T frames with P = h * width positions each, raster order (no special tokens: the
    framework keeps LLaVA's newline, a strategy never sees it)."""
    frames, positions, dim = features.shape
    n = frames * positions
    cells = torch.arange(positions).repeat(frames)
    return VisualTokens(
        features=features.reshape(-1, dim), frame=torch.arange(frames).repeat_interleave(positions),
        row=cells // width, col=cells % width, source=torch.arange(n),
        frame_sources=[[t] for t in range(frames)], grid=(positions // width, width),
        scores=scores.reshape(-1),
    )


def three_frames() -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 grid: positions 0 and 1 keep their direction over 3 frames (static), 2 and 3 turn by 90
    degrees every frame (dynamic). Scores favour position 2 in frames 0 and 2, position 3 in frame 1."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features = torch.stack([
        torch.stack([1 * e0, 1 * e1, e0, e1]),
        torch.stack([2 * e0, 2 * e1, e1, e0]),
        torch.stack([3 * e0, 3 * e1, e0, e1]),
    ])
    scores = torch.tensor([[0.1, 0.1, 0.9, 0.2], [0.3, 0.1, 0.2, 0.9], [0.5, 0.1, 0.9, 0.2]])
    return features, scores


def test_static_positions_are_averaged_over_the_window_and_output_order_is_static_then_dynamic():
    features, scores = three_frames()
    tokens = hand_tokens(features, scores, width=2)
    tokens.group = torch.arange(12) * 10  # another strategy's per-token labels: follow the geometry
    OuterMerge(ratio=1.0).tokcomp_pre_llm(tokens)  # r' = 1: every static position its own cluster
    assert tokens.meta[WINDOWS] == [(0, 2)]
    assert tokens.features.tolist() == [
        [2.0, 0.0], [0.0, 2.0],  # static positions 0 and 1 averaged over the three frames
        [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0],  # dynamic, frame by frame
    ]
    assert tokens.source.tolist() == [0, 1, 2, 3, 6, 7, 10, 11]
    assert tokens.frame.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert tokens.row.tolist()[:2] == [0, 0] and tokens.col.tolist()[:2] == [0, 1]
    assert tokens.scores[:2].tolist() == pytest.approx([0.3, 0.1])  # the static attention: averaged over time
    assert tokens.group.tolist() == [10 * s for s in tokens.source.tolist()]


def test_merged_static_token_is_beta_centre_plus_one_minus_beta_cluster_mean_and_dynamic_is_top_by_attention():
    features, scores = three_frames()
    tokens = hand_tokens(features, scores, width=2)
    # 4 of 12 tokens are saved by the static window, so r' = (1/3) / (8/12) = 0.5: one static
    # cluster (round(2 * 0.5)) and ceil(2 * 0.5) = 1 dynamic token per frame
    OuterMerge(ratio=1 / 3, beta=0.6).tokcomp_pre_llm(tokens)
    assert tokens.num_tokens == 1 + 3
    # one cluster: k = min(7, 1) = 1, equal densities, the lower position is the centre; averaged
    # (2, 0) and (0, 2): 0.6 * centre + 0.4 * the other member
    assert tokens.features[0].tolist() == pytest.approx([0.6 * 2, 0.4 * 2])
    assert tokens.source.tolist() == [0, 2, 7, 10]  # centre, then position 2 / 3 / 2 by attention


def six_static_points() -> torch.Tensor:
    """(2, 6, 2): six positions static over two frames at (v, 1), v = 0, .1, .2, .3 (a loose row)
    and 1, 1.05 (a tight pair)."""
    v = torch.tensor([0.0, 0.1, 0.2, 0.3, 1.0, 1.05])
    return torch.stack([v, torch.ones(6)], dim=-1)[None].expand(2, -1, -1).clone()


def test_static_clustering_uses_min_of_k_and_the_cluster_count_neighbours():
    from tokcomp.ops.cluster import dpc_knn_cluster

    tokens = hand_tokens(six_static_points(), torch.rand(2, 6), width=3)
    # one window saves 6 of 12 tokens: r' = (1/6) / (6/12) = 1/3, C = round(6 / 3) = 2, k = min(7, 2) = 2.
    # With 2 neighbours (itself and its nearest) the tight pair is densest: position 4 (ties: lower
    # index) gets the largest delta, then position 0, the densest of the row, 1.0 away from it.
    # With 7 (all six) neighbours the middle of the row is densest and positions 3 and 4 would win.
    assert dpc_knn_cluster(six_static_points()[0], 2, 7, centre_order="index")[0].tolist() == [3, 4]
    OuterMerge(ratio=1 / 6, k=7).tokcomp_pre_llm(tokens)
    assert tokens.meta[WINDOWS] == [(0, 1)]
    assert tokens.source.tolist() == [0, 4]
    # 0.6 * (0, 1) + 0.4 * mean of (.1, 1), (.2, 1), (.3, 1); 0.6 * (1, 1) + 0.4 * (1.05, 1)
    assert tokens.features.flatten().tolist() == pytest.approx([0.08, 1.0, 1.02, 1.0])


def test_outer_merge_passes_min_of_k_and_the_cluster_count_to_the_clustering(monkeypatch):
    import tokcomp.strategies.holitom as holitom

    seen = []

    def spy(x, n_clusters, k, centre_order="score"):
        seen.append((x.shape[0], n_clusters, k, centre_order))
        return real(x, n_clusters, k, centre_order)

    real = holitom.dpc_knn_cluster
    monkeypatch.setattr(holitom, "dpc_knn_cluster", spy)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 16, 8, generator=g) * torch.linspace(0.2, 3.0, 16)[None, :, None]
    features = base.expand(4, -1, -1).clone()  # 16 static positions, r' = 0.8: 13 clusters
    for k, expected in ((7, 7), (20, 13)):
        OuterMerge(ratio=0.2, tau=0.5, k=k).tokcomp_pre_llm(hand_tokens(features, torch.rand(4, 16), width=4))
        assert seen.pop() == (16, 13, expected, "index")


def test_windows_are_emitted_in_temporal_order_each_with_its_static_tokens_first():
    g = torch.Generator().manual_seed(0)
    e0 = torch.tensor([1.0, 0.0, 0.0])
    features = torch.randn(4, 4, 3, generator=g)
    features[0, 0] = features[1, 0] = e0  # position 0 static in frames 0-1 ...
    features[2, 0] = features[3, 0] = -e0  # ... and in frames 2-3, but it flips between them
    features[1, 1:] = features[3, 1:] = -features[0, 1:]  # everything else flips every frame
    features[2, 1:] = features[0, 1:]
    tokens = hand_tokens(features, torch.rand(4, 4, generator=g), width=2)
    OuterMerge(ratio=1.0).tokcomp_pre_llm(tokens)
    assert tokens.meta[WINDOWS] == [(0, 1), (2, 3)]
    assert tokens.source.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15]
    assert tokens.frame.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


def test_static_cluster_tokens_are_in_spatial_order_of_their_centres():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 16, 8, generator=g) * torch.linspace(0.2, 3.0, 16)[None, :, None]
    features = base.expand(4, -1, -1).clone()  # every position static over all 4 frames
    tokens = hand_tokens(features, torch.rand(4, 16, generator=g), width=4)
    OuterMerge(ratio=0.2, tau=0.5).tokcomp_pre_llm(tokens)
    # one window saves 48 of 64 tokens: r' = 0.2 / (16/64) = 0.8, round(16 * 0.8) = 13 clusters
    assert tokens.num_tokens == 13
    raster = (tokens.row * 4 + tokens.col).tolist()
    assert raster == sorted(raster) and len(set(raster)) == 13


def test_outer_merge_refuses_tokens_that_are_not_every_frames_full_grid():
    features, scores = three_frames()
    tokens = hand_tokens(features, scores, width=2)
    tokens.keep(list(range(1, 12)))
    with pytest.raises(ConfigError, match="full token grid"):
        OuterMerge().tokcomp_pre_llm(tokens)


def test_nominal_budget_is_int_of_t_p_ratio_spread_over_the_frames():
    planned = PlannedTokens([196] * 32, (14, 14))
    OuterMerge(ratio=0.1).nominal_pre_llm(None, planned)
    assert planned.per_frame == [20] * 19 + [19] * 13  # int(6272 * 0.1) = 627
    assert planned.total == 627
    planned = PlannedTokens([196] * 32, (14, 14))
    OuterMerge(ratio=0.15).nominal_pre_llm(None, planned)
    assert sum(planned.per_frame) == 940  # int(940.8)


@pytest.mark.parametrize("params", [dict(ratio=0.0), dict(ratio=1.5), dict(tau=1.2), dict(k=0), dict(beta=-0.1),
                                    dict(max_window=0)])
def test_outer_merge_rejects_out_of_range_parameters_naming_them(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        OuterMerge(**params)


def test_outer_merge_defaults_are_holitoms_and_it_scores_with_the_last_vision_layer():
    s = OuterMerge()
    assert (s.ratio, s.tau, s.k, s.beta, s.max_window) == (0.1, 0.8, 7, 0.6, 1024)
    info = ModelInfo("m", 26, (27, 27), (14, 14), 24, 896)
    assert CompressionStack([s], info).statistics["vision.attention"] == {25}
    with pytest.raises(ConfigError, match="layer=26"):
        OuterMerge(layer=26).check(info)
    assert OuterMerge in HOLITOM_STRATEGIES and InnerMerge in HOLITOM_STRATEGIES
    assert s.hook_points() == ["pre_llm"]


# ---------------------------------------------------------------------------------------------
# tiny model


def test_on_the_tiny_model_the_budget_holds_and_with_nothing_static_it_is_per_frame_topk(tiny, pixels):
    plain = run_with(tiny, pixels, [])
    out = run_with(tiny, pixels, [OuterMerge(ratio=0.25)])
    ledger = out.ledger
    assert ledger.text_tokens == plain.ledger.text_tokens
    assert ledger.visual_tokens_before_pre_llm == 8 * 16
    assert ledger.special_tokens == 1  # the newline still reaches the LLM
    assert ledger.llm_layers[0] == ledger.text_tokens + ledger.visual_tokens_after_pre_llm + 1
    # about 0.25 * 128 video tokens; rounding adds at most one per frame and one per window
    assert 8 <= ledger.visual_tokens_after_pre_llm <= 32 + 8 + 8
    # tau = 1: no position is static, every window is all dynamic: top ceil(16 / 4) per frame by attention
    none_static = run_with(tiny, pixels, [OuterMerge(ratio=0.25, tau=1.0)])
    topk = run_with(tiny, pixels, [TopK(ratio=0.25)])
    assert none_static.ledger.visual_tokens_after_pre_llm == topk.ledger.visual_tokens_after_pre_llm == 32
    torch.testing.assert_close(none_static.prefill_logits, topk.prefill_logits)
