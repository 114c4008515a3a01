"""Token schedules without a forward pass: the ledger a run *would* record.

Strategies whose token counts follow from their parameters declare them through ``plan_*``
methods mirroring their hooks; ``plan_ledger`` replays the adapter's order of events (vision
layers, pre-LLM, decoder layers, attention statistics) on counts only. Data-dependent strategies
(temporal merging by similarity) do not declare a plan: their FLOPs need a finished run's ledger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tokcomp.errors import TokcompError
from tokcomp.ledger import TokenLedger, VisionLayerEntry, vision_stat_record
from tokcomp.strategy import ModelInfo, Strategy


class ScheduleUnknown(TokcompError):
    """A strategy's token counts depend on the data; use the ledger of a finished run."""


@dataclass
class PlannedTokens:
    """Visual-token counts at the pre-LLM stage: per frame, plus newline tokens."""

    per_frame: list[int]
    newline: int
    grid: tuple[int, int]

    @property
    def total(self) -> int:
        return sum(self.per_frame) + self.newline


def _active(strategies: Sequence[Strategy], hook: str) -> list[Strategy]:
    return [s for s in strategies if hook in s.active_hooks()]


def _require(strategy: Strategy, method: str) -> None:
    if getattr(type(strategy), method) is getattr(Strategy, method):
        nominal = ", or count its nominal budget (--nominal)" if hasattr(strategy, "nominal_pre_llm") else ""
        raise ScheduleUnknown(
            f"strategy {strategy.name!r} has a data-dependent token schedule; compute FLOPs from a finished "
            f"run's ledger (tokcomp flops --from-run RUN_ID){nominal}"
        )


def _plan_pre_llm(strategy: Strategy, info: ModelInfo, planned: PlannedTokens, nominal: bool) -> None:
    """The declared schedule, or with ``nominal`` the budget a data-dependent method targets."""
    exact = type(strategy).plan_pre_llm is not Strategy.plan_pre_llm
    if not exact and nominal and callable(getattr(strategy, "nominal_pre_llm", None)):
        strategy.nominal_pre_llm(info, planned)
        return
    _require(strategy, "plan_pre_llm")
    strategy.plan_pre_llm(info, planned)


def _union(strategies: Sequence[Strategy], method: str, info: ModelInfo, wrap: int | None = None) -> set[int]:
    out: set[int] = set()
    for s in strategies:
        out |= {i % wrap if wrap else i for i in getattr(s, method)(info)}
    return out


def plan_ledger(info: ModelInfo, frames: int, text_tokens: int, strategies: Sequence[Strategy],
                nominal: bool = False) -> TokenLedger:
    """The ledger a run would record; ``nominal``: data-dependent pre-LLM strategies count their budget."""
    tokens = info.vision_grid[0] * info.vision_grid[1]
    ledger = TokenLedger(input_frames=frames, text_tokens=text_tokens, embedded_tokens=frames * tokens)
    count = frames
    encoder = _active(strategies, "intra_encoder")
    last = info.vision_layers
    stats = {name: _union(strategies, f"encoder_{name}_layers", info, last) for name in ("attention", "key", "saliency")}
    if _union(strategies, "text_attention_layers", info):
        raise ScheduleUnknown("a strategy scores tokens by the text after the video: its schedule needs a finished run")
    for s in encoder:
        if -1 in s.encoder_layers(info):
            _require(s, "plan_intra_encoder")
            count, tokens = s.plan_intra_encoder(info, -1, count, tokens)
    for layer in range(info.vision_layers):
        entry = VisionLayerEntry(count, tokens)
        ledger.vision_layers.append(entry)
        names = {{"key": "keys"}.get(name, name) for name, layers in stats.items() if layer in layers}
        record = vision_stat_record(names, layer, count, tokens)
        if record is not None:
            ledger.attention_stats.append(record)
        for s in encoder:
            if layer in s.encoder_mid_layers(info):
                _require(s, "plan_intra_encoder")
                count, tokens = s.plan_intra_encoder(info, layer, count, tokens)
                entry.mlp_tokens_per_frame = tokens
        for s in encoder:
            if layer in s.encoder_layers(info):
                _require(s, "plan_intra_encoder")
                count, tokens = s.plan_intra_encoder(info, layer, count, tokens)
    ledger.vision_out_frames, ledger.vision_out_tokens_per_frame = count, tokens
    pooled_grid = info.pooled_grid if tokens == info.vision_grid[0] * info.vision_grid[1] else _pooled_grid(tokens)
    pooled = pooled_grid[0] * pooled_grid[1]
    ledger.pooled_tokens_per_frame = pooled
    planned = PlannedTokens([pooled] * count, 1, pooled_grid)
    ledger.visual_tokens_before_pre_llm = planned.total
    for s in _active(strategies, "pre_llm"):
        _plan_pre_llm(s, info, planned, nominal)
    ledger.visual_tokens_after_pre_llm, ledger.newline_tokens = planned.total, planned.newline
    visual, seq = planned.total, text_tokens + planned.total
    inner = _active(strategies, "inner_llm")
    stats_llm = set().union(*(s.attention_layers(info) for s in strategies)) if strategies else set()
    for layer in range(info.llm_layers):
        for s in inner:
            if layer in s.llm_layers(info):
                _require(s, "plan_inner_llm")
                kept = s.plan_inner_llm(info, layer, visual)
                seq, visual = seq - (visual - kept), kept
        if layer in stats_llm:
            ledger.attention_stats.append({"where": "llm", "layer": layer, "seq": seq})
        ledger.llm_layers.append(seq)
    return ledger


