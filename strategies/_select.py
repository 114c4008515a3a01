"""Shared base for pre-LLM strategies that keep a fraction of each frame's tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokcomp.hookspecs import hookimpl
from tokcomp.ops.selection import groups, keep_count
from tokcomp.state import VisualTokens
from tokcomp.strategy import Strategy, check_ratio


@dataclass
class PerFrameSelection(Strategy):
    """Keep ``ratio`` of every frame's tokens, chosen by ``select``."""

    ratio: float = 0.25

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)

    def select(self, tokens: VisualTokens, members: Tensor, k: int) -> Tensor:
        """Positions (into ``members``) of the ``k`` tokens to keep for one frame."""
        raise NotImplementedError

    def plan_pre_llm(self, info, tokens) -> None:
        tokens.per_frame = [keep_count(n, self.ratio) for n in tokens.per_frame]

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        kept = []
        for members in groups(state.frame):
            chosen = self.select(state, members, keep_count(members.numel(), self.ratio))
            kept.append(members[chosen.to(members.device)])
        state.keep(torch.sort(torch.cat(kept)).values)
