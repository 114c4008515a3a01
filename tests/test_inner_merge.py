"""HoliTom's inner-LLM merge: which tokens are kept, where the others merge, with what weights,
and that a run with it equals a hand-written forward pass over the merged tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from tokcomp.strategies.holitom import HOLITOM_STRATEGIES, InnerMerge

from tests.conftest import run_with
from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.kernels import scatter_mean
from tokcomp.ops.merge import (
    merge_mean,
    merge_sequential,
    merged_keep_count,
    nearest_kept,
    sequential_weights,
)
from tokcomp.plan import plan_ledger
from tokcomp.state import LLMState
from tokcomp.strategy import Strategy

FRAMES, POOLED = 8, 16  # tiny model: 8 frames of 4x4 pooled tokens
VISUAL = FRAMES * POOLED
SPECIAL = 1  # LLaVA's newline: spliced after the video by the framework, kept like text
K = 2  # tiny has 4 decoder layers


def idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# --- tensor math on hand-checkable cases -------------------------------------------------------

def test_keep_count_rounds_halves_to_even_and_keeps_at_least_one():
    assert merged_keep_count(129, 0.5) == 64  # 64.5 -> 64, as Python's round in the official code
    assert merged_keep_count(131, 0.5) == 66  # 65.5 -> 66
    assert merged_keep_count(6273, 0.5) == 3136  # 3136.5 -> 3136
    assert merged_keep_count(10, 0.0) == 10
    assert merged_keep_count(10, 0.3) == 7
    assert merged_keep_count(1, 0.9) == 1
    assert merged_keep_count(0, 0.5) == 0


def test_nearest_kept_uses_cosine_not_dot_product():
    hidden = torch.tensor([[1.0, 0.0], [10.0, 10.0], [1.0, 0.2], [0.1, 1.0], [-1.0, 0.0]])
    kept, others = idx(0, 1), idx(2, 3, 4)
    # token 2 has the larger dot product with the long token 1 (12 > 1) but points along token 0
    assert nearest_kept(hidden, kept, others).tolist() == [0, 1, 1]


def test_nearest_kept_returns_positions_in_kept_not_sequence_indices():
    hidden = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    assert nearest_kept(hidden, idx(3, 1), idx(2, 0)).tolist() == [1, 0]


def test_scatter_mean_counts_the_base_row_once_per_group():
    values = torch.tensor([[1.0], [2.0], [3.0]])
    index = idx(0, 0, 1)
    base = torch.tensor([[0.0], [10.0], [5.0]])
    assert scatter_mean(values, index, base).flatten().tolist() == [1.0, 6.5, 5.0]  # (0+1+2)/3, (10+3)/2, 5


def test_scatter_mean_accumulates_bf16_in_float32():
    values = torch.full((300, 1), 1.0 + 2.0**-7, dtype=torch.bfloat16)
    base = torch.full((1, 1), 1.0 + 2.0**-7, dtype=torch.bfloat16)
    out = scatter_mean(values, torch.zeros(300, dtype=torch.long), base)
    assert out.dtype == torch.bfloat16 and out.item() == 1.0 + 2.0**-7


def test_mean_and_sequential_differ_once_two_tokens_merge_into_one():
    hidden = torch.tensor([[0.0], [4.0], [8.0]])  # kept 0; 1 then 2 merge into it
    kept, others, assignment = idx(0), idx(1, 2), idx(0, 0)
    assert merge_mean(hidden, kept, others, assignment).item() == 4.0  # (0 + 4 + 8) / 3
    assert merge_sequential(hidden, kept, others, assignment).item() == 5.0  # ((0 + 4)/2 + 8)/2
    # the sequential result depends on the order sources come in; the mean does not
    assert merge_sequential(hidden, kept, idx(2, 1), assignment).item() == 4.0  # ((0 + 8)/2 + 4)/2
    assert merge_mean(hidden, kept, idx(2, 1), assignment).item() == 4.0


def test_mean_and_sequential_agree_with_one_token_per_destination():
    hidden = torch.tensor([[2.0, 0.0], [0.0, 6.0], [4.0, 2.0], [8.0, 0.0]])
    kept, others, assignment = idx(0, 1), idx(2, 3), idx(1, 0)
    expected = torch.tensor([[5.0, 0.0], [2.0, 4.0]])  # (h0 + h3)/2, (h1 + h2)/2
    assert torch.equal(merge_mean(hidden, kept, others, assignment), expected)
    assert torch.equal(merge_sequential(hidden, kept, others, assignment), expected)


def test_sequential_weights_halve_towards_the_earliest_source():
    source, kept = sequential_weights(idx(1, 0, 1, 1), num_kept=3)
    # destination 1 receives sources 0, 2, 3 in that order: 1/8, 1/4, 1/2 and itself 1/8
    assert source.tolist() == [0.125, 0.5, 0.25, 0.5]
    assert kept.tolist() == [0.5, 0.125, 1.0]


def test_sequential_merge_equals_the_official_pairwise_loop():
    torch.manual_seed(0)
    hidden = torch.randn(40, 8)
    kept, others = torch.arange(0, 40, 5), torch.tensor([i for i in range(40) if i % 5])
    assignment = torch.randint(0, kept.numel(), (others.numel(),))
    expected = hidden[kept].clone()
    for src, dst in zip(others.tolist(), assignment.tolist(), strict=True):  # visual order
        expected[dst] = (expected[dst] + hidden[src]) / 2
    torch.testing.assert_close(merge_sequential(hidden, kept, others, assignment), expected)
    mean = torch.stack([torch.cat([hidden[kept[j]][None], hidden[others[assignment == j]]]).mean(0)
                        for j in range(kept.numel())])
    torch.testing.assert_close(merge_mean(hidden, kept, others, assignment), mean)


# --- the strategy on a hand-built state --------------------------------------------------------

def hand_state(layer: int = 1) -> LLMState:
    """Text 0, visual 1..4, text 5; layer 0's attention ranks visual tokens 2 and 4 highest."""
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 0.1], [2.0, 0.0], [0.1, 3.0], [0.0, 1.0], [7.0, -7.0]]])
    state = LLMState(layer=layer, num_layers=4, hidden=hidden, position_ids=torch.arange(6)[None],
                     visual_mask=torch.tensor([False, True, True, True, True, False]))
    state.last_token_attention = {layer - 1: torch.tensor([0.3, 0.1, 0.2, 0.05, 0.15, 0.2])}
    return state


