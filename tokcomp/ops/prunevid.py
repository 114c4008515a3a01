"""PruneVid's tensor math: temporal segments, static/dynamic split, spatial cluster means, per-group top-k.

Everything works on one video's pooled tokens laid out as ``frames`` (T, n, D): T frames of n
tokens each, position p of every frame being the same spatial cell. No model knowledge here.

Temporal segments: DPC-KNN (``tokcomp.ops.cluster``) clusters the T frame-mean features;
``refine_clusters`` turns the labels into contiguous segments (rule in its docstring); a segment is
a maximal run of equal refined labels.

Static/dynamic split: inside a segment of W >= 2 frames, position p is static when the mean
cosine similarity of its W tokens over the W(W-1) ordered pairs of distinct frames exceeds
``tau``. A segment of one frame has no static positions.

Group labels (``merge_frames_dynamic``'s ``group``): every non-empty group of output tokens, in
output order, gets a counter g = 0, 1, 2, ...; its label is ``2 * g`` for a segment's static
group and ``2 * g + 1`` for one frame's dynamic group. Labels are distinct per group, ascending
along the sequence, and even exactly for static groups (``is_static_label``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.ops.cluster import cluster_means, dpc_knn_cluster
from tokcomp.ops.selection import ceil_ratio, top_per_group

UNASSIGNED = -1


def runs(labels: Tensor | list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values as (label, first, last), left to right."""
    values = torch.as_tensor(labels).flatten().tolist()
    out: list[tuple[int, int, int]] = []
    for i, v in enumerate(values):
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1], i)
        else:
            out.append((v, i, i))
    return out


def refine_clusters(labels: Tensor) -> Tensor:
    """Relabel frame clusters (T,) so that every cluster keeps only its longest contiguous run(s).

    specs/methods.md records only the purpose of PruneVid's ``refine_clusters`` (contiguous
    segments); the three steps are our reading of the official function, re-implemented:

    1. For each label, find its maximal runs and their longest length m.
    2. A label whose runs all have length 1 (m == 1) loses all of them; otherwise the runs shorter
       than m lose their label (every run of length m stays, so ties keep several runs).
    3. Left to right, each maximal stretch of frames that lost their label takes the label of the
       frame just left of it or just right of it: the one whose label's longest run (from step 1)
       is longer, the left one on ties, the only one at either end of the video.
    If every frame lost its label (no run of length >= 2 anywhere), the input is returned
    unchanged: each original run is then its own segment.

    Segments are the maximal runs of the result (``runs``), so they are contiguous by
    construction. Returns a new (T,) long tensor on the input's device.
    """
    labels = torch.as_tensor(labels).long().flatten()
    original = runs(labels)
    longest: dict[int, int] = {}
    for label, first, last in original:
        longest[label] = max(longest.get(label, 0), last - first + 1)
    refined = labels.clone()
    for label, first, last in original:
        if longest[label] == 1 or last - first + 1 < longest[label]:
            refined[first : last + 1] = UNASSIGNED
    if bool((refined == UNASSIGNED).all()):
        return labels.clone()
    t = refined.numel()
    i = 0
    while i < t:
        if int(refined[i]) != UNASSIGNED:
            i += 1
            continue
        start = i
        while i < t and int(refined[i]) == UNASSIGNED:
            i += 1
        left = int(refined[start - 1]) if start > 0 else None
        right = int(refined[i]) if i < t else None
        if right is None or (left is not None and longest[left] >= longest[right]):
            refined[start:i] = left
        else:
            refined[start:i] = right
    return refined


def temporal_segments(frames: Tensor, n_clusters: int, k: int) -> list[tuple[int, int]]:
    """(first, last) frame of each segment: DPC-KNN over frame means, refined, cut into runs."""
    _, assignment = dpc_knn_cluster(frames.float().mean(dim=1), max(1, n_clusters), k)
    return [(first, last) for _, first, last in runs(refine_clusters(assignment))]


def static_positions(window: Tensor, tau: float) -> Tensor:
    """(n,) bool: positions whose mean pairwise cosine similarity across the W frames of ``window``
    (W, n, D) exceeds ``tau`` (ordered pairs of distinct frames; one frame: nothing is static)."""
    w = window.shape[0]
    if w < 2:
        return torch.zeros(window.shape[1], dtype=torch.bool, device=window.device)
    normed = F.normalize(window.float(), dim=-1)
    sim = torch.einsum("wnd,tnd->nwt", normed, normed)  # (n, W, W)
    off_diagonal = sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(dim=-1)
    return off_diagonal / (w * (w - 1)) > tau


