"""Token schedules without weights: the pipeline run on shapes alone.

``plan`` runs ``tokcomp.pipeline.prefill`` on a ``CountingAdapter`` (meta tensors of the right
shapes, no weights, no video) with a ``PlanningStack`` that calls each strategy's declared
``plan_*`` method where the real stack calls its hook. The pipeline writes the ledger in both
cases, so a planned ledger and a recorded one cannot drift apart. Strategies whose token counts
depend on the data declare no plan: their FLOPs need a finished run's ledger (``ScheduleUnknown``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokcomp.adapter import QK, ModelDescription, PromptLayout, VideoInput, VisionOutput
from tokcomp.errors import TokcompError
from tokcomp.ledger import TokenLedger
from tokcomp.ops.selection import groups
from tokcomp.stack import CompressionStack
from tokcomp.state import EncoderState, LLMState, VisualTokens
from tokcomp.strategy import ModelInfo, Strategy
from tokcomp.timing import StageClock

META = torch.device("meta")


class ScheduleUnknown(TokcompError):
    """A strategy's token counts depend on the data; use the ledger of a finished run."""


@dataclass
class PlannedTokens:
    """Visual-token counts at the pre-LLM stage, per row (special tokens are the framework's)."""

    per_frame: list[int]
    grid: tuple[int, int]

    @property
    def total(self) -> int:
        return sum(self.per_frame)


class _CountingLayer(nn.Module):
    """A decoder layer that only passes the (meta) hidden states on, so the decoder hooks see every layer."""

    def forward(self, hidden: Tensor, **kwargs) -> Tensor:
        return hidden


class CountingAdapter:
    """The adapter protocol on meta tensors: shapes follow the model's geometry, nothing is computed."""

    family = "counting"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, description: ModelDescription, text_tokens: int):
        self.description, self.text_tokens = description, text_tokens
        self.info = description.info
        self.contiguous_positions = description.contiguous_positions
        self.decoder_layers = nn.ModuleList(_CountingLayer() for _ in range(self.info.llm_layers))
        self._llm_hidden = self.info.llm_hidden

    def prompt(self, text: str, video: VideoInput, visual: int) -> PromptLayout:
        return PromptLayout(torch.zeros(1, self.text_tokens + visual, dtype=torch.long), self.text_tokens, visual)

    def full_positions(self, layout: PromptLayout, video: VideoInput) -> Tensor:
        return torch.arange(layout.ids.shape[1]).expand(self.description.position_rank, -1)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return torch.empty(*ids.shape, self._llm_hidden, device=META)

    def embed_video(self, video: VideoInput) -> Tensor:
        return torch.empty(video.rows, video.grid[0] * video.grid[1], self.description.vision_hidden or 1, device=META)

    def vision_layer(self, index: int, hidden: Tensor, sizes: Tensor | None, video: VideoInput,
                     grid: tuple[int, int] | None = None) -> Tensor:
        return hidden

    def vision_attention_block(self, index: int, hidden: Tensor, sizes: Tensor | None, video: VideoInput) -> Tensor:
        return hidden

    def vision_mlp_block(self, index: int, hidden: Tensor, video: VideoInput) -> Tensor:
        return hidden

    def vision_attention_pairs(self, index: int, rows: int, tokens: int, video: VideoInput,
                               grid: tuple[int, int] | None = None) -> int | None:
        pairs = self.description.attention_pairs
        return None if pairs is None else pairs(index, rows, tokens, video, video.grid if grid is None else grid)

    def vision_qk(self, index: int, hidden: Tensor, queries: bool, video: VideoInput,
                  grid: tuple[int, int] | None = None) -> QK:
        qk = hidden[:, None]
        return QK(qk if queries else None, qk, 1.0)

    def vision_to_llm(self, hidden: Tensor, grid: tuple[int, int], stats: dict[str, Tensor],
                      video: VideoInput) -> VisionOutput:
        rows, tokens = hidden.shape[:2]
        h, w = self.description.llm_grid(grid, tokens)
        pooled = {name: torch.empty(rows, h, w, *v.shape[2:], device=META) for name, v in stats.items()}
        return VisionOutput(torch.empty(rows, h, w, self._llm_hidden, device=META), pooled,
                            torch.empty(self.description.specials, self._llm_hidden, device=META))

    def new_cache(self) -> None:
        return None

    def forward_llm(self, embeds: Tensor, positions: Tensor, cache) -> Tensor:
        rotary = torch.empty(1, embeds.shape[1], 1, device=META)
        hidden = embeds
        for layer in self.decoder_layers:
            hidden = layer(hidden, position_embeddings=(rotary, rotary), attention_mask=None, position_ids=positions)
        return torch.empty(1, 1, device=META)

    def decoder_qk(self, layer, hidden: Tensor, position_embeddings, query_idx: Tensor, past_keys=None) -> QK:
        return QK(torch.empty(1, query_idx.numel(), 1, device=META), torch.empty(1, hidden.shape[1], 1, device=META), 1.0)


