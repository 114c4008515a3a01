"""Qwen2-VL / Qwen2.5-VL video preprocessing in plain torch (no torchvision), and the geometry of
Qwen2.5-VL's windowed vision attention over the resulting patch grid (``window_geometry``).

Follows transformers' ``Qwen2VLVideoProcessor`` step by step: each frame is resized to the size
``smart_resize`` picks (both sides multiples of ``patch * merge`` = 28 px, the pixel count within
``[min_pixels, max_pixels]``, aspect ratio kept) with antialiased bicubic interpolation on the uint8
frames (as torchvision does on CPU: natively in uint8; on other devices in float32, then clamped and
rounded back to uint8), rescaled to [0, 1] and normalised with the OpenAI CLIP mean / std (fused
into one subtract and divide, as the processor does), the frame count padded to a multiple of
``temporal_patch_size`` by repeating the last frame, and the frames flattened into patches in the
processor's order: (grid_t, h/merge, w/merge, merge, merge) patches, each (channel, temporal,
patch, patch) values. A merge unit's ``merge**2`` patches are therefore consecutive.

Pixel bounds: the stock video processor defaults (``STOCK_MIN_PIXELS``/``STOCK_MAX_PIXELS``, up to
~770 patches per frame) are heavy for CPU runs; tokcomp's default (``MIN_PIXELS``/``MAX_PIXELS``)
is the per-frame range the EarlyTom evaluation script uses (48 to 256 LLM tokens per frame).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from tokcomp.adapter import VideoInput
from tokcomp.config import GeneratedVideoConfig
from tokcomp.errors import ConfigError, InputError
from tokcomp.state import StrategyContractError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STOCK_MIN_PIXELS = 128 * 28 * 28  # transformers' Qwen2VLVideoProcessor: size["shortest_edge"]
STOCK_MAX_PIXELS = 768 * 28 * 28  # ... size["longest_edge"]
MIN_PIXELS = 48 * 28 * 28  # 37632 (EarlyTom's eval script)
MAX_PIXELS = 256 * 28 * 28  # 200704
DEFAULT_FPS = 2.0  # Qwen's default sampling rate: seconds per temporal patch = temporal_patch_size / fps


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The (height, width) Qwen's processors resize a frame to: multiples of ``factor``, the aspect
    ratio kept as closely as possible, the area brought into [min_pixels, max_pixels] when the
    nearest multiples fall outside it."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} frames exceeds 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return h, w


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, h, w), antialiased bicubic like torchvision's ``resize``."""
    x = frames.permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) == tuple(size):
        return x.contiguous()
    if x.device.type == "cpu":
        return F.interpolate(x.contiguous(), size=size, mode="bicubic", align_corners=False, antialias=True)
    y = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return y.clamp_(0, 255).round_().to(torch.uint8)


def normalize(frames: Tensor, mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
              std: tuple[float, ...] = OPENAI_CLIP_STD) -> Tensor:
    """uint8 (T, 3, h, w) -> float32: (x / 255 - mean) / std, computed as the processor's fused
    (x - 255 mean) / (255 std). Qwen2-VL / Qwen2.5-VL use the OpenAI CLIP statistics, Qwen3-VL 0.5 / 0.5."""
    scale = 1.0 / (1.0 / 255)
    mean = (torch.tensor(mean) * scale).to(frames.device)[:, None, None]
    std = (torch.tensor(std) * scale).to(frames.device)[:, None, None]
    return frames.to(torch.float32).sub_(mean).div_(std)


def patchify(frames: Tensor, patch: int, temporal: int, merge: int) -> tuple[Tensor, tuple[int, int, int]]:
    """(T, C, H, W) -> patches (grid_t * gh * gw, C * temporal * patch * patch) in the processor's
    order, and (grid_t, gh, gw); T is padded to a multiple of ``temporal`` with the last frame."""
    if pad := -frames.shape[0] % temporal:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # -> (grid_t, gh/merge, gw/merge, merge_h, merge_w, channel, temporal, patch_h, patch_w)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


