"""FastV (inner-LLM): at decoder layer K keep the visual tokens the last token attends to most.

The score is layer K-1's attention row of the last prompt token, averaged over heads, restricted
to the visual tokens (the newline is a special token the framework keeps like text). Only that
row is computed (q of one token against all keys), so the model keeps its fast attention. Kept
tokens keep their original positions ("inplace" mode); ``ratio`` is the fraction of visual tokens
*kept*, ceil(n * ratio) of them (the paper's R is the fraction dropped: R=50% is ratio 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokcomp.strategies._scorer import LayerScorer

from tokcomp.ops.selection import ceil_ratio
from tokcomp.strategy import check_ratio


@dataclass
class FastV(LayerScorer):
    name = "fastv"
    summary = "drop visual tokens at LLM layer K by layer K-1's last-token attention"
    layer: int | float = 2  # K: a decoder layer, or a fraction of the depth
    ratio: float = 0.5

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)

    def budget(self, n: int) -> int:
        return ceil_ratio(n, self.ratio)
