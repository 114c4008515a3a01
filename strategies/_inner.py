"""Shared base for inner-LLM strategies that act at decoder layer K on layer K-1's last-token attention."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokcomp.state import LLMState
from tokcomp.strategy import ModelInfo, Strategy, check_layer, depth_layer


@dataclass
class LastTokenAttentionStrategy(Strategy):
    """FastV-style placement: called before decoder layer ``layer``, scored by layer ``layer``-1.

    ``layer`` is a decoder layer index, or a fraction of the LLM's depth (e.g. 0.75)."""

    layer: int | float = 2

    def check(self, info: ModelInfo) -> None:
        check_layer(self.name, "layer", self.layer, info.llm_layers, "LLM", minimum=1)

    def llm_layers(self, info: ModelInfo) -> set[int]:
        return {depth_layer(self.layer, info.llm_layers)}

    def attention_layers(self, info: ModelInfo) -> set[int]:
        return {depth_layer(self.layer, info.llm_layers) - 1}

    def visual_scores(self, state: LLMState) -> tuple[Tensor, Tensor]:
        """Sequence indices of the visual tokens and the last token's attention to each."""
        visual = state.visual_indices()
        return visual, state.last_token_attention[state.layer - 1][visual]
