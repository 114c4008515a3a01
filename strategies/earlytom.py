"""EarlyTom: frame merging inside the vision encoder, then decoupled spatial token selection.

Stage 1, ``earlytom.frame_merge`` (intra-encoder): after each vision layer in ``layers``, segment
the frames by streaming similarity and merge similar middle frames of each segment (official code
or paper variant, see ``tokcomp.ops.temporal``); later layers run on fewer frames. At the last
merge layer the merged frames are segmented once more ("refine") for stage 2.

A merged pair (F_i, F_{i+1}) gets Eq. 3's weights w = s_i / (s_i + s_{i+1}) and 1 - w. The merge
condition (s_i > tau_merge and s_i > s_{i+1}) does not keep the sum positive: the official adaptive
threshold can be low or negative, and s_{i+1} can be negative. When s_i + s_{i+1} <= 0 the official
``fine_segment`` still divides (only s_{i+1} == 0 exactly falls back to w = 1): a negative sum
*extrapolates*, e.g. s_i = 0.61 and s_{i+1} = -0.81 give weights -3.05 and +4.05, and a zero sum
gives infinite weights (an inf/NaN frame). tokcomp does not reproduce this: ``pair_weight`` in
``tokcomp.ops.temporal`` returns w = 1 whenever the sum is not positive, so the pair's output is
1 * F_i + 0 * F_{i+1} (float32, back in the input dtype), i.e. F_i itself, for the hidden states and
the attention statistic (when present) alike; F_{i+1} is dropped and does not appear in the merged
frame's provenance (weight 0), like the official last-pair rule. The scan then goes on after the
pair (i += 2), as for any merge. The paper variant uses the same ``pair_weight``, so the same holds
there.

Stage 2, ``earlytom.decoupled_select`` (pre-LLM): with r_hat = min(r * B / N, 1), the head and
tail frames of each segment (every frame of a segment of one or two) keep their top ceil(L * r_hat)
tokens by importance; middle frames keep the argmax of each of round(L * r_hat) windows, which
spreads them over the frame instead of piling onto attention sinks. Frames stay in temporal
order, tokens in spatial order (the framework keeps the newline and re-emits it after the video).

Stage 3 is HoliTom's inner-LLM merge (``holitom.inner_merge``, layer 18, ratio 0.5), composed in YAML.

The stages talk through ``state.meta``: ``earlytom.segments`` ((first, last) merged-frame rows),
``earlytom.input_frames`` (B; the official scan drops frames, so provenance cannot count them) and
``earlytom.score_layer`` (the layer whose merged attention became the scores).

Which attention scores stage 2: officially the received attention of the *last merge layer*,
merged with the frames. The adapter takes scores from the highest requested vision layer, so
``decoupled_select`` requests none by default (``score_layer: null``) and uses what stage 1 passes
on: no second statistic is computed. Alone (the stage-2-only ablation) it needs ``score_layer``
(-1: the last vision layer, HoliTom's choice); with stage 1 a ``score_layer`` above the last merge
layer takes precedence, one below it cannot be honoured and is an error.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.selection import topk_positions
from tokcomp.ops.temporal import (
    apply_plan,
    equal_weights,
    merge_plan,
    plan_sources,
    segment_ends,
    segment_frames,
    tiles,
)
from tokcomp.ops.windows import (
    labelled_window_argmax,
    random_positions,
    raster_window_argmax,
    rescaled_ratio,
    square_windows,
    topk_count,
    window_count,
)
from tokcomp.state import EncoderState, StrategyContractError, VisualTokens
from tokcomp.strategy import ModelInfo, Strategy, check_layer, check_ratio

SEGMENTS, INPUT_FRAMES, SCORE_LAYER = "earlytom.segments", "earlytom.input_frames", "earlytom.score_layer"
PAPER_TAU_MERGE = 0.8  # the paper gives no value; 0.8 is HoliTom's temporal threshold and EarlyTom's printed T default


def check_segmentation(tau_seg: float, alpha: float, max_len: int) -> None:
    if not 0.0 <= tau_seg <= 1.0:
        raise ValueError(f"tau_seg={tau_seg!r} is outside [0, 1]")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is outside (0, 1]")
    if max_len < 2:
        raise ValueError(f"M={max_len!r} must be >= 2 (segments have at most M - 1 frames)")


@dataclass
class FrameMerge(Strategy):
    """Stage 1. ``tau_merge`` is the paper variant's fixed threshold; the official one is adaptive."""

    name = "earlytom.frame_merge"
    summary = "EarlyTom stage 1: merge similar frames inside the vision encoder after `layers`"
    layers: tuple[int, ...] = (8, 21, 23)  # a tuple: a dataclass default must be immutable
    tau_seg: float = 0.5
    alpha: float = 0.9
    M: int = 6
    variant: Literal["official", "paper"] = "official"
    tau_merge: float = PAPER_TAU_MERGE
    merge_attention: bool = True
    weighted: bool = True  # False: merged frames are plain means (the paper's "w/o weighted frame merging")

    def __post_init__(self) -> None:
        check_segmentation(self.tau_seg, self.alpha, self.M)
        if not 0.0 <= self.tau_merge <= 1.0:
            raise ValueError(f"tau_merge={self.tau_merge!r} is outside [0, 1]")
        if self.variant == "official" and self.tau_merge != PAPER_TAU_MERGE:
            raise ValueError(f"tau_merge={self.tau_merge!r} applies only to variant 'paper' (official: sim(head, tail))")

    def check(self, info: ModelInfo) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ConfigError(f"strategy {self.name!r}: layers={list(self.layers)} must be non-empty, unique, ascending")
        for layer in self.layers:
            check_layer(self.name, "layers", layer, info.vision_layers, "vision")

    def encoder_layers(self, info: ModelInfo) -> set[int]:
        return set(self.layers)

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        return {"vision.attention": {max(self.layers)}} if self.merge_attention else {}

    @hookimpl
    def tokcomp_intra_encoder(self, state: EncoderState) -> None:
        state.meta.setdefault(INPUT_FRAMES, state.num_frames)  # rows before any merge (Qwen: temporal patches)
        rows = merge_plan(state.hidden, self.variant, self.tau_seg, self.alpha, self.M, self.tau_merge)
        if not self.weighted:
            rows = equal_weights(rows)
        attention = None if state.attention is None else apply_plan(state.attention, rows)  # whoever asked
        riders = None if state.riders is None else apply_plan(state.riders, rows)  # DeepStack: the same weights
        state.replace(apply_plan(state.hidden, rows), plan_sources(rows, state.frame_sources), attention,
                      riders=riders)
        if state.layer == max(self.layers):
            state.meta[SEGMENTS] = segment_frames(state.hidden, self.variant, self.tau_seg, self.alpha, self.M)
            if attention is not None:
                state.meta[SCORE_LAYER] = state.layer


