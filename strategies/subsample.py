"""Baselines that keep a fraction of each frame's tokens: uniform, random, and top-k by importance.

Each is a ``FrameScorer``: a score per token, and every frame keeps its round(n * ratio) best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokcomp.strategies._scorer import FrameScorer, per_frame
from torch import Tensor

from tokcomp.errors import ConfigError
from tokcomp.ops.selection import uniform_indices
from tokcomp.state import VisualTokens
from tokcomp.strategy import ModelInfo


@dataclass
class Uniform(FrameScorer):
    """Evenly spaced tokens in raster order: the cheapest content-blind baseline."""

    name = "uniform"
    summary = "keep evenly spaced tokens of each frame (raster order)"

    def score(self, state: VisualTokens, members: list[Tensor]) -> Tensor:
        """1 on the frame's evenly spaced lattice of ``budget(n)`` positions, 0 elsewhere."""
        return per_frame(state, members,
                         lambda n: torch.zeros(n).index_fill_(0, uniform_indices(n, self.budget(n)), 1.0))


@dataclass
class Random(FrameScorer):
    """Random tokens per frame; ``seed`` (or the run seed) makes it reproducible."""

    name = "random"
    summary = "keep random tokens of each frame (seeded)"
    seed: int | None = None

    def start(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(self.seed if self.seed is not None else seed)

    def score(self, state: VisualTokens, members: list[Tensor]) -> Tensor:
        """A random priority per frame: a permutation's first token scores highest."""
        def priority(n: int) -> Tensor:
            return torch.empty(n).index_copy_(0, torch.randperm(n, generator=self._generator),
                                              torch.arange(n, 0, -1, dtype=torch.float32))
        return per_frame(state, members, priority)


@dataclass
class TopK(FrameScorer):
    """Highest-importance tokens per frame, kept in spatial order.

    Importance is the mean attention a token receives (over heads and queries) in vision layer
    ``layer`` (default: the last), computed for that one layer only and pooled with the features.
    """

    name = "topk"
    summary = "keep each frame's tokens with the most received attention in a vision layer"
    layer: int = -1

    def check(self, info: ModelInfo) -> None:
        if not -info.vision_layers <= self.layer < info.vision_layers:
            raise ConfigError(
                f"strategy 'topk': layer={self.layer} is outside the vision layers "
                f"{-info.vision_layers}..{info.vision_layers - 1}"
            )

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        return {"vision.attention": {self.layer}}

    def score(self, state: VisualTokens, members: list[Tensor]) -> Tensor:
        if state.scores is None:
            raise ConfigError("strategy 'topk' found no importance scores (an earlier strategy replaced them)")
        return state.scores
