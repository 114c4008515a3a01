"""HoliTom: outer-LLM spatio-temporal merging (``holitom.outer_merge``) and inner-LLM merge (``holitom.inner_merge``).

Outer-LLM, ``holitom.outer_merge`` (pre-LLM, on the projected and pooled features, P per frame):

1. ``feature_sim`` (T-1, P): cosine similarity of each position between consecutive frames.
2. Global temporal segmentation by dynamic programming (``tokcomp.ops.static_windows``): a position is
   static in a window of frames when its similarity exceeds ``tau`` for every consecutive pair inside
   it; a window's gain is its static count times (length - 1), the tokens saved by keeping each static
   position once; the DP picks the partition into windows of at most ``max_window`` frames with the
   largest total gain, ``total_reduced``; among partitions of equal total, the one the official loop
   keeps: at every end frame the shortest optimal last window (it tries lengths 1, 2, 3, ... and
   replaces its best only on a strict ``>``). Why: static content is collapsed over the longest
   stretches where it stays put, globally rather than greedily.
3. r' = min(ratio / ((T*P - total_reduced) / (T*P)), 1), so about ``ratio`` * T * P tokens remain.
4. Per window: the static positions are averaged over the window's frames (one token each) and
   clustered by DPC-KNN into C = round(n_static * r') centres with min(``k``, C) density neighbours
   (the official ``merge_tokens_by_density`` passes ``k=min(K, cluster_num)``: the cluster count, not
   the token count); every other static token joins its nearest centre. Each cluster becomes
   ``beta`` * centre + (1 - beta) * mean of its *non-centre* members, and a centre that no other
   token joined stays as it is (official ``merge_tokens_by_clustering``: it averages only the
   non-centre tokens assigned to each centre and appends the bare centre when there are none; e.g.
   tokens 0, 1, 4 with centre 0 and beta 0.6 give 0.6 * x0 + 0.4 * (x1 + x4) / 2; the
   centre-included mean is its ``NO_BETA=1`` branch, off by default whatever the "NO_BETA: 1"
   printout says). Every frame keeps its top ceil(n_dynamic * r') dynamic
   (non-static) tokens by the received attention of vision layer ``layer`` (default -1: the last one,
   what HoliTom's vendored SigLIP returns), pooled like the features. A one-frame window is all dynamic.
5. Output: per window in temporal order [static cluster tokens, dynamic tokens frame by frame], each
   part in spatial order (the framework re-emits the newline after the video). A merged token takes
   the geometry (frame, row, col, source) of its centre in the window's first frame, and as score the
   centre position's attention averaged over the window's frames (the official static attention);
   keys, saliency and group, when present, are the centre's too; riders (Qwen3-VL's DeepStack
   features) are averaged and merged exactly like the features. ``state.meta["holitom.windows"]``
   records the windows. Positions stay contiguous, as in LLaVA.

Defaults are the official code defaults (environment variables in brackets): ratio 0.1 (RETAIN_RATIO),
tau 0.8 (T; the scripts use 0.65 at ratio 0.10 and 0.80 otherwise), k 7 (K), beta 0.6 (BETA),
max_window 1024 (MAX_WINDOW_SIZE).

Deviations from the official outer-LLM code:

- ``D`` (the contextual DPC-KNN branch for dynamic tokens) is not implemented: the official default
  D=0 turns it off (methods.md 2.2).
- The DP is vectorised: every window's static count comes from one histogram of run lengths of the
  (T-1, P) indicator (no loop over windows) and the DP is T host steps of a vectorised max over the
  starts, instead of the official Python O(T * W) double loop. Not a deviation in result: the same
  optimum and the same windows, ties included (the largest start wins at every end frame, as the
  official strict ``>`` over increasing lengths keeps the shortest window; benchmarks/holitom_dp.py
  times both and checks the windows agree).
- Not a deviation either: static clusters are emitted in the spatial order of their centres, as the
  official ``merge_tokens_by_density`` sorts its centre indices before merging; the other static
  tokens are assigned to the nearest centre, the lower-index centre on exact distance ties, as its
  ``argmin`` over the sorted centres does (``dpc_knn_cluster(..., centre_order="index")``).
- A window with static positions keeps at least one static cluster (round(n_static * r') can be 0 at
  small ratios, and the official code then emits no static token for the window: its whole static
  content is dropped). With one cluster, min(k, 1) = 1 neighbour, so the densities carry no
  information (see below).
- DPC-KNN density ties are broken by index instead of 1e-6 uniform noise (``tokcomp.ops.cluster``).
  Ties are certain whenever C = 1 (k = 1: every token's nearest neighbour is itself, density exp(0)
  up to ``cdist`` rounding): the official centre is then effectively a random static position,
  here the one that rounding and the index rule favour (the first in raster order when ``cdist``
  is exact, i.e. up to 25 tokens).
- The similarity, the static averages and the merges are computed in float32 whatever the feature
  dtype (bf16 on the real model), so thresholds at tau are not decided by bf16 rounding.

Inner-LLM, ``holitom.inner_merge``: at decoder layer K, keep the visual tokens the last token attends
to most and merge every other visual token into its most similar kept token.

What runs before decoder layer ``layer`` (K) during prefill:

1. Score the visual tokens (the newline is the framework's special token, kept like text) by layer
   K-1's attention row of the last prompt token, averaged over heads (the same statistic as FastV).
2. Keep the top ``round(L_v * (1 - merge_ratio))`` of the L_v visual tokens (Python ``round``,
   halves to even; at least one). ``merge_ratio`` is the fraction of visual tokens **merged away**,
   HoliTom's ``HOLITOM_r`` (0.5 by default), hence its name: ``ratio`` everywhere else is the
   fraction kept. ``merge_ratio = 0`` merges nothing and leaves the run unchanged.
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
from typing import TYPE_CHECKING, Literal

import torch
from tokcomp.strategies._scorer import LayerScorer
from torch import Tensor

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.cluster import dpc_knn_cluster
from tokcomp.ops.merge import merge_mean, merge_sequential, merged_keep_count, nearest_kept
from tokcomp.ops.static_windows import (
    beta_merge,
    consecutive_similarity,
    dynamic_keep_count,
    retained_ratio,
    static_cluster_count,
    static_masks,
    static_neighbours,
    static_windows,
    topk_rank_mask,
)
from tokcomp.ops.windows import split_sizes
from tokcomp.state import LLMState, VisualTokens
from tokcomp.strategy import ModelInfo, Strategy, check_ratio

if TYPE_CHECKING:  # pragma: no cover
    from tokcomp.plan import PlannedTokens

WINDOWS = "holitom.windows"  # state.meta key: the outer merge's windows, inclusive (first, last) frame rows

MERGES = {"mean": merge_mean, "sequential": merge_sequential}


@dataclass
class InnerMerge(LayerScorer):
    name = "holitom.inner_merge"
    summary = "merge visual tokens at LLM layer K into the top ones by layer K-1's last-token attention"
    layer: int | float = 18  # HOLITOM_k: a decoder layer, or a fraction of the depth
    merge_ratio: float = 0.5  # fraction of visual tokens merged away (HoliTom's HOLITOM_r), in [0, 1)
    mode: Literal["mean", "sequential"] = "mean"

    def __post_init__(self) -> None:
        if not 0.0 <= self.merge_ratio < 1.0:
            raise ConfigError(
                f"strategy {self.name!r}: merge_ratio={self.merge_ratio!r} is outside [0, 1) "
                "(the fraction of visual tokens merged away; at least one must be kept)"
            )
        if self.mode not in MERGES:
            raise ConfigError(f"strategy {self.name!r}: mode={self.mode!r} is not one of {sorted(MERGES)}")

    def budget(self, n: int) -> int:
        return merged_keep_count(n, self.merge_ratio)

    def act(self, state: LLMState, visual: Tensor, chosen: Tensor) -> None:
        """Merge every visual token not chosen into its most similar chosen one, then drop it."""
        is_kept = torch.zeros(visual.numel(), dtype=torch.bool, device=visual.device)
        is_kept[chosen] = True
        kept, others = visual[is_kept], visual[~is_kept]  # both in visual (sequence) order
        if others.numel():
            hidden = state.hidden[0]
            assignment = nearest_kept(hidden, kept, others)
            merged = hidden.clone()
            merged[kept] = MERGES[self.mode](hidden, kept, others, assignment)
            state.set_hidden(merged[None])
        state.keep_visual(kept)


@dataclass
class OuterMerge(Strategy):
    """HoliTom's outer-LLM stage (module docstring); needs every frame's full pooled grid."""

    name = "holitom.outer_merge"
    summary = "HoliTom outer-LLM: DP temporal windows, static tokens averaged and DPC-KNN merged, dynamic top-k"
    ratio: float = 0.1  # RETAIN_RATIO: fraction of the video tokens kept
    tau: float = 0.8  # T: cosine similarity a position must exceed between consecutive frames to be static
    k: int = 7  # K: DPC-KNN neighbours, capped at each window's static cluster count (official min(K, C))
    beta: float = 0.6  # BETA: weight of the centre in a merged static token
    max_window: int = 1024  # MAX_WINDOW_SIZE: most frames in one window
    layer: int = -1  # vision layer whose received attention ranks dynamic tokens (official: the last)

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau!r} is outside [-1, 1] (a cosine similarity threshold)")
        if self.k < 1:
            raise ValueError(f"k={self.k!r} must be >= 1 (DPC-KNN neighbours)")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta={self.beta!r} is outside [0, 1]")
        if self.max_window < 1:
            raise ValueError(f"max_window={self.max_window!r} must be >= 1 (frames per window)")

    def check(self, info: ModelInfo) -> None:
        if not -info.vision_layers <= self.layer < info.vision_layers:
            raise ConfigError(f"strategy {self.name!r}: layer={self.layer} is outside the vision layers "
                              f"{-info.vision_layers}..{info.vision_layers - 1}")

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        return {"vision.attention": {self.layer}}

    def nominal_pre_llm(self, info: ModelInfo, tokens: PlannedTokens) -> None:
        """The paper protocol's budget: int(T * P * ratio) video tokens, spread over the frames."""
        total = int(sum(tokens.per_frame) * self.ratio)
        tokens.per_frame = split_sizes(total, len(tokens.per_frame))

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        grid = state.frame_grid(self.name)
        frames, positions = grid.shape
        if state.scores is None:
            raise ConfigError(f"strategy {self.name!r} found no attention scores (an earlier strategy replaced them)")
        if int(grid[-1, -1]) == grid.numel() - 1:  # the grid is tokens 0..T*P-1: a view, no copy
            features = state.features[: grid.numel()].view(frames, positions, -1)
        else:
            features = state.features[grid]  # (T, P, D)
        scores = state.scores[grid].float()
        windows, reduced, run = static_windows(consecutive_similarity(features), self.tau, self.max_window)
        state.meta[WINDOWS] = windows
        r = retained_ratio(self.ratio, frames * positions, reduced)

        static = static_masks(run, windows)  # (windows, P)
        n_static = static.sum(dim=1).tolist()
        lengths = [e - s + 1 for s, e in windows]
        counts = [dynamic_keep_count(positions - n, r) for n in n_static]
        repeats = torch.tensor(lengths, device=grid.device)
        keep = topk_rank_mask(scores, ~torch.repeat_interleave(static, repeats, dim=0),
                              torch.tensor(counts, device=grid.device).repeat_interleave(repeats))
        dynamic = grid[keep]  # frame by frame, spatial order inside a frame

        riders = None if state.riders is None else state.riders[grid.to(state.riders.device)]  # (T, P, C)
        feats, rider_parts, geometry, token_scores, offset = [], [], [], [], 0
        for w, (s, e) in enumerate(windows):
            if n_static[w]:
                window_riders = None if riders is None else riders[s : e + 1]
                merged, centres, centre_scores, merged_riders = self._merge_static(
                    features[s : e + 1], scores[s : e + 1], static[w], r, window_riders)
                feats.append(merged)
                rider_parts.append(merged_riders)
                geometry.append(grid[s, centres])
                token_scores.append(centre_scores)
            size = counts[w] * lengths[w]
            part = dynamic[offset : offset + size]
            offset += size
            feats.append(state.features[part])
            if state.riders is not None:
                rider_parts.append(state.riders[part.to(state.riders.device)])
            geometry.append(part)
            token_scores.append(state.scores[part].float())
        index = torch.cat(geometry)

        def carried(t: Tensor | None) -> Tensor | None:  # other strategies' per-token data: the centre's
            return None if t is None else t[index.to(t.device)]

        state.replace(torch.cat([f.to(state.features.dtype) for f in feats]), frame=state.frame[index],
                      row=state.row[index], col=state.col[index],
                      source=state.source[index], scores=torch.cat(token_scores), keys=carried(state.keys),
                      saliency=carried(state.saliency), group=carried(state.group),
                      riders=None if state.riders is None else torch.cat(rider_parts))

    def _merge_static(self, features: Tensor, scores: Tensor, static: Tensor, r: float,
                      riders: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One window's static tokens: (merged (C, D), centre positions (C,), centre scores (C,), merged
        riders (C, C_r) or None), in spatial order of the centres (the official code sorts its centres by
        index). The riders (DeepStack features, (W, P, C_r)) are averaged over the window and beta-merged
        with the clusters the features gave."""
        positions = torch.nonzero(static, as_tuple=False).flatten()
        averaged = features.index_select(1, positions).float().mean(dim=0)  # one token per static position
        n_clusters = static_cluster_count(positions.numel(), r)
        centres, assignment = dpc_knn_cluster(averaged, n_clusters, static_neighbours(self.k, n_clusters),
                                              centre_order="index")
        merged = beta_merge(averaged, centres, assignment, self.beta)
        merged_riders = None
        if riders is not None:
            averaged_riders = riders.index_select(1, positions.to(riders.device)).float().mean(dim=0)
            merged_riders = beta_merge(averaged_riders, centres.to(riders.device), assignment.to(riders.device), self.beta)
        centre_positions = positions[centres]  # ascending: ``positions`` is, and so are the centres
        return merged, centre_positions, scores[:, centre_positions].mean(dim=0), merged_riders



HOLITOM_STRATEGIES = (InnerMerge, OuterMerge)
