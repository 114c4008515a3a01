"""Per-group token selection: which indices to keep, in their original order."""

from __future__ import annotations

import math
from collections.abc import Callable

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


def topk_positions(scores: Tensor, k: int) -> Tensor:
    """(rows, k): each row's ``k`` highest scores of ``scores`` (rows, n) (ties: lower position first),
    returned in ascending position."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, returned ascending (ties: lower index first)."""
    return topk_positions(scores.reshape(1, -1), min(k, scores.numel()))[0]


def groups(labels: Tensor) -> list[Tensor]:
    """Indices of each distinct non-negative label, in order of the labels' first appearance (one group per
    run of equal labels; a label in several runs gives all its indices each time), ascending in a group.

    One stable sort and a split, not a ``nonzero`` per label: on a GPU each of those is a host sync."""
    values = torch.unique_consecutive(labels[labels >= 0]).tolist()
    if not values:
        return []
    distinct, counts = torch.unique(labels, return_counts=True)
    members = torch.split(torch.argsort(labels, stable=True), counts.tolist())
    by_label = dict(zip(distinct.tolist(), members, strict=True))
    return [by_label[value] for value in values]


def ceil_ratio(n: int, ratio: float) -> int:
    return max(1, min(n, math.ceil(n * ratio)))


def equal_size_batches(members: list[Tensor]) -> dict[int, list[int]]:
    """Group sizes -> which groups have that many members, so groups of one size run as one batch."""
    batches: dict[int, list[int]] = {}
    for i, m in enumerate(members):
        batches.setdefault(m.numel(), []).append(i)
    return batches


def top_per_group(scores: Tensor, members: list[Tensor], budget: Callable[[int], int]) -> Tensor:
    """Indices of each group's ``budget(n)`` highest scores (ties: lower index first) over all groups,
    ascending. ``members`` are index vectors into ``scores`` (N,), e.g. ``groups(frame)``; groups of
    one size are ranked as one (groups, n) batch."""
    kept = []
    for n, which in equal_size_batches(members).items():
        idx = torch.stack([members[i] for i in which]).to(scores.device)  # (groups, n)
        kept.append(torch.gather(idx, 1, topk_positions(scores[idx], budget(n))).flatten())
    return torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long, device=scores.device)