@pytest.mark.parametrize("mode", ["mean", "sequential"])
def test_hook_keeps_top_attended_visual_tokens_and_merges_each_other_into_its_nearest(mode):
    state = hand_state()
    before = state.hidden.clone()
    InnerMerge(layer=1, merge_ratio=0.5, mode=mode).tokcomp_inner_llm(state)
    # 2 of 4 visual kept (2 and 4); 1 points along 2, 3 along 4; positions keep their gaps
    assert state.position_ids.tolist() == [[0, 2, 4, 5]]
    assert state.visual_mask.tolist() == [False, True, True, False]
    expected = torch.stack([before[0, 0], (before[0, 2] + before[0, 1]) / 2, (before[0, 4] + before[0, 3]) / 2,
                            before[0, 5]])
    torch.testing.assert_close(state.hidden[0], expected)


def test_hook_merges_in_visual_order_in_sequential_mode():
    state = hand_state()
    state.last_token_attention = {0: torch.tensor([0.3, 0.1, 0.05, 0.05, 0.4, 0.2])}  # visual 4 ranks first
    before = state.hidden[0].clone()
    InnerMerge(layer=1, merge_ratio=0.75, mode="sequential").tokcomp_inner_llm(state)  # round(4 * 0.25) = 1 kept: 4
    assert state.position_ids.tolist() == [[0, 4, 5]]
    expected = before[4]
    for src in (1, 2, 3):
        expected = (expected + before[src]) / 2
    torch.testing.assert_close(state.hidden[0, 1], expected)
    assert not torch.allclose(expected, before[1:5].mean(0))


def test_hook_leaves_text_hidden_states_and_the_attention_row_of_kept_tokens_untouched():
    state = hand_state()
    before = state.hidden.clone()
    InnerMerge(layer=1, merge_ratio=0.5).tokcomp_inner_llm(state)
    assert torch.equal(state.hidden[0, [0, 3]], before[0, [0, 5]])
    assert state.last_token_attention[0].tolist() == pytest.approx([0.3, 0.2, 0.15, 0.2])


