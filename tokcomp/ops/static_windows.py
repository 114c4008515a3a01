"""HoliTom's outer-LLM temporal math: static windows by dynamic programming, static/dynamic split, beta merge.

Inputs are the pooled features of T frames with P positions each, (T, P, D). Notation:

- ``feature_sim`` (T-1, P): cosine similarity of each position between frames t and t+1.
- ``indicator`` = feature_sim > tau. A position is *static in the window* [s, e] (frames s..e, inclusive)
  when the indicator holds for every consecutive pair inside it, i.e. rows s..e-1.
- ``run`` (T-1, P): the number of consecutive True indicator rows ending at row j (0 where it is False).
  Position p is static in [s, e] (s < e) exactly when run[e-1, p] >= e - s, so every window's static
  count comes out of one histogram of ``run`` per row: no loop over windows.
- gain([s, e]) = static_count(s, e) * (e - s): the tokens saved when each static position of the window
  is kept once instead of e - s + 1 times. A one-frame window gains 0.
- The segmentation maximises the total gain over partitions of 0..T-1 into contiguous windows of at
  most ``max_window`` frames. The DP over end frames is T steps with a vectorised max over the starts
  (numpy, on the host, after one transfer of the (T, T) gain table). Among equal totals the
  *largest* start wins, i.e. the shortest last window, at every end frame and so along the whole
  trace-back: the official loop (``select_static_windows``) starts from the one-frame window and
  tries lengths 2, 3, ... in turn, replacing its best only on a strict ``>``, so the first (shortest)
  optimal window is kept. Equal totals with different windows are not rare (about a third of random
  small inputs, T <= 32 and P < 50, with the default ``max_window``; far fewer at 32 x 196), so this
  rule decides the windows, not just the optimum's value.

Everything is exact integer arithmetic after the similarity threshold, so the DP has no float ties
(the official DP adds the same integers in float32, exact below 2**24, far above T * P).

``beta_merge`` is HoliTom's cluster merge (``merge_tokens_by_clustering``): the centre weighted by
beta, the mean of the cluster's *other* members by 1 - beta, and a centre with no other member kept
as it is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tokcomp.ops.cluster import cluster_means


def consecutive_similarity(features: Tensor, eps: float = 1e-12) -> Tensor:
    """(T-1, P) float32 cosine similarity of each position between consecutive frames of (T, P, D).

    Dot products over norms (each norm clamped at ``eps``, as ``F.normalize`` does): no normalised
    copy of the features."""
    x = features.float()
    norms = torch.linalg.vector_norm(x, dim=-1).clamp_min(eps)
    dots = torch.linalg.vecdot(x[1:], x[:-1])
    return dots / (norms[1:] * norms[:-1])


def static_run_lengths(indicator: Tensor) -> Tensor:
    """(T-1, P) long: consecutive True rows of ``indicator`` (T-1, P) ending at each row (0 where False)."""
    rows = torch.arange(indicator.shape[0], device=indicator.device)[:, None].expand_as(indicator)
    last_false = torch.where(indicator, torch.full_like(rows, -1), rows)
    last_false = torch.cummax(last_false, dim=0).values
    return rows - last_false


def window_static_counts(run: Tensor) -> Tensor:
    """(T, T) long table: entry [e, s] = positions static in every pair of frames s..e, for s < e.

    ``run`` is :func:`static_run_lengths` of the (T-1, P) indicator. Entries with s >= e are 0
    (a single frame has no pair; its gain is 0 whatever its count)."""
    pairs = run.shape[0]
    frames = pairs + 1
    device = run.device
    if pairs == 0:
        return torch.zeros(1, 1, dtype=torch.long, device=device)
    # at_least[j, L] = #positions with run[j, p] >= L, for L = 0..frames-1
    hist = torch.zeros(pairs, frames + 1, dtype=torch.long, device=device)
    hist.scatter_add_(1, run, torch.ones_like(run))
    at_least = torch.flip(torch.cumsum(torch.flip(hist, [1]), dim=1), [1])[:, :frames]
    e = torch.arange(frames, device=device)[:, None]
    s = torch.arange(frames, device=device)[None, :]
    length = (e - s).clamp(min=0)  # pairs inside the window
    row = (e - 1).clamp(min=0).expand(frames, frames)
    counts = at_least[row, length]
    return torch.where(s < e, counts, torch.zeros_like(counts))


def window_gains(run: Tensor) -> Tensor:
    """(T, T) long: gain of window [s, e] at [e, s] = static count * (e - s); 0 for s >= e."""
    frames = run.shape[0] + 1
    e = torch.arange(frames, device=run.device)[:, None]
    s = torch.arange(frames, device=run.device)[None, :]
    return window_static_counts(run) * (e - s).clamp(min=0)


def best_partition(gains: Tensor | np.ndarray, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """Partition frames 0..T-1 into contiguous windows of at most ``max_window`` frames maximising the
    summed ``gains[e, s]``. Returns (windows as inclusive (s, e) pairs in temporal order, the optimum).

    One host transfer, then T steps each taking a vectorised max over the admissible starts; among
    equal totals the largest start (shortest last window) wins at every end frame, as in HoliTom's
    loop (lengths tried from 1 upwards, replaced only on a strict ``>``); traced back from the end."""
    if max_window < 1:
        raise ValueError(f"max_window={max_window!r} must be >= 1")
    g = gains.detach().cpu().numpy() if isinstance(gains, Tensor) else np.asarray(gains)
    frames = g.shape[0]
    best = np.zeros(frames + 1, dtype=np.int64)  # best[i]: optimum over frames 0..i-1
    start = np.zeros(frames, dtype=np.int64)
    for e in range(frames):
        lo = max(0, e - max_window + 1)
        values = (best[lo : e + 1] + g[e, lo : e + 1])[::-1]  # starts e, e - 1, ..., lo
        j = int(values.argmax())  # first maximum in that order: the largest start
        start[e], best[e + 1] = e - j, values[j]
    windows, e = [], frames - 1
    while e >= 0:
        windows.append((int(start[e]), e))
        e = int(start[e]) - 1
    return windows[::-1], int(best[frames])


def static_windows(feature_sim: Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int, Tensor]:
    """HoliTom's global temporal segmentation of T frames from their (T-1, P) ``feature_sim``.

    Returns (windows, total_reduced, run): the optimal partition, its total gain (tokens saved by
    keeping each static position once per window) and the run lengths, for :func:`static_masks`."""
    run = static_run_lengths(feature_sim > tau)
    windows, total = best_partition(window_gains(run), max_window)
    return windows, total, run


def static_masks(run: Tensor, windows: list[tuple[int, int]]) -> Tensor:
    """(len(windows), P) bool: the positions static in each window (s, e) of frames s..e, i.e. whose
    indicator holds for every pair inside it; none for a one-frame window."""
    device = run.device
    first = torch.tensor([s for s, _ in windows], device=device)
    last = torch.tensor([e for _, e in windows], device=device)
    if run.shape[0] == 0:
        return torch.zeros(len(windows), run.shape[1], dtype=torch.bool, device=device)
    masks = run[(last - 1).clamp(min=0)] >= (last - first)[:, None]
    return masks & (last > first)[:, None]


def retained_ratio(ratio: float, total_tokens: int, reduced: int) -> float:
    """r' = min(r / ((total - reduced) / total), 1): the ratio applied to what is left after the static
    tokens were collapsed, so that about r * total tokens remain (HoliTom's order of operations)."""
    return min(ratio / ((total_tokens - reduced) / total_tokens), 1.0)


def dynamic_keep_count(n_dynamic: int, ratio: float) -> int:
    """Dynamic tokens a frame keeps: ceil(n * r') (0 when the window has none)."""
    return min(n_dynamic, math.ceil(n_dynamic * ratio)) if n_dynamic > 0 else 0


def static_cluster_count(n_static: int, ratio: float) -> int:
    """Static cluster centres of a window: round(n * r') (Python rounding), at least one when n > 0."""
    return max(1, min(n_static, round(n_static * ratio))) if n_static > 0 else 0


def static_neighbours(k: int, n_clusters: int) -> int:
    """DPC-KNN neighbours for a window's static tokens: min(K, number of clusters), as HoliTom's
    ``merge_tokens_by_density`` passes ``k=min(K, cluster_num)`` (the cluster count, not the token
    count; at least one)."""
    return max(1, min(k, n_clusters))


def beta_merge(x: Tensor, centres: Tensor, assignment: Tensor, beta: float) -> Tensor:
    """(C, D): beta * x[centre] + (1 - beta) * mean of the cluster's *non-centre* members; a centre
    with no other member is returned unchanged (not scaled by beta).

    This is HoliTom's ``merge_tokens_by_clustering`` with ``NO_BETA`` unset or "0" (its default): it
    averages only the non-centre tokens assigned to a centre, and appends the bare centre when none
    is. E.g. members 0, 1, 4 with centre 0 and beta 0.6: 0.6 * x0 + 0.4 * (x1 + x4) / 2.

    ``centres`` (C,) indexes x (N, D); ``assignment`` (N,) gives each point's cluster position in
    ``centres`` (the entries of the centres themselves are ignored). Float32 arithmetic, x's dtype out."""
    others = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    others[centres] = False
    labels = assignment[others]
    means = cluster_means(x[others].float(), labels, centres.numel())
    counts = torch.bincount(labels, minlength=centres.numel())
    centre = x[centres].float()
    merged = torch.where((counts > 0)[:, None], beta * centre + (1.0 - beta) * means, centre)
    return merged.to(x.dtype)


def topk_rank_mask(scores: Tensor, eligible: Tensor, counts: Tensor) -> Tensor:
    """(F, P) bool: in each row, the ``counts[row]`` highest ``scores`` among ``eligible`` positions
    (ties: lower position first). All rows in one sort; ``counts`` must not exceed eligible per row."""
    masked = scores.float().masked_fill(~eligible, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < counts.to(scores.device)[:, None]) & eligible
