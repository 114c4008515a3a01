"""Qwen3-VL (transformers ``Qwen3VLForConditionalGeneration``) as tokcomp primitives.

What differs from Qwen2.5-VL (``qwen2_5_vl``), all read from the model's own modules:

- vision tower: 16-px 3-D patches (a row = one temporal patch of 2 frames) plus a learned position
  embedding bilinearly resampled to the row's patch grid, 2-D rotary positions, and full attention
  within each row in every block (no windows); GELU MLPs; the 2x2 merger (LayerNorm first).
- DeepStack: the states after vision blocks ``deepstack_visual_indexes`` go through their own
  mergers and are added to the outputs of the first decoder layers at the visual positions. Here
  they are the pipeline's *riders*: captured right after those blocks (``vision_riders``), carried
  through every drop or merge, merged with the features (``vision_to_llm``), and added by the
  pipeline's decoder hooks to the kept visual entries still alive at each of those layers
  (``decoder_riders``).
- the video prompt: before each row's vision tokens the processor writes its timestamp,
  ``<t seconds><|vision_start|>`` + placeholders + ``<|vision_end|>``, so the placeholders are one run
  per row between text (``PromptLayout.slots``); no default system turn.
- interleaved M-RoPE positions (``get_rope_index``: one grid per row, rows spaced by the text
  between them); decoder attention normalises q and k per head (``decoder_qk``).

Frames follow the video (``qwen_video``): resized to multiples of 32 px within the per-frame pixel
bounds (tokcomp's default 48 to 256 LLM tokens per frame), normalised with mean 0.5 / std 0.5. The
stock video processor bounds the pixels of the whole clip instead; the model is exact either way
(the reference is stock ``generate`` on the same ids and pixels).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from tokcomp.models import qwen_tokenizer as qtok
from tokcomp.models import qwen_video as qvid
from tokcomp.models._hf import TransformersAdapter, build_model, checkpoint_source, load_config
from tokcomp.models.dims import dims_from_qwen3_vl_config
from torch import Tensor
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from tokcomp.adapter import QK, ModelDescription, PromptLayout, VideoInput, VisionOutput
from tokcomp.config import GeneratedVideoConfig
from tokcomp.state import StrategyContractError
from tokcomp.strategy import ModelInfo

FAMILY, TINY = "qwen3_vl", "qwen3-vl-tiny"
PRESET_HUB_IDS = {f"qwen3-vl-{size}": f"Qwen/Qwen3-VL-{size.upper()}-Instruct" for size in ("2b", "4b", "8b")}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the Qwen3-VL processors' normalisation (IMAGENET_STANDARD)
FACTOR = 32  # patch 16 x merge 2
MIN_PIXELS, MAX_PIXELS = 48 * FACTOR**2, 256 * FACTOR**2  # per frame: 48 to 256 LLM tokens
PIXEL_BOUNDS = {TINY: (128 * 128, 128 * 128)}
CAPABILITIES = frozenset({"intra_encoder"})  # rows and grids may change inside the tower (DeepStack states follow)
CAPABILITY_NOTES = (("vision_split", "ToMe's merged patches cannot reach its LLM: the 2x2 merger and the DeepStack "
                     "mergers concatenate the four patches of every merge unit; only whole temporal patches (rows) "
                     "and whole grids (input pooling) can change inside this tower"),)
_TEXT_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# ---- configs, tokenizer, prompt text --------------------------------------------------------------
def tiny_config(tokenizer: Any) -> Qwen3VLConfig:
    """A few-layer Qwen3-VL with the real structure: 4 vision blocks (DeepStack from blocks 1, 2, 3), the
    interpolated 8x8 position table, a GQA SwiGLU decoder of 4 layers with q/k norms and interleaved M-RoPE."""
    ids = qtok.special_token_ids(tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                **{k: ids.pop(k) for k in _TEXT_IDS})
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, hidden_act="gelu_pytorch_tanh",
                  in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[1, 2, 3])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def bundled_config(preset: str, tokenizer: Any | None = None) -> Qwen3VLConfig:
    """The bundled config of a real size; with ``tokenizer``, the special ids point into it (random weights)."""
    data = json.loads((qtok.CONFIG_DIR / f"{preset}.json").read_text())
    for key in ("_source", "model_type"):
        data.pop(key, None)
    if tokenizer is not None:
        ids = qtok.special_token_ids(tokenizer)
        data["text_config"].update({k: ids.pop(k) for k in _TEXT_IDS})
        data.update(ids)
    return Qwen3VLConfig(**data)


def chat_segments(prompt: str) -> tuple[str, str]:
    """Qwen3-VL's chat template (no default system turn) before and after the video."""
    return "<|im_start|>user\n", f"{prompt}<|im_end|>\n<|im_start|>assistant\n"