def _pooled_grid(tokens: int) -> tuple[int, int]:
    """The adapter's pooling of a changed token count: a square grid is halved, anything else left as one row."""
    side = math.isqrt(tokens)
    if side * side == tokens:
        return (side + 1) // 2, (side + 1) // 2
    return 1, tokens


def schedule_ledger(info: ModelInfo, frames: int, text_tokens: int, *, visual_tokens: int | None = None,
                    vision_frames_after: Sequence[tuple[int, int]] = (),
                    llm_stages: Sequence[tuple[int, float]] = ()) -> TokenLedger:
    """A ledger from an explicit schedule, for methods that are not (yet) strategies or are data-dependent.

    ``vision_frames_after``: (layer, frames) pairs, frames alive after that vision layer;
    ``visual_tokens``: video tokens spliced in (newline excluded; default all frames' pooled tokens);
    ``llm_stages``: (layer, ratio) pairs, from that decoder layer on keep round(n * ratio) video tokens.
    """
    from tokcomp.errors import ConfigError

    after = dict(vision_frames_after)
    for layer, count in after.items():
        if not 0 <= layer < info.vision_layers or count < 1:
            raise ConfigError(f"vision frames after layer {layer}: need 0 <= layer < {info.vision_layers} and frames >= 1")
    for layer, ratio in llm_stages:
        if not 0 <= layer < info.llm_layers or not 0 < ratio <= 1:
            raise ConfigError(f"LLM stage {layer}:{ratio}: need 0 <= layer < {info.llm_layers} and 0 < ratio <= 1")
    ledger = TokenLedger(input_frames=frames, text_tokens=text_tokens, newline_tokens=1)
    count, tokens = frames, info.vision_grid[0] * info.vision_grid[1]
    for layer in range(info.vision_layers):
        ledger.vision_layers.append(VisionLayerEntry(count, tokens))
        count = after.get(layer, count)
    pooled = info.pooled_grid[0] * info.pooled_grid[1]
    ledger.vision_out_frames, ledger.vision_out_tokens_per_frame = count, tokens
    ledger.pooled_tokens_per_frame = pooled
    ledger.visual_tokens_before_pre_llm = count * pooled + 1
    video = count * pooled if visual_tokens is None else visual_tokens
    if video < 0:
        raise ConfigError(f"visual tokens must be >= 0, got {video}")
    ledger.visual_tokens_after_pre_llm = video + 1
    stages = dict(llm_stages)
    for layer in range(info.llm_layers):
        if layer in stages:
            video = round(video * stages[layer])
        ledger.llm_layers.append(text_tokens + video + 1)
    return ledger
