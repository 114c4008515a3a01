"""DyCoke (KD-TAO/DyCoke): temporal token merging before the LLM, dynamic KV-cache pruning while decoding.

``dycoke.ttm`` (pre-LLM). Consecutive frames of a video repeat most of their content, so a frame
compared with its neighbour needs only the tokens that changed. In groups of four frames, frame 0
is kept whole and frames 1-3 keep the ``int((1 - k) * P)`` tokens (P tokens per frame: 196 on
LLaVA-OV-7B, 16 on the tiny model) whose features are least cosine-similar to the same grid
position of their reference frame: frame i+1 against frame i for the pairs (0, 1), (2, 3), ...,
then frame i+2 against frame i for i = 0, 4, ... while i < T - 4. That bound skips the last group,
so for T = 32 the per-frame counts are 196, 58, 58, 58 for frames 0-27 and 196, 58, 196, 58 for
frames 28-31 (3098 video tokens). Kept tokens of a pruned frame come out in ascending-similarity
order (the official ``topk(largest=False)``), frames in temporal order (the framework re-emits the
newline after the video).
``spatial_order: true`` sorts each pruned frame's tokens by position instead. The counts depend
only on T, P and k, so the strategy declares them (``plan_pre_llm``).

``dycoke.kv_pruning`` (decoding only; prefill is unchanged). On every decode step, before decoder
layer ``layer`` (L): take the new token's head-averaged attention in layer L-1 over the visual
cache entries. If its cosine similarity to the previous step's is below ``threshold``, layers >= L
read only every non-visual entry plus the top ``int(n_visual * (1 - p))`` visual entries by that
attention (a gather; the cache keeps everything). On a "stable" step (similarity >= threshold)
the official code reads the FULL cache, because its index list is reset at the layers below L on
every step; that is the default here. ``stable_reuses_selection: true`` instead reads the previous
selection again, which is what the paper describes. The previous step's attention is updated on
every step, stable or not. The first decode step has no previous attention: it always prunes.

Defaults: ``k = 0.7`` (lmms-eval's and the README's value; the builder's default is 0.3),
``layer = 3`` (``dycoke_l``), ``p = 0.7`` (README value; the code default is 0.8), ``threshold = 0.9``.

Deviations from the official code:

- Odd frame counts: the official pair loop never emits the last, unpaired frame (the video loses
  a frame). Here it is kept whole. T = 1 (an error there) keeps the frame whole.
- A pruned frame keeps at least one token (``int((1 - k) * P)`` = 0 would empty it there).
- Similarities are computed in float32 (the official code uses the model dtype), and ties between
  equal similarities or attentions are broken by the lower position (torch's topk order for ties
  is unspecified).
- Per-position similarity needs every frame to hold the same grid positions in the same order;
  other inputs (e.g. after another pre-LLM strategy dropped tokens unevenly) are a ConfigError.
  Special tokens (LLaVA-OV's newline) never reach the strategy: the framework keeps them.
- The official forward forces ``output_attentions`` in every decoder layer on every call (extra
  memory and time, no effect on the outputs). Here only layer L-1's attention row of the new token
  is computed, so decode speed is not handicapped the way the paper's Table 1 shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.dycoke import attention_changed, kv_keep_indices, ttm_counts, ttm_select
from tokcomp.ops.selection import groups
from tokcomp.state import DecodeState, VisualTokens
from tokcomp.strategy import ModelInfo, Strategy, check_layer, depth_layer


@dataclass
class TemporalTokenMerging(Strategy):
    name = "dycoke.ttm"
    summary = "DyCoke TTM: frames 1-3 of each group of 4 keep their tokens least similar to a reference frame"
    k: float = 0.7  # dycoke_k, pruning strength: lmms-eval default and README (builder default 0.3)
    spatial_order: bool = False  # official: pruned frames' tokens in ascending-similarity order

    def __post_init__(self) -> None:
        if not 0.0 <= self.k < 1.0:
            raise ValueError(f"k={self.k!r} is outside [0, 1) (the fraction of a pruned frame's tokens dropped)")

    def plan_pre_llm(self, info: ModelInfo, tokens) -> None:
        if not tokens.per_frame:
            return
        if len(set(tokens.per_frame)) != 1:
            raise ConfigError(f"strategy {self.name!r} needs the same token count in every frame, "
                              f"got {tokens.per_frame}")
        tokens.per_frame = ttm_counts(len(tokens.per_frame), tokens.per_frame[0], self.k)

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        members = self._frame_tokens(state)
        if members is None:
            return
        chosen = ttm_select(state.features[members], self.k, self.spatial_order)
        kept = [members[f][c.to(members.device)] for f, c in enumerate(chosen)]
        state.keep(torch.cat(kept))

    def _frame_tokens(self, state: VisualTokens) -> Tensor | None:
        """(T, P) token indices, frame by frame; every frame must hold the same grid positions."""
        frame = state.frame
        per_frame = groups(frame)
        if not per_frame:
            return None
        if len(per_frame) != torch.unique(frame[frame >= 0]).numel():
            raise ConfigError(f"strategy {self.name!r} needs each frame's tokens to be contiguous")
        if len({m.numel() for m in per_frame}) != 1:
            raise ConfigError(f"strategy {self.name!r} needs the same token count in every frame, "
                              f"got {[m.numel() for m in per_frame]}")
        members = torch.stack(per_frame)
        where = torch.stack([state.row[members], state.col[members]])
        if not bool((where == where[:, :1]).all()):
            raise ConfigError(f"strategy {self.name!r} needs every frame's tokens at the same grid positions "
                              "in the same order (put it before strategies that drop tokens per frame)")
        return members


@dataclass
class KVPruning(Strategy):
    name = "dycoke.kv_pruning"
    summary = "DyCoke decoding: read only the top visual KV entries by attention when the attention moved"
    layer: int | float = 3  # dycoke_l: prune before decoder layer L (or a fraction of the depth), scored by L-1
    p: float = 0.7  # dycoke_p, fraction of visual entries PRUNED: README value (code default 0.8)
    threshold: float = 0.9  # re-prune when cos(attention, previous step's) < threshold (hard-coded officially)
    stable_reuses_selection: bool = False  # official: a stable step reads the full cache; True: the paper

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p={self.p!r} is outside [0, 1) (the fraction of visual KV entries pruned)")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} is outside [-1, 1] (a cosine similarity)")
        self.start(0)

    def check(self, info: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, info.llm_layers, "LLM", minimum=1)

    def decode_layers(self, info: ModelInfo) -> set[int]:
        return {depth_layer(self.layer, info.llm_layers)}

    def start(self, seed: int) -> None:
        self._previous: Tensor | None = None  # last step's attention over the visual entries
        self._kept_visual: Tensor | None = None  # original positions of the visual entries last selected

    @hookimpl
    def tokcomp_inner_llm_decode(self, state: DecodeState) -> None:
        visual = state.visual.to(state.attention.device)
        current = state.attention[visual].detach().float()
        if current.numel() == 0:
            return
        changed = attention_changed(current, self._previous, self.threshold)
        self._previous = current.clone()
        if changed:
            keep = kv_keep_indices(state.attention, visual, self.p)
            self._kept_visual = state.positions[keep[visual[keep]].to(state.positions.device)]
        elif not self.stable_reuses_selection or self._kept_visual is None:
            return  # official: a stable step reads the full cache
        text = state.positions[~visual.to(state.positions.device)]
        state.select(torch.cat([text, self._kept_visual.to(text.device)]))


DYCOKE_STRATEGIES = (TemporalTokenMerging, KVPruning)
