"""PruneVid: merge static and similar tokens before the LLM, then prune by text attention inside it.

PruneVid's official code (Visual-AI/PruneVid) targets PLLaVA (16 frames pooled to 12x12). No
LLaVA-OneVision code has been released, and the OV/LLaVA-Video numbers in the HoliTom and EarlyTom
tables come from HoliTom's author's own unreleased port. This is our port of the PLLaVA code to
OV's 196-token frames (14x14 pooled grid, one newline token after the video).

Stage 1, ``prunevid.outer`` (pre-LLM), on the pooled tokens of every frame:

1. Temporal segments: DPC-KNN (k neighbours) over the frame-mean features into
   int(T * temporal_segment_ratio) clusters; ``refine_clusters`` keeps each cluster's longest
   contiguous run(s) and gives the frames in between to the neighbouring run whose cluster's run is
   longer (left on ties); segments are the maximal runs of the refined labels
   (``tokcomp.ops.prunevid.refine_clusters`` spells the rule out; specs/methods.md records only
   that it forces contiguous segments, the steps are our reading of the official function). The
   smoothing goes by run lengths only: a stray frame between two segments joins the neighbour whose
   cluster has the longer run, even when its own DPC label matches the other neighbour.
2. Per segment of W >= 2 frames, position p is static when the mean cosine similarity of its W
   tokens over all pairs of distinct frames exceeds ``tau``; static tokens are averaged over time
   (one per static position). A one-frame segment is all dynamic.
3. The static tokens are merged spatially by DPC-KNN into int(n_static * cluster_ratio) cluster
   means; each frame's dynamic tokens likewise, but only when there are more than
   ``min_dynamic_tokens`` (14) of them, else they are kept as they are.
4. Order: per segment [static clusters, then the dynamic tokens frame by frame], segments in
   temporal order (the framework re-emits the newline after the video). Positions stay contiguous,
   as in LLaVA. Each merged token takes its cluster centre's geometry (frame, row, col, source); a
   static token's frame is its segment's first frame. Importance scores, keys and saliency do not
   survive the merge.
5. ``state.group`` labels each token's group for stage 2: the g-th non-empty group in sequence
   order gets ``2g`` if it is a segment's static group, ``2g + 1`` if it is one frame's dynamic
   group (``tokcomp.ops.prunevid.is_static_label``). The segments are also
   left in ``state.meta["prunevid.segments"]`` as (first, last) frame rows.

Stage 2, ``prunevid.inner`` (inner-LLM, prefill), after decoder layer ``layer`` (10), so the hook
runs before layer ``layer + 1``:

- Score each visual token by layer ``layer``'s attention from all text tokens after the video to
  it, max over heads and over those queries (the ``llm.text`` statistic).
- Per group, keep the top ceil(n * alpha) tokens (alpha 0.4), so every static group and every
  frame's dynamic group keeps at least one token; visual tokens labelled -1 are kept (the newline
  is not a visual token: the framework keeps it like text). If no visual token has a label >= 0
  (``prunevid.outer`` did not run before it), all visual tokens form one group.
- Drop the rest from the hidden states and from the KV caches of layers 0..layer
  (``keep(..., prune_earlier_cache=True)``); kept tokens keep their original positions.

Defaults (all from the official PLLaVA code): temporal_segment_ratio 0.25, tau 0.8,
cluster_ratio 0.5, k 7, min_dynamic_tokens 14; layer 10, alpha 0.4.

Token budget. PruneVid has no retention-ratio parameter: what stage 1 keeps depends on how static
the video is. Per segment of W frames with a fraction s of static positions it keeps about
cluster_ratio * (s + W(1 - s)) * n of the W * n tokens, i.e. a retention of about
cluster_ratio * (1 - s(1 - 1/W)), which is never above cluster_ratio (except for frames whose
dynamic tokens are too few to cluster). Recipe for a target pre-LLM retention rho (the 25/20/15/10%
columns of the paper tables): keep tau, k and temporal_segment_ratio at their defaults and scale
``cluster_ratio``, which the retention follows almost linearly: run once at the default 0.5 on a
sample of the benchmark, read the retained ratio rho0 from the ledgers, and use
cluster_ratio = min(1, 0.5 * rho / rho0); check the ledgers again (at small ratios the retention
falls more slowly than cluster_ratio, since frames with at most 14 dynamic tokens are never
clustered and every group keeps at least one cluster). Lower ``tau`` or a smaller
``temporal_segment_ratio`` (longer segments) compress further where cluster_ratio alone cannot.
Because the count is data-dependent neither stage declares a ``plan_*`` method and stage 1 has no
``nominal_pre_llm``: FLOPs come from a run's ledger, or from ``--visual-tokens``.

Deviations from the official code:
- ``refine_clusters``' treatment of a video where every cluster's runs are single frames (it would
  leave no labelled neighbour to copy): the DPC-KNN labels are kept, so each run is a segment.
- At least one temporal cluster and one spatial cluster: int(T * 0.25) is 0 below 4 frames and
  int(n * cluster_ratio) is 0 for one static token; the spec records plain int().
- The mean pairwise similarity subtracts the true self-similarities (as we read the official code,
  it subtracts 1 per frame, which differs only for all-zero tokens).
- DPC-KNN density ties are broken by index instead of 1e-6 noise (``tokcomp.ops.cluster``), so
  the stage is deterministic.
- Stage 2's per-group count rounds up (ceil, at least one), so no frame or segment vanishes
  entirely; OV's newline token, which PLLaVA does not have, is kept by the framework like text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.prunevid import group_topk, merge_frames_dynamic
from tokcomp.state import LLMState, VisualTokens
from tokcomp.strategy import ModelInfo, Strategy, check_ratio, depth_layer

SEGMENTS = "prunevid.segments"


@dataclass
class Outer(Strategy):
    name = "prunevid.outer"
    summary = "PruneVid stage 1: temporal segments, static tokens averaged, DPC-KNN cluster means"
    temporal_segment_ratio: float = 0.25  # official default: segments = int(T * 0.25) DPC-KNN clusters
    tau: float = 0.8  # official default: static threshold on the mean pairwise cosine similarity
    cluster_ratio: float = 0.5  # official default: spatial DPC-KNN clusters = int(n * 0.5)
    k: int = 7  # official default: DPC-KNN neighbours
    min_dynamic_tokens: int = 14  # official: a frame's dynamic tokens are clustered only when more than 14

    def __post_init__(self) -> None:
        check_ratio(self.name, "temporal_segment_ratio", self.temporal_segment_ratio)
        check_ratio(self.name, "cluster_ratio", self.cluster_ratio)
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau!r} is outside [-1, 1] (a cosine similarity threshold)")
        if self.k < 1:
            raise ValueError(f"k={self.k!r} must be >= 1")
        if self.min_dynamic_tokens < 0:
            raise ValueError(f"min_dynamic_tokens={self.min_dynamic_tokens!r} must be >= 0")

    def nominal_pre_llm(self, info: ModelInfo, tokens) -> None:
        """The budget ``tokcomp flops --nominal`` counts: int(n * cluster_ratio) per frame, the count
        when nothing is static; static positions only lower it (frames with at most
        ``min_dynamic_tokens`` dynamic tokens, which stay unclustered, can exceed it slightly)."""
        tokens.per_frame = [max(1, int(n * self.cluster_ratio)) for n in tokens.per_frame]

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        grid = state.frame_grid(self.name)
        riders = None if state.riders is None else state.riders[grid.to(state.riders.device)]
        out = merge_frames_dynamic(state.features[grid], self.temporal_segment_ratio, self.tau,
                                   self.cluster_ratio, self.k, self.min_dynamic_tokens, riders)
        source = grid[out.frame.to(grid.device), out.position.to(grid.device)]
        state.replace(out.features.to(state.features.dtype), state.frame[source], state.row[source],
                      state.col[source], state.source[source], group=out.group.to(source.device), riders=out.riders)
        state.meta[SEGMENTS] = out.segments



@dataclass
class Inner(Strategy):
    name = "prunevid.inner"
    summary = "PruneVid stage 2: after LLM layer `layer`, keep top alpha per group by text attention"
    layer: int | float = 10  # official selected_layer: prune after this decoder layer (or a fraction of the depth)
    alpha: float = 0.4  # official: fraction of each group kept

    def __post_init__(self) -> None:
        check_ratio(self.name, "alpha", self.alpha)

    def check(self, info: ModelInfo) -> None:
        if not 0 <= depth_layer(self.layer, info.llm_layers) < info.llm_layers - 1:
            raise ConfigError(f"strategy {self.name!r}: layer={self.layer} must be in 0..{info.llm_layers - 2} "
                              f"(a decoder layer with a next layer; the model has {info.llm_layers})")

    def llm_layers(self, info: ModelInfo) -> set[int]:
        return {depth_layer(self.layer, info.llm_layers) + 1}

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        return {"llm.text": {depth_layer(self.layer, info.llm_layers)}}

    @hookimpl
    def tokcomp_inner_llm(self, state: LLMState) -> None:
        visual = state.visual_indices()
        if visual.numel() == 0:
            return
        scores = state.text_attention[state.layer - 1].to(visual.device)[visual]
        if state.visual_group is None:
            labels = torch.full_like(visual, -1)
        else:
            labels = state.visual_group.to(visual.device)[visual]
        state.keep_visual(visual[group_topk(scores, labels, self.alpha).to(visual.device)], prune_earlier_cache=True)


PRUNEVID_STRATEGIES = (Outer, Inner)
