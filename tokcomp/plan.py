"""Token schedules without a forward pass: the ledger a run *would* record.

Both functions run the pipeline itself on a counting adapter (``tokcomp.counting``), so the
ledger has one writer. ``plan_ledger`` uses the strategies' declared ``plan_*`` methods;
``schedule_ledger`` an explicit schedule (frames after vision layers, video tokens reaching the
LLM, LLM stages), for methods that are not strategies or whose schedule depends on the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tokcomp.adapter import ModelDescription
from tokcomp.counting import PlannedTokens, ScheduleUnknown, plan
from tokcomp.errors import ConfigError
from tokcomp.ledger import TokenLedger
from tokcomp.ops.windows import split_sizes
from tokcomp.strategy import ModelInfo, Strategy

__all__ = ["PlannedTokens", "ScheduleUnknown", "plan_ledger", "prompt_text_tokens", "schedule_ledger"]


def _description(model: Any) -> ModelDescription:
    """A ModelDescription, or the description of a built adapter."""
    return model if isinstance(model, ModelDescription) else model.description


def plan_ledger(model: Any, frames: int, text_tokens: int, strategies: Sequence[Strategy], nominal: bool = False,
                height: int | None = None, width: int | None = None) -> TokenLedger:
    """The ledger a run would record on a ``frames``-frame video (of ``height`` x ``width`` pixels where
    the model's geometry follows the resolution); ``nominal``: data-dependent pre-LLM strategies count
    their budget."""
    description = _description(model)
    return plan(description, description.video(frames, height, width), text_tokens, strategies, nominal)


def prompt_text_tokens(model: Any, prompt: str, frames: int, height: int | None = None,
                       width: int | None = None) -> int:
    """All text ids of a run's prompt (the ledger's ``text_tokens``): the chat-formatted ``prompt`` plus the
    text the video adds on models that write some between its rows (Qwen3-VL's timestamps)."""
    description = _description(model)
    extra = description.video_text_tokens
    return description.count_prompt(prompt) + (extra(description.video(frames, height, width)) if extra else 0)


@dataclass
class _FramesAfter(Strategy):
    """Schedule step: ``frames`` rows alive after vision layer ``layer``."""

    name: ClassVar[str] = "schedule.frames_after"
    layer: int = 0
    frames: int = 1

    def encoder_layers(self, info: ModelInfo) -> set[int]:
        return {self.layer}

    def plan_intra_encoder(self, info: ModelInfo, layer: int, frames: int, tokens: int) -> tuple[int, int]:
        return min(frames, self.frames), tokens

    def tokcomp_intra_encoder(self, state) -> None:  # planned only
        raise NotImplementedError


@dataclass
class _VideoTokens(Strategy):
    """Schedule step: ``tokens`` video tokens reach the LLM, spread over the rows."""

    name: ClassVar[str] = "schedule.video_tokens"
    tokens: int = 0

    def plan_pre_llm(self, info: ModelInfo, planned: PlannedTokens) -> None:
        planned.per_frame = split_sizes(self.tokens, len(planned.per_frame))

    def tokcomp_pre_llm(self, state) -> None:  # planned only
        raise NotImplementedError


@dataclass
class _LLMStage(Strategy):
    """Schedule step: from decoder layer ``layer`` on keep round(n * ratio) video tokens."""

    name: ClassVar[str] = "schedule.llm_stage"
    layer: int = 0
    ratio: float = 1.0

    def llm_layers(self, info: ModelInfo) -> set[int]:
        return {self.layer}

    def plan_inner_llm(self, info: ModelInfo, layer: int, visual: int) -> int:
        return round(visual * self.ratio)

    def tokcomp_inner_llm(self, state) -> None:  # planned only
        raise NotImplementedError


def schedule_ledger(model: Any, frames: int, text_tokens: int, *, visual_tokens: int | None = None,
                    vision_frames_after: Sequence[tuple[int, int]] = (),
                    llm_stages: Sequence[tuple[int, float]] = (), height: int | None = None,
                    width: int | None = None) -> TokenLedger:
    """A ledger from an explicit schedule, for methods that are not (yet) strategies or are data-dependent.

    ``vision_frames_after``: (layer, frames) pairs, rows alive after that vision layer;
    ``visual_tokens``: video tokens spliced in (special tokens excluded; default all rows' tokens);
    ``llm_stages``: (layer, ratio) pairs, from that decoder layer on keep round(n * ratio) video tokens.
    """
    description = _description(model)
    info = description.info
    steps: list[Strategy] = []
    for layer, count in vision_frames_after:
        if not 0 <= layer < info.vision_layers or count < 1:
            raise ConfigError(f"vision frames after layer {layer}: need 0 <= layer < {info.vision_layers} and frames >= 1")
        steps.append(_FramesAfter(layer, count))
    if visual_tokens is not None:
        if visual_tokens < 0:
            raise ConfigError(f"visual tokens must be >= 0, got {visual_tokens}")
        steps.append(_VideoTokens(visual_tokens))
    for layer, ratio in llm_stages:
        if not 0 <= layer < info.llm_layers or not 0 < ratio <= 1:
            raise ConfigError(f"LLM stage {layer}:{ratio}: need 0 <= layer < {info.llm_layers} and 0 < ratio <= 1")
        steps.append(_LLMStage(layer, ratio))
    return plan(description, description.video(frames, height, width), text_tokens, steps)
