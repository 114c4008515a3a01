"""FastVID's token math: dynamic segmentation (DySeg), the per-frame budget split, attention token
selection (ATS), anchor frames and density-based token merging (DTM).

Everything works on plain tensors: ``features`` (N, D) of the visual tokens, ``members`` one index
vector into it per frame (temporal order), ``saliency`` (N,) one importance value per token and
``global_features`` (T, D) one vector per frame. Frame positions inside a segment count from 0.
No model knowledge lives here; ``tokcomp.strategies.fastvid`` wires it to the pre-LLM stage.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.ops.cluster import dpc_scores
from tokcomp.ops.merge import nearest_kept
from tokcomp.ops.selection import topk_indices


def budget(tokens: int, ratio: float, d: float) -> tuple[int, int, int]:
    """(keep, salient, context) for a frame of ``tokens``: keep = int(tokens * ratio) (truncated, as
    the official code does), context = int(keep * d), salient = keep - context."""
    keep = int(tokens * ratio)
    context = int(keep * d)
    return keep, keep - context, context


def consecutive_similarity(global_features: Tensor) -> Tensor:
    """(T - 1,) float32 cosine similarity of frame t and frame t + 1's global features."""
    g = F.normalize(global_features.float(), dim=-1)
    return (g[:-1] * g[1:]).sum(dim=-1)


def dyseg_cuts(similarity: Tensor, c: int, tau: float) -> Tensor:
    """Transitions to cut, ascending: transition t separates frame t from frame t + 1.

    The union of the ``c - 1`` lowest-similarity transitions (all of them when there are fewer;
    ties: the lower transition first) and every transition with similarity < ``tau``."""
    lowest = torch.sort(similarity.float(), stable=True).indices[: max(0, min(c - 1, similarity.numel()))]
    below = torch.nonzero(similarity < tau, as_tuple=False).flatten()
    return torch.unique(torch.cat([lowest, below]).long())


