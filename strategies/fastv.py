"""FastV (inner-LLM): at decoder layer K keep the visual tokens the last token attends to most.

The score is layer K-1's attention row of the last prompt token, averaged over heads, restricted
to the visual tokens (the newline is a special token the framework keeps like text). Only that
row is computed (q of one token against all keys), so the model keeps its fast attention. Kept
tokens keep their original positions ("inplace" mode); ``ratio`` is the fraction of visual tokens
*kept* (the paper's R is the fraction dropped: R=50% is ratio 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokcomp.strategies._inner import LastTokenAttentionStrategy

from tokcomp.hookspecs import hookimpl
from tokcomp.ops.selection import ceil_ratio, topk_indices
from tokcomp.state import LLMState
from tokcomp.strategy import ModelInfo, check_ratio


@dataclass
class FastV(LastTokenAttentionStrategy):
    name = "fastv"
    summary = "drop visual tokens at LLM layer K by layer K-1's last-token attention"
    layer: int = 2
    ratio: float = 0.5

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)

    def plan_inner_llm(self, info: ModelInfo, layer: int, visual: int) -> int:
        return ceil_ratio(visual, self.ratio)

    @hookimpl
    def tokcomp_inner_llm(self, state: LLMState) -> None:
        visual, scores = self.visual_scores(state)
        kept_visual = visual[topk_indices(scores, ceil_ratio(visual.numel(), self.ratio)).to(visual.device)]
        text = torch.nonzero(~state.visual_mask, as_tuple=False).flatten()
        state.keep(torch.cat([text, kept_visual]))
