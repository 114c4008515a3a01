"""Spatial pooling of per-frame token grids."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def bilinear_halve(grid: Tensor) -> Tensor:
    """Bilinear resize (frames, h, w, C) to (frames, ceil(h/2), ceil(w/2), C), as LLaVA-OneVision pools video."""
    h, w = grid.shape[1:3]
    x = grid.permute(0, 3, 1, 2).contiguous()
    x = F.interpolate(x, size=[math.ceil(h / 2), math.ceil(w / 2)], mode="bilinear")
    return x.permute(0, 2, 3, 1)


def side_for_ratio(side: int, ratio: float) -> int:
    """Grid side that keeps about ``ratio`` of ``side**2`` cells (at least one)."""
    return max(1, min(side, round(side * math.sqrt(ratio))))


def average_pool_grid(grid: Tensor, out_h: int, out_w: int) -> Tensor:
    """Adaptive average pooling of (frames, h, w, C) to (frames, out_h, out_w, C)."""
    x = grid.permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, (out_h, out_w))
    return x.permute(0, 2, 3, 1)
