"""Per-frame token selection for EarlyTom's decoupled stage 2: counts, window argmax, random (its
per-frame top-k is ``tokcomp.ops.selection.topk_positions``).

Everything works on score matrices (frames, tokens) whose rows share one token layout, and returns
*positions* within a frame, ascending (spatial order), as a (frames, k) tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokcomp.ops import kernels


def rescaled_ratio(ratio: float, base_frames: int, frames: int) -> float:
    """r_hat = min(r * B / N, 1): the per-frame ratio that keeps about r * B * L tokens from the N
    frames that survived stage 1 out of B input frames. Computed as r / (N / B), the official order
    of operations (methods.md 1.5.2; the paper's Eq. 5 is garbled)."""
    return min(ratio / (frames / base_frames), 1.0)


def topk_count(tokens: int, r_hat: float) -> int:
    """Tokens a dynamic frame keeps: ceil(L * r_hat), at least one."""
    return max(1, min(tokens, math.ceil(tokens * r_hat)))


def window_count(tokens: int, r_hat: float) -> int:
    """Windows (hence tokens) of a static frame: max(1, round(L * r_hat)) (Python rounding, half to even)."""
    return max(1, min(tokens, round(tokens * r_hat)))


def random_positions(frames: int, tokens: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct random positions per frame, ascending (CPU generator, CPU result)."""
    order = torch.rand(frames, tokens, generator=generator).argsort(dim=-1)[:, :k]
    return torch.sort(order, dim=-1).values


def split_sizes(length: int, parts: int) -> list[int]:
    """``parts`` contiguous sizes summing to ``length``: floor(length/parts), the first
    ``length mod parts`` one larger (the official window split)."""
    base, extra = divmod(length, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def raster_window_argmax(scores: Tensor, target: int) -> Tensor:
    """Official static-frame selection: split each row of ``scores`` (frames, tokens), in raster
    order, into ``target`` contiguous 1-D windows (:func:`split_sizes`) and keep the position of each
    window's maximum (first one on ties); (frames, target), ascending. Runs the dispatching
    ``window_argmax`` kernel (Triton on CUDA)."""
    target = min(target, scores.shape[1])
    return kernels.window_argmax(scores, torch.full((scores.shape[0],), target, dtype=torch.int64,
                                                    device=scores.device))


def square_windows(height: int, width: int, target: int) -> Tensor:
    """Window id of each raster position of a height x width grid, tiled into gh x gw near-square
    blocks with gh * gw as close to ``target`` as such a tiling allows (exact when ``target``
    factors so); rows and columns are split like :func:`split_sizes`.

    The 2-D alternative to the official raster windows, which wrap around row ends."""
    gh = max(1, min(height, round(math.sqrt(target * height / width))))
    gw = max(1, min(width, round(target / gh)))
    row_band = torch.repeat_interleave(torch.arange(gh), torch.tensor(split_sizes(height, gh)))
    col_band = torch.repeat_interleave(torch.arange(gw), torch.tensor(split_sizes(width, gw)))
    return (row_band[:, None] * gw + col_band[None, :]).reshape(-1)


def labelled_window_argmax(scores: Tensor, window_ids: Tensor) -> Tensor:
    """Position of each window's highest score (first one on ties), for every row of ``scores``
    (frames, tokens); ``window_ids`` (tokens,) labels any windows 0..W-1 (e.g. :func:`square_windows`).
    Returns (frames, W), ascending."""
    ids = window_ids.to(scores.device)
    count = int(ids.max()) + 1
    sizes = torch.bincount(ids, minlength=count)
    order = torch.argsort(ids, stable=True)  # positions grouped by window, ascending inside each
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(int(sizes.max()), device=ids.device)
    valid = slot[None, :] < sizes[:, None]
    padded = order[(starts[:, None] + slot[None, :]).clamp(max=order.numel() - 1)]  # (W, max size)
    values = scores.float()[:, padded].masked_fill(~valid, float("-inf"))  # (frames, W, max size)
    chosen = torch.gather(padded.expand(scores.shape[0], -1, -1), 2, values.argmax(dim=-1, keepdim=True))
    return torch.sort(chosen.squeeze(-1), dim=-1).values
