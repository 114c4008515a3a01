"""ToMe: bipartite soft matching, size-weighted merging, the r schedule, and the strategy in SigLIP."""

from __future__ import annotations

import math

import pytest
import torch
from tokcomp.strategies.tome import SIZES, SOURCES, ToMe

from tests.conftest import run_with
from tokcomp.errors import ConfigError
from tokcomp.ops.tome import (
    Matching,
    bipartite_soft_matching,
    capped_r,
    compose_slots,
    merge_wavg,
    parse_r,
    source_matrix,
    spread_total,
    square_side,
)
from tokcomp.state import EncoderState
from tokcomp.strategy import ModelInfo

TINY = ModelInfo("tiny", 4, (8, 8), (4, 4), 4, 64)


def unit(*degrees: float) -> torch.Tensor:
    """(1, T, 2): unit vectors at these angles (cosine similarity = cos of the angle between them)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)[None].float()


# A = tokens 0, 2, 4; B = tokens 1, 3, 5. Best B partners and cosine scores, by hand:
# A0 (0 deg) -> B1 (10 deg): cos 10 = .985; A2 (90) -> B5 (110): cos 20 = .940; A4 (180) -> B5: cos 70 = .342
FIRST = unit(0, 10, 90, 60, 180, 110)
# A0 (0) -> B1 (50): cos 50 = .643; A2 (90) -> B3 (120): cos 30 = .866; A4 (180) -> B5 (175): cos 5 = .996
SECOND = unit(0, 50, 90, 120, 180, 175)


def test_the_best_matched_a_token_merges_into_its_b_partner_and_unmerged_a_tokens_come_first():
    m = bipartite_soft_matching(FIRST, 1)
    # A0 merges into B1; output [A2, A4, B1, B3, B5]
    assert m.num_out == 5 and m.r == 1
    assert m.slots.tolist() == [[2, 2, 0, 3, 1, 4]]


def test_the_r_highest_scores_merge_and_several_a_tokens_may_share_a_b_partner():
    assert bipartite_soft_matching(FIRST, 2).slots.tolist() == [[1, 1, 3, 2, 0, 3]]  # A0->B1, A2->B5
    assert bipartite_soft_matching(FIRST, 3).slots.tolist() == [[0, 0, 2, 1, 2, 2]]  # A4->B5 as well


def test_unmerged_a_tokens_keep_their_original_order_not_their_score_order():
    m = bipartite_soft_matching(SECOND, 1)  # A4 merges; A2 (.866) outscores A0 (.643) but A0 comes first
    assert m.slots.tolist() == [[0, 2, 1, 3, 4, 4]]


def test_frames_are_matched_independently():
    m = bipartite_soft_matching(torch.cat([FIRST, SECOND]), 1)
    assert m.slots.tolist() == [[2, 2, 0, 3, 1, 4], [0, 2, 1, 3, 4, 4]]


def test_the_metric_is_l2_normalised_so_its_scale_does_not_matter():
    scaled = FIRST * torch.tensor([1.0, 100.0, 0.01, 3.0, 7.0, 0.5])[None, :, None]
    assert bipartite_soft_matching(scaled, 2).slots.tolist() == [[1, 1, 3, 2, 0, 3]]


def test_r_is_capped_at_half_the_tokens_minus_the_protected_one():
    assert capped_r(10, 6) == 3 and capped_r(10, 7) == 3
    assert capped_r(10, 6, protect_first=True) == 2 and capped_r(10, 7, protect_first=True) == 3
    assert capped_r(2, 64) == 2 and capped_r(-1, 6) == 0 and capped_r(1, 1) == 0
    m = bipartite_soft_matching(FIRST, 50)
    assert m.num_out == 3 and m.slots.tolist() == [[0, 0, 2, 1, 2, 2]]


def test_r_zero_merges_nothing():
    m = bipartite_soft_matching(FIRST, 0)
    assert m.num_out == 6 and m.slots.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_a_protected_first_token_is_never_merged_and_stays_first():
    m = bipartite_soft_matching(FIRST, 2, protect_first=True)  # A0 has the best score but is protected
    assert m.slots.tolist() == [[0, 1, 3, 2, 3, 3]]  # A2 and A4 merge into B5; output [A0, B1, B3, B5]
    assert bipartite_soft_matching(FIRST, 3, protect_first=True).slots.tolist() == m.slots.tolist()  # cap 2


def test_merge_wavg_weights_each_token_by_its_size_and_sums_the_sizes():
    x = torch.tensor([[[1.0], [2.0], [3.0], [10.0]]])
    size = torch.tensor([[1.0, 3.0, 2.0, 1.0]])
    merged, new_size = merge_wavg(x, size, Matching(torch.tensor([[0, 0, 1, 1]]), 2))
    assert merged[0, :, 0].tolist() == pytest.approx([(1 * 1 + 3 * 2) / 4, (2 * 3 + 1 * 10) / 3])
    assert new_size.tolist() == [[4.0, 3.0]]


def test_merge_wavg_without_sizes_is_the_plain_mean_and_keeps_the_dtype():
    x = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [5.0, 6.0]]], dtype=torch.bfloat16)
    merged, size = merge_wavg(x, None, Matching(torch.tensor([[1, 0, 1]]), 2))
    assert merged.dtype == torch.bfloat16 and size.dtype == torch.float32
    assert merged.float().tolist() == [[[3.0, 4.0], [3.0, 3.0]]] and size.tolist() == [[1.0, 2.0]]


def test_sources_compose_over_layers_into_tomes_source_matrix():
    first = Matching(torch.tensor([[2, 2, 0, 3, 1, 4]]), 5)
    sources = compose_slots(torch.arange(6)[None], first)
    second = Matching(torch.tensor([[0, 0, 1, 2, 3]]), 4)  # tokens 0 and 1 of the 5 merge
    sources = compose_slots(sources, second)
    assert sources.tolist() == [[1, 1, 0, 2, 0, 3]]  # original tokens 2 and 4 (then slots 0, 1) now share 0
    matrix = source_matrix(sources, 4)
    assert matrix.shape == (1, 4, 6)
    assert matrix[0].int().tolist() == [[0, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]]


def test_parse_r_constant_increasing_decreasing_and_fractional_inflection():
    assert parse_r(4, 4) == [4, 4, 4, 4]
    assert parse_r(4, 3, 1) == [0, 2, 4, 6]  # 0 .. 2r
    assert parse_r(4, 3, -1) == [6, 4, 2, 0]  # 2r .. 0
    assert parse_r(4, 4, 1) == [0, 2, 5, 8]  # step 8/3, truncated
    assert parse_r(4, 4, 0.5) == [2, 3, 4, 6]  # int(4 * 0.5) = 2 .. 6, step 4/3, truncated
    assert parse_r(1, 4, 1) == [0]


def test_parse_r_pads_a_list_with_zeros():
    assert parse_r(4, [5, 3]) == [5, 3, 0, 0]
    assert parse_r(2, [1, 2]) == [1, 2]


def test_spread_total_puts_the_remainder_on_the_first_layers():
    assert spread_total(4, 15) == [4, 4, 4, 3]
    assert spread_total(4, 2) == [1, 1, 0, 0]
    assert spread_total(26, 104) == [4] * 26


def test_square_side_only_for_perfect_squares():
    assert square_side(49) == 7 and square_side(1) == 1
    assert square_side(48) is None and square_side(0) is None


# ---- the strategy -------------------------------------------------------------------------------

def test_default_is_tomes_readme_r_of_16_at_every_layer():
    tome = ToMe()
    assert tome.schedule(26) == [16] * 26
    assert tome.encoder_mid_layers(TINY) == tome.statistics(TINY)["vision.keys"] == {0, 1, 2, 3}
    assert tome.encoder_layers(TINY) == set()


def test_only_layers_with_r_above_zero_merge():
    tome = ToMe(r=[0, 3, 0])
    assert tome.encoder_mid_layers(TINY) == {1}
    assert ToMe(r=2, inflect=1).encoder_mid_layers(TINY) == {1, 2, 3}  # [0, 1, 2, 4]
    assert ToMe(merge_total=2).encoder_mid_layers(TINY) == {0, 1}


@pytest.mark.parametrize("params", [
    dict(r=4, merge_total=16), dict(r=-1), dict(r=[1, -1]), dict(r=[1, 2], inflect=1), dict(inflect=2.0),
    dict(merge_total=-3), dict(merge_total=8, inflect=-1),
])
def test_invalid_parameters_are_rejected(params):
    with pytest.raises(ValueError):
        ToMe(**params)


def test_a_list_longer_than_the_vision_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="5 entries"):
        ToMe(r=[1, 1, 1, 1, 1]).check(TINY)
    ToMe(r=[1, 1, 1, 1]).check(TINY)


def test_yaml_parameters_accept_an_int_or_a_list_for_r():
    assert ToMe.from_params({"r": [2, 1]}).r == [2, 1]
    assert ToMe.from_params({"r": 3, "inflect": -1}).schedule(4) == [6, 4, 2, 0]
    with pytest.raises(ConfigError):
        ToMe.from_params({"r": 4, "merge_total": 3})


def test_plan_follows_the_capped_schedule():
    assert ToMe(r=4).plan_intra_encoder(TINY, 0, 8, 64) == (8, 60)
    assert ToMe(r=40).plan_intra_encoder(TINY, 1, 8, 64) == (8, 32)
    assert ToMe(r=40, protect_first=True).plan_intra_encoder(TINY, 0, 8, 64) == (8, 33)
    assert ToMe(r=[0, 5]).plan_intra_encoder(TINY, 0, 8, 64) == (8, 64)


def mid_state(hidden, keys, layer, num_layers=2):
    return EncoderState(layer=layer, num_layers=num_layers, hidden=hidden, grid=(2, 3),
                        frame_sources=[[0]], position="attention", keys=keys)


def test_hook_merges_hidden_states_by_the_keys_and_hands_sizes_on_for_proportional_attention():
    hidden = torch.arange(6.0)[None, :, None].repeat(1, 1, 2)
    state = mid_state(hidden, FIRST, layer=0)
    ToMe(r=[2, 1]).tokcomp_intra_encoder(state)  # A0 -> B1, A2 -> B5; output [A4, B1, B3, B5]
    assert state.hidden[0, :, 0].tolist() == [4.0, 0.5, 3.0, 3.5]
    assert state.sizes.tolist() == [[1.0, 2.0, 1.0, 2.0]]
    assert state.grid == (0, 0)  # not the last merge layer: no grid
    assert state.meta[SOURCES].tolist() == [[1, 1, 3, 2, 0, 3]]
    assert state.keys is None


def test_sizes_from_an_earlier_layer_weight_the_next_merge_and_a_square_count_is_a_grid_again():
    state = mid_state(torch.arange(6.0)[None, :, None], FIRST, layer=0)
    tome = ToMe(r=[2, 1])
    tome.tokcomp_intra_encoder(state)  # tokens now [4, 0.5, 3, 3.5], sizes [1, 2, 1, 2]
    state.layer, state.keys = 1, unit(0, 90, 1, 180)  # A0 -> B1 (cos 90 = 0), A2 (1 deg) -> B1 (cos 89 = .017): A2 merges
    tome.tokcomp_intra_encoder(state)
    # output [A0, B1, B3]: B1 = (0.5 * 2 + 3 * 1) / 3
    assert state.hidden[0, :, 0].tolist() == pytest.approx([4.0, 4.0 / 3, 3.5])
    assert state.sizes.tolist() == [[1.0, 3.0, 2.0]]
    assert state.grid == (0, 0)  # 3 tokens: not a square
    assert state.meta[SOURCES].tolist() == [[1, 1, 2, 1, 0, 2]]


def test_last_merge_layer_declares_a_square_grid():
    state = mid_state(torch.arange(6.0)[None, :, None], FIRST, layer=0, num_layers=1)
    ToMe(r=2).tokcomp_intra_encoder(state)
    assert state.hidden.shape == (1, 4, 1) and state.grid == (2, 2)


def test_without_proportional_attention_sizes_still_weight_merges_but_are_not_handed_on():
    state = mid_state(torch.arange(6.0)[None, :, None], FIRST, layer=0)
    ToMe(r=[2, 1], prop_attn=False).tokcomp_intra_encoder(state)
    assert state.sizes is None
    assert state.meta[SIZES].tolist() == [[1.0, 2.0, 1.0, 2.0]]


def test_hook_ignores_calls_after_a_whole_layer():
    state = mid_state(torch.arange(6.0)[None, :, None], FIRST, layer=0)
    state.position = "layer"
    ToMe(r=2).tokcomp_intra_encoder(state)
    assert state.hidden.shape == (1, 6, 1)


# ---- on the tiny model (8 frames of 8x8 = 64 tokens, 4 SigLIP layers) ---------------------------

def test_r_4_leaves_48_tokens_per_frame_which_reach_the_llm_unpooled(tiny, pixels):
    out = run_with(tiny, pixels, [ToMe(r=4)])
    ledger = out.ledger
    assert [e.tokens_per_frame for e in ledger.vision_layers] == [64, 60, 56, 52]
    assert [e.mlp_tokens for e in ledger.vision_layers] == [8 * 60, 8 * 56, 8 * 52, 8 * 48]
    assert ledger.vision_out_tokens_per_frame == 48
    assert ledger.visual_tokens_after_pre_llm == 8 * 48  # 48 is no square: no pooling
    assert ledger.special_tokens == 1  # the newline follows the unpooled tokens
    assert ledger.llm_layers == [ledger.text_tokens + 8 * 48 + 1] * tiny.info.llm_layers
    assert torch.isfinite(out.prefill_logits).all()


def test_a_total_of_15_leaves_a_7x7_grid_which_is_pooled_to_4x4(tiny, pixels):
    ledger = run_with(tiny, pixels, [ToMe(merge_total=15, protect_first=True)]).ledger  # [4, 4, 4, 3]
    assert [e.tokens_per_frame for e in ledger.vision_layers] == [64, 60, 56, 52]
    assert ledger.vision_out_tokens_per_frame == 49
    assert ledger.pooled_tokens_per_frame == 16
    assert ledger.visual_tokens_after_pre_llm == 8 * 16 and ledger.special_tokens == 1


def test_proportional_attention_changes_what_later_layers_compute(tiny, pixels):
    with_sizes = run_with(tiny, pixels, [ToMe(r=4)], max_new_tokens=1)
    without = run_with(tiny, pixels, [ToMe(r=4, prop_attn=False)], max_new_tokens=1)
    assert with_sizes.ledger.to_dict() == without.ledger.to_dict()
    assert not torch.allclose(with_sizes.prefill_logits, without.prefill_logits)


@pytest.mark.parametrize("params", [dict(r=4), dict(merge_total=15, protect_first=True), dict(r=[0, 20, 0, 1])],
                         ids=["gridless", "square", "list"])
def test_planned_ledger_equals_the_recorded_one(tiny, pixels, params):
    from tokcomp.plan import plan_ledger

    recorded = run_with(tiny, pixels, [ToMe(**params)], max_new_tokens=1).ledger
    planned = plan_ledger(tiny, pixels.frames, recorded.text_tokens, [ToMe(**params)])
    planned.new_tokens = recorded.new_tokens
    assert planned.to_dict() == recorded.to_dict()