def segments_from_cuts(cuts: Tensor, frames: int) -> list[tuple[int, int]]:
    """(first, last) frame of each contiguous segment the cut transitions produce."""
    if frames <= 0:
        return []
    bounds = [-1, *cuts.tolist(), frames - 1]
    return [(a + 1, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def dynamic_segments(global_features: Tensor, c: int, tau: float) -> list[tuple[int, int]]:
    """DySeg: segments of the frames whose global features are (T, D)."""
    frames = global_features.shape[0]
    return segments_from_cuts(dyseg_cuts(consecutive_similarity(global_features), c, tau), frames)


def anchor_offsets(length: int, p: int) -> list[int]:
    """Anchor frames of a segment of ``length`` frames, ascending: every ``p``-th frame counted
    backwards from the segment's last frame (so the last frame is always an anchor)."""
    return sorted(range(length - 1, -1, -p))


def context_slots(segment_context: int, anchors: int) -> int:
    """Context tokens each anchor frame picks: the segment's total context budget // #anchors."""
    return segment_context // anchors


def weighted_merge(anchors: Tensor, others: Tensor, assignment: Tensor, beta: float) -> Tensor:
    """(K, D): anchor i becomes w * anchor_i + (1 - w) * mean(tokens assigned to it), with
    w = max(1 / (count + 1), beta); an anchor nothing is assigned to stays as it is.

    ``assignment`` (M,) holds each of ``others``' anchor position (0..K-1). float32 math, the
    anchors' dtype out."""
    k = anchors.shape[0]
    sums = torch.zeros(k, anchors.shape[-1], dtype=torch.float32, device=anchors.device)
    sums.index_add_(0, assignment, others.float())
    counts = torch.bincount(assignment, minlength=k).to(torch.float32)
    mean = sums / counts.clamp(min=1)[:, None]
    w = torch.clamp(1.0 / (counts + 1.0), min=beta)
    merged = w[:, None] * anchors.float() + (1.0 - w[:, None]) * mean
    return torch.where((counts > 0)[:, None], merged, anchors.float()).to(anchors.dtype)


def density_top(features: Tensor, candidates: Tensor, n: int, k: int) -> Tensor:
    """The ``n`` of ``candidates`` (indices into ``features``) with the highest DPC-KNN score
    (density x distance to the nearest denser token, ``k`` neighbours), ascending."""
    n = min(n, candidates.numel())
    if n <= 0:
        return candidates[:0]
    _, _, score = dpc_scores(features[candidates], k)
    return candidates[topk_indices(score, n).to(candidates.device)]


class FastVIDPlan(NamedTuple):
    """FastVID's decisions (:func:`fastvid_plan`), applicable to the features and to any tensor aligned
    with them, e.g. riders (:func:`fastvid_apply`). ``merges``: per segment with a context budget,
    (anchors (K,), pool (M,) the tokens merged into them, assignment (M,) each one's anchor position)."""

    salient: list[Tensor]  # per frame: indices kept as they are
    merges: list[tuple[Tensor, Tensor, Tensor]]
    beta: float


def fastvid_plan(
    features: Tensor,
    members: list[Tensor],
    saliency: Tensor,
    global_features: Tensor,
    *,
    ratio: float,
    c: int,
    tau: float,
    d: float,
    p: int,
    beta: float,
    k: int,
) -> FastVIDPlan:
    """Which tokens FastVID keeps and what it merges into each context token (see :func:`fastvid_select`)."""
    salient, non_salient, context = [], [], []
    for idx in members:
        _, n_salient, n_context = budget(idx.numel(), ratio, d)
        chosen = topk_indices(saliency[idx], n_salient).to(idx.device)
        is_salient = torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
        is_salient[chosen] = True
        salient.append(idx[is_salient])
        non_salient.append(idx[~is_salient])
        context.append(n_context)
    merges = []
    for first, last in dynamic_segments(global_features, c, tau):
        frames = range(first, last + 1)
        offsets = anchor_offsets(len(frames), p)
        slots = context_slots(sum(context[f] for f in frames), len(offsets))
        anchors = torch.cat([density_top(features, non_salient[first + o], slots, k) for o in offsets])
        if anchors.numel() == 0:
            continue  # no context budget: the segment's non-salient tokens are dropped
        pool = torch.cat([non_salient[f] for f in frames])
        pool = pool[~torch.isin(pool, anchors)]
        assignment = nearest_kept(features, anchors, pool) if pool.numel() else pool
        merges.append((anchors, pool, assignment))
    return FastVIDPlan(salient, merges, beta)


def fastvid_apply(x: Tensor, plan: FastVIDPlan) -> tuple[Tensor, Tensor]:
    """(kept indices into ``x`` (N, C), ascending; their new values (K, C)): salient tokens as they are,
    each anchor the DTM merge (:func:`weighted_merge`) of the tokens the plan assigns to it."""
    kept, merged = list(plan.salient), [x[s] for s in plan.salient]
    for anchors, pool, assignment in plan.merges:
        anchor_x = x[anchors]
        if pool.numel():
            anchor_x = weighted_merge(anchor_x, x[pool], assignment, plan.beta)
        kept.append(anchors)
        merged.append(anchor_x)
    if not kept:
        return x.new_zeros(0, dtype=torch.long), x[:0]
    kept_idx, kept_x = torch.cat(kept), torch.cat(merged)
    order = torch.argsort(kept_idx)
    return kept_idx[order], kept_x[order]


def fastvid_select(
    features: Tensor,
    members: list[Tensor],
    saliency: Tensor,
    global_features: Tensor,
    *,
    ratio: float,
    c: int,
    tau: float,
    d: float,
    p: int,
    beta: float,
    k: int,
) -> tuple[Tensor, Tensor]:
    """The whole FastVID selection over T frames.

    Returns (kept indices into ``features``, ascending; their new features (K, D)). Salient tokens
    keep their features; context tokens carry the DTM merge of the segment's other non-salient
    tokens. A segment of one frame is the same rule with its only frame as anchor. An anchor
    frame with fewer non-salient tokens than slots contributes all of them.
    """
    plan = fastvid_plan(features, members, saliency, global_features, ratio=ratio, c=c, tau=tau, d=d, p=p,
                        beta=beta, k=k)
    return fastvid_apply(features, plan)
