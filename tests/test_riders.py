"""Riders (per-token features a model carries beside the hidden states, e.g. Qwen3-VL's DeepStack) follow
every drop and merge of every strategy, exactly as the hidden states or features do.

The invariant: every drop or merge is a weighted combination of tokens whose weights come from the
hidden states (or features, scores, keys), never from the riders. So riders = hidden @ A for a fixed
random A before a strategy acts must still be (new hidden) @ A after it (float32, up to rounding). A
probe strategy attaches such riders right before the strategy under test, at the same hook call, and
a checker right after it verifies the invariant and removes them again (the tiny models carry none,
so nothing past the hook may see them). A strategy that forgets the riders raises the state's
StrategyContractError; one that merges them differently breaks the equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from tests.conftest import model_spec, run_info, run_with
from tests.test_every_strategy import TINY_PARAMS
from tokcomp.hookspecs import hookimpl
from tokcomp.plugins import Plugins
from tokcomp.state import EncoderState, StrategyContractError, VisualTokens
from tokcomp.strategy import ModelInfo, Strategy
from tokcomp.video import generate_video, uniform_frame_indices

RIDER_DIM = 5
PLUGINS = Plugins()
ENCODER = sorted(n for n in PLUGINS.strategies if "intra_encoder" in PLUGINS.strategy(n).hook_points())
PRE_LLM = sorted(n for n in PLUGINS.strategies if "pre_llm" in PLUGINS.strategy(n).hook_points())
# Strategies that combine tokens (not only drop them): on the tiny clip at least one of their output
# riders must be a true mix, or the invariant would be checked on selections alone.
MERGING = {"earlytom.frame_merge", "frame_avg", "input.pooling", "tome",
           "pooling", "visionzip", "holitom.outer_merge", "prunevid.outer", "fastvid"}


def projection(dim: int, device: torch.device | str = "cpu") -> Tensor:
    """A fixed random (dim, RIDER_DIM) matrix: riders = hidden @ A (drawn on the CPU: the same on any device)."""
    return (torch.randn(dim, RIDER_DIM, generator=torch.Generator().manual_seed(7)) / dim**0.5).to(device)


@dataclass
class Check:
    """What the checker saw at one hook call: shapes before and after, and how many rider rows are new
    (equal to no input row: merged, not merely kept)."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    mixed: int


@dataclass
class Riders:
    """One run's shared record: the riders attached at each hook call, and the checks."""

    attached: list[Tensor] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def check(record: Riders, riders: Tensor | None, values: Tensor) -> None:
    """The invariant after the strategy under test: riders == values @ A; recorded, then riders removed."""
    assert riders is not None, "the strategy under test dropped the riders"
    expected = values.float() @ projection(values.shape[-1], values.device)
    torch.testing.assert_close(riders.float(), expected, rtol=1e-4, atol=1e-4)
    given = record.attached[-1]
    distance = torch.cdist(rows(riders).float(), rows(given).float())
    record.checks.append(Check(tuple(given.shape[:-1]), tuple(riders.shape[:-1]),
                               int((distance.min(dim=1).values > 1e-6).sum())))


@dataclass
class AttachEncoderRiders(Strategy):
    """At the target's intra-encoder calls, before it: riders = hidden @ A."""

    name = "test.attach_encoder_riders"
    after: frozenset = frozenset()
    mid: frozenset = frozenset()
    record: Riders = field(default_factory=Riders)

    def encoder_layers(self, info: ModelInfo) -> set[int]:
        return set(self.after)

    def encoder_mid_layers(self, info: ModelInfo) -> set[int]:
        return set(self.mid)

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        state.riders = state.hidden @ projection(state.hidden.shape[-1], state.hidden.device)
        self.record.attached.append(state.riders.clone())


@dataclass
class CheckEncoderRiders(AttachEncoderRiders):
    """At the same calls, after the target: the invariant; then no riders (the tiny models carry none)."""

    name = "test.check_encoder_riders"

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        check(self.record, state.riders, state.hidden)
        state.riders = None


@dataclass
class AttachTokenRiders(Strategy):
    """First at pre-LLM: riders = features @ A."""

    name = "test.attach_token_riders"
    record: Riders = field(default_factory=Riders)

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        state.riders = state.features @ projection(state.features.shape[-1], state.features.device)
        self.record.attached.append(state.riders.clone())


@dataclass
class CheckTokenRiders(AttachTokenRiders):
    """Last at pre-LLM: the invariant; then no riders."""

    name = "test.check_token_riders"

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        check(self.record, state.riders, state.features)
        state.riders = None