@dataclass
class VideoGeometry:
    """What a video of ``frames`` frames becomes: ``rows`` temporal patches of ``grid`` (h, w) patches
    (``llm_grid`` after the 2x2 merger), frames resized to ``size`` (height, width) px."""

    frames: int
    rows: int
    grid: tuple[int, int]
    llm_grid: tuple[int, int]
    size: tuple[int, int]
    seconds_per_row: float  # second_per_grid_ts: temporal_patch_size / fps
    row_frames: list[list[int]]  # input frames behind each row (the padded last row repeats one)

    def video_input(self, pixels: Tensor | None, device: torch.device, fps: float | None = None) -> VideoInput:
        """The adapter's VideoInput (pixels None: a weight-free description); ``extra`` holds the stock
        model's ``grid_thw`` and ``second_per_grid_ts`` tensors, the resized ``size`` and ``fps``."""
        extra = {"grid_thw": torch.tensor([[self.rows, *self.grid]], device=device), "size": self.size, "fps": fps,
                 "second_per_grid_ts": torch.tensor([self.seconds_per_row], device=device)}
        return VideoInput(pixels, frames=self.frames, rows=self.rows, grid=self.grid, llm_grid=self.llm_grid,
                          extra=extra, row_frames=self.row_frames)


def checkpoint_pixel_bounds(source: str) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) from a checkpoint's video (or image) processor config: a local folder's
    file, or the hub's when reachable; None when it has none (the preset's bounds apply)."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = Path(source) / name
        if not path.is_file() and not Path(source).is_dir():
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(source, name))
            except Exception:  # no network, no such file, gated: the preset's bounds apply
                continue
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        size = data.get("size") or {}
        low, high = data.get("min_pixels") or size.get("shortest_edge"), data.get("max_pixels") or size.get("longest_edge")
        if low and high:
            return int(low), int(high)
    return None


def pixel_bounds(bounds: tuple[int, int], image_size: int | None) -> tuple[int, int]:
    """Per-frame (min, max) pixels: ``bounds``, with max_pixels = image_size**2 (min lowered to fit) when given."""
    if image_size is None:
        return bounds
    if int(image_size) < 28:
        raise ConfigError(f"model.image_size={image_size} is below one 28-px merge unit")
    high = int(image_size) ** 2
    return min(bounds[0], high), high


