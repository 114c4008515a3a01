"""The cheapest early baselines, acting at the vision encoder's input (the paper's Table 7).

``input.frame_sampling`` keeps ``ratio`` of the frames, evenly spread, before SigLIP's first layer:
the whole encoder and the LLM then see fewer frames. ``input.pooling`` average-pools every frame's
patch-embedding grid (position embeddings already added) to about ``ratio`` of its tokens, e.g.
27x27 -> 14x14 at 0.25; the encoder runs on the small grid and LLaVA-OneVision's own 2x2 pooling
then halves it again, so the LLM also receives about ``ratio`` of its usual tokens. A skeptical
reader compares every early-compression method against these first: they cost nothing to decide.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokcomp.hookspecs import hookimpl
from tokcomp.ops.pooling import average_pool_grid, side_for_ratio
from tokcomp.ops.selection import keep_count, uniform_indices
from tokcomp.state import EncoderState, StrategyContractError
from tokcomp.strategy import ModelInfo, Strategy, check_ratio

INPUT = -1  # the intra-encoder hook's "encoder input" position


@dataclass
class FrameSampling(Strategy):
    name = "input.frame_sampling"
    summary = "keep an evenly spread fraction of the frames before the vision encoder"
    ratio: float = 0.25  # fraction of frames kept

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)

    def encoder_layers(self, info: ModelInfo) -> set[int]:
        return {INPUT}

    def plan_intra_encoder(self, info: ModelInfo, layer: int, frames: int, tokens: int) -> tuple[int, int]:
        return keep_count(frames, self.ratio), tokens

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        kept = uniform_indices(state.num_frames, keep_count(state.num_frames, self.ratio)).tolist()
        state.replace(state.hidden[kept], frame_sources=[state.frame_sources[i] for i in kept],
                      riders=None if state.riders is None else state.riders[kept])


@dataclass
class InputPooling(Strategy):
    name = "input.pooling"
    summary = "average-pool each frame's patch grid to a fraction of its tokens before the vision encoder"
    ratio: float = 0.25  # fraction of each frame's tokens kept (the grid side scales by sqrt(ratio))

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)

    def encoder_layers(self, info: ModelInfo) -> set[int]:
        return {INPUT}

    def pooled_grid(self, grid: tuple[int, int], multiple: int) -> tuple[int, int]:
        """The pooled (h, w) of a ``grid``: each side scaled by sqrt(ratio), rounded to a multiple of
        ``multiple`` (the model's merge unit: Qwen's 2x2 merger needs even sides), never above the grid."""
        return tuple(max(multiple, multiple * round(side_for_ratio(side, self.ratio) / multiple)) for side in grid)

    def plan_intra_encoder(self, info: ModelInfo, layer: int, frames: int,
                           tokens: int) -> tuple[int, int, tuple[int, int]]:
        side_h, side_w = self.pooled_grid(info.vision_grid, info.grid_multiple)
        return frames, side_h * side_w, (side_h, side_w)

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        h, w = state.grid
        if h * w != state.hidden.shape[1]:
            raise StrategyContractError(f"strategy {self.name!r} needs each frame's full patch grid at the input")
        side_h, side_w = self.pooled_grid((h, w), state.grid_multiple)
        riders = None if state.riders is None else self._pool(state.riders, (h, w), (side_h, side_w))
        state.replace(self._pool(state.hidden, (h, w), (side_h, side_w)), grid=(side_h, side_w), riders=riders)

    @staticmethod
    def _pool(x: Tensor, grid: tuple[int, int], side: tuple[int, int]) -> Tensor:
        """(frames, h*w, C) -> (frames, side_h*side_w, C), float32 pooling in ``x``'s dtype; the hidden
        states and the riders (DeepStack features) go through the same pooling."""
        pooled = average_pool_grid(x.view(x.shape[0], *grid, -1).float(), *side).to(x.dtype)
        return pooled.reshape(x.shape[0], side[0] * side[1], -1)


INPUT_STRATEGIES = (FrameSampling, InputPooling)
