"""PruneVid: segment refinement, static/dynamic split, cluster counts, per-group pruning, tiny-model runs."""

from __future__ import annotations

import math

import pytest
import torch
from tokcomp.strategies.prunevid import SEGMENTS, Inner, Outer

from tests.conftest import run_with
from tokcomp.errors import ConfigError
from tokcomp.ops import prunevid as ops
from tokcomp.state import LLMState, VisualTokens
from tokcomp.strategy import ModelInfo

# ---------------------------------------------------------------------------------------------
# refine_clusters


def test_runs_lists_maximal_runs_of_equal_labels():
    assert ops.runs(torch.tensor([0, 0, 1, 1, 1, 0])) == [(0, 0, 1), (1, 2, 4), (0, 5, 5)]


@pytest.mark.parametrize(
    "labels, refined",
    [
        ([0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]),  # 0's shorter run joins its only neighbour
        ([0, 1, 1, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]),  # video start: the right neighbour
        ([0, 0, 1, 2, 2], [0, 0, 0, 2, 2]),  # singleton cluster, neighbours' runs tie: the left one
        ([0, 0, 1, 2, 2, 2], [0, 0, 2, 2, 2, 2]),  # the neighbour whose cluster's run is longer
        ([0, 0, 1, 0, 0], [0, 0, 0, 0, 0]),  # the gap closes: one segment
        ([0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0]),  # equally long runs of one cluster all stay
        ([2, 2, 2], [2, 2, 2]),
    ],
)
def test_refine_clusters_keeps_each_clusters_longest_run_and_fills_the_rest_from_neighbours(labels, refined):
    assert ops.refine_clusters(torch.tensor(labels)).tolist() == refined


def test_refine_clusters_leaves_labels_alone_when_no_cluster_has_a_run_of_two():
    assert ops.refine_clusters(torch.tensor([0, 1, 0, 1])).tolist() == [0, 1, 0, 1]


def test_refined_segments_are_contiguous_runs():
    refined = ops.refine_clusters(torch.tensor([0, 0, 1, 1, 1, 0, 0]))
    assert [(a, b) for _, a, b in ops.runs(refined)] == [(0, 1), (2, 4), (5, 6)]


# ---------------------------------------------------------------------------------------------
# static / dynamic split


def unit(deg: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(deg)), length * math.sin(math.radians(deg))]


def window_of(angles_per_position: list[list[float]]) -> torch.Tensor:
    """(W, n, 2): position p of frame w points at angles_per_position[p][w] (lengths vary, which must not matter)."""
    w = len(angles_per_position[0])
    return torch.tensor([[unit(a[f], 1.0 + f) for a in angles_per_position] for f in range(w)])


def test_identical_directions_are_static_orthogonal_ones_dynamic():
    window = window_of([[20.0, 20.0, 20.0], [0.0, 90.0, 0.0]])
    assert ops.static_positions(window, 0.8).tolist() == [True, False]


def test_static_threshold_is_on_the_mean_over_pairs_of_distinct_frames():
    # angles 0, 30, 60: pair cosines cos30, cos60, cos30 -> mean (2 * 0.866 + 0.5) / 3 = 0.744
    window = window_of([[0.0, 30.0, 60.0]])
    assert ops.static_positions(window, 0.8).tolist() == [False]
    assert ops.static_positions(window, 0.74).tolist() == [True]
    assert ops.static_positions(window, 0.75).tolist() == [False]


def test_a_one_frame_segment_has_no_static_positions():
    assert ops.static_positions(window_of([[0.0], [45.0]]), -1.0).tolist() == [False, False]


# ---------------------------------------------------------------------------------------------
# spatial clusters and counts


def test_spatial_clusters_are_means_around_dpc_centres_in_score_order():
    # k=2: every point's nearest neighbour is at distance 1, so densities tie (lower index denser);
    # deltas 41, 1, 1, 38, 1 make points 0 and 3 the centres
    means, centres = ops.spatial_clusters(torch.tensor([[0.0], [1.0], [2.0], [40.0], [41.0]]), 0.5, k=2)
    assert centres.tolist() == [0, 3]
    assert means.flatten().tolist() == [1.0, 40.5]


