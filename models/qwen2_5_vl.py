"""Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration``) as tokcomp primitives.

The model's own modules, one at a time: 3-D patch embedding (a row = one temporal patch of 2
frames), vision blocks (attention within windows, or whole rows in ``fullatt_block_indexes``; 2-D
rotary positions), the 2x2 patch merger, Qwen's chat prompt, M-RoPE positions from the model's
``get_rope_index``, the Qwen2 decoder. Encoder tokens are in the processor's (spatial) order: 2x2
merge units in raster order, a unit's 4 patches consecutive; each vision block permutes them into
the model's window order and back, so it computes exactly what the stock forward does.

Frame size follows the video (``qwen_video``): ``min_pixels`` to ``max_pixels`` per frame
(``PIXEL_BOUNDS``); ``model.image_size = S`` caps a frame at S*S pixels, with any weights.
"""

from __future__ import annotations

from typing import Any

import torch
from tokcomp.models import qwen_tokenizer as qtok
from tokcomp.models import qwen_video as qvid
from tokcomp.models._hf import TransformersAdapter, build_model, checkpoint_source, load_config
from tokcomp.models.dims import dims_from_qwen2_5_vl_config
from torch import Tensor
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.utils.generic import get_max_seqlen

from tokcomp.adapter import QK, ModelDescription, PromptLayout, VideoInput, VisionOutput
from tokcomp.config import GeneratedVideoConfig
from tokcomp.state import StrategyContractError
from tokcomp.strategy import ModelInfo

FAMILY, TINY = "qwen2_5_vl", "qwen2.5-vl-tiny"
PRESET_HUB_IDS = {"qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"}
PIXEL_BOUNDS = {TINY: (112 * 112, 112 * 112)}  # per-frame (min, max) pixels; others: qwen_video's defaults
CAPABILITIES = frozenset({"intra_encoder"})  # rows and grids may change inside the tower; no token subsets
CAPABILITY_NOTES = (("vision_split", "ToMe's merged patches cannot reach its LLM: the 2x2 patch merger concatenates "
                     "the four patches of every merge unit, the windowed blocks attend over whole 112-px windows of "
                     "units, and their cu_seqlens attention takes no proportional-attention bias; only whole "
                     "temporal patches (rows) and whole grids (input pooling) can change inside this tower"),)


def pixel_bounds(spec: Any, preset: str) -> tuple[int, int]:
    """Per-frame (min_pixels, max_pixels): a checkpoint's own video processor settings when it has them,
    else the preset's; capped at image_size**2 when given."""
    source = _checkpoint(spec, preset)
    bounds = (qvid.checkpoint_pixel_bounds(source) if source else None) or PIXEL_BOUNDS.get(
        preset, (qvid.MIN_PIXELS, qvid.MAX_PIXELS))
    return qvid.pixel_bounds(bounds, spec.image_size)


def _checkpoint(spec: Any, preset: str) -> str | None:
    """The hub id or path to load, None for random weights."""
    return checkpoint_source(spec, preset, PRESET_HUB_IDS)


def preset_config(spec: Any, preset: str) -> Qwen2_5_VLConfig:
    """The model config a build of ``preset`` with ``spec`` would use, without building weights."""
    source = _checkpoint(spec, preset)
    if source is None:
        tokenizer = qtok.load_tokenizer(None)
        return qtok.tiny_config(tokenizer) if preset == TINY else qtok.bundled_config(preset, tokenizer)
    return load_config(Qwen2_5_VLConfig, source)


