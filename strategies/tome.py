"""ToMe (Bolya et al., token merging) inside the SigLIP layers.

In every vision layer with r > 0, between the attention (+ residual) and the MLP, the r most
redundant tokens of each frame are merged into similar ones: bipartite soft matching on that
layer's head-averaged keys (A = even tokens, B = odd tokens, each A token's best cosine match in
B, the r best-matched A tokens merge into their partners), with a size-weighted average. The MLP
and all later layers then run on fewer tokens. With proportional attention (``prop_attn``) each
token's size is handed on as ``EncoderState.sizes``, and the adapter adds log(size) to the
attention logits of every later layer, so a merged token keeps the attention weight of the tokens
it stands for. The pure math is in ``tokcomp.ops.tome``.

Parameters and defaults (``facebookresearch/ToMe`` unless noted):
- ``r``: tokens merged per layer, ToMe's ``model.r``: an int (with ``inflect``) or a per-layer list
  (padded with zeros). ``None`` means 16, the value ToMe's README sets (``apply_patch`` itself
  starts at 0, i.e. no merging). r is capped at half of each layer's tokens, as officially.
- ``inflect``: the second element of ToMe's ``(r, inflection)`` pair: a linear ramp from
  ``int(r * (1 - inflect))`` to ``2 r - int(r * (1 - inflect))`` over the layers (0: constant,
  1: increasing from 0 to 2r, -1: decreasing from 2r to 0); only with an int r. Official: 0.
- ``merge_total``: instead of r, a total number of tokens merged per frame, spread evenly over the
  vision layers (each layer ``total // layers``, the first ``total % layers`` layers one more).
  EarlyTom's port derives r from a total ``MERGE_NUM`` against a hard-coded total of 768 tokens
  (not SigLIP's 729); this is the plain even spread of such a total. Mutually exclusive with r.
- ``protect_first``: never merge the first token (ToMe protects the class token). Default False:
  SigLIP has no class token. EarlyTom's port uses True (it treats the first patch as a class
  token stand-in).
- ``prop_attn``: proportional attention, True (ToMe's setting for off-the-shelf models). Sizes
  weight the merges either way, as officially; the flag only controls the attention bias.

After the last merge layer the tokens are no longer a grid. As in EarlyTom's port, when the
remaining count n is a perfect square s * s the tokens are declared an s x s grid, so the adapter
applies LLaVA-OV's 2x2 pooling to them (tiny model: 64 - 15 = 49 -> 7 x 7 -> 4 x 4). The order is
ToMe's ([unmerged A tokens, B tokens]), not spatial, so "neighbours" pooled together are tokens that
happen to sit next to each other in that order, as in the port. Otherwise no grid is declared and
the adapter skips pooling: all n tokens per frame reach the LLM (a 1 x n row).

``state.meta`` carries ``tome.sizes`` (frames, tokens) float32 and ``tome.sources`` (frames, T0)
long: for every original token of the first merge layer, the token that stands for it now.

FLOPs/ledger note: at a merge layer the attention runs on the layer's input tokens and the MLP on
the merged ones (``VisionLayerEntry.mlp_tokens_per_frame``). Officially the keys are a by-product of
that attention; the adapter recomputes them from the layer input (one extra k projection per merge
layer, recorded as a ``vision_keys`` statistic).

Deviations from the official code:
- The unmerged A tokens keep their original order (officially they stay in descending-score order
  unless a class token is protected); see ``tokcomp.ops.tome``. Harmless in a ViT, but here the
  order reaches the LLM; with ``protect_first`` it is the official order.
- Score ties are broken by index (official: device-dependent unstable sort); float32 arithmetic.
- A per-layer list longer than the vision layers is an error (officially the extra entries are
  never popped); an ``inflect`` outside [-1, 1] is an error (officially it gives negative r, i.e.
  no merging, at one end of the ramp).
- The received-attention statistic, when another strategy requested it at a merge layer, is merged
  by summing it over each merged group (the attention the group receives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.tome import (
    bipartite_soft_matching,
    capped_r,
    compose_slots,
    merge_sum,
    merge_wavg,
    parse_r,
    spread_total,
    square_side,
)
from tokcomp.state import EncoderState, StrategyContractError
from tokcomp.strategy import ModelInfo, Strategy

README_R = 16  # ToMe's README sets model.r = 16 (apply_patch starts at r = 0: no merging)
SIZES, SOURCES = "tome.sizes", "tome.sources"


@dataclass
class ToMe(Strategy):
    """Token merging between attention and MLP of the vision layers with r > 0."""

    name = "tome"
    summary = "ToMe: bipartite soft matching of similar tokens inside the vision encoder layers"
    requires = frozenset({"vision_split"})
    r: int | list[int] | None = None  # None: 16 (ToMe README), unless merge_total is given
    inflect: float = 0.0  # ToMe's (r, inflection) pair; default constant
    merge_total: int | None = None  # EarlyTom port style: a total spread evenly over the layers
    protect_first: bool = False  # ToMe protects its class token; EarlyTom's port protects the first patch
    prop_attn: bool = True  # ToMe's apply_patch default for off-the-shelf models

    def __post_init__(self) -> None:
        if self.r is not None and self.merge_total is not None:
            raise ValueError(f"r={self.r!r} and merge_total={self.merge_total!r} are mutually exclusive")
        if isinstance(self.r, list | tuple):
            self.r = list(self.r)
            if any(v < 0 for v in self.r):
                raise ValueError(f"r={self.r!r} must not contain negative values")
            if self.inflect != 0:
                raise ValueError(f"inflect={self.inflect!r} applies only to an int r, not the list {self.r!r}")
        elif self.r is not None and self.r < 0:
            raise ValueError(f"r={self.r!r} must be >= 0")
        if not -1.0 <= self.inflect <= 1.0:
            raise ValueError(f"inflect={self.inflect!r} is outside [-1, 1]")
        if self.merge_total is not None and self.merge_total < 0:
            raise ValueError(f"merge_total={self.merge_total!r} must be >= 0")
        if self.merge_total is not None and self.inflect != 0:
            raise ValueError(f"inflect={self.inflect!r} applies only to an int r, not to merge_total")

    def schedule(self, num_layers: int) -> list[int]:
        """Tokens to merge at each vision layer (before the per-layer 50% cap)."""
        if self.merge_total is not None:
            return spread_total(num_layers, self.merge_total)
        r = README_R if self.r is None else self.r
        return parse_r(num_layers, r, self.inflect)[:num_layers]

    def check(self, info: ModelInfo) -> None:
        if isinstance(self.r, list) and len(self.r) > info.vision_layers:
            raise ConfigError(f"strategy {self.name!r}: r has {len(self.r)} entries but the model has "
                              f"{info.vision_layers} vision layers")

    def encoder_mid_layers(self, info: ModelInfo) -> set[int]:
        return {i for i, r in enumerate(self.schedule(info.vision_layers)) if r > 0}

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        return {"vision.keys": self.encoder_mid_layers(info)}

    def plan_intra_encoder(self, info: ModelInfo, layer: int, frames: int, tokens: int) -> tuple[int, int]:
        r = self.schedule(info.vision_layers)[layer]
        return frames, tokens - capped_r(r, tokens, self.protect_first)

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        if state.position != "attention":
            return
        schedule = self.schedule(state.num_layers)
        if state.keys is None:
            raise StrategyContractError(f"tome at vision layer {state.layer}: the layer's keys were not delivered")
        frames, tokens = state.hidden.shape[:2]
        sizes, sources = state.meta.get(SIZES), state.meta.get(SOURCES)
        if sizes is None:
            sizes = torch.ones(frames, tokens, device=state.hidden.device)
            sources = torch.arange(tokens, device=state.hidden.device).expand(frames, tokens).clone()
        elif sizes.shape != (frames, tokens):
            raise StrategyContractError(
                f"tome at vision layer {state.layer}: {tuple(sizes.shape)} token sizes for (frames, tokens) = "
                f"{(frames, tokens)}: another strategy changed the tokens between ToMe's layers"
            )
        matching = bipartite_soft_matching(state.keys, schedule[state.layer], self.protect_first)
        last = state.layer == max(i for i, r in enumerate(schedule) if r > 0)
        side = square_side(matching.num_out) if last else None
        if matching.r == 0 and (side is None or state.grid == (side, side)):
            return
        # riders (DeepStack features) take the same size-weighted average as the hidden states
        riders = None if state.riders is None else merge_wavg(state.riders, sizes, matching)[0]
        hidden, sizes = merge_wavg(state.hidden, sizes, matching)
        attention = None if state.attention is None else merge_sum(state.attention, matching)
        state.meta[SIZES], state.meta[SOURCES] = sizes, compose_slots(sources, matching)
        state.replace(hidden, attention=attention, grid=None if side is None else (side, side),
                      sizes=sizes if self.prop_attn else None, riders=riders)
