"""Baselines that keep a fraction of each frame's tokens: uniform, random, and top-k by importance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokcomp.strategies._select import PerFrameSelection
from torch import Tensor

from tokcomp.errors import ConfigError
from tokcomp.ops.selection import random_indices, topk_indices, uniform_indices
from tokcomp.state import VisualTokens
from tokcomp.strategy import ModelInfo


@dataclass
class Uniform(PerFrameSelection):
    """Evenly spaced tokens in raster order: the cheapest content-blind baseline."""

    name = "uniform"
    summary = "keep evenly spaced tokens of each frame (raster order)"

    def select(self, tokens: VisualTokens, members: Tensor, k: int) -> Tensor:
        return uniform_indices(members.numel(), k)


@dataclass
class Random(PerFrameSelection):
    """Random tokens per frame; ``seed`` (or the run seed) makes it reproducible."""

    name = "random"
    summary = "keep random tokens of each frame (seeded)"
    seed: int | None = None

    def start(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(self.seed if self.seed is not None else seed)

    def select(self, tokens: VisualTokens, members: Tensor, k: int) -> Tensor:
        return random_indices(members.numel(), k, self._generator)


@dataclass
class TopK(PerFrameSelection):
    """Highest-importance tokens per frame, kept in spatial order.

    Importance is the mean attention a token receives (over heads and queries) in vision layer
    ``layer`` (default: the last), computed for that one layer only and pooled with the features.
    """

    name = "topk"
    summary = "keep each frame's tokens with the most received attention in a vision layer"
    layer: int = -1

    def _layer(self, info: ModelInfo) -> int:
        return self.layer % info.vision_layers if self.layer < 0 else self.layer

    def check(self, info: ModelInfo) -> None:
        if not -info.vision_layers <= self.layer < info.vision_layers:
            raise ConfigError(
                f"strategy 'topk': layer={self.layer} is outside the vision layers "
                f"{-info.vision_layers}..{info.vision_layers - 1}"
            )

    def encoder_attention_layers(self, info: ModelInfo) -> set[int]:
        return {self._layer(info)}

    def select(self, tokens: VisualTokens, members: Tensor, k: int) -> Tensor:
        if tokens.scores is None:
            raise ConfigError("strategy 'topk' found no importance scores (an earlier strategy replaced them)")
        return topk_indices(tokens.scores[members], k)