def test_spatial_clusters_keep_at_least_one_cluster():
    means, centres = ops.spatial_clusters(torch.tensor([[3.0, 4.0]]), 0.5, k=7)
    assert centres.tolist() == [0] and means.tolist() == [[3.0, 4.0]]


def orthogonal_frames(frames: int, tokens: int) -> torch.Tensor:
    """Every token a distinct one-hot vector: nothing is similar across frames, everything is dynamic."""
    return torch.eye(frames * tokens).view(frames, tokens, frames * tokens)


@pytest.mark.parametrize("tokens, min_dynamic, per_frame", [(16, 14, 8), (15, 14, 7), (14, 14, 14), (16, 16, 16)])
def test_dynamic_tokens_are_clustered_to_half_only_above_the_minimum(tokens, min_dynamic, per_frame):
    out = ops.merge_frames_dynamic(orthogonal_frames(2, tokens), 0.25, 0.8, 0.5, 7, min_dynamic)
    assert out.segments == [(0, 1)]  # int(2 * 0.25) = 0 clusters -> one
    assert out.frame.tolist() == [0] * per_frame + [1] * per_frame
    assert out.group.tolist() == [1] * per_frame + [3] * per_frame


def two_segment_frames() -> torch.Tensor:
    """Frames 0-1: both positions unchanged; frames 2-3: position 0 turns 90 degrees, position 1 stays.

    Frame means (0.5, 0.5), (0.5, 0.5), (2.5, 2.5), (0, 5): with k=2, DPC-KNN picks frames 0 and 2 as
    the two centres and frame 3 joins frame 2 (distance 2.5 against 3.2)."""
    return torch.tensor([
        [[1.0, 0.0], [0.0, 1.0]],
        [[1.0, 0.0], [0.0, 1.0]],
        [[5.0, 0.0], [0.0, 5.0]],
        [[0.0, 5.0], [0.0, 5.0]],
    ])


def test_outer_merge_orders_static_then_dynamic_per_segment_with_group_labels():
    out = ops.merge_frames_dynamic(two_segment_frames(), 0.5, 0.8, 0.5, 2, 14)
    assert out.segments == [(0, 1), (2, 3)]
    # segment 0: static p0, p1 -> one cluster (mean of the two time-averaged tokens, centre p0)
    # segment 1: static p1 -> itself; dynamic p0 in frames 2 and 3 (too few to cluster)
    assert out.features.tolist() == [[0.5, 0.5], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]]
    assert out.frame.tolist() == [0, 2, 2, 3]
    assert out.position.tolist() == [0, 1, 0, 0]
    assert out.group.tolist() == [0, 2, 5, 7]
    assert ops.is_static_label(out.group).tolist() == [True, True, False, False]


def test_static_tokens_are_averaged_over_the_segment_frames():
    frames = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]], [[5.0, 0.0]]])  # one position, same direction
    out = ops.merge_frames_dynamic(frames, 0.25, 0.8, 0.5, 7, 14)
    assert out.features.tolist() == [[3.0, 0.0]] and out.group.tolist() == [0] and out.frame.tolist() == [0]


# ---------------------------------------------------------------------------------------------
# per-group selection (stage 2)


def test_group_topk_keeps_ceil_alpha_of_each_group_and_unlabelled_tokens():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.7, 0.0])
    labels = torch.tensor([0, 0, 0, 3, 3, 3, 3, -1])
    # group 0: ceil(3 * 0.4) = 2 -> 1, 2; group 3: ceil(4 * 0.4) = 2 -> 5, 6; the unlabelled newline stays
    assert ops.group_topk(scores, labels, 0.4).tolist() == [1, 2, 5, 6, 7]


def test_group_topk_without_labels_treats_all_tokens_as_one_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.7, 0.0])
    # ceil(8 * 0.4) = 4: scores 0.9, 0.8, 0.7, 0.5
    assert ops.group_topk(scores, torch.full((8,), -1), 0.4).tolist() == [1, 2, 5, 6]


