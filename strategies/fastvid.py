"""FastVID (pre-LLM): segment the video by frame similarity, keep each frame's most salient tokens,
and merge the rest of every segment into density-peak "context" tokens of a few anchor frames.

What runs on the spliced visual tokens (projected, pooled; ``tokcomp.ops.fastvid``):

1. DySeg: the cosine similarity of consecutive frames' global features; the video is cut at the
   ``dyseg_c - 1`` least similar transitions and at every transition below ``dyseg_tau``, which
   gives contiguous segments (scene changes get their own segments, static stretches share one).
2. Per frame of P tokens: keep = int(P * ratio), context = int(keep * stprune_d), salient =
   keep - context (P=196, ratio=0.25: 49 = 30 salient + 19 context).
3. ATS: every frame keeps its ``salient`` tokens of highest saliency.
4. DTM: inside a segment, every ``dtm_p``-th frame counted backwards from its last frame is an
   anchor frame; the segment's context budget (context x its frames) is split evenly over them
   (integer division). Each anchor frame picks that many of its non-salient tokens with the
   highest DPC-KNN score (``density_k`` neighbours); every other non-salient token of the whole
   segment joins its most cosine-similar pick, which becomes w * pick + (1 - w) * mean(joined)
   with w = max(1 / (joined + 1), dtm_beta). A one-frame segment is the same rule with its frame
   as the only anchor. Redundant frames thus cost context tokens only once per p frames.
   Riders (Qwen3-VL's DeepStack features) take the same picks and merges as the features.
5. Kept tokens are sorted by their index in the uncompressed sequence and keep it as their
   position id (``state.original_positions``; gaps stay, as the official code passes the kept
   indices as ``position_ids``); a merged token takes its pick's index. The framework keeps the
   newline and re-emits it after the video at its uncompressed position.

Defaults are the official ones (``scripts/eval.sh``; EarlyTom's ``eval_ov-7b_fastvid.sh``):
dyseg_c=8, dyseg_tau=0.9, stprune_d=0.4, dtm_p=4, dtm_beta=0.6, DPC-KNN k=4. The scripts sweep
the retention ratio over 0.10-0.25; the default here is 0.25, the largest (the paper's main
LLaVA-OneVision setting).

The token count depends on the segmentation (the integer split of context slots over anchors),
so there is no ``plan_pre_llm``; ``nominal_pre_llm`` gives the targeted int(P * ratio) per frame.

Deviations from the official code:
- Saliency: the official LLaVA-OV code runs SigLIP's attention-pooling (MAP) head on the last
  layer's features and uses its probe's attention over the patches. The LLaVA-OneVision
  checkpoint has no MAP head (it is replaced by Identity), so this uses the cheap mean-query
  saliency of FastVID's own Qwen2.5-VL port, from the last vision layer: per frame, softmax over
  the frame's patches of the mean query . each key, averaged over heads, bilinearly pooled.
- Global frame feature (DySeg): the official OV code uses the MAP head's pooled output, also
  unavailable; this uses the frame mean of the projected, pooled features, the counterpart of the
  Qwen2.5-VL port's frame mean of the merged embeddings.
- Where it acts: officially inside the LLM's forward, before layer 0, on the spliced sequence.
  Nothing runs in between, so it is a pre-LLM strategy here with the same effect; the framework
  applies the original position ids.
- ``dyseg_c - 1`` larger than the number of transitions cuts every transition (the official
  ``topk`` would fail); an anchor frame with fewer non-salient tokens than its slots gives all of
  them (the official ``topk`` would fail, e.g. ratio near 1 with long segments); density ties go to
  the lower index instead of the official 1e-6 random noise (shared ``tokcomp.ops.cluster``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.fastvid import budget, fastvid_apply, fastvid_plan
from tokcomp.ops.selection import groups
from tokcomp.state import VisualTokens
from tokcomp.strategy import ModelInfo, Strategy, check_ratio


@dataclass
class FastVID(Strategy):
    name = "fastvid"
    summary = "FastVID: DySeg segments, salient tokens per frame, density-merged context tokens on anchor frames"
    ratio: float = 0.25  # retention r; scripts/eval.sh sweeps 0.10-0.25
    dyseg_c: int = 8  # DySeg_c (scripts/eval.sh): at least c segments
    dyseg_tau: float = 0.9  # DySeg_tau (scripts/eval.sh): cut below this similarity
    stprune_d: float = 0.4  # STPrune_d (scripts/eval.sh): share of the budget for context tokens
    dtm_p: int = 4  # DTM_p (scripts/eval.sh): anchor frame interval
    dtm_beta: float = 0.6  # DTM_beta (scripts/eval.sh): least weight of the anchor token
    density_k: int = 4  # DPC-KNN neighbours (official code constant)

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)
        if self.dyseg_c < 1:
            raise ValueError(f"dyseg_c={self.dyseg_c!r} must be >= 1")
        if not -1.0 <= self.dyseg_tau <= 1.0:
            raise ValueError(f"dyseg_tau={self.dyseg_tau!r} is outside [-1, 1] (a cosine similarity)")
        if not 0.0 <= self.stprune_d <= 1.0:
            raise ValueError(f"stprune_d={self.stprune_d!r} is outside [0, 1]")
        if self.dtm_p < 1:
            raise ValueError(f"dtm_p={self.dtm_p!r} must be >= 1")
        if not 0.0 <= self.dtm_beta <= 1.0:
            raise ValueError(f"dtm_beta={self.dtm_beta!r} is outside [0, 1]")
        if self.density_k < 1:
            raise ValueError(f"density_k={self.density_k!r} must be >= 1")

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        return {"vision.saliency": {-1}}

    def nominal_pre_llm(self, info: ModelInfo, tokens) -> None:
        """The budget FastVID targets: int(P * ratio) per frame (the segmentation may leave fewer)."""
        tokens.per_frame = [budget(n, self.ratio, self.stprune_d)[0] for n in tokens.per_frame]

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        if state.saliency is None:
            raise ConfigError(f"strategy {self.name!r} received no saliency (the framework must deliver "
                              "the vision.saliency statistic at pre-LLM)")
        members = groups(state.frame)
        global_features = torch.stack([state.features[m].float().mean(dim=0) for m in members])
        plan = fastvid_plan(
            state.features, members, state.saliency.to(state.features.device), global_features,
            ratio=self.ratio, c=self.dyseg_c, tau=self.dyseg_tau, d=self.stprune_d, p=self.dtm_p,
            beta=self.dtm_beta, k=self.density_k,
        )
        kept, features = fastvid_apply(state.features, plan)
        order = torch.argsort(kept)  # original index order
        kept, features = kept[order], features[order]
        riders = None if state.riders is None else fastvid_apply(state.riders, plan)[1][order.to(state.riders.device)]

        def take(t):
            return None if t is None else t[kept.to(t.device)]

        state.replace(
            features, state.frame[kept], state.row[kept], state.col[kept],
            state.source[kept], scores=take(state.scores), keys=take(state.keys),
            saliency=take(state.saliency), group=take(state.group), riders=riders,
        )
        state.original_positions = True