def row_timestamps(video: VideoInput, temporal: int) -> list[float]:
    """Seconds of each row, as the processor computes them: the mean time of its ``temporal`` frames (the
    last row padded with its last frame), frame i of frames sampled at ``fps`` being at i / fps."""
    fps = video.extra.get("fps") or qvid.DEFAULT_FPS
    times = []
    for frames in video.row_frames:
        padded = list(frames) + [frames[-1]] * (temporal - len(frames))
        times.append((padded[0] / fps + padded[temporal - 1] / fps) / 2)
    return times


def video_text(video: VideoInput, temporal: int, per_row: int) -> str:
    """The processor's video placeholder text: ``<t seconds><|vision_start|>`` + pads + ``<|vision_end|>`` per row."""
    return "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_row + "<|vision_end|>"
                   for t in row_timestamps(video, temporal))


def count_text_tokens(tokenizer: Any, prompt: str) -> int:
    """Text ids of the chat-formatted ``prompt`` around the video (timestamps excluded: ``count_video_text``)."""
    return sum(len(tokenizer(part, add_special_tokens=False).input_ids) for part in chat_segments(prompt))


def count_video_text(tokenizer: Any, video: VideoInput, temporal: int) -> int:
    """Text ids the video adds: each row's timestamp and vision start / end markers."""
    return len(tokenizer(video_text(video, temporal, 0), add_special_tokens=False).input_ids)


# ---- presets ----------------------------------------------------------------------------------------
def _checkpoint(spec: Any, preset: str) -> str | None:
    """The hub id or path to load, None for random weights."""
    return checkpoint_source(spec, preset, PRESET_HUB_IDS)


def pixel_bounds(spec: Any, preset: str) -> tuple[int, int]:
    """Per-frame (min_pixels, max_pixels) of the preset, capped at image_size**2 when given. (A checkpoint's
    video processor bounds the whole clip's pixels, not a frame's, so it is not read here.)"""
    return qvid.pixel_bounds(PIXEL_BOUNDS.get(preset, (MIN_PIXELS, MAX_PIXELS)), spec.image_size)


def preset_config(spec: Any, preset: str) -> Qwen3VLConfig:
    """The model config a build of ``preset`` with ``spec`` would use, without building weights."""
    source = _checkpoint(spec, preset)
    if source is None:
        tokenizer = qtok.load_tokenizer(None)
        return tiny_config(tokenizer) if preset == TINY else bundled_config(preset, tokenizer)
    return load_config(Qwen3VLConfig, source)