@pytest.fixture(scope="module")
def model(plugins):
    """The tiny LLaVA model in float32 (merges in float32 then back to the dtype stay tight) and a clip."""
    adapter = plugins.model("tiny").build(model_spec(dtype="float32"))
    clip, _ = generate_video(length=48, height=64, width=64, shots=2, seed=1)
    return adapter, adapter.preprocess(clip[uniform_frame_indices(48, 8)])


def wrapped(name: str, hook: str, adapter, video) -> tuple[list[Strategy], Riders]:
    """[attach, strategy, check] for the strategy's ``hook``, sharing one record."""
    strategy = PLUGINS.strategy(name).from_params(TINY_PARAMS.get(name, {}))
    strategy.restrict_hooks([hook])
    info = run_info(adapter, video)
    record = Riders()
    if hook == "intra_encoder":
        where = dict(after=frozenset(strategy.encoder_layers(info)), mid=frozenset(strategy.encoder_mid_layers(info)))
        return [AttachEncoderRiders(**where, record=record), strategy, CheckEncoderRiders(**where, record=record)], record
    return [AttachTokenRiders(record=record), strategy, CheckTokenRiders(record=record)], record


@pytest.mark.parametrize(("name", "hook"), [(n, "intra_encoder") for n in ENCODER] + [(n, "pre_llm") for n in PRE_LLM])
def test_riders_follow_every_drop_and_merge(name, hook, model):
    adapter, video = model
    stack, record = wrapped(name, hook, adapter, video)
    out = run_with(adapter, video, stack, max_new_tokens=1)

    assert record.checks and len(record.checks) == len(record.attached)
    assert any(c.before != c.after for c in record.checks), f"{name} changed no tokens on the tiny clip"
    if name in MERGING:
        assert sum(c.mixed for c in record.checks) > 0, f"{name} merged no tokens on the tiny clip"
    # carrying riders changes nothing else: the run without them is bit-exact
    plain = PLUGINS.strategy(name).from_params(TINY_PARAMS.get(name, {}))
    assert torch.equal(run_with(adapter, video, [plain], max_new_tokens=1).prefill_logits, out.prefill_logits)


@dataclass
class ForgetsEncoderRiders(Strategy):
    """Drops the last token of every frame the wrong way: without passing the riders on."""

    name = "test.forgets_encoder_riders"

    def encoder_layers(self, info: ModelInfo) -> set[int]:
        return {0}

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        state.replace(state.hidden[:, :-1])


@dataclass
class ForgetsTokenRiders(Strategy):
    name = "test.forgets_token_riders"

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        state.replace(state.features[:-1], state.frame[:-1], state.row[:-1], state.col[:-1], state.source[:-1])


def test_a_strategy_that_forgets_the_riders_gets_a_clear_contract_error(model):
    adapter, video = model
    layer0 = dict(after=frozenset({0}))
    with pytest.raises(StrategyContractError, match=r"intra-encoder: this model carries per-token riders.*riders="):
        run_with(adapter, video, [AttachEncoderRiders(**layer0), ForgetsEncoderRiders(), CheckEncoderRiders(**layer0)],
                 max_new_tokens=1)
    with pytest.raises(StrategyContractError, match=r"pre-LLM replace: this model carries per-token riders"):
        run_with(adapter, video, [AttachTokenRiders(), ForgetsTokenRiders(), CheckTokenRiders()], max_new_tokens=1)


def test_riders_merged_differently_break_the_invariant():
    """The checker is not vacuous: riders averaged with other weights than the hidden states fail it."""
    hidden = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1))
    state = EncoderState(layer=0, num_layers=4, hidden=hidden, grid=(2, 3), frame_sources=[[0], [1], [2], [3]],
                         riders=hidden @ projection(8))
    record = Riders(attached=[state.riders.clone()])
    merged = torch.stack([0.75 * hidden[0] + 0.25 * hidden[1], hidden[2], hidden[3]])
    wrong = torch.stack([0.5 * state.riders[0] + 0.5 * state.riders[1], state.riders[2], state.riders[3]])
    state.replace(merged, frame_sources=[[0, 1], [2], [3]], riders=wrong)
    with pytest.raises(AssertionError):
        check(record, state.riders, state.hidden)
    right = torch.stack([0.75 * record.attached[0][0] + 0.25 * record.attached[0][1], *record.attached[0][2:]])
    check(record, right, state.hidden)
