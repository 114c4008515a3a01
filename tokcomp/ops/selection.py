"""Per-group token selection: which indices to keep, in their original order."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept out of ``n`` at ``ratio`` (rounded, at least one)."""
    return max(1, min(n, round(n * ratio)))


def uniform_indices(n: int, k: int) -> Tensor:
    """``k`` evenly spread indices in ``range(n)``, ascending and unique."""
    if k >= n:
        return torch.arange(n)
    return torch.floor((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long()


def random_indices(n: int, k: int, generator: torch.Generator) -> Tensor:
    return torch.sort(torch.randperm(n, generator=generator)[:k]).values


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, returned ascending (ties: lower index first)."""
    k = min(k, scores.numel())
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def groups(labels: Tensor) -> list[Tensor]:
    """Indices of each distinct non-negative label, in order of the labels' first appearance."""
    out = []
    for value in torch.unique_consecutive(labels[labels >= 0]).tolist():
        out.append(torch.nonzero(labels == value, as_tuple=False).flatten())
    return out


def ceil_ratio(n: int, ratio: float) -> int:
    return max(1, min(n, math.ceil(n * ratio)))
