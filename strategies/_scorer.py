"""Score-based strategies, kvpress-style: a method is a score plus a budget.

A subclass writes ``score`` (one value per token), ``budget`` (how many of n tokens to keep) and
the statistic its score reads (``Strategy.statistics``); the base keeps the top tokens. Ties go to
the lower index, and kept tokens stay in their order.

- ``FrameScorer`` (pre-LLM): every frame keeps the ``budget(n)`` highest-scored of its n tokens,
  ``ratio`` of them by default (``uniform``, ``random``, ``topk``). Its plan follows from the budget.
- ``InnerScorer`` (inner-LLM): before each decoder layer in ``llm_layers`` the visual tokens still
  alive keep the ``budget(n)`` highest-scored of their n; text is never dropped and kept tokens keep
  their positions. The default score is FastV's: the last prompt token's head-averaged attention
  row in the previous layer (``llm.last_token``), so ``fastv``, ``pyramiddrop`` and
  ``holitom.inner_merge`` differ only in their layers, their budget and what happens to the rest
  (``act``: dropped, or merged into the kept ones). ``LayerScorer`` acts at one ``layer``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tokcomp.hookspecs import hookimpl
from tokcomp.ops.selection import groups, keep_count, top_per_group, topk_indices
from tokcomp.state import LLMState, VisualTokens
from tokcomp.strategy import ModelInfo, Strategy, check_layer, check_ratio, depth_layer


def per_frame(state: VisualTokens, members: list[Tensor], frame_score: Callable[[int], Tensor]) -> Tensor:
    """(N,) scores made of one (n,) ``frame_score(n)`` per frame (``members``: each frame's token indices)."""
    scores = torch.zeros(state.num_tokens)
    for m in members:
        scores[m.cpu()] = frame_score(m.numel())
    return scores


@dataclass
class FrameScorer(Strategy):
    """Pre-LLM: keep each frame's ``budget(n)`` highest-scored tokens, in spatial order."""

    ratio: float = 0.25  # fraction of each frame's tokens kept

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)

    def score(self, state: VisualTokens, members: list[Tensor]) -> Tensor:
        """(N,) one score per token; ``members`` are each frame's token indices (``groups(state.frame)``)."""
        raise NotImplementedError

    def budget(self, n: int) -> int:
        """Tokens a frame of ``n`` keeps: round(n * ratio), at least one."""
        return keep_count(n, self.ratio)

    def plan_pre_llm(self, info: ModelInfo, tokens) -> None:
        tokens.per_frame = [self.budget(n) for n in tokens.per_frame]

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        members = groups(state.frame)
        state.keep(top_per_group(self.score(state, members), members, self.budget))


@dataclass
class InnerScorer(Strategy):
    """Inner-LLM: before each decoder layer in ``llm_layers``, keep the top ``budget(n)`` of the n visual
    tokens alive by ``score`` (default: the previous layer's last-token attention row)."""

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        return {"llm.last_token": {layer - 1 for layer in self.llm_layers(info)}}

    def score(self, state: LLMState, visual: Tensor) -> Tensor:
        """Scores of the visual tokens at sequence indices ``visual``."""
        return state.last_token_attention[state.layer - 1][visual]

    def budget(self, n: int) -> int:
        """Visual tokens kept out of the ``n`` alive."""
        raise NotImplementedError

    def plan_inner_llm(self, info: ModelInfo, layer: int, visual: int) -> int:
        return self.budget(visual)

    def act(self, state: LLMState, visual: Tensor, chosen: Tensor) -> None:
        """Keep the chosen visual tokens (positions into ``visual``) and every text token; drop the rest."""
        state.keep_visual(visual[chosen])

    @hookimpl
    def tokcomp_inner_llm(self, state: LLMState) -> None:
        visual = state.visual_indices()
        if visual.numel():
            self.act(state, visual, topk_indices(self.score(state, visual), self.budget(visual.numel())).to(visual.device))


@dataclass
class LayerScorer(InnerScorer):
    """An ``InnerScorer`` acting before decoder layer ``layer`` (an index, or a fraction of the LLM's
    depth, e.g. 0.75), scored by layer ``layer`` - 1."""

    layer: int | float = 2

    def check(self, info: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, info.llm_layers, "LLM", minimum=1)

    def llm_layers(self, info: ModelInfo) -> set[int]:
        return {depth_layer(self.layer, info.llm_layers)}
