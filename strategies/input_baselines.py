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
        state.replace(state.hidden[kept], frame_sources=[state.frame_sources[i] for i in kept])


@dataclass
class InputPooling(Strategy):
    name = "input.pooling"
    summary = "average-pool each frame's patch grid to a fraction of its tokens before the vision encoder"
    ratio: float = 0.25  # fraction of each frame's tokens kept (the grid side scales by sqrt(ratio))

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)

    def encoder_layers(self, info: ModelInfo) -> set[int]:
        return {INPUT}

    def plan_intra_encoder(self, info: ModelInfo, layer: int, frames: int, tokens: int) -> tuple[int, int]:
        side = side_for_ratio(info.vision_grid[0], self.ratio)
        return frames, side * side

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        h, w = state.grid
        if h * w != state.hidden.shape[1]:
            raise StrategyContractError(f"strategy {self.name!r} needs each frame's full patch grid at the input")
        side_h, side_w = side_for_ratio(h, self.ratio), side_for_ratio(w, self.ratio)
        grid = state.hidden.view(state.num_frames, h, w, -1)
        pooled = average_pool_grid(grid.float(), side_h, side_w).to(grid.dtype)
        state.replace(pooled.reshape(state.num_frames, side_h * side_w, -1), grid=(side_h, side_w))


INPUT_STRATEGIES = (FrameSampling, InputPooling)
