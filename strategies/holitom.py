"""HoliTom's inner-LLM merge: at decoder layer K, keep the visual tokens the last token attends to
most and merge every other visual token into its most similar kept token.

What runs before decoder layer ``layer`` (K) during prefill:

1. Score the visual tokens (the newline counts as visual) by layer K-1's attention row of the
   last prompt token, averaged over heads (the same statistic as FastV).
2. Keep the top ``round(L_v * (1 - ratio))`` of the L_v visual tokens (Python ``round``, halves to
   even; at least one). ``ratio`` is the fraction of visual tokens **merged away**, HoliTom's
   ``HOLITOM_r`` (0.5 by default): the opposite direction to ``fastv.ratio``, which is the
   fraction kept. ``ratio = 0`` merges nothing and leaves the run unchanged.
3. Assign every other visual token to the kept token whose hidden state (entering layer K) is
   most cosine-similar, and merge: ``mode="mean"`` replaces each kept token by the true mean of
   itself and its assigned tokens (what the official, unused, Triton kernel computes);
   ``mode="sequential"`` folds the assigned tokens in one at a time in visual order,
   ``h_dst <- (h_dst + h_src) / 2``, which is what the official Python loop runs (later tokens
   weigh more). The two agree when at most one token merges into each kept token.
4. Drop the merged-away tokens. Text tokens are untouched; kept tokens keep their original
   positions (gaps stay, RoPE follows) and decoding continues from the full length, as in the
   official code; the framework does both.

Not reproduced on purpose: under transformers 4.51 with sdpa, the official code asks layer K-1
for ``output_attentions``, which falls back to eager attention with no causal mask, so layer K-1
runs *bidirectional* attention over the whole prompt in prefill (specs/methods.md 1.6). Here layer
K-1 runs normally (causal) and the score is computed beside it; the last token's row is the same
under either mask, since the last token already sees every key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from tokcomp.strategies._inner import LastTokenAttentionStrategy

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.merge import merge_mean, merge_sequential, merged_keep_count, nearest_kept
from tokcomp.ops.selection import topk_indices
from tokcomp.state import LLMState
from tokcomp.strategy import ModelInfo

MERGES = {"mean": merge_mean, "sequential": merge_sequential}


@dataclass
class InnerMerge(LastTokenAttentionStrategy):
    name = "holitom.inner_merge"
    summary = "merge visual tokens at LLM layer K into the top ones by layer K-1's last-token attention"
    layer: int = 18
    ratio: float = 0.5  # fraction of visual tokens merged away (HoliTom's HOLITOM_r), in [0, 1)
    mode: Literal["mean", "sequential"] = "mean"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(
                f"strategy {self.name!r}: ratio={self.ratio!r} is outside [0, 1) "
                "(the fraction of visual tokens merged away; at least one must be kept)"
            )
        if self.mode not in MERGES:
            raise ConfigError(f"strategy {self.name!r}: mode={self.mode!r} is not one of {sorted(MERGES)}")

    def plan_inner_llm(self, info: ModelInfo, layer: int, visual: int) -> int:
        return merged_keep_count(visual, self.ratio)

    @hookimpl
    def tokcomp_inner_llm(self, state: LLMState) -> None:
        visual, scores = self.visual_scores(state)
        if visual.numel() == 0:
            return
        chosen = topk_indices(scores, merged_keep_count(visual.numel(), self.ratio)).to(visual.device)
        is_kept = torch.zeros(visual.numel(), dtype=torch.bool, device=visual.device)
        is_kept[chosen] = True
        kept, others = visual[is_kept], visual[~is_kept]  # both in visual (sequence) order
        if others.numel():
            hidden = state.hidden[0]
            assignment = nearest_kept(hidden, kept, others)
            merged = hidden.clone()
            merged[kept] = MERGES[self.mode](hidden, kept, others, assignment)
            state.set_hidden(merged[None])
        text = torch.nonzero(~state.visual_mask, as_tuple=False).flatten().to(visual.device)
        state.keep(torch.cat([text, kept]))


HOLITOM_STRATEGIES = (InnerMerge,)