def _require(strategy: Strategy, method: str) -> None:
    if getattr(type(strategy), method) is getattr(Strategy, method):
        nominal = ", or count its nominal budget (--nominal)" if hasattr(strategy, "nominal_pre_llm") else ""
        raise ScheduleUnknown(
            f"strategy {strategy.name!r} has a data-dependent token schedule; compute FLOPs from a finished "
            f"run's ledger (tokcomp flops --from-run RUN_ID){nominal}"
        )


def _grid_after(tokens: int, before: tuple[int, int], before_tokens: int) -> tuple[int, int]:
    """A changed token count a strategy planned without a grid is a grid again when it is a square, else none."""
    if tokens == before_tokens:
        return before
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (0, 0)


class PlanningStack(CompressionStack):
    """A stack whose hook points apply the strategies' declared schedules instead of their hooks."""

    def __init__(self, strategies: Sequence[Strategy], info: ModelInfo, nominal: bool = False):
        super().__init__(strategies, info)
        self.nominal = nominal
        if self.statistics["llm.text"]:
            raise ScheduleUnknown("a strategy scores tokens by the text after the video: its schedule needs a finished run")
        self.decode_layers = set()  # a plan stops at the first token

    def _at(self, hook: str, wanted: str, layer: int) -> list[Strategy]:
        return [s for s in self.strategies if hook in s.active_hooks() and layer in getattr(s, wanted)(self.info)]

    def intra_encoder(self, state: EncoderState) -> None:
        wanted = "encoder_mid_layers" if state.position == "attention" else "encoder_layers"
        frames, tokens = state.hidden.shape[:2]
        grid: tuple[int, int] | None = None
        for s in self._at("intra_encoder", wanted, state.layer):
            _require(s, "plan_intra_encoder")
            frames, tokens, *planned_grid = s.plan_intra_encoder(self.info, state.layer, frames, tokens)
            grid = tuple(planned_grid[0]) if planned_grid else None
        if (frames, tokens) == tuple(state.hidden.shape[:2]):
            return
        grid = grid or _grid_after(tokens, state.grid, state.hidden.shape[1])
        sources = state.frame_sources if frames == state.num_frames else [[i] for i in range(frames)]
        state.replace(torch.empty(frames, tokens, state.hidden.shape[2], device=META), frame_sources=sources,
                      grid=None if grid == (0, 0) else grid)

    def pre_llm(self, state: VisualTokens) -> None:
        planned = PlannedTokens([m.numel() for m in groups(state.frame)], state.grid)
        for s in [s for s in self.strategies if "pre_llm" in s.active_hooks()]:
            exact = type(s).plan_pre_llm is not Strategy.plan_pre_llm
            if not exact and self.nominal and callable(getattr(s, "nominal_pre_llm", None)):
                s.nominal_pre_llm(self.info, planned)
            else:
                _require(s, "plan_pre_llm")
                s.plan_pre_llm(self.info, planned)
        frame = torch.repeat_interleave(torch.arange(len(planned.per_frame)), torch.tensor(planned.per_frame))
        n = frame.numel()
        state.features = torch.empty(n, state.features.shape[1], device=META)
        state.frame, state.row, state.col, state.source = frame, torch.zeros_like(frame), torch.zeros_like(frame), torch.arange(n)
        state.scores = state.keys = state.saliency = state.group = None
        state.grid = tuple(planned.grid)

    def inner_llm(self, state: LLMState) -> None:
        visual = state.visual_indices()
        count = visual.numel()
        for s in self._at("inner_llm", "llm_layers", state.layer):
            _require(s, "plan_inner_llm")
            count = s.plan_inner_llm(self.info, state.layer, count)
        if count != visual.numel():
            text = torch.nonzero(~state.visual_mask, as_tuple=False).flatten()
            state.keep(torch.cat([text, visual[:count]]))


def plan(description: ModelDescription, video: VideoInput, text_tokens: int, strategies: Sequence[Strategy],
         nominal: bool = False) -> TokenLedger:
    """The ledger a run of ``strategies`` on a video of this geometry would record (up to the first token).

    ``nominal``: data-dependent pre-LLM strategies count the token budget they target."""
    from tokcomp.pipeline import prefill

    info = description.info.for_video(video.grid, video.llm_grid)
    stack = PlanningStack(strategies, info, nominal)
    ledger = TokenLedger()
    with torch.no_grad():
        done = prefill(CountingAdapter(description, text_tokens), video, "", stack, ledger, StageClock())
    if done.hooks is not None:
        done.hooks.remove()
    stack.close()
    return ledger
