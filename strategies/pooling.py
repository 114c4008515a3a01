"""Spatial average pooling of each frame's token grid to a target ratio (the Table 7 baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.pooling import average_pool_grid, side_for_ratio
from tokcomp.state import VisualTokens
from tokcomp.strategy import Strategy, check_ratio


@dataclass
class Pooling(Strategy):
    """Average-pool each frame's h x w grid to s x s with s = round(h * sqrt(ratio))."""

    name = "pooling"
    summary = "average-pool each frame's token grid to about `ratio` of its tokens"
    ratio: float = 0.25

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)

    def plan_pre_llm(self, info, tokens) -> None:
        h, w = tokens.grid
        if any(n != h * w for n in tokens.per_frame):
            raise ConfigError("strategy 'pooling' needs every frame's full token grid (put it first at pre_llm)")
        out_h, out_w = side_for_ratio(h, self.ratio), side_for_ratio(w, self.ratio)
        tokens.per_frame, tokens.grid = [out_h * out_w] * len(tokens.per_frame), (out_h, out_w)

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        h, w = state.grid
        frames = state.num_frames
        index = state.frame_grid(self.name)
        out_h, out_w = side_for_ratio(h, self.ratio), side_for_ratio(w, self.ratio)

        def pool(x: Tensor) -> Tensor:  # the features, and the riders (DeepStack features) alike
            return average_pool_grid(x[index.to(x.device)].view(frames, h, w, -1), out_h, out_w).reshape(
                frames * out_h * out_w, -1)

        pooled = pool(state.features)
        dev = pooled.device
        cells = torch.arange(out_h * out_w, device=dev).repeat(frames)
        row, col = (cells // out_w) * h // out_h, (cells % out_w) * w // out_w
        frame = torch.arange(frames, device=dev).repeat_interleave(out_h * out_w)
        state.replace(features=pooled, frame=frame, row=row, col=col, source=frame * h * w + row * w + col,
                      riders=None if state.riders is None else pool(state.riders))
        state.grid = (out_h, out_w)
