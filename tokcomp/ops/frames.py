"""Frame-level merging of encoder hidden states."""

from __future__ import annotations

import torch
from torch import Tensor


def average_adjacent_pairs(hidden: Tensor, sources: list[list[int]]) -> tuple[Tensor, list[list[int]]]:
    """Average frames (0,1), (2,3), ...; an odd last frame stays alone. Weights follow source counts."""
    rows, merged = [], []
    for start in range(0, hidden.shape[0], 2):
        group = list(range(start, min(start + 2, hidden.shape[0])))
        weights = torch.tensor([len(sources[i]) for i in group], dtype=hidden.dtype, device=hidden.device)
        rows.append((hidden[group] * weights[:, None, None]).sum(0) / weights.sum())
        merged.append([f for i in group for f in sources[i]])
    return torch.stack(rows), merged