def description_from_config(config: Qwen3VLConfig, preset: str, bounds: tuple[int, int],
                            tokenizer: Any) -> ModelDescription:
    """The weight-free geometry: rows of temporal patches whose patch grid follows each video's frame size,
    merged 2x2 for the LLM; no special tokens; M-RoPE; timestamps and markers as text around each row."""
    v, t, nominal = config.vision_config, config.text_config, GeneratedVideoConfig()
    grid, merge = qvid.nominal_grid(v, bounds), v.spatial_merge_size
    info = ModelInfo(name=preset, vision_layers=v.depth, vision_grid=grid,
                     pooled_grid=(grid[0] // merge, grid[1] // merge), llm_layers=t.num_hidden_layers,
                     llm_hidden=t.hidden_size, family=FAMILY, capabilities=CAPABILITIES, grid_multiple=merge,
                     capability_notes=CAPABILITY_NOTES)

    def video(frames: int, height: int | None = None, width: int | None = None) -> VideoInput:
        size = (height or nominal.height, width or nominal.width)
        return qvid.video_geometry(v, frames, *size, bounds, model=preset).video_input(None, torch.device("cpu"))

    def llm_grid(grid: tuple[int, int], tokens: int) -> tuple[int, int]:  # the merger needs the full grid
        return (grid[0] // merge, grid[1] // merge) if grid[0] * grid[1] == tokens else (1, tokens // merge**2)

    return ModelDescription(
        info=info, dims=dims_from_qwen3_vl_config(config, grid),
        count_prompt=lambda prompt: count_text_tokens(tokenizer, prompt), video=video, llm_grid=llm_grid,
        specials=0, position_rank=3, contiguous_positions=False, vision_hidden=v.hidden_size,
        context_length=getattr(t, "max_position_embeddings", None),
        attention_pairs=lambda index, rows, tokens, vid, grid: rows * tokens * tokens,
        video_text_tokens=lambda vid: count_video_text(tokenizer, vid, v.temporal_patch_size))


def describe(spec: Any, preset: str) -> ModelDescription:
    """The model's description (info, dims, prompt-token counters, geometry), without building weights."""
    return description_from_config(preset_config(spec, preset), preset, pixel_bounds(spec, preset),
                                   qtok.load_tokenizer(_checkpoint(spec, preset)))


def build(spec: Any, preset: str) -> Qwen3VLAdapter:
    """Build an adapter for ``preset`` from a model spec (weights, dtype, device, attention, image size)."""
    bounds, source = pixel_bounds(spec, preset), _checkpoint(spec, preset)
    model = build_model(Qwen3VLForConditionalGeneration, spec, source, lambda: preset_config(spec, preset))
    return Qwen3VLAdapter(model, qtok.load_tokenizer(source), preset, *bounds)


class Qwen3VLAdapter(TransformersAdapter):
    """The primitives of ``tokcomp.adapter.ModelAdapter`` for one Qwen3-VL instance."""

    family = FAMILY
    contiguous_positions = False  # M-RoPE: kept tokens keep their (t, h, w) positions

    def __init__(self, model: Qwen3VLForConditionalGeneration, tokenizer: Any, preset: str,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
        self.model, self.tokenizer, self.preset, self.config = model, tokenizer, preset, model.config
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.visual, self.language_model = model.model.visual, model.model.language_model
        self.description = description_from_config(self.config, preset, (min_pixels, max_pixels), tokenizer)
        self.info, self.dims = self.description.info, self.description.dims
        # DeepStack: the blocks whose states ride along, in block order, and the merger of each
        self.deepstack = list(self.visual.deepstack_visual_indexes)
        self.vision_rider_layers = tuple(sorted(self.deepstack))

    # ---- inputs ----------------------------------------------------------------------------
    def preprocess(self, frames: Tensor, fps: float | None = None) -> VideoInput:
        """uint8 (T, H, W, 3) -> patches in the stock processor's order; ``fps``: the rate the frames were
        sampled at (unknown: 2.0), which sets the timestamps written before each row."""
        v = self.config.vision_config
        pixels, geometry = qvid.process_video(frames, v, (self.min_pixels, self.max_pixels), fps, self.preset, MEAN, STD)
        return geometry.video_input(pixels.to(self.device, self.dtype), self.device, fps)

    def prompt(self, text: str, video: VideoInput, visual: int) -> PromptLayout:
        """Chat-formatted ids of the uncompressed video, tokenized as the processor does (the expanded text in
        one piece); ``slots``: the placeholders, one run per row between its timestamp and vision markers."""
        per_row = video.llm_grid[0] * video.llm_grid[1]
        if visual != video.rows * per_row:
            raise ValueError(f"{self.preset}: the prompt holds every row's {per_row} placeholders "
                             f"({video.rows * per_row}), got {visual}")
        pre, post = chat_segments(text)
        body = video_text(video, self.config.vision_config.temporal_patch_size, per_row)
        ids = torch.tensor([self.tokenizer(pre + body + post, add_special_tokens=False).input_ids], device=self.device)
        slots = torch.nonzero(ids[0] == self.config.video_token_id, as_tuple=False).flatten()
        if slots.numel() != visual:
            raise ValueError(f"{self.preset}: the prompt text itself holds video placeholder ids")
        return PromptLayout(ids, int(slots[0]), visual, slots)

    def full_positions(self, layout: PromptLayout, video: VideoInput) -> Tensor:
        """(3, L) interleaved M-RoPE positions of the uncompressed prompt, from the model's ``get_rope_index``."""
        full = video.rows * video.llm_grid[0] * video.llm_grid[1]
        if layout.visual != full:
            raise ValueError(f"full_positions needs the uncompressed prompt ({full} video tokens), got {layout.visual}")
        types = (layout.ids == self.config.video_token_id).int() * 2  # mm_token_type_ids: 2 = video
        positions, _ = self.model.model.get_rope_index(layout.ids, mm_token_type_ids=types,
                                                       video_grid_thw=video.extra["grid_thw"])
        return positions[:, 0]

    # ---- vision encoder ----------------------------------------------------------------------
    # The hook's spatial order is raster order of each row's patch grid (as for Qwen2.5-VL); the tower's own
    # helpers (position table, rotary, merger) work in the processor's merge-unit order.
    def _geometry(self, video: VideoInput, rows: int, tokens: int, grid: tuple[int, int] | None = None) -> dict[str, Any]:
        """For ``rows`` rows of ``grid`` patches (default: the video's): ``units`` (raster index at each position
        of the processor's order; ``raster`` undoes it), the rotary (cos, sin) in raster order, the attention
        segments (whole rows) and the resampled position table in raster order; cached per run."""
        grid = tuple(video.grid if grid is None else grid)
        merge = self.visual.spatial_merge_size
        if tokens != grid[0] * grid[1] or tokens == 0 or grid[0] % merge or grid[1] % merge:
            raise StrategyContractError(f"{self.preset}: vision blocks need a full patch grid per row with sides that "
                                        f"are multiples of {merge} (2-D rotary positions, the {merge}x{merge} merger); "
                                        f"got {tokens} tokens on grid {grid}")
        cache = video.extra.setdefault("qwen3_geometry", {})
        if (rows, grid) not in cache:
            thw = torch.tensor([[rows, *grid]], device=self.device)
            units = (qvid.unit_order(grid, merge, self.device)[None]
                     + tokens * torch.arange(rows, device=self.device)[:, None]).reshape(-1)
            raster = torch.argsort(units)
            probe = torch.empty(0, device=self.device, dtype=self.dtype)
            rope = self.visual.rotary_pos_emb(probe, get_vision_position_ids(thw, merge))
            cu, longest = get_vision_attention_seqlens(thw, self.visual.config)
            index, weight = get_vision_interpolation_indices_and_weights(
                thw, num_grid_per_side=self.visual.num_grid_per_side, mode=self.visual.interpolation_mode,
                align_corners=self.visual.interpolation_align_corners, spatial_merge_size=merge)
            cache[rows, grid] = {"units": units, "raster": raster, "rope": tuple(r[raster] for r in rope),
                                 "cu": cu.to(self.device), "max_seqlen": longest,
                                 "table": (index.to(self.device), weight.to(self.device))}
        return cache[rows, grid]

    def embed_video(self, video: VideoInput) -> Tensor:
        """Patch embeddings plus the learned position table resampled to the grid, (rows, tokens, D_vision),
        in raster order of each row's patch grid."""
        visual = self.visual
        g = self._geometry(video, video.rows, video.grid[0] * video.grid[1])
        hidden = visual.patch_embed(video.pixels)
        index, weight = g["table"]
        hidden = hidden + (visual.pos_embed(index) * weight[:, :, None]).sum(1).to(hidden.dtype)
        return hidden[g["raster"]].view(video.rows, -1, hidden.shape[-1])

    def vision_layer(self, index: int, hidden: Tensor, sizes: Tensor | None, video: VideoInput,
                     grid: tuple[int, int] | None = None) -> Tensor:
        """Vision block ``index`` on (rows, tokens, D) in raster order; each row attends within itself."""
        if sizes is not None:
            raise NotImplementedError("Qwen3-VL vision blocks do not support proportional attention (token sizes)")
        rows, tokens, dim = hidden.shape
        g = self._geometry(video, rows, tokens, grid)
        out = self.visual.blocks[index](hidden.reshape(rows * tokens, dim), cu_seqlens=g["cu"],
                                        max_seqlen=g["max_seqlen"], position_embeddings=g["rope"])
        return out.view(rows, tokens, dim)

    def vision_attention_pairs(self, index: int, rows: int, tokens: int, video: VideoInput,
                               grid: tuple[int, int] | None = None) -> int | None:
        """Query-key pairs of a block: every row attends fully within itself."""
        return rows * tokens * tokens

    def vision_qk(self, index: int, hidden: Tensor, queries: bool, video: VideoInput,
                  grid: tuple[int, int] | None = None) -> QK:
        """Rotated queries (when asked) and keys of block ``index`` for its input (rows, tokens, D), as
        (rows, heads, tokens, head_dim) in raster order; whole rows are the attention segments."""
        rows, tokens, dim = hidden.shape
        g, block = self._geometry(video, rows, tokens, grid), self.visual.blocks[index]
        heads = block.attn.num_heads
        qkv = block.attn.qkv(block.norm1(hidden.reshape(rows * tokens, dim)))
        q, k, _ = qkv.reshape(rows * tokens, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = qwen3.apply_rotary_pos_emb_vision(q, k, *g["rope"])
        q, k = (x.view(rows, tokens, heads, -1).transpose(1, 2) for x in (q, k))
        return QK(q if queries else None, k, block.attn.scaling, None)

    def vision_riders(self, index: int, hidden: Tensor, riders: Tensor | None, video: VideoInput) -> Tensor:
        """DeepStack: this block's output states appended to the riders, (rows, tokens, k * D_vision)."""
        return hidden if riders is None else torch.cat([riders, hidden.to(riders.dtype)], dim=-1)

    def _merge(self, merger: torch.nn.Module, hidden: Tensor, grid: tuple[int, int], video: VideoInput) -> Tensor:
        """A 2x2 merger on (rows, tokens, D) in raster order -> (rows, h/2, w/2, D_out)."""
        rows, tokens, dim = hidden.shape
        merge = self.visual.spatial_merge_size
        g = self._geometry(video, rows, tokens, grid)
        merged = merger(hidden.reshape(rows * tokens, dim)[g["units"]])
        return merged.view(rows, grid[0] // merge, grid[1] // merge, -1)

    def vision_to_llm(self, hidden: Tensor, grid: tuple[int, int], stats: dict[str, Tensor],
                      video: VideoInput, riders: Tensor | None = None) -> VisionOutput:
        """The 2x2 merger -> (rows, h/2, w/2, D_llm); statistics averaged over each merge unit; riders (the
        DeepStack states) through their own mergers, concatenated in the order of the LLM layers they feed."""
        rows, tokens, _ = hidden.shape
        merge = self.visual.spatial_merge_size
        features = self._merge(self.visual.merger, hidden, grid, video)
        h, w = features.shape[1:3]
        pooled = {name: v.float().reshape(rows, h, merge, w, merge, *v.shape[2:]).mean((2, 4))
                  for name, v in stats.items()}
        merged = None
        if riders is not None:
            chunks = riders.split(hidden.shape[-1], dim=-1)  # block order (vision_rider_layers)
            by_block = dict(zip(self.vision_rider_layers, chunks, strict=True))
            merged = torch.cat([self._merge(self.visual.deepstack_merger_list[j], by_block[layer], grid, video)
                                for j, layer in enumerate(self.deepstack)], dim=-1)
        return VisionOutput(features, pooled, features.new_zeros(0, features.shape[-1]), merged)

    # ---- language model ----------------------------------------------------------------------
    def decoder_riders(self, riders: Tensor) -> dict[int, Tensor]:
        """DeepStack: decoder layer j's output gets the j-th merged rider slice at the visual entries."""
        width = self.config.text_config.hidden_size
        return {j: chunk for j, chunk in enumerate(riders.split(width, dim=-1))}

    def llm_positions(self, positions: Tensor) -> Tensor:
        """(3, L) -> (3, 1, L), the decoder's M-RoPE layout (a single row is broadcast to the three)."""
        return (positions[:, None, :] if positions.dim() == 2 else positions).expand(3, -1, -1)

    def decoder_qk_heads(self, attn: Any, x: Tensor, query_idx: Tensor) -> tuple[Tensor, Tensor]:
        """As ``TransformersAdapter.decoder_qk_heads``, with Qwen3's per-head RMSNorm of q and k (before the rotation)."""
        q = attn.q_norm(attn.q_proj(x[:, query_idx]).view(1, query_idx.numel(), -1, attn.head_dim)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim)).transpose(1, 2)
        return q, k

    def stock_inputs(self, text: str, video: VideoInput) -> dict[str, Tensor]:
        """The uncompressed prompt as the stock model's forward/generate takes it (for reference checks)."""
        ids = self.prompt(text, video, video.rows * video.llm_grid[0] * video.llm_grid[1]).ids
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=video.pixels,
                    video_grid_thw=video.extra["grid_thw"],
                    mm_token_type_ids=(ids == self.config.video_token_id).int() * 2)