def spatial_clustering(x: Tensor, ratio: float, k: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN clustering of the tokens x (n, D) into max(1, int(n * ratio)) clusters: (centres (C,)
    indices into x, in descending DPC score; assignment (n,) each token's position in centres)."""
    c = max(1, min(x.shape[0], int(x.shape[0] * ratio)))
    return dpc_knn_cluster(x, c, k)


def spatial_clusters(x: Tensor, ratio: float, k: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN cluster means of the tokens x (n, D) into max(1, int(n * ratio)) clusters.

    Returns (means (C, D) in x's dtype, centres (C,) indices into x), both in the clustering's
    centre order (descending DPC score), which is the order the merged tokens take.
    """
    centres, assignment = spatial_clustering(x, ratio, k)
    return cluster_means(x, assignment, centres.numel()), centres


def static_label(group: int) -> int:
    return 2 * group


def dynamic_label(group: int) -> int:
    return 2 * group + 1


def is_static_label(labels: Tensor) -> Tensor:
    """True where a label (>= 0) marks a static group."""
    return (labels >= 0) & (labels % 2 == 0)


@dataclass
class OuterResult:
    """PruneVid's merged tokens, in output order. ``frame``/``position``: the frame row and the spatial
    position of each token's representative (a cluster's centre; a static token's segment's first frame)."""

    features: Tensor  # (M, D)
    frame: Tensor  # (M,) long
    position: Tensor  # (M,) long
    group: Tensor  # (M,) long
    segments: list[tuple[int, int]]
    riders: Tensor | None = None  # (M, C): the riders given, merged like the features


def merge_frames_dynamic(frames: Tensor, temporal_segment_ratio: float, tau: float, cluster_ratio: float,
                         k: int, min_dynamic_tokens: int, riders: Tensor | None = None) -> OuterResult:
    """PruneVid's outer stage on ``frames`` (T, n, D).

    Segments from DPC-KNN over int(T * temporal_segment_ratio) clusters (at least one); per
    segment: static positions averaged over its frames and merged into DPC-KNN cluster means;
    then each frame's dynamic tokens, merged likewise when there are more than
    ``min_dynamic_tokens`` of them, else kept in spatial order. Output per segment:
    [static, dynamic of each frame in order]. ``riders`` (T, n, C), aligned with ``frames``
    (Qwen3-VL's DeepStack features), are averaged and clustered with the features' clusters.
    """
    t, n, _ = frames.shape
    device = frames.device
    segments = temporal_segments(frames, int(t * temporal_segment_ratio), k)
    feats: list[Tensor] = []
    frame_ids: list[Tensor] = []
    positions: list[Tensor] = []
    labels: list[Tensor] = []
    rider_parts: list[Tensor] = []
    group = 0

    def emit(f: Tensor, frame: int, pos: Tensor, label: int, r: Tensor | None) -> None:
        feats.append(f)
        if r is not None:
            rider_parts.append(r)
        frame_ids.append(torch.full((pos.numel(),), frame, dtype=torch.long, device=device))
        positions.append(pos.long())
        labels.append(torch.full((pos.numel(),), label, dtype=torch.long, device=device))

    for first, last in segments:
        window = frames[first : last + 1]
        static = static_positions(window, tau)
        static_idx = torch.nonzero(static, as_tuple=False).flatten()
        dynamic_idx = torch.nonzero(~static, as_tuple=False).flatten()
        if static_idx.numel():
            mean = window[:, static_idx].float().mean(dim=0).to(frames.dtype)
            centres, assignment = spatial_clustering(mean, cluster_ratio, k)
            rider_mean = None if riders is None else riders[first : last + 1, static_idx].float().mean(dim=0).to(riders.dtype)
            emit(cluster_means(mean, assignment, centres.numel()), first, static_idx[centres], static_label(group),
                 None if rider_mean is None else cluster_means(rider_mean, assignment, centres.numel()))
            group += 1
        if dynamic_idx.numel():
            for f in range(first, last + 1):
                tokens = frames[f, dynamic_idx]
                rider_tokens = None if riders is None else riders[f, dynamic_idx]
                if dynamic_idx.numel() > min_dynamic_tokens:
                    centres, assignment = spatial_clustering(tokens, cluster_ratio, k)
                    emit(cluster_means(tokens, assignment, centres.numel()), f, dynamic_idx[centres],
                         dynamic_label(group),
                         None if rider_tokens is None else cluster_means(rider_tokens, assignment, centres.numel()))
                else:
                    emit(tokens, f, dynamic_idx, dynamic_label(group), rider_tokens)
                group += 1
    return OuterResult(torch.cat(feats), torch.cat(frame_ids), torch.cat(positions), torch.cat(labels), segments,
                       torch.cat(rider_parts) if riders is not None else None)


def group_topk(scores: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """Positions (ascending) of the tokens kept when each group keeps its top ceil(n * alpha) by score.

    ``labels`` (V,): a group label per token, -1 for none. If no token has a label >= 0, all
    tokens form one group. Otherwise every label >= 0 is a group and unlabelled tokens are all
    kept. Ties go to the lower position.
    """
    labels = labels.to(scores.device).long()
    if not bool((labels >= 0).any()):
        labels = torch.zeros_like(labels)
    members = [torch.nonzero(labels == label, as_tuple=False).flatten() for label in torch.unique(labels[labels >= 0]).tolist()]
    kept = top_per_group(scores, members, lambda n: ceil_ratio(n, alpha))
    return torch.sort(torch.cat([torch.nonzero(labels < 0, as_tuple=False).flatten(), kept])).values