def test_zero_ratio_merges_nothing():
    state = hand_state()
    before = state.hidden.clone()
    InnerMerge(layer=1, merge_ratio=0.0).tokcomp_inner_llm(state)
    assert torch.equal(state.hidden, before) and state.position_ids.tolist() == [list(range(6))]


# --- parameters ----------------------------------------------------------------------------

def test_defaults_are_the_official_ones():
    s = InnerMerge()
    assert (s.layer, s.merge_ratio, s.mode) == (18, 0.5, "mean")
    assert s.name == "holitom.inner_merge" and InnerMerge in HOLITOM_STRATEGIES
    assert InnerMerge.hook_points() == ["inner_llm"]


@pytest.mark.parametrize("params, bad", [
    ({"merge_ratio": 1.0}, "merge_ratio=1.0"), ({"merge_ratio": -0.1}, "merge_ratio=-0.1"),
    ({"merge_ratio": float("nan")}, "merge_ratio=nan"), ({"mode": "max"}, "'max'"), ({"merge_ratio": "half"}, "'half'"),
    ({"ratio": 0.5}, "'ratio'. Did you mean 'merge_ratio'"),  # renamed: ratio is a kept fraction elsewhere
])
def test_bad_parameters_are_config_errors_naming_the_value(params, bad):
    with pytest.raises(ConfigError, match=bad):
        InnerMerge.from_params(params)


def test_direct_construction_rejects_a_bad_mode():
    with pytest.raises(ConfigError, match="mode='max'"):
        InnerMerge(mode="max")  # type: ignore[arg-type]


@pytest.mark.parametrize("layer", [0, 4, -1])
def test_layer_must_have_a_previous_layer_and_exist(tiny, layer):
    with pytest.raises(ConfigError, match=f"layer={layer} is outside the LLM layers 1..3"):
        InnerMerge.from_params({"layer": layer}).check(tiny.info)


# --- end to end on the tiny model ----------------------------------------------------------

@dataclass
class Recorder(Strategy):
    """Records the state it sees at ``at``; listed before or after the merge at the same layer."""

    name = "test.recorder"
    at: int = K
    seen: list = field(default_factory=list)

    def llm_layers(self, info):
        return {self.at}

    @hookimpl
    def tokcomp_inner_llm(self, state):
        self.seen.append((state.hidden.clone(), state.position_ids.clone(), state.visual_mask.clone()))


def test_sequence_shrinks_at_layer_k_by_the_merged_count(tiny, pixels):
    out = run_with(tiny, pixels, [InnerMerge(layer=K, merge_ratio=0.5)])
    assert out.ledger.special_tokens == SPECIAL
    full = out.ledger.text_tokens + VISUAL + SPECIAL
    merged = VISUAL - 64  # round(128 * 0.5) = 64 kept; the newline is never merged
    assert out.ledger.llm_layers == [full, full, full - merged, full - merged]
    assert out.ledger.attention_stats == [{"where": "llm", "layer": K - 1, "seq": full}]
    assert len(out.new_ids) == 6  # decoding continues over the shorter cache


@pytest.mark.parametrize("mode", ["mean", "sequential"])
def test_text_is_untouched_and_kept_visual_tokens_change(tiny, pixels, mode):
    before, after = Recorder(), Recorder()
    run_with(tiny, pixels, [before, InnerMerge(layer=K, merge_ratio=0.5, mode=mode), after], max_new_tokens=1)
    (h0, p0, v0), (h1, p1, v1) = before.seen[0], after.seen[0]
    text = p0[0, ~v0]
    assert torch.equal(p1[0, ~v1], text)  # every text token, at its own position
    assert torch.equal(h1[0, ~v1], h0[0, ~v0])  # with its hidden state bit-exact
    kept = p1[0, v1]
    assert kept.numel() == 64 and bool((kept[1:] > kept[:-1]).all())  # original positions, in order
    assert not torch.allclose(h1[0, v1], h0[0, kept])  # kept tokens now carry merged tokens


