"""Average adjacent frame pairs after one vision layer: the simplest intra-encoder temporal merge.

Later encoder layers run on half the frames, which is where early compression saves time.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokcomp.hookspecs import hookimpl
from tokcomp.ops.frames import average_adjacent_pairs
from tokcomp.state import EncoderState
from tokcomp.strategy import ModelInfo, Strategy, check_layer


@dataclass
class FrameAvg(Strategy):
    name = "frame_avg"
    summary = "average adjacent frame pairs after vision layer `layer`"
    layer: int = 0

    def check(self, info: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, info.vision_layers, "vision")

    def encoder_layers(self, info: ModelInfo) -> set[int]:
        return {self.layer}

    def plan_intra_encoder(self, info: ModelInfo, layer: int, frames: int, tokens: int) -> tuple[int, int]:
        return (frames + 1) // 2, tokens

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        hidden, sources = average_adjacent_pairs(state.hidden, state.frame_sources)
        # riders (DeepStack features) take the same source-count weights
        riders = None if state.riders is None else average_adjacent_pairs(state.riders, state.frame_sources)[0]
        state.replace(hidden, frame_sources=sources, riders=riders)
