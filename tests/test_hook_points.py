"""The hook-point features the compared methods rely on, checked on the tiny model with probe strategies."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from tokcomp.strategies.input_baselines import FrameSampling, InputPooling
from tokcomp.strategies.pyramiddrop import PyramidDrop, stage_keep

from tests.conftest import run_with
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.pooling import average_pool_grid
from tokcomp.stack import CompressionStack
from tokcomp.state import DecodeState, EncoderState
from tokcomp.strategy import Strategy


@dataclass
class EncoderProbe(Strategy):
    """Records the encoder state at the requested layers; optionally sets sizes (proportional attention)."""

    name = "test.encoder_probe"
    after: tuple = ()
    mid: tuple = ()
    keys_at: tuple = ()
    saliency_at: tuple = ()
    unit_sizes: bool = False
    seen: list = field(default_factory=list)

    def encoder_layers(self, info):
        return set(self.after)

    def encoder_mid_layers(self, info):
        return set(self.mid)

    def statistics(self, info):
        return {"vision.keys": set(self.keys_at), "vision.saliency": set(self.saliency_at)}

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        self.seen.append((state.layer, state.position, state.hidden.clone(), state.keys, state.saliency))
        if self.unit_sizes:
            state.replace(state.hidden, sizes=torch.ones(state.hidden.shape[:2], device=state.hidden.device))


@dataclass
class DecodeProbe(Strategy):
    name = "test.decode_probe"
    layer: int = 2
    keep_all: bool = True
    seen: list = field(default_factory=list)

    def decode_layers(self, info):
        return {self.layer}

    @hookimpl
    def tokcomp_inner_llm_decode(self, state: DecodeState) -> None:
        self.seen.append((state.step, state.attention.clone(), state.positions.clone(), state.visual.clone()))
        state.select(state.positions if self.keep_all else state.positions[~state.visual])


def test_frame_sampling_keeps_evenly_spread_frames_before_the_first_layer(tiny, pixels):
    probe = EncoderProbe(after=(-1,))
    out = run_with(tiny, pixels, [FrameSampling(ratio=0.5), probe])
    assert [e.frames for e in out.ledger.vision_layers] == [4] * 4
    assert out.ledger.embedded_tokens == 8 * 64
    assert probe.seen[0][1] == "input" and probe.seen[0][2].shape[0] == 4
    assert out.ledger.visual_tokens_after_pre_llm == 4 * 16 and out.ledger.special_tokens == 1


def test_input_pooling_averages_each_frames_embedding_grid(tiny, pixels):
    probe = EncoderProbe(after=(-1,))
    out = run_with(tiny, pixels, [InputPooling(ratio=0.25), probe])
    embeddings = tiny.vision.embeddings(pixels.pixels)
    expected = average_pool_grid(embeddings.view(8, 8, 8, -1), 4, 4).reshape(8, 16, -1)
    torch.testing.assert_close(probe.seen[0][2], expected)
    assert [e.tokens_per_frame for e in out.ledger.vision_layers] == [16] * 4
    assert out.ledger.pooled_tokens_per_frame == 4  # the 4x4 grid is still pooled 2x2 after the encoder


def test_a_mid_layer_hook_that_changes_nothing_leaves_the_run_bit_exact(tiny, pixels):
    reference = run_with(tiny, pixels, [])
    probe = EncoderProbe(mid=(1, 2))
    out = run_with(tiny, pixels, [probe])
    assert [(layer, pos) for layer, pos, *_ in probe.seen] == [(1, "attention"), (2, "attention")]
    assert torch.equal(out.prefill_logits, reference.prefill_logits)
    assert out.new_ids == reference.new_ids


def test_unit_sizes_make_proportional_attention_a_no_op(tiny, pixels):
    reference = run_with(tiny, pixels, [])
    out = run_with(tiny, pixels, [EncoderProbe(after=(0,), unit_sizes=True)])
    torch.testing.assert_close(out.prefill_logits, reference.prefill_logits, atol=1e-5, rtol=1e-5)


def test_keys_and_saliency_are_computed_from_the_layers_input(tiny, pixels):
    probe = EncoderProbe(after=(1, 2), keys_at=(2,), saliency_at=(2,))
    run_with(tiny, pixels, [probe])
    (_, _, h1, keys1, _), (_, _, _, keys2, saliency2) = probe.seen
    assert keys1 is None
    layer = tiny.vision.encoder.layers[2]
    qk = tiny.vision_qk(2, h1, True, pixels)  # the hidden states after layer 1 enter layer 2
    q, k = qk.q, qk.k
    torch.testing.assert_close(keys2, k.mean(dim=1))
    logits = torch.einsum("bhd,bhtd->bht", q.mean(dim=2), k) * layer.self_attn.scale
    torch.testing.assert_close(saliency2, logits.softmax(-1).mean(dim=1))
    assert torch.allclose(saliency2.sum(-1), torch.ones(8, device=saliency2.device))


def test_pooled_keys_reach_the_pre_llm_stage_one_row_per_content_token(tiny, pixels):
    from tokcomp.strategies.visionzip import VisionZip

    seen = {}

    @dataclass
    class PreProbe(Strategy):
        name = "test.pre_probe"

        def statistics(self, info):
            return {"vision.keys": {-1}}

        @hookimpl
        def tokcomp_pre_llm(self, state):
            seen["keys"], seen["tokens"] = state.keys, state.num_tokens

    out = run_with(tiny, pixels, [PreProbe()])
    # the strategy sees content tokens only; the newline is the framework's and still reaches the LLM
    assert seen["tokens"] == 8 * 16 and seen["keys"].shape == (8 * 16, 16)
    assert bool(seen["keys"].abs().sum(-1).gt(0).all())  # every row is a pooled key, none a placeholder
    assert out.ledger.special_tokens == 1
    assert out.ledger.llm_layers[0] == out.ledger.text_tokens + 8 * 16 + 1
    assert CompressionStack([VisionZip(ratio=0.25)], tiny.info).statistics["vision.keys"] == {tiny.info.vision_layers - 1}


def test_selecting_every_cache_entry_on_decode_steps_changes_nothing(tiny, pixels):
    reference = run_with(tiny, pixels, [], max_new_tokens=5)
    probe = DecodeProbe(layer=2)
    out = run_with(tiny, pixels, [probe], max_new_tokens=5)
    assert out.new_ids == reference.new_ids
    assert [s for s, *_ in probe.seen] == [1, 2, 3, 4]
    length = out.ledger.llm_layers[0]
    for step, attention, positions, visual in probe.seen:
        assert positions.tolist() == list(range(length + step))  # prompt, earlier decoded tokens, this token
        assert torch.isclose(attention.sum(), torch.tensor(1.0, device=attention.device))
        assert int(visual.sum()) == out.ledger.visual_tokens_after_pre_llm


def test_decode_selection_is_a_gather_of_the_cache_for_that_step(tiny):
    from tokcomp.decoding import DecoderCache

    cache = DecoderCache(config=tiny.language_model.config)
    keys = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 2, 5, 1)
    cache.update(keys, keys + 10, 0)
    cache.read_index[0] = torch.tensor([0, 2, 5])
    k, v = cache.update(torch.full((1, 2, 1, 1), 5.0), torch.full((1, 2, 1, 1), 15.0), 0)
    assert k[0, 0, :, 0].tolist() == [0.0, 2.0, 5.0] and v[0, 0, :, 0].tolist() == [10.0, 12.0, 15.0]
    assert cache.layers[0].keys.shape[2] == 6  # the cache itself keeps every entry


def test_decode_hook_runs_on_every_decode_step_and_leaves_prefill_alone(tiny, pixels):
    forced = [5, 6, 7, 8, 9]
    probe = DecodeProbe(layer=1, keep_all=False)
    out = run_with(tiny, pixels, [probe], max_new_tokens=5, forced_ids=forced)
    assert len(probe.seen) == 4
    reference = run_with(tiny, pixels, [], max_new_tokens=5, forced_ids=forced)
    assert torch.equal(out.prefill_logits, reference.prefill_logits)  # prefill untouched


def test_decode_selection_may_not_drop_text_entries():
    state = DecodeState(layer=2, step=1, attention=torch.full((4,), 0.25), positions=torch.arange(4),
                        visual=torch.tensor([False, True, True, False]))
    from tokcomp.state import StrategyContractError

    with pytest.raises(StrategyContractError, match="non-visual"):
        state.select([0, 1, 2])
    state.select([3, 0])
    assert state.selected.tolist() == [0, 3]


def test_pyramiddrop_keeps_half_the_survivors_at_each_stage(tiny, pixels):
    out = run_with(tiny, pixels, [PyramidDrop(layers=[1, 3], stage_ratio=0.5)])
    text = out.ledger.text_tokens
    assert out.ledger.special_tokens == 1  # the newline is kept like text, not dropped with visual tokens
    assert [n - text - 1 for n in out.ledger.llm_layers] == [128, 64, 64, 32]
    assert stage_keep(128, 0.5) == 64 and stage_keep(129, 0.5) == 64 and stage_keep(1, 0.5) == 1 and stage_keep(0, 0.5) == 0


def test_pyramiddrop_keeps_the_tokens_the_last_token_attends_to_most():
    from tokcomp.state import LLMState

    state = LLMState(layer=3, num_layers=4, hidden=torch.zeros(1, 6, 2), position_ids=torch.arange(6)[None],
                     visual_mask=torch.tensor([False, True, True, True, True, False]),
                     last_token_attention={2: torch.tensor([0.3, 0.05, 0.3, 0.1, 0.2, 0.05])})
    PyramidDrop(layers=[3], stage_ratio=0.5).tokcomp_inner_llm(state)
    assert state.position_ids.tolist() == [[0, 2, 4, 5]]


def test_pyramiddrop_rejects_impossible_layers(tiny):
    from tokcomp.errors import ConfigError

    with pytest.raises(ConfigError, match="layers=8"):
        PyramidDrop(layers=[2, 8]).check(tiny.info)
    PyramidDrop().check(tiny.info)  # the defaults are fractions of the depth: they fit every model
    assert PyramidDrop().llm_layers(tiny.info) == {1, 2, 3}
    with pytest.raises(ValueError, match="repeats"):
        PyramidDrop(layers=[1, 1])
    with pytest.raises(ConfigError, match="'ratio'. Did you mean 'stage_ratio'"):  # lambda is not a kept fraction
        PyramidDrop.from_params({"ratio": 0.5})


def test_input_baselines_reject_impossible_ratios():
    with pytest.raises(ValueError, match="ratio=0"):
        FrameSampling(ratio=0)
    with pytest.raises(ValueError, match="ratio=1.5"):
        InputPooling(ratio=1.5)


def test_text_query_attention_is_the_max_of_causal_softmax_rows():
    from tokcomp.ops.attention import text_query_attention

    torch.manual_seed(0)
    q, k = torch.randn(3, 10, 4), torch.randn(3, 10, 4)
    full = (q @ k.transpose(1, 2) * 0.5).masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    probs = F.softmax(full, dim=-1)
    rows = torch.tensor([7, 8, 9])
    expected = probs[:, rows].amax(dim=(0, 1))
    torch.testing.assert_close(text_query_attention(q[:, rows], k, rows, 0.5), expected)