@pytest.mark.parametrize("mode", ["mean", "sequential"])
def test_prefill_matches_a_manual_forward_over_the_merged_tokens(tiny, pixels, mode):
    """Layers >= K see the kept tokens, merged by hand, at their original positions."""
    from tests.conftest import ManualPrefill

    ratio = 0.5
    out = run_with(tiny, pixels, [InnerMerge(layer=K, merge_ratio=ratio, mode=mode)], max_new_tokens=1)
    with torch.no_grad():
        ref = ManualPrefill(tiny, pixels)
        scores = ref.run_to(K)
        h, visual = ref.hidden, ref.visual
        n_keep = round(len(visual) * (1 - ratio))
        kept = sorted(visual[i] for i in torch.topk(scores[visual], n_keep).indices.tolist())
        merged = {k: [h[0, k]] for k in kept}
        for src in (v for v in visual if v not in kept):
            sims = [F.cosine_similarity(h[0, src], h[0, k], dim=0) for k in kept]
            dst = kept[int(torch.stack(sims).argmax())]
            merged[dst].append(h[0, src])
        h = h.clone()
        for k, group in merged.items():
            if mode == "mean":
                h[0, k] = torch.stack(group).mean(0)
            else:
                value = group[0]
                for src in group[1:]:
                    value = (value + src) / 2
                h[0, k] = value
        ref.hidden = h
        logits = ref.finish(ref.text_around(kept), K)
    assert any(len(g) > 2 for g in merged.values())  # the modes really differ on this input
    torch.testing.assert_close(out.prefill_logits, logits, atol=1e-5, rtol=1e-4)


def test_modes_give_different_prefill_logits(tiny, pixels):
    mean = run_with(tiny, pixels, [InnerMerge(layer=K, mode="mean")], max_new_tokens=1)
    sequential = run_with(tiny, pixels, [InnerMerge(layer=K, mode="sequential")], max_new_tokens=1)
    assert not torch.allclose(mean.prefill_logits, sequential.prefill_logits, atol=1e-5)


def test_zero_ratio_run_equals_the_uncompressed_run(tiny, pixels):
    base = run_with(tiny, pixels, [])
    zero = run_with(tiny, pixels, [InnerMerge(layer=K, merge_ratio=0.0)])
    assert zero.new_ids == base.new_ids
    assert torch.equal(zero.prefill_logits, base.prefill_logits)
    assert zero.ledger.llm_layers == base.ledger.llm_layers


def test_hooks_are_removed_after_a_run(tiny, pixels):
    before = run_with(tiny, pixels, [])
    run_with(tiny, pixels, [InnerMerge(layer=K, mode="sequential")])
    assert all(not layer._forward_pre_hooks for layer in tiny.language_model.layers)
    after = run_with(tiny, pixels, [])
    assert before.new_ids == after.new_ids
    assert torch.equal(before.prefill_logits, after.prefill_logits)


@pytest.mark.parametrize("spec", [
    [("holitom.inner_merge", {"layer": K, "merge_ratio": 0.5})],
    [("holitom.inner_merge", {"layer": 1, "merge_ratio": 0.3, "mode": "sequential"})],
    [("pooling", {"ratio": 0.25}), ("holitom.inner_merge", {"layer": 3, "merge_ratio": 0.5})],  # 32 -> 16 kept
    [("fastv", {"layer": 1, "ratio": 0.5}), ("holitom.inner_merge", {"layer": K, "merge_ratio": 0.9})],
], ids=["k2", "k1_sequential", "pooling+k3", "fastv+k2"])
def test_planned_ledger_equals_the_recorded_one(plugins, tiny, pixels, spec):
    strategies = [InnerMerge.from_params(p) if n == InnerMerge.name else plugins.strategy(n).from_params(p)
                  for n, p in spec]
    recorded = run_with(tiny, pixels, strategies, max_new_tokens=1).ledger
    planned = plan_ledger(tiny, pixels.frames, recorded.text_tokens, strategies)
    planned.new_tokens = recorded.new_tokens
    assert planned.to_dict() == recorded.to_dict()
    assert recorded.llm_layers[-1] < recorded.llm_layers[0]