def video_geometry(v: Any, frames: int, height: int, width: int, bounds: tuple[int, int],
                   fps: float | None = None, model: str = "Qwen2.5-VL") -> VideoGeometry:
    """The geometry of ``frames`` frames of ``height`` x ``width`` px for vision config ``v`` at per-frame
    (min, max) pixel ``bounds``. ``fps``: the rate the frames were sampled at; unknown (None) means
    Qwen's default of 2 frames per second, so a temporal patch of 2 frames spans 1 s."""
    tp, patch, merge = v.temporal_patch_size, v.patch_size, v.spatial_merge_size
    if frames < tp:
        raise InputError(f"{model} needs at least {tp} frames (one temporal patch), got {frames}")
    size = smart_resize(height, width, patch * merge, *bounds)
    rows, grid = -(-frames // tp), (size[0] // patch, size[1] // patch)
    return VideoGeometry(frames, rows, grid, (grid[0] // merge, grid[1] // merge), size, tp / (fps or DEFAULT_FPS),
                         [list(range(r * tp, min(frames, (r + 1) * tp))) for r in range(rows)])


def process_video(frames: Tensor, v: Any, bounds: tuple[int, int], fps: float | None = None,
                  model: str = "Qwen2.5-VL", mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                  std: tuple[float, ...] = OPENAI_CLIP_STD) -> tuple[Tensor, VideoGeometry]:
    """uint8 frames (T, H, W, 3) -> the pixel patches ``Qwen2_5_VLModel.get_video_features`` (or Qwen3-VL's)
    takes (see the module doc), (rows * h * w, 3 * temporal * patch^2) float32, and their geometry;
    ``mean`` / ``std``: the processor's normalisation statistics."""
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise InputError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    geometry = video_geometry(v, frames.shape[0], frames.shape[1], frames.shape[2], bounds, fps, model)
    pixels, _ = patchify(normalize(resize_frames(frames, geometry.size), mean, std), v.patch_size, v.temporal_patch_size,
                         v.spatial_merge_size)
    return pixels, geometry


def nominal_grid(v: Any, bounds: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (h, w) of a frame of tokcomp's default generated video at these (min, max) pixel bounds."""
    video = GeneratedVideoConfig()
    return video_geometry(v, v.temporal_patch_size, video.height, video.width, bounds).grid


@functools.lru_cache(maxsize=64)
def _window_lengths(rows: int, h: int, w: int, merge: int, window: int, patch: int) -> tuple[int, ...]:
    _, cu = get_vision_window_index(torch.tensor([[rows, h, w]]), merge, window, patch)
    return tuple(cu.diff().tolist())


def attention_pairs(v: Any, index: int, rows: int, tokens: int, grid: tuple[int, int]) -> int | None:
    """Query-key pairs of vision block ``index`` on ``rows`` x ``tokens`` (patch ``grid`` per row, the
    current one): the sum of squared segment lengths, whole rows in full-attention blocks, else windows
    (None when the tokens are no grid)."""
    if index in v.fullatt_block_indexes:
        return rows * tokens * tokens
    if tokens != grid[0] * grid[1] or tokens == 0:
        return None
    return sum(n * n for n in _window_lengths(rows, *grid, v.spatial_merge_size, v.window_size, v.patch_size))


def unit_order(grid: tuple[int, int], merge: int, device: torch.device | None = None) -> Tensor:
    """Raster index of the patch at each position of the processor's order (2x2 merge units in raster
    order, a unit's patches consecutive) for one row of ``grid`` patches."""
    h, w = grid
    return torch.arange(h * w, device=device).view(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)


def window_geometry(visual: Any, rows: int, grid: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """How a Qwen2.5-VL vision tower (``visual``) attends over ``rows`` rows of a ``grid`` of patches
    given in raster order (the hook's spatial order), from the model's own helpers
    (``transformers.vision_utils``), which work in the processor's merge-unit order:

    ``units``: raster index at each position of the processor's order (``embed_video`` and the merger
    use it; ``raster`` undoes it); ``order``: raster index at each position of the model's window order
    (``inverse`` undoes it); ``cu_window`` / ``cu_full``: segment boundaries in window order for
    windowed / full-attention blocks (windows; whole rows); ``rope`` / ``rope_window``: the 2-D rotary
    (cos, sin) in raster / window order; ``segments``: (rows, tokens) window ids, per row from 0, in
    raster order. A grid smaller than the video's (input pooling) is a smaller image to the tower."""
    merge = visual.spatial_merge_size
    if grid[0] % merge or grid[1] % merge or min(grid) < merge:
        raise StrategyContractError(f"Qwen2.5-VL's {merge}x{merge} patch merger needs a patch grid with sides that are "
                                    f"multiples of {merge}; got {tuple(grid)}")
    unit, tokens = merge * merge, grid[0] * grid[1]
    thw = torch.tensor([[rows, *grid]], device=device)
    units = (unit_order(grid, merge, device)[None] + tokens * torch.arange(rows, device=device)[:, None]).reshape(-1)
    raster = torch.argsort(units)
    windows, cu_window = get_vision_window_index(thw, merge, visual.window_size, visual.patch_size)
    in_units = (windows.to(device)[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
    order = units[in_units]
    cu_window = cu_window.to(device)
    rope = visual.rotary_pos_emb(thw, get_vision_position_ids(thw, merge))  # processor order; reads thw.device
    slots = torch.arange(order.numel(), device=device)
    window = torch.empty_like(slots)
    window[order] = torch.searchsorted(cu_window[1:].long(), slots, right=True)
    window = window.view(rows, -1)
    return {"units": units, "raster": raster, "order": order, "inverse": torch.argsort(order), "cu_window": cu_window,
            "cu_full": get_vision_cu_seqlens(thw).to(device), "rope": tuple(r[raster] for r in rope),
            "rope_window": tuple(r[in_units] for r in rope),
            "segments": window - window.min(dim=1, keepdim=True).values}