def test_group_topk_keeps_at_least_one_token_per_group():
    scores = torch.tensor([0.5, 0.4, 0.3])
    assert ops.group_topk(scores, torch.tensor([0, 1, 3]), 0.1).tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# hooks on hand-made states


def visual_tokens(frames: torch.Tensor) -> VisualTokens:
    """Tokens of ``frames`` (T, n, D) on a 1 x n grid, as the pipeline hands them to a strategy
    (content tokens only: the framework keeps the newline and re-emits it after the video)."""
    t, n, d = frames.shape
    total = t * n
    return VisualTokens(
        features=frames.reshape(total, d), frame=torch.arange(t).repeat_interleave(n),
        row=torch.zeros(total, dtype=torch.long), col=torch.arange(n).repeat(t),
        source=torch.arange(total), frame_sources=[[f] for f in range(t)], grid=(1, n),
    )


def test_outer_hook_replaces_tokens_with_centre_geometry_and_groups():
    state = visual_tokens(two_segment_frames())
    Outer(temporal_segment_ratio=0.5, k=2).tokcomp_pre_llm(state)
    assert state.source.tolist() == [0, 5, 4, 6]  # (frame, position) (0,0), (2,1), (2,0), (3,0)
    assert state.frame.tolist() == [0, 2, 2, 3] and state.col.tolist() == [0, 1, 0, 0]
    assert state.group.tolist() == [0, 2, 5, 7]
    assert state.num_tokens == 4
    assert state.meta[SEGMENTS] == [(0, 1), (2, 3)]


def test_outer_hook_rejects_an_incomplete_grid():
    state = visual_tokens(two_segment_frames())
    state.keep([0, 1, 2])  # frame 1 lost a token
    with pytest.raises(ConfigError, match="full token grid"):
        Outer().tokcomp_pre_llm(state)


def llm_state(groups: list[int] | None) -> LLMState:
    """2 text, 6 visual, the newline (not visual: the framework keeps it like text), 2 text; text
    attention from layer 10 (high on text, lowest on the newline)."""
    visual = torch.tensor([False, False] + [True] * 6 + [False] * 3)
    scores = torch.tensor([9.0, 9.0, 0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.05, 9.0, 9.0])
    group = None if groups is None else torch.tensor([-1, -1, *groups, -1, -1, -1])
    return LLMState(layer=11, num_layers=28, hidden=torch.randn(1, 11, 4), position_ids=torch.arange(11)[None] + 5,
                    visual_mask=visual, text_attention={10: scores}, visual_group=group)


def test_inner_hook_keeps_top_alpha_per_group_and_all_text_with_original_positions():
    state = llm_state([0, 0, 0, 3, 3, 3])
    Inner().tokcomp_inner_llm(state)
    # visual 2..7: group 0 = 2, 3, 4 -> keep 3, 4; group 3 = 5, 6, 7 -> ceil(1.2) = 2: 5, 7; newline 8 kept
    assert state.kept.tolist() == [0, 1, 3, 4, 5, 7, 8, 9, 10]
    assert state.position_ids[0].tolist() == [5, 6, 8, 9, 10, 12, 13, 14, 15]
    assert state.prune_earlier_cache


@pytest.mark.parametrize("groups", [None, [-1] * 6, [4] * 6])
def test_inner_hook_without_outer_groups_ranks_all_visual_tokens_together(groups):
    state = llm_state(groups)
    Inner().tokcomp_inner_llm(state)
    # ceil(6 * 0.4) = 3 of the visual entries 2..7: scores 0.9 (3), 0.8 (7), 0.5 (4); the newline
    # (8, the lowest score) is not visual and is kept with the text
    assert state.kept.tolist() == [0, 1, 3, 4, 7, 8, 9, 10]


def test_inner_acts_before_the_layer_after_the_scored_one():
    info = ModelInfo("m", 4, (8, 8), (4, 4), 28, 64)
    inner = Inner()
    assert inner.llm_layers(info) == {11} and inner.statistics(info) == {"llm.text": {10}}
    inner.check(info)
    Inner(layer=26).check(info)
    with pytest.raises(ConfigError, match="layer=27"):
        Inner(layer=27).check(info)


