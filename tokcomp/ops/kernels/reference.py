"""Pure-torch references of the hot operations; any device, and the production path on CPU.

Each function here defines the semantics that the Triton kernels in ``triton_impl`` must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8  # torch.nn.functional.cosine_similarity's default; applied to each norm separately


def frame_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Token-aligned frame similarity: ``out[f] = mean_t cos(a[f, t], b[f, t])``.

    a, b: (F, T, D), any float dtype (broadcast views such as ``ref.expand(F, -1, -1)`` are fine).
    Returns (F,) float32, computed in float32 with torch's cosine_similarity (each norm clamped at
    1e-8). T == 0 gives NaN, like the mean of nothing.
    """
    check_frame_cosine(a, b)
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=EPS).mean(dim=-1)


def window_argmax(scores: Tensor, windows: Tensor) -> Tensor:
    """Argmax of each contiguous 1-D raster window, per row.

    scores: (N, L) float, NaN-free. windows: (N,) integers in [0, L]. Row n is split into
    ``w = windows[n]`` contiguous windows: ``L // w`` positions each, the first ``L % w`` windows one
    larger. Returns (N, max(windows)) int64: the absolute position in [0, L) of each window's maximum
    (ties: lowest position), padded with -1 after row n's ``w`` windows. O(N*L) memory whatever the
    windows.
    """
    wmax = check_window_argmax(scores, windows)
    n, length = scores.shape
    device = scores.device
    if wmax == 0 or n == 0:
        return torch.full((n, wmax), -1, dtype=torch.int64, device=device)
    w = windows.to(device=device, dtype=torch.int64)
    ws = w.clamp_min(1)[:, None]
    q, r = length // ws, length % ws  # window size, and how many windows get one more
    pos = torch.arange(length, device=device)[None, :]
    big = r * (q + 1)  # positions covered by the r larger windows
    wid = torch.where(pos < big, pos // (q + 1), r + (pos - big) // q)  # (N, L), window of each position
    flat = (wid + torch.arange(n, device=device)[:, None] * wmax).flatten()
    x = scores.float().flatten()
    best = torch.full((n * wmax,), float("-inf"), device=device).scatter_reduce(0, flat, x, "amax")
    at_max = x == best[flat]
    candidate = torch.where(at_max, pos.expand(n, length).flatten(), length)
    first = torch.full((n * wmax,), length, dtype=torch.int64, device=device)
    first = first.scatter_reduce(0, flat, candidate, "amin").view(n, wmax)
    j = torch.arange(wmax, device=device)[None, :]
    return torch.where(j < w[:, None], first, -1)


def scatter_mean(values: Tensor, index: Tensor, base: Tensor) -> Tensor:
    """True-mean merge of tokens into kept tokens.

    values: (M, D); index: (M,) int64 in [0, K); base: (K, D), the kept tokens themselves.
    ``out[k] = (base[k] + sum_{m: index[m] == k} values[m]) / (1 + count_k)``, accumulated in float32
    and returned in base's dtype. Groups that receive nothing keep base[k] (exactly, up to the dtype
    round trip). An out-of-range index raises here on CPU (the Triton path ignores such rows).
    """
    check_scatter_mean(values, index, base)
    k = base.shape[0]
    index = index.to(device=base.device, dtype=torch.int64)
    total = base.float().index_add(0, index, values.to(device=base.device, dtype=torch.float32))
    count = torch.bincount(index, minlength=k)
    return (total / (1 + count.to(torch.float32))[:, None]).to(base.dtype)


# ---------------------------------------------------------------- shared argument checks (no device sync)


def check_frame_cosine(a: Tensor, b: Tensor) -> None:
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"frame_cosine needs two (F, T, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"frame_cosine needs float tensors, got {a.dtype} and {b.dtype}")


def check_window_argmax(scores: Tensor, windows: Tensor) -> int:
    """Validate and return max(windows) (one host sync, needed anyway for the output's shape)."""
    if scores.dim() != 2 or windows.dim() != 1 or windows.shape[0] != scores.shape[0]:
        raise ValueError(
            f"window_argmax needs scores (N, L) and windows (N,), got {tuple(scores.shape)} and {tuple(windows.shape)}"
        )
    if windows.is_floating_point() or windows.is_complex() or windows.dtype == torch.bool:
        raise TypeError(f"windows must be integers, got {windows.dtype}")
    if windows.numel() == 0:
        return 0
    lo, hi = (int(v) for v in torch.aminmax(windows.to(torch.int64)))
    if lo < 0 or hi > scores.shape[1]:
        raise ValueError(f"windows must lie in [0, L={scores.shape[1]}], got values in [{lo}, {hi}]")
    return hi


def check_scatter_mean(values: Tensor, index: Tensor, base: Tensor) -> None:
    if values.dim() != 2 or base.dim() != 2 or index.dim() != 1:
        raise ValueError(
            f"scatter_mean needs values (M, D), index (M,), base (K, D), got {tuple(values.shape)}, "
            f"{tuple(index.shape)}, {tuple(base.shape)}"
        )
    if values.shape[0] != index.shape[0] or values.shape[1] != base.shape[1]:
        raise ValueError(
            f"scatter_mean shapes disagree: values {tuple(values.shape)}, index {tuple(index.shape)}, base {tuple(base.shape)}"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must be integers, got {index.dtype}")