def description_from_config(config: Qwen2_5_VLConfig, preset: str, bounds: tuple[int, int],
                            count_prompt: Any) -> ModelDescription:
    """The weight-free geometry: rows of temporal patches whose patch grid follows each video's frame
    size (default: tokcomp's generated video), merged 2x2 for the LLM; no special tokens; M-RoPE."""
    v, t, nominal = config.vision_config, config.text_config, GeneratedVideoConfig()
    grid, merge = qvid.nominal_grid(v, bounds), v.spatial_merge_size
    info = ModelInfo(name=preset, vision_layers=v.depth, vision_grid=grid,
                     pooled_grid=(grid[0] // merge, grid[1] // merge), llm_layers=t.num_hidden_layers,
                     llm_hidden=t.hidden_size, family=FAMILY, capabilities=CAPABILITIES,
                     grid_multiple=merge, capability_notes=CAPABILITY_NOTES)

    def video(frames: int, height: int | None = None, width: int | None = None) -> VideoInput:
        size = (height or nominal.height, width or nominal.width)
        return qvid.video_geometry(v, frames, *size, bounds, model=preset).video_input(None, torch.device("cpu"))

    def llm_grid(grid: tuple[int, int], tokens: int) -> tuple[int, int]:  # the merger needs the full grid
        return (grid[0] // merge, grid[1] // merge) if grid[0] * grid[1] == tokens else (1, tokens // merge**2)

    return ModelDescription(
        info=info, dims=dims_from_qwen2_5_vl_config(config, grid), count_prompt=count_prompt, video=video,
        llm_grid=llm_grid, specials=0, position_rank=3, contiguous_positions=False, vision_hidden=v.hidden_size,
        context_length=getattr(t, "max_position_embeddings", None),
        attention_pairs=lambda index, rows, tokens, vid, grid: qvid.attention_pairs(v, index, rows, tokens, grid))


def describe(spec: Any, preset: str) -> ModelDescription:
    """The model's description (info, dims, prompt-token counter, geometry), without building weights."""
    tokenizer = qtok.load_tokenizer(_checkpoint(spec, preset))
    return description_from_config(preset_config(spec, preset), preset, pixel_bounds(spec, preset),
                                   lambda prompt: qtok.count_text_tokens(tokenizer, prompt))


def build(spec: Any, preset: str) -> Qwen2_5_VLAdapter:
    """Build an adapter for ``preset`` from a model spec (weights, dtype, device, attention, image size)."""
    bounds, source = pixel_bounds(spec, preset), _checkpoint(spec, preset)
    model = build_model(Qwen2_5_VLForConditionalGeneration, spec, source, lambda: preset_config(spec, preset))
    return Qwen2_5_VLAdapter(model, qtok.load_tokenizer(source), preset, *bounds)


class Qwen2_5_VLAdapter(TransformersAdapter):
    """The primitives of ``tokcomp.adapter.ModelAdapter`` for one Qwen2.5-VL instance."""

    family = FAMILY
    contiguous_positions = False  # M-RoPE: kept tokens keep their (t, h, w) positions

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, tokenizer: Any, preset: str,
                 min_pixels: int = qvid.MIN_PIXELS, max_pixels: int = qvid.MAX_PIXELS):
        self.model, self.tokenizer, self.preset, self.config = model, tokenizer, preset, model.config
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.visual, self.language_model = model.model.visual, model.model.language_model
        self.description = description_from_config(self.config, preset, (min_pixels, max_pixels),
                                                   lambda prompt: qtok.count_text_tokens(tokenizer, prompt))
        self.info, self.dims = self.description.info, self.description.dims

    # ---- inputs ----------------------------------------------------------------------------
    def preprocess(self, frames: Tensor, fps: float | None = None) -> VideoInput:
        """uint8 (T, H, W, 3) -> patches in the stock processor's order (``qwen_video``); ``fps``: the
        rate the frames were sampled at (unknown: Qwen's default 2.0), which spaces M-RoPE time."""
        pixels, geometry = qvid.process_video(frames, self.config.vision_config, (self.min_pixels, self.max_pixels),
                                              fps, self.preset)
        return geometry.video_input(pixels.to(self.device, self.dtype), self.device, fps)

    def prompt(self, text: str, video: VideoInput, visual: int) -> PromptLayout:
        """Chat-formatted ids with ``visual`` video placeholders between vision start and end."""
        pre, post = (self.tokenizer(s, add_special_tokens=False).input_ids for s in qtok.chat_segments(text))
        ids = pre + [self.config.video_token_id] * visual + post
        return PromptLayout(torch.tensor([ids], device=self.device), len(pre), visual)

    def full_positions(self, layout: PromptLayout, video: VideoInput) -> Tensor:
        """(3, L) M-RoPE positions of the uncompressed prompt, from the model's ``get_rope_index``."""
        full = video.rows * video.llm_grid[0] * video.llm_grid[1]
        if layout.visual != full:
            raise ValueError(f"full_positions needs the uncompressed prompt ({full} video tokens), got {layout.visual}")
        types = (layout.ids == self.config.video_token_id).int() * 2  # mm_token_type_ids: 2 = video
        positions, _ = self.model.model.get_rope_index(
            layout.ids, mm_token_type_ids=types, video_grid_thw=video.extra["grid_thw"],
            second_per_grid_ts=video.extra["second_per_grid_ts"])
        return positions[:, 0]

    # ---- vision encoder ----------------------------------------------------------------------
    # The hook's spatial order is raster order of each row's patch grid; the tower's own helpers work in
    # the processor's merge-unit order and the blocks in window order (``qwen_video.window_geometry``).
    def _geometry(self, video: VideoInput, rows: int, tokens: int, grid: tuple[int, int] | None = None) -> dict[str, Any]:
        """``qwen_video.window_geometry`` for ``rows`` rows of ``grid`` (default: the video's), cached per run."""
        grid = tuple(video.grid if grid is None else grid)
        if tokens != grid[0] * grid[1] or tokens == 0:
            raise StrategyContractError(f"{self.preset}: vision blocks need a full patch grid per row (windows, 2-D "
                                        f"rotary positions, the 2x2 merger); got {tokens} tokens on grid {grid}")
        cache = video.extra.setdefault("qwen_geometry", {})
        if (rows, grid) not in cache:
            cache[rows, grid] = qvid.window_geometry(self.visual, rows, grid, self.device)
        return cache[rows, grid]

    def embed_video(self, video: VideoInput) -> Tensor:
        """Patch embeddings (rows, tokens, D_vision) in raster order of each row's patch grid."""
        hidden = self.visual.patch_embed(video.pixels)
        g = self._geometry(video, video.rows, video.grid[0] * video.grid[1])
        return hidden[g["raster"]].view(video.rows, -1, hidden.shape[-1])

    def vision_layer(self, index: int, hidden: Tensor, sizes: Tensor | None, video: VideoInput,
                     grid: tuple[int, int] | None = None) -> Tensor:
        """Vision block ``index`` on (rows, tokens, D) in raster order, run in the model's window order."""
        if sizes is not None:
            raise NotImplementedError("Qwen2.5-VL vision blocks do not support proportional attention (token sizes)")
        rows, tokens, _ = hidden.shape
        flat = self.vision_layer_in_order(index, self.to_layer_order(hidden, video, grid), video, rows, grid)
        return self.from_layer_order(flat, rows, tokens, video, grid)

    # The window order, kept across consecutive blocks while no hook or statistic needs spatial order
    # (the stock forward permutes once; a permutation per block would cost ~1% of TTFT at 3B sizes).
    def to_layer_order(self, hidden: Tensor, video: VideoInput, grid: tuple[int, int] | None = None) -> Tensor:
        """(rows, tokens, D) in raster order -> (rows * tokens, D) in the model's window order."""
        rows, tokens, dim = hidden.shape
        return hidden.reshape(rows * tokens, dim)[self._geometry(video, rows, tokens, grid)["order"]]

    def from_layer_order(self, flat: Tensor, rows: int, tokens: int, video: VideoInput,
                         grid: tuple[int, int] | None = None) -> Tensor:
        return flat[self._geometry(video, rows, tokens, grid)["inverse"]].view(rows, tokens, -1)

    def vision_layer_in_order(self, index: int, flat: Tensor, video: VideoInput, rows: int | None = None,
                              grid: tuple[int, int] | None = None) -> Tensor:
        """Vision block ``index`` on ``rows`` rows of ``grid`` (defaults: the video's) in window order."""
        grid = tuple(video.grid if grid is None else grid)
        g = self._geometry(video, video.rows if rows is None else rows, grid[0] * grid[1], grid)
        cu = g["cu_full"] if index in self.visual.fullatt_block_indexes else g["cu_window"]
        return self.visual.blocks[index](flat, cu_seqlens=cu, max_seqlen=get_max_seqlen(cu, self.visual.config),
                                         position_embeddings=g["rope_window"])

    def vision_attention_pairs(self, index: int, rows: int, tokens: int, video: VideoInput,
                               grid: tuple[int, int] | None = None) -> int | None:
        """Query-key pairs of block ``index``: the sum of squared segment lengths (rows, or windows)."""
        return qvid.attention_pairs(self.config.vision_config, index, rows, tokens, video.grid if grid is None else grid)

    def vision_qk(self, index: int, hidden: Tensor, queries: bool, video: VideoInput,
                  grid: tuple[int, int] | None = None) -> QK:
        """Rotated queries (when asked) and keys of block ``index`` for its input (rows, tokens, D), as
        (rows, heads, tokens, head_dim) in raster order; windowed blocks give per-row window ids."""
        rows, tokens, dim = hidden.shape
        g, block = self._geometry(video, rows, tokens, grid), self.visual.blocks[index]
        qkv = block.attn.qkv(block.norm1(hidden.reshape(rows * tokens, dim)))
        q, k, _ = qkv.reshape(rows * tokens, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = qwen.apply_rotary_pos_emb_vision(q, k, *g["rope"])
        q, k = (x.view(rows, tokens, block.attn.num_heads, -1).transpose(1, 2) for x in (q, k))
        segments = None if index in self.visual.fullatt_block_indexes else g["segments"]
        return QK(q if queries else None, k, block.attn.scaling, segments)

    def vision_to_llm(self, hidden: Tensor, grid: tuple[int, int], stats: dict[str, Tensor],
                      video: VideoInput) -> VisionOutput:
        """The 2x2 patch merger -> (rows, h/2, w/2, D_llm); statistics averaged over each merge unit."""
        rows, tokens, dim = hidden.shape
        merge = self.visual.spatial_merge_size
        g = self._geometry(video, rows, tokens, grid)
        h, w = grid[0] // merge, grid[1] // merge
        features = self.visual.merger(hidden.reshape(rows * tokens, dim)[g["units"]]).view(rows, h, w, -1)
        pooled = {name: v.float().reshape(rows, h, merge, w, merge, *v.shape[2:]).mean((2, 4)) for name, v in stats.items()}
        return VisionOutput(features, pooled, features.new_zeros(0, features.shape[-1]))

    # ---- language model ----------------------------------------------------------------------
    def llm_positions(self, positions: Tensor) -> Tensor:
        """(3, L) -> (3, 1, L), the decoder's M-RoPE layout (a single row is broadcast to the three)."""
        return (positions[:, None, :] if positions.dim() == 2 else positions).expand(3, -1, -1)

    def stock_inputs(self, text: str, video: VideoInput) -> dict[str, Tensor]:
        """The uncompressed prompt as the stock model's forward/generate takes it (for reference checks)."""
        ids = self.prompt(text, video, video.rows * video.llm_grid[0] * video.llm_grid[1]).ids
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=video.pixels,
                    video_grid_thw=video.extra["grid_thw"], second_per_grid_ts=video.extra["second_per_grid_ts"],
                    mm_token_type_ids=(ids == self.config.video_token_id).int() * 2)
