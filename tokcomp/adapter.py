"""The model adapter protocol: the primitives a model family gives the pipeline.

The pipeline (``tokcomp.pipeline``) owns the order of events, the token ledger, the stage clock,
the splice and the decoding loop. An adapter only answers questions about its model: how a video
becomes patch embeddings, how one vision layer runs on the current token set, how vision states
become LLM tokens, what the prompt looks like, which position ids the prompt has, and where the
decoder layers are. Everything here is per model instance; nothing patches a class.

Geometry conventions shared by every adapter:

- Inside the encoder a video is ``rows`` x ``tokens`` x dim: a row is one input frame (LLaVA) or
  one temporal patch of frames (Qwen2.5-VL), tokens are in the adapter's *spatial order* (raster
  order of patches for LLaVA; raster order of 2x2 merge units, four patches each, for Qwen).
- Towards the LLM a video is ``rows`` x ``h`` x ``w`` tokens in raster order (``VisionOutput``),
  followed by the adapter's *special tokens* (LLaVA's newline feature; none for Qwen, whose
  vision start/end markers are ordinary prompt ids). The framework keeps and re-emits specials;
  strategies never see them.
- Positions: ``full_positions`` gives the (R, L) position ids of the uncompressed prompt (R = 1 for
  1-D RoPE, 3 for M-RoPE). Kept tokens either keep their original positions (a gather of columns)
  or, where the adapter allows it (``contiguous_positions``), are renumbered contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from tokcomp.strategy import ModelInfo


@dataclass
class VideoInput:
    """A preprocessed video: what ``embed_video`` takes, plus its geometry for this run."""

    pixels: Tensor
    frames: int  # input frames
    rows: int  # rows entering the encoder (frames, or temporal patches)
    grid: tuple[int, int]  # vision patch grid (h, w) of each row
    llm_grid: tuple[int, int]  # LLM token grid (h, w) of each row, before any compression
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-specific (grid_thw, seconds per row, ...)
    row_frames: list[list[int]] | None = None  # input frames behind each row (default: row i = frame i)

    def __post_init__(self) -> None:
        if self.row_frames is None:
            self.row_frames = [[i] for i in range(self.rows)]


@dataclass
class VisionOutput:
    """Vision states turned into LLM-space tokens: a grid per row, plus statistics pooled alike."""

    features: Tensor  # (rows, h, w, D_llm), raster order; (rows, 1, n, D) when no grid is left
    stats: dict[str, Tensor]  # name -> (rows, h, w) or (rows, h, w, C), pooled like the features
    specials: Tensor  # (S, D_llm): features of special tokens emitted after the video (may be S = 0)
    riders: Tensor | None = None  # (rows, h, w, C): per-token features that follow every drop/merge (DeepStack)


@dataclass
class PromptLayout:
    """The chat-formatted prompt with ``visual`` placeholder ids starting at ``start``.

    The placeholders are one block ``start .. start + visual`` unless ``slots`` lists where they are:
    models whose video prompt interleaves text with the visual tokens (Qwen3-VL writes a timestamp and
    vision start / end markers around each temporal patch) give every placeholder's index in ``ids``,
    content tokens in the uncompressed raster order, then the special tokens. The splice keeps every
    non-placeholder id (text is never dropped, a row whose tokens are all dropped keeps its text).
    """

    ids: Tensor  # (1, L) long
    start: int
    visual: int  # placeholders: content tokens + special tokens
    slots: Tensor | None = None  # (visual,) long ascending indices into ids; None: start .. start + visual

    def visual_slots(self) -> Tensor:
        """(visual,) indices of the placeholders in ``ids``."""
        if self.slots is not None:
            return self.slots.to(self.ids.device)
        return torch.arange(self.start, self.start + self.visual, device=self.ids.device)


@dataclass
class QK:
    """Queries (or None) and keys of one attention layer, (rows, heads, tokens, head_dim), plus how
    that layer groups tokens for attention: ``segments`` (rows, tokens) long ids, or None when every
    token of a row attends to every other (a full-attention layer)."""

    q: Tensor | None
    k: Tensor
    scale: float
    segments: Tensor | None = None


@runtime_checkable
class ModelAdapter(Protocol):
    """What ``tokcomp.pipeline.run`` needs from a model family (see the module docstring)."""

    family: str
    info: ModelInfo
    contiguous_positions: bool  # may kept tokens be renumbered contiguously (LLaVA), or never (M-RoPE)?

    device: torch.device
    dtype: torch.dtype

    # inputs
    def preprocess(self, frames: Tensor, fps: float | None = None) -> VideoInput: ...  # fps: of the sampled frames
    def prompt(self, text: str, video: VideoInput, visual: int) -> PromptLayout: ...
    def full_positions(self, layout: PromptLayout, video: VideoInput) -> Tensor: ...
    def embed_tokens(self, ids: Tensor) -> Tensor: ...

    # vision encoder
    def embed_video(self, video: VideoInput) -> Tensor: ...  # (rows, tokens, D_vision)
    # ``grid``: the rows' current patch grid ((0, 0) when the tokens are no grid any more), as the
    # intra-encoder hook left it; adapters whose blocks depend on geometry (Qwen's windows) follow it
    def vision_layer(self, index: int, hidden: Tensor, sizes: Tensor | None, video: VideoInput,
                     grid: tuple[int, int] | None = None) -> Tensor: ...
    def vision_attention_pairs(self, index: int, rows: int, tokens: int, video: VideoInput,
                               grid: tuple[int, int] | None = None) -> int | None: ...
    def vision_qk(self, index: int, hidden: Tensor, queries: bool, video: VideoInput,
                  grid: tuple[int, int] | None = None) -> QK: ...
    def vision_to_llm(self, hidden: Tensor, grid: tuple[int, int], stats: dict[str, Tensor],
                      video: VideoInput) -> VisionOutput: ...

    # optional: the two halves of a vision layer, for strategies acting between attention and MLP
    # (ToMe); adapters without them do not declare the "vision_split" capability
    # def vision_attention_block(self, index, hidden, sizes, video) -> Tensor
    # def vision_mlp_block(self, index, hidden, video) -> Tensor

    # optional: models that carry states of some vision layers to the LLM (Qwen3-VL's DeepStack) list them
    # in ``vision_rider_layers`` and give ``vision_riders(index, hidden, riders, video) -> (rows, tokens, C)``
    # (the riders so far with this layer's state appended); ``vision_to_llm`` then takes ``riders=`` and
    # returns ``VisionOutput.riders`` in LLM space, pooled like the features

    # language model
    @property
    def decoder_layers(self) -> Any: ...
    def new_cache(self) -> Any: ...
    def forward_llm(self, embeds: Tensor, positions: Tensor, cache: Any) -> Tensor: ...  # last-position logits
    def decoder_qk(self, layer: Any, hidden: Tensor, position_embeddings: Any, query_idx: Tensor,
                   past_keys: Tensor | None = None) -> QK: ...  # q (heads, Q, hd), k (heads, L, hd), KV repeated
    def eos_ids(self) -> set[int]: ...
    def decode_text(self, ids: list[int]) -> str: ...


@dataclass
class ModelDescription:
    """A model family's geometry without weights: what ``tokcomp flops`` plans run the pipeline on.

    ``video(frames, height, width)`` is the VideoInput (no pixels) a video of that size becomes;
    ``llm_grid(grid, tokens)`` the LLM token grid of a row leaving the encoder with ``tokens``
    tokens on ``grid`` ((0, 0) when no grid is left); ``attention_pairs`` as in the adapter.
    """

    info: ModelInfo
    dims: Any
    count_prompt: Any  # Callable[[str], int]: chat-formatted text tokens of a prompt
    video: Any  # Callable[[int, int, int], VideoInput]
    llm_grid: Any  # Callable[[tuple[int, int], int], tuple[int, int]]
    specials: int
    position_rank: int
    contiguous_positions: bool
    attention_pairs: Any = None  # Callable[[int, int, int, VideoInput, tuple[int, int]], int | None] | None
    vision_hidden: int = 0
    context_length: int | None = None  # positions the LLM was trained for (text max_position_embeddings)
    video_text_tokens: Any = None  # Callable[[VideoInput], int] | None: text ids the video itself adds (Qwen3-VL's
    # timestamps and per-row vision markers), beyond count_prompt's; None: none
