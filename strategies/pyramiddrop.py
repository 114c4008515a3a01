"""PyramidDrop (inner-LLM): drop visual tokens in stages, a fixed fraction of the survivors at each.

Before each decoder layer in ``layers`` the visual tokens still alive are ranked by the previous
layer's attention row of the last prompt token (the last instruction token), averaged over heads,
and the top ``int(n * stage_ratio)`` (at least one) are kept; the newline is the framework's special
token, kept like text, as in FastV. ``stage_ratio`` is PyramidDrop's lambda, the fraction of the
*surviving* visual tokens kept at each stage (after s stages stage_ratio^s of them are left), not a
fraction of all visual tokens as ``ratio`` is elsewhere.
Kept tokens keep their original positions. With one layer this is FastV; PyramidDrop's point is
that later layers tolerate far fewer tokens, so the total cost falls faster than the first cut.

Defaults are the official LLaVA-1.5/NeXT ones (32 decoder layers: stage boundaries at layers
8, 16 and 24) given as fractions of the depth, 0.25/0.5/0.75, so they fit every model (6/12/18 on
Qwen2-0.5B's 24 layers, 7/14/21 on Qwen2-7B's 28), with stage_ratio (lambda) = 0.5: 50%, 25% and
12.5% of the visual tokens run in the last three quarters. Integers still name exact layers.
Deviation: the official code scores with the last instruction token's query against
the keys *of the boundary layer itself* computed inside its patched attention; here the score is
the previous layer's row computed beside that layer (FastV's statistic), which keeps fused
attention and is what the FLOPs accounting counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokcomp.strategies._scorer import InnerScorer

from tokcomp.errors import ConfigError
from tokcomp.strategy import ModelInfo, check_layer, check_ratio, depth_layer


def stage_keep(n: int, stage_ratio: float) -> int:
    """Visual tokens kept out of ``n`` at one stage: int(n * stage_ratio), at least one."""
    return max(1, min(n, int(n * stage_ratio))) if n else 0


@dataclass
class PyramidDrop(InnerScorer):
    name = "pyramiddrop"
    summary = "drop visual tokens in stages at several LLM layers by the last token's attention"
    layers: tuple[int | float, ...] = (0.25, 0.5, 0.75)  # layer indices or fractions of the depth (immutable default)
    stage_ratio: float = 0.5  # lambda: fraction of the surviving visual tokens kept at each stage

    def __post_init__(self) -> None:
        check_ratio(self.name, "stage_ratio", self.stage_ratio)
        if not self.layers:
            raise ValueError("layers=[] has no stage; give at least one decoder layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={self.layers!r} repeats a layer")
        self.layers = tuple(self.layers)

    def _layers(self, info: ModelInfo) -> list[int]:
        return sorted({depth_layer(layer, info.llm_layers) for layer in self.layers})

    def check(self, info: ModelInfo) -> None:
        for layer in self.layers:
            check_layer(self.name, "layers", layer, info.llm_layers, "LLM", minimum=1)
        if len(self._layers(info)) != len(self.layers):
            raise ConfigError(f"strategy {self.name!r}: layers={list(self.layers)} name the same decoder layer "
                              f"on {info.llm_layers} layers ({self._layers(info)})")

    def llm_layers(self, info: ModelInfo) -> set[int]:
        return set(self._layers(info))

    def budget(self, n: int) -> int:
        return stage_keep(n, self.stage_ratio)
