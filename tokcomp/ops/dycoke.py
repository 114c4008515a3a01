"""DyCoke's two token rules as pure tensor math: temporal token merging (TTM) and KV-cache pruning.

TTM (pre-LLM). Frames are compared token by token at the same grid position (cosine similarity
of the two feature vectors at position p). A *pruned* frame keeps the ``kept_per_frame`` tokens
that are LEAST similar to the same positions of its reference frame, in ascending-similarity
order (what ``topk(largest=False)`` returns). The schedule over T frames (official loops):

* pass 1, pairs (0, 1), (2, 3), ...: frame i+1 is pruned against frame i (frame i stays full);
* pass 2, for i = 0, 4, 8, ... while i < T - 4: frame i+2 (still full after pass 1) is pruned
  against frame i.

So each group of four frames keeps frame 0 full and prunes frames 1-3, except that pass 2's bound
``i < T - 4`` skips the last group when 4 divides T: there frame T-2 stays full. With an odd T the
official pass-1 loop never emits the last frame at all (it has no partner); here it is kept full.

KV pruning (decoding). Keep every non-visual cache entry plus the top ``int(n_visual * (1 - p))``
visual entries by the current token's attention; re-prune only when the attention over the
visual entries moved (cosine similarity to the previous step's below a threshold).
"""

from __future__ import annotations

import torch
from torch import Tensor


def ttm_keep_count(per_frame: int, k: float) -> int:
    """Tokens a pruned frame keeps: ``int((1 - k) * per_frame)`` as the official code computes it
    (so k=0.7 keeps 58 of 196 and 4 of 16), but at least one."""
    return min(per_frame, max(1, int((1 - k) * per_frame)))


def ttm_references(frames: int) -> list[int | None]:
    """For each frame, the frame it is pruned against (None: kept whole), following both passes."""
    ref: list[int | None] = [None] * frames
    for i in range(0, frames - 1, 2):  # pass 1: pairs (i, i+1)
        ref[i + 1] = i
    for i in range(0, frames - 4, 4):  # pass 2: frame i+2 against frame i; skips the last group
        ref[i + 2] = i
    return ref


def ttm_counts(frames: int, per_frame: int, k: float) -> list[int]:
    """Tokens each frame keeps after TTM (depends only on T, P and k)."""
    kept = ttm_keep_count(per_frame, k)
    return [per_frame if r is None else kept for r in ttm_references(frames)]


def position_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of ``a[p]`` and ``b[p]`` for every position p: (P, D), (P, D) -> (P,) float32."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def least_similar(similarity: Tensor, count: int) -> Tensor:
    """Positions of the ``count`` smallest similarities, in ascending-similarity order (ties: lower
    position first)."""
    return torch.sort(similarity, stable=True).indices[:count]


def ttm_select(features: Tensor, k: float, spatial_order: bool = False) -> list[Tensor]:
    """Per frame, the positions kept by TTM, in output order.

    ``features``: (T, P, D), frame f's token at grid position p. Whole frames come out as
    ``arange(P)``; pruned frames in ascending-similarity order, or ascending position with
    ``spatial_order``.
    """
    frames, per_frame = features.shape[:2]
    kept = ttm_keep_count(per_frame, k)
    out = []
    for f, ref in enumerate(ttm_references(frames)):
        if ref is None:
            out.append(torch.arange(per_frame, device=features.device))
            continue
        chosen = least_similar(position_similarity(features[f], features[ref]), kept)
        out.append(torch.sort(chosen).values if spatial_order else chosen)
    return out


def kv_keep_count(visual: int, prune_ratio: float) -> int:
    """Visual cache entries kept: ``int(visual * (1 - prune_ratio))``, as the official code."""
    return int(visual * (1 - prune_ratio))


def kv_keep_indices(attention: Tensor, visual: Tensor, prune_ratio: float) -> Tensor:
    """Indices (ascending) of the cache entries to read: every non-visual entry plus the visual
    entries with the ``kv_keep_count`` highest attention (ties: lower index first)."""
    vis = torch.nonzero(visual, as_tuple=False).flatten()
    count = kv_keep_count(vis.numel(), prune_ratio)
    top = vis[torch.sort(attention[vis].float(), descending=True, stable=True).indices[:count]]
    keep = torch.cat([torch.nonzero(~visual, as_tuple=False).flatten(), top])
    return torch.sort(keep).values


def attention_changed(current: Tensor, previous: Tensor | None, threshold: float) -> bool:
    """True when there is no previous attention or cos(current, previous) < threshold."""
    if previous is None or previous.shape != current.shape:
        return True
    sim = torch.nn.functional.cosine_similarity(current.float(), previous.float(), dim=0)
    return bool(sim < threshold)