@pytest.mark.parametrize("cls, params", [
    (Outer, {"cluster_ratio": 0.0}), (Outer, {"temporal_segment_ratio": 1.5}), (Outer, {"tau": 1.2}),
    (Outer, {"k": 0}), (Outer, {"min_dynamic_tokens": -1}), (Inner, {"alpha": 0.0}),
])
def test_bad_parameters_are_rejected_by_name(cls, params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        cls.from_params(params)


def test_both_stages_are_data_dependent_and_the_outer_budget_is_its_cluster_ratio():
    from tokcomp.plan import PlannedTokens
    from tokcomp.strategy import Strategy

    assert Outer.plan_pre_llm is Strategy.plan_pre_llm and Inner.plan_inner_llm is Strategy.plan_inner_llm
    budget = PlannedTokens([196] * 32, (14, 14))
    Outer(cluster_ratio=0.25).nominal_pre_llm(None, budget)
    assert budget.per_frame == [49] * 32 and budget.total == 1568


# ---------------------------------------------------------------------------------------------
# tiny model: 8 frames of 4x4 pooled tokens (the framework adds the newline), 4 decoder layers

FRAMES, POOLED = 8, 16


def test_outer_alone_with_one_all_static_segment_keeps_half_the_positions(tiny, pixels):
    # temporal_segment_ratio 1/8 -> one cluster -> one segment; tau -1 -> every position static:
    # 16 time-averaged tokens -> int(16 * 0.5) = 8 cluster means; the framework adds the newline
    out = run_with(tiny, pixels, [Outer(temporal_segment_ratio=0.125, tau=-1.0)])
    ledger = out.ledger
    assert ledger.visual_tokens_after_pre_llm == 8 and ledger.special_tokens == 1
    assert ledger.llm_layers == [ledger.text_tokens + 8 + 1] * tiny.info.llm_layers
    assert len(out.new_ids) == 6


def test_outer_defaults_compress_and_keep_the_text(tiny, pixels):
    ledger = run_with(tiny, pixels, [Outer()]).ledger
    assert 1 < ledger.visual_tokens_after_pre_llm <= FRAMES * POOLED // 2  # cluster_ratio 0.5 at most
    assert ledger.special_tokens == 1
    assert ledger.llm_layers == [ledger.text_tokens + ledger.visual_tokens_after_pre_llm + 1] * tiny.info.llm_layers


def test_outer_then_inner_prunes_each_group_after_the_selected_layer_and_decodes(tiny, pixels):
    outer = Outer(temporal_segment_ratio=0.125, tau=-1.0)
    out = run_with(tiny, pixels, [outer, Inner(layer=1, alpha=0.4)])
    text = out.ledger.text_tokens
    # 8 static cluster tokens (one group) -> ceil(3.2) = 4, plus the newline, from layer 2 on
    assert out.ledger.llm_layers == [text + 8 + 1, text + 8 + 1, text + 4 + 1, text + 4 + 1]
    assert out.ledger.cache_lengths == [text + 4 + 1] * 4  # layers 0 and 1 cut too (prune_earlier_cache)
    assert len(out.new_ids) == 6


def test_inner_alone_ranks_all_visual_tokens_as_one_group(tiny, pixels):
    out = run_with(tiny, pixels, [Inner(layer=2, alpha=0.4)])
    text, visual = out.ledger.text_tokens, FRAMES * POOLED
    # ceil(128 * 0.4) = 52 visual tokens kept; the newline is never pruned
    assert out.ledger.llm_layers == [text + visual + 1] * 3 + [text + 52 + 1]
    assert out.ledger.cache_lengths == [text + 52 + 1] * 4


def test_inner_keeping_everything_changes_nothing(tiny, pixels):
    outer = dict(temporal_segment_ratio=0.125, tau=-1.0)
    alone = run_with(tiny, pixels, [Outer(**outer)])
    both = run_with(tiny, pixels, [Outer(**outer), Inner(layer=1, alpha=1.0)])
    torch.testing.assert_close(both.prefill_logits, alone.prefill_logits)
    assert both.new_ids == alone.new_ids
