"""Pure tensor algorithms on random tensors, checked against straightforward references."""

from __future__ import annotations

import pytest
import torch

from tokcomp.ops.attention import last_query_attention, received_attention
from tokcomp.ops.frames import average_adjacent_pairs
from tokcomp.ops.pooling import average_pool_grid, bilinear_halve, side_for_ratio
from tokcomp.ops.selection import (
    groups,
    keep_count,
    top_per_group,
    topk_indices,
    topk_positions,
    uniform_indices,
)


def _reference_received_attention(q, k, scale, bias=None, segments=None):
    """The definition, materialised: float64 softmax probabilities, masked by window, column means."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.double()[:, None, None, :]
    if segments is not None:
        logits = logits.masked_fill((segments[:, :, None] != segments[:, None, :])[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2)).float()


def test_received_attention_is_the_column_mean_of_softmax_probabilities():
    torch.manual_seed(0)
    q, k = torch.randn(5, 3, 7, 4), torch.randn(5, 3, 7, 4)
    torch.testing.assert_close(received_attention(q, k, 0.5), _reference_received_attention(q, k, 0.5))
    assert torch.allclose(received_attention(q, k, 0.5).sum(-1), torch.ones(5))


def test_received_attention_adds_the_key_bias_and_keeps_attention_within_windows():
    torch.manual_seed(1)
    q, k = torch.randn(3, 2, 11, 8), torch.randn(3, 2, 11, 8)
    bias = torch.log(torch.rand(3, 11) + 0.5)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]] * 2 + [[5, 2, 5, 2, 5, 2, 5, 2, 5, 2, 9]])
    got = received_attention(q, k, 0.3, bias=bias, segments=segments)
    torch.testing.assert_close(got, _reference_received_attention(q, k, 0.3, bias, segments))
    # each window's queries spread one unit of attention over the window's keys: a window's share of
    # the row total is its size over the row's tokens
    share = torch.stack([got[0, :3].sum(), got[0, 3:7].sum(), got[0, 7:].sum()])
    torch.testing.assert_close(share, torch.tensor([3.0, 4.0, 4.0]) / 11)


def test_received_attention_of_bfloat16_inputs_is_computed_in_float32():
    torch.manual_seed(2)
    q, k = torch.randn(2, 4, 33, 16).bfloat16(), torch.randn(2, 4, 33, 16).bfloat16()
    got = received_attention(q, k, 0.25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _reference_received_attention(q.float(), k.float(), 0.25))


def test_last_query_attention_is_the_head_mean_of_the_last_row():
    torch.manual_seed(0)
    q, k = torch.randn(4, 8), torch.randn(4, 6, 8)
    expected = torch.softmax(torch.einsum("hd,htd->ht", q, k) * 0.3, dim=-1).mean(0)
    torch.testing.assert_close(last_query_attention(q, k, 0.3), expected)


def test_uniform_indices_are_evenly_spread_and_unique():
    assert uniform_indices(16, 4).tolist() == [2, 6, 10, 14]
    for n in range(1, 30):
        for k in range(1, n + 1):
            idx = uniform_indices(n, k)
            assert idx.numel() == k and torch.unique(idx).numel() == k and int(idx.max()) < n


def test_topk_indices_are_ascending_and_break_ties_by_position():
    assert topk_indices(torch.tensor([0.5, 0.9, 0.5, 0.1]), 2).tolist() == [0, 1]


def test_topk_positions_are_per_row_and_ascending():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.1, 0.2, 0.3]])
    assert topk_positions(scores, 2).tolist() == [[1, 3], [0, 3]]


def test_top_per_group_ranks_each_group_on_its_own_budget_like_topk_indices():
    scores = torch.rand(23, generator=torch.Generator().manual_seed(0))
    scores[[3, 4]] = float(scores[5])  # a tie inside a group
    members = groups(torch.tensor([0] * 8 + [1] * 5 + [2] * 8 + [-1] * 2))

    def budget(n):
        return n // 2 + 1

    expected = torch.sort(torch.cat([m[topk_indices(scores[m], budget(m.numel()))] for m in members])).values
    assert torch.equal(top_per_group(scores, members, budget), expected)
    assert top_per_group(scores, [], budget).numel() == 0


def test_keep_count_rounds_and_keeps_at_least_one():
    assert keep_count(196, 0.25) == 49 and keep_count(3, 0.01) == 1 and keep_count(10, 1.0) == 10


def test_groups_follow_label_order():
    assert [g.tolist() for g in groups(torch.tensor([0, 0, 1, 1, 1, -1]))] == [[0, 1], [2, 3, 4]]


@pytest.mark.parametrize("seed", range(5))
def test_groups_equal_one_nonzero_per_run_of_labels(seed):
    """The sort-based groups give what a ``nonzero`` per run of equal non-negative labels gives, in any order
    of labels, with unlabelled (-1) entries and with labels that come back in a later run."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 4, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g)
    expected = [torch.nonzero(labels == v, as_tuple=False).flatten()
                for v in torch.unique_consecutive(labels[labels >= 0]).tolist()]
    got = groups(labels)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert groups(torch.full((3,), -1)) == []


def test_bilinear_halve_matches_llava_onevision_sizes():
    x = torch.randn(2, 27, 27, 5)
    assert bilinear_halve(x).shape == (2, 14, 14, 5)


def test_average_pool_grid_and_side_for_ratio():
    x = torch.randn(3, 14, 14, 2)
    assert side_for_ratio(14, 0.25) == 7
    torch.testing.assert_close(average_pool_grid(x, 7, 7)[0, 0, 0], x[0, :2, :2].mean(dim=(0, 1)))


def test_average_adjacent_pairs_weights_by_source_count():
    hidden = torch.tensor([[[0.0]], [[3.0]], [[6.0]]])
    merged, sources = average_adjacent_pairs(hidden, [[0, 1], [2], [3]])
    assert merged.flatten().tolist() == [1.0, 6.0]  # (0*2 + 3*1) / 3
    assert sources == [[0, 1, 2], [3]]


def test_dpc_knn_centre_order_index_sorts_centres_and_sends_distance_ties_to_the_lower_index_centre():
    from tokcomp.ops.cluster import dpc_knn_cluster

    # 1-D points 0, 2, 1, 2.1 with k = 2: the pair (2, 2.1) is densest, so point 1 scores highest
    # (largest delta), then point 0; point 2 (at 1) is exactly 1 away from both centres.
    x = torch.tensor([[0.0], [2.0], [1.0], [2.1]])
    centres, assignment = dpc_knn_cluster(x, 2, 2)  # PruneVid's default: descending score
    assert centres.tolist() == [1, 0] and assignment.tolist() == [1, 0, 0, 0]
    centres, assignment = dpc_knn_cluster(x, 2, 2, centre_order="index")  # HoliTom's: sorted indices
    assert centres.tolist() == [0, 1] and assignment.tolist() == [0, 1, 0, 1]
