"""DyCoke: TTM schedule and selection, KV-pruning decisions, on hand-made tensors and the tiny model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from tokcomp.strategies.dycoke import KVPruning, TemporalTokenMerging

from tests.conftest import run_with
from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops import dycoke
from tokcomp.plan import PlannedTokens, plan_ledger
from tokcomp.state import DecodeState, VisualTokens
from tokcomp.strategy import ModelInfo

# ---------------------------------------------------------------------------------------------
# TTM: counts


def test_pruned_frame_keeps_int_of_one_minus_k_times_p():
    assert dycoke.ttm_keep_count(196, 0.7) == 58  # 58.8 truncated
    assert dycoke.ttm_keep_count(16, 0.7) == 4  # 4.8 truncated
    assert dycoke.ttm_keep_count(196, 0.3) == 137  # the builder default: 137.2
    assert dycoke.ttm_keep_count(196, 0.0) == 196
    assert dycoke.ttm_keep_count(16, 0.99) == 1  # 0.16 would empty the frame: at least one


def test_ttm_counts_for_32_frames_keep_frame_30_whole():
    group = [196, 58, 58, 58]
    expected = group * 7 + [196, 58, 196, 58]  # pass 2 stops at i < T - 4 = 28: frame 30 is never re-pruned
    counts = dycoke.ttm_counts(32, 196, 0.7)
    assert counts == expected
    assert sum(counts) == 3098


@pytest.mark.parametrize(("frames", "expected"), [
    (1, [16]),
    (2, [16, 4]),
    (3, [16, 4, 16]),  # odd: the unpaired last frame stays whole
    (4, [16, 4, 16, 4]),  # the only group is the last one: pass 2 skips it
    (5, [16, 4, 4, 4, 16]),
    (6, [16, 4, 4, 4, 16, 4]),
    (7, [16, 4, 4, 4, 16, 4, 16]),
    (8, [16, 4, 4, 4, 16, 4, 16, 4]),
    (9, [16, 4, 4, 4, 16, 4, 4, 4, 16]),  # 4 < 9 - 4: the second group is re-pruned too
])
def test_ttm_counts_at_the_end_of_the_video(frames, expected):
    assert dycoke.ttm_counts(frames, 16, 0.7) == expected


def test_ttm_references_pair_odd_frames_with_the_previous_and_third_frames_with_the_group_head():
    assert dycoke.ttm_references(9) == [None, 0, 0, 2, None, 4, 4, 6, None]


# ---------------------------------------------------------------------------------------------
# TTM: which tokens survive. Token p of frame f is a 2-D vector at angle A[f][p] degrees with a
# random length, so the similarity of positions p in frames f and g is cos(A[f][p] - A[g][p]).

ANGLES = [
    [0, 0, 0, 0],
    [10, 60, 80, 40],  # vs frame 0: least similar 2 (80), 1 (60), 3, 0
    [50, 5, 20, 70],  # vs frame 0 (pass 2): 3 (70), 0 (50), 2, 1; vs frame 1 it would be 2, 1
    [80, 5, 110, 70],  # vs frame 2: 2 (90), 0 (30), then the ties 1, 3
    [0, 0, 0, 0],
    [0, 0, 45, 90],  # vs frame 4: 3, 2
    [0, 100, 0, 0],  # whole: the last group is skipped by pass 2
    [15, 100, 0, 50],  # vs frame 6: 3 (50), 0 (15)
]


def angle_frames(angles, seed=0):
    g = torch.Generator().manual_seed(seed)
    rad = torch.deg2rad(torch.tensor(angles, dtype=torch.float64))
    length = torch.rand(*rad.shape, 1, generator=g, dtype=torch.float64) + 0.5
    return (torch.stack([rad.cos(), rad.sin()], dim=-1) * length).float()


def test_position_similarity_is_the_cosine_at_each_position():
    feats = angle_frames(ANGLES)
    sim = dycoke.position_similarity(feats[1], feats[0])
    expected = [math.cos(math.radians(a)) for a in ANGLES[1]]
    assert sim.tolist() == pytest.approx(expected, abs=1e-6)


def test_ttm_select_keeps_least_similar_tokens_in_ascending_similarity_order():
    chosen = dycoke.ttm_select(angle_frames(ANGLES), k=0.5)
    assert [c.tolist() for c in chosen] == [
        [0, 1, 2, 3], [2, 1], [3, 0], [2, 0], [0, 1, 2, 3], [3, 2], [0, 1, 2, 3], [3, 0],
    ]


def test_ttm_select_spatial_order_sorts_pruned_frames():
    chosen = dycoke.ttm_select(angle_frames(ANGLES), k=0.5, spatial_order=True)
    assert [c.tolist() for c in chosen] == [
        [0, 1, 2, 3], [1, 2], [0, 3], [0, 2], [0, 1, 2, 3], [2, 3], [0, 1, 2, 3], [0, 3],
    ]


def test_ttm_pass_two_prunes_the_third_frame_against_the_group_head_not_its_neighbour():
    feats = angle_frames(ANGLES)
    assert dycoke.ttm_select(feats, k=0.5)[2].tolist() == [3, 0]
    neighbour = dycoke.least_similar(dycoke.position_similarity(feats[2], feats[1]), 2)
    assert neighbour.tolist() == [2, 1]  # what a comparison with frame 1 would have kept


def visual_tokens(feats: torch.Tensor, width: int = 2) -> VisualTokens:
    """The content tokens of ``feats`` (frames, tokens, D); special tokens never reach a strategy."""
    frames, per = feats.shape[:2]
    n = frames * per
    pos = torch.arange(per)
    return VisualTokens(
        features=feats.reshape(n, -1), frame=torch.arange(frames).repeat_interleave(per),
        row=(pos // width).repeat(frames), col=(pos % width).repeat(frames),
        source=torch.arange(n), frame_sources=[[f] for f in range(frames)], grid=(per // width, width),
    )


def test_ttm_hook_keeps_frames_in_order_and_pruned_tokens_by_similarity():
    state = visual_tokens(angle_frames(ANGLES))
    TemporalTokenMerging(k=0.5).tokcomp_pre_llm(state)
    assert state.source.tolist() == [0, 1, 2, 3, 6, 5, 11, 8, 14, 12, 16, 17, 18, 19, 23, 22,
                                     24, 25, 26, 27, 31, 28]
    assert state.frame.tolist() == [0] * 4 + [1] * 2 + [2] * 2 + [3] * 2 + [4] * 4 + [5] * 2 + [6] * 4 + [7] * 2


def test_ttm_hook_spatial_order_sorts_each_pruned_frame():
    state = visual_tokens(angle_frames(ANGLES))
    TemporalTokenMerging(k=0.5, spatial_order=True).tokcomp_pre_llm(state)
    assert state.source.tolist() == [0, 1, 2, 3, 5, 6, 8, 11, 12, 14, 16, 17, 18, 19, 22, 23,
                                     24, 25, 26, 27, 28, 31]


def test_ttm_hook_rejects_frames_with_different_positions():
    state = visual_tokens(angle_frames(ANGLES))
    state.keep([i for i in range(32) if i != 5])  # frame 1 lost a token
    with pytest.raises(ConfigError, match="same token count"):
        TemporalTokenMerging().tokcomp_pre_llm(state)
    state = visual_tokens(angle_frames(ANGLES))
    state.keep([0, 1, 2, 3, 5, 4, *range(6, 32)])  # frame 1's tokens out of grid order
    with pytest.raises(ConfigError, match="same grid positions"):
        TemporalTokenMerging().tokcomp_pre_llm(state)


def test_ttm_plan_declares_the_per_frame_counts():
    tokens = PlannedTokens([196] * 32, (14, 14))
    TemporalTokenMerging().plan_pre_llm(None, tokens)
    assert tokens.per_frame == [196, 58, 58, 58] * 7 + [196, 58, 196, 58]
    assert tokens.total == 3098  # content tokens only: the framework adds the newline


def test_ttm_rejects_k_outside_zero_one():
    with pytest.raises(ValueError, match="k=1.0"):
        TemporalTokenMerging(k=1.0)
    with pytest.raises(ValueError, match="k=-0.1"):
        TemporalTokenMerging(k=-0.1)


# ---------------------------------------------------------------------------------------------
# KV pruning on hand-made decode states

POSITIONS = [0, 3, 4, 5, 6, 7, 9, 10]  # gaps, as after an earlier prune
VISUAL = [False, True, True, True, True, True, False, False]
ATTENTION = [0.1, 0.05, 0.3, 0.01, 0.2, 0.04, 0.1, 0.2]  # visual: 0.05, 0.3, 0.01, 0.2, 0.04


def decode_state(attention, positions=POSITIONS, visual=VISUAL, step=1, layer=3):
    return DecodeState(layer=layer, step=step, attention=torch.tensor(attention),
                       positions=torch.tensor(positions), visual=torch.tensor(visual))


def test_kv_keep_indices_keeps_text_and_the_top_visual_by_attention():
    keep = dycoke.kv_keep_indices(torch.tensor(ATTENTION), torch.tensor(VISUAL), 0.6)  # int(5 * 0.4) = 2
    assert keep.tolist() == [0, 2, 4, 6, 7]


def test_kv_keep_count_truncates():
    assert dycoke.kv_keep_count(129, 0.7) == 38  # 38.7
    assert dycoke.kv_keep_count(6273, 0.8) == 1254  # 1254.6
    assert dycoke.kv_keep_count(5, 0.9) == 0  # 0.5: no visual entry left, as the official topk(0)


def test_attention_changed_compares_the_cosine_with_the_threshold():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # cos = 0.7071
    assert dycoke.attention_changed(a, None, 0.9)
    assert not dycoke.attention_changed(b, a, 0.70)
    assert dycoke.attention_changed(b, a, 0.75)
    assert not dycoke.attention_changed(2 * a, a, 1.0)  # scale does not matter


def test_first_decode_step_prunes_by_attention_keeping_all_text():
    s = KVPruning(p=0.6)
    s.start(0)
    state = decode_state(ATTENTION)
    s.tokcomp_inner_llm_decode(state)
    assert state.selected.tolist() == [0, 4, 6, 9, 10]  # text 0, 9, 10; visual 4 (0.3), 6 (0.2)


def test_stable_step_reads_the_full_cache_by_default():
    s = KVPruning(p=0.6)
    s.start(0)
    s.tokcomp_inner_llm_decode(decode_state(ATTENTION))
    stable = decode_state([*[2 * a for a in ATTENTION], 0.5], POSITIONS + [11], VISUAL + [False], step=2)
    s.tokcomp_inner_llm_decode(stable)
    assert stable.selected is None  # no select: every entry is read


def test_stable_step_reuses_the_previous_selection_when_asked():
    s = KVPruning(p=0.6, stable_reuses_selection=True)
    s.start(0)
    s.tokcomp_inner_llm_decode(decode_state(ATTENTION))
    stable = decode_state([*[2 * a for a in ATTENTION], 0.5], POSITIONS + [11], VISUAL + [False], step=2)
    s.tokcomp_inner_llm_decode(stable)
    assert stable.selected.tolist() == [0, 4, 6, 9, 10, 11]  # the new token is text and read too


def test_changed_attention_re_prunes():
    s = KVPruning(p=0.6)
    s.start(0)
    s.tokcomp_inner_llm_decode(decode_state(ATTENTION))
    # visual attention moved to entries 3 (pos 5) and 5 (pos 7): cos with the previous < 0.9
    moved = decode_state([0.1, 0.01, 0.02, 0.3, 0.03, 0.25, 0.1, 0.2, 0.5], POSITIONS + [11],
                         VISUAL + [False], step=2)
    s.tokcomp_inner_llm_decode(moved)
    assert moved.selected.tolist() == [0, 5, 7, 9, 10, 11]


def test_similarity_is_taken_against_the_previous_step_not_the_last_prune():
    # visual attention a=(1,0), b=(1,1), c=(0,1): cos(a,b)=cos(b,c)=0.707 >= 0.7, cos(a,c)=0
    s = KVPruning(p=0.5, threshold=0.7)
    s.start(0)
    pos, vis = [0, 1, 2], [False, True, True]
    first = decode_state([0.0, 1.0, 0.0], pos, vis)
    s.tokcomp_inner_llm_decode(first)
    assert first.selected.tolist() == [0, 1]
    for step, att in ((2, [0.0, 1.0, 1.0, 0.0]), (3, [0.0, 0.0, 1.0, 0.0, 0.0])):
        state = decode_state(att, pos + list(range(3, step + 2)), vis + [False] * (step - 1), step=step)
        s.tokcomp_inner_llm_decode(state)
        assert state.selected is None, step


def test_start_forgets_the_previous_run():
    s = KVPruning(p=0.6)
    s.start(0)
    s.tokcomp_inner_llm_decode(decode_state(ATTENTION))
    s.start(1)
    again = decode_state(ATTENTION)
    s.tokcomp_inner_llm_decode(again)
    assert again.selected is not None  # a first step again: pruned, not "stable"


def test_kv_pruning_checks_layer_and_parameters():
    info = ModelInfo("m", 4, (8, 8), (4, 4), 4, 64)
    KVPruning(layer=1).check(info)
    KVPruning(layer=3).check(info)
    for layer in (0, 4):
        with pytest.raises(ConfigError, match=f"layer={layer}"):
            KVPruning(layer=layer).check(info)
    with pytest.raises(ValueError, match="p=1.0"):
        KVPruning(p=1.0)
    with pytest.raises(ValueError, match="threshold=1.5"):
        KVPruning(threshold=1.5)
    assert KVPruning().decode_layers(info) == {3}


# ---------------------------------------------------------------------------------------------
# tiny model (8 frames of 4x4 pooled tokens; the framework adds 1 newline)


def test_ttm_on_tiny_model_keeps_the_planned_per_frame_counts(tiny, pixels):
    out = run_with(tiny, pixels, [TemporalTokenMerging()], max_new_tokens=2)
    ledger = out.ledger
    assert ledger.visual_tokens_after_pre_llm == 16 + 4 + 4 + 4 + 16 + 4 + 16 + 4
    assert ledger.special_tokens == 1  # the newline still reaches the LLM
    planned = plan_ledger(tiny, 8, ledger.text_tokens, [TemporalTokenMerging()])
    assert planned.visual_tokens_after_pre_llm == ledger.visual_tokens_after_pre_llm
    assert ledger.llm_layers == [ledger.text_tokens + 68 + 1] * tiny.info.llm_layers


@dataclass
class RecordingKVPruning(KVPruning):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.seen: list[tuple[int, int, int, int | None]] = []

    @hookimpl
    def tokcomp_inner_llm_decode(self, state: DecodeState) -> None:
        super().tokcomp_inner_llm_decode(state)
        read = None if state.selected is None else state.selected.numel()
        self.seen.append((state.step, state.positions.numel(), int(state.visual.sum()), read))


def test_kv_pruning_on_tiny_model_prunes_decoding_only(tiny, pixels):
    base = run_with(tiny, pixels, [], max_new_tokens=6)
    s = RecordingKVPruning()  # layer 3, p 0.7
    out = run_with(tiny, pixels, [s], max_new_tokens=6)
    assert torch.equal(out.prefill_logits, base.prefill_logits)  # prefill untouched
    assert out.new_ids[0] == base.new_ids[0] and len(out.new_ids) == 6
    assert [step for step, *_ in s.seen] == list(range(1, len(s.seen) + 1)) and len(s.seen) >= 4
    step, entries, visual, read = s.seen[0]
    assert visual == 128  # content tokens; the newline is kept like text
    assert read == entries - visual + 38  # all text (and the newline) plus int(128 * 0.3) visual entries


def test_kv_pruning_keeping_every_visual_entry_changes_nothing(tiny, pixels):
    base = run_with(tiny, pixels, [], max_new_tokens=6)
    out = run_with(tiny, pixels, [KVPruning(p=0.0)], max_new_tokens=6)
    assert out.new_ids == base.new_ids


def test_kv_pruning_reusing_the_selection_reads_the_same_visual_entries_every_step(tiny, pixels):
    s = RecordingKVPruning(stable_reuses_selection=True)
    run_with(tiny, pixels, [s], max_new_tokens=6)
    assert len(s.seen) == 5
    assert all(read == entries - visual + 38 for _, entries, visual, read in s.seen)  # new tokens are text, read


def test_decode_select_of_entries_a_later_layer_dropped_names_that_layer(tiny, pixels):
    """Selections are checked against every layer they apply to (one check per step, the first failing
    layer named): FastV dropped half the visual entries from layer 3 on, so layer 2's selection of all fails."""
    from tokcomp.strategies.fastv import FastV

    from tokcomp.state import StrategyContractError

    with pytest.raises(StrategyContractError, match="decode select at layer 2: layer 3 no longer holds"):
        run_with(tiny, pixels, [KVPruning(layer=2, p=0.0), FastV(layer=3, ratio=0.5)], max_new_tokens=3)
    assert run_with(tiny, pixels, [], max_new_tokens=3).new_ids  # the hooks were removed