@dataclass
class DecoupledSelect(Strategy):
    """Stage 2. ``sampling`` topk/random pick every frame's tokens that way (paper Table 4) with the
    same per-frame counts; tau_seg/alpha/M segment the pooled features when stage 1 did not run."""

    name = "earlytom.decoupled_select"
    summary = "EarlyTom stage 2: top-k on segment head/tail frames, window argmax on middle frames"
    ratio: float = 0.2
    sampling: Literal["decoupled", "topk", "random"] = "decoupled"
    window: Literal["raster", "square"] = "raster"
    base_frames: int | None = None
    score_layer: int | None = None
    tau_seg: float = 0.5
    alpha: float = 0.9
    M: int = 6
    seed: int | None = None
    offload_static: bool = False  # paper Sec. 3.3: static-frame selection on a CPU thread, overlapped

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)
        check_segmentation(self.tau_seg, self.alpha, self.M)
        if self.base_frames is not None and self.base_frames < 1:
            raise ValueError(f"base_frames={self.base_frames!r} must be >= 1")
        # resolved against the model in statistics() (called when the stack is built)
        self._score_layer = self.score_layer if self.score_layer is None or self.score_layer >= 0 else None

    def check(self, info: ModelInfo) -> None:
        if self.score_layer is not None and not -info.vision_layers <= self.score_layer < info.vision_layers:
            raise ConfigError(f"strategy {self.name!r}: score_layer={self.score_layer} is outside the vision layers "
                              f"{-info.vision_layers}..{info.vision_layers - 1}")

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        if self.score_layer is None or self.sampling == "random":
            return {}
        self._score_layer = self.score_layer % info.vision_layers
        return {"vision.attention": {self._score_layer}}

    def start(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(self.seed if self.seed is not None else seed)

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        grid = state.frame_grid(self.name)
        frames, tokens = grid.shape
        base = self.base_frames or state.meta.get(INPUT_FRAMES) or state.num_frames  # rows, not input frames
        r_hat = rescaled_ratio(self.ratio, base, frames)
        dynamic = segment_ends(self._segments(state, grid), frames).to(grid.device)
        scores = self._scores(state, grid)

        def select(is_dynamic: bool, on_cpu: bool = False) -> Tensor:
            rows = torch.nonzero(dynamic == is_dynamic, as_tuple=False).flatten()
            if not rows.numel():
                return rows
            part = None if scores is None else scores[rows]
            if on_cpu and part is not None:
                # A blocking copy: a non_blocking device-to-host copy returns before the data has arrived
                # (into pinned memory, with no sync), and the CPU selection would read it too early.
                # It blocks this worker thread only; the dynamic frames' selection goes on meanwhile.
                part = part.to("cpu")
            picked = self._pick(part, rows.numel(), tokens, is_dynamic, r_hat, state.grid)
            return torch.gather(grid[rows], 1, picked.to(grid.device)).flatten()

        if self.offload_static and scores is not None:  # static frames on a CPU thread, overlapped
            static = _offload_pool().submit(select, False, True)
            kept = [select(True), static.result()]
        else:
            kept = [select(True), select(False)]
        state.keep(torch.sort(torch.cat(kept)).values)

    def _pick(self, scores: Tensor | None, frames: int, tokens: int, dynamic: bool, r_hat: float,
              grid: tuple[int, int]) -> Tensor:
        k = topk_count(tokens, r_hat) if dynamic else window_count(tokens, r_hat)
        if scores is None:
            return random_positions(frames, tokens, k, self._generator)
        if dynamic or self.sampling == "topk":
            return topk_positions(scores, k)
        if self.window == "raster":
            return raster_window_argmax(scores, k)
        return labelled_window_argmax(scores, square_windows(*grid, k))


    def _segments(self, state: VisualTokens, grid: Tensor) -> list[tuple[int, int]]:
        segments = state.meta.get(SEGMENTS)
        if segments is None:
            return segment_frames(state.features[grid], "official", self.tau_seg, self.alpha, self.M)
        if not tiles(segments, grid.shape[0]):
            raise StrategyContractError(f"earlytom segments {segments} do not tile the {grid.shape[0]} frames "
                                        "(did a strategy change frames after earlytom.frame_merge?)")
        return [tuple(s) for s in segments]

    def _scores(self, state: VisualTokens, grid: Tensor) -> Tensor | None:
        if self.sampling == "random":
            return None
        if state.scores is None:
            raise ConfigError(f"strategy {self.name!r} found no importance scores: put earlytom.frame_merge "
                              "(merge_attention: true) before it, or set score_layer (e.g. -1, the last vision layer)")
        stage1 = state.meta.get(SCORE_LAYER)
        if self._score_layer is not None and stage1 is not None and self._score_layer < stage1:
            raise ConfigError(f"strategy {self.name!r}: score_layer={self.score_layer} is below earlytom.frame_merge's "
                              f"last merge layer {stage1}, whose merged attention the adapter passes on instead")
        return state.scores[grid]


@functools.cache
def _offload_pool() -> ThreadPoolExecutor:
    """One worker thread for the static-frame selection (created on first use, shared by runs)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="earlytom-static")


EARLYTOM_STRATEGIES = (FrameMerge, DecoupledSelect)
