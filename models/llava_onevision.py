"""LLaVA-OneVision (transformers ``LlavaOnevisionForConditionalGeneration``) as tokcomp primitives.

The model's own modules, reached one at a time so the pipeline can run them in the model's order:
SigLIP embeddings and each encoder layer (frames as the batch, 27x27 patches in raster order), the
projector and the bilinear pooling of the grid to 14x14, one newline feature after the whole video
(a special token the pipeline re-emits), a Qwen-format chat prompt with 1-D RoPE positions, and the
Qwen2 decoder. This file knows nothing of hook points, ledgers or decoding.

LLaVA-Video-7B-Qwen2 is served by the same class: its llava-hf conversion loads as
``LlavaOnevisionForConditionalGeneration``, and transformers' ``get_video_features`` always pools
bilinearly to ceil(side/2)^2 and appends one newline (``LlavaOnevisionConfig`` has no pooling-mode or
newline-position field). The official LLaVA-NeXT code instead average-pools to floor(side/2)^2 and
puts a newline after every row ("grid"); tokcomp follows transformers, the model it checks exactness
against. What distinguishes the LLaVA-Video presets here is their weights and their 64 frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokcomp.models import LLAVA_ONEVISION_CAPABILITIES, TINY_SYNTH_CHECKPOINT
from tokcomp.models._hf import TransformersAdapter, build_model, checkpoint_source, load_config
from tokcomp.models.dims import dims_from_config
from tokcomp.models.tiny_tokenizer import build_byte_tokenizer
from torch import Tensor
from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

from tokcomp.adapter import QK, ModelDescription, PromptLayout, VideoInput, VisionOutput
from tokcomp.errors import ConfigError
from tokcomp.ops.pooling import bilinear_halve
from tokcomp.strategy import ModelInfo

CONFIG_DIR = Path(__file__).parent / "configs"
SYSTEM_PROMPT = "You are a helpful assistant."
CAPABILITIES = LLAVA_ONEVISION_CAPABILITIES


def _key_mask(bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Log token sizes (frames, tokens) as an additive attention mask (frames, 1, 1, tokens) on the keys."""
    return None if bias is None else bias[:, None, None, :].to(dtype)


def tiny_config(tokenizer: Any, image_size: int = 112) -> LlavaOnevisionConfig:
    """A few-layer LLaVA-OneVision with the real structure (GQA, SwiGLU, SigLIP, 2-layer projector)."""
    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=2, patch_size=14, image_size=image_size,
                           hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                         eos_token_id=ids("<|im_end|>"), tie_word_embeddings=False),
        image_token_id=ids("<image>"), video_token_id=ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def synth_config(tokenizer: Any) -> LlavaOnevisionConfig:
    """``tiny-synth``: the tiny architecture a little wider (vision 48d, LLM 96d), so the questions of the
    synthetic set that compare frames are learnable (``tokcomp train-tiny`` trains it)."""
    config = tiny_config(tokenizer)
    config.vision_config.update(dict(hidden_size=48, intermediate_size=96, num_attention_heads=3))
    config.text_config.update(dict(hidden_size=96, intermediate_size=192, num_attention_heads=6,
                                   num_key_value_heads=2))
    return config


# LLaVA-Video's tiny stand-in: a 7x7 patch grid (98 px / 14), odd like the real 27x27, so pooling rounds
# up to 4x4 as 27 -> 14 does; the OneVision tiny's 8x8 grid halves evenly.
TINY_IMAGE_SIZE = {"tiny": 112, "llava-video-tiny": 98, "tiny-synth": 112}


def bundled_config(preset: str, image_size: int | None = None) -> LlavaOnevisionConfig:
    data = json.loads((CONFIG_DIR / f"{preset}.json").read_text())
    data.pop("_source", None)
    data.pop("model_type", None)
    if image_size is not None:
        data["vision_config"]["image_size"] = image_size
    return LlavaOnevisionConfig(**data)


def info_from_config(config: LlavaOnevisionConfig, preset: str) -> ModelInfo:
    vc, tc = config.vision_config, config.text_config
    side = vc.image_size // vc.patch_size
    pooled = (side + 1) // 2
    return ModelInfo(name=preset, vision_layers=vc.num_hidden_layers, vision_grid=(side, side),
                     pooled_grid=(pooled, pooled), llm_layers=tc.num_hidden_layers, llm_hidden=tc.hidden_size,
                     family="llava_onevision", capabilities=CAPABILITIES)


def preset_config(spec: Any, preset: str) -> LlavaOnevisionConfig:
    """The model config a build of ``preset`` with ``spec`` would use, without building weights."""
    if spec.weights == "random":
        if preset == "tiny-synth":
            if spec.image_size not in (None, TINY_IMAGE_SIZE[preset]):
                raise ConfigError(f"model.image_size={spec.image_size}: tiny-synth is trained at 112 px")
            return synth_config(build_byte_tokenizer())
        if preset in TINY_IMAGE_SIZE:
            return tiny_config(build_byte_tokenizer(), spec.image_size or TINY_IMAGE_SIZE[preset])
        return bundled_config(preset, spec.image_size)
    return load_config(LlavaOnevisionConfig, _checkpoint(spec, preset))


def _checkpoint(spec: Any, preset: str) -> str:
    if spec.image_size is not None:
        raise ConfigError(f"model.image_size={spec.image_size} only applies to weights: random")
    return checkpoint_source(spec, preset, PRESET_HUB_IDS)


def prompt_token_counter(spec: Any, preset: str):
    """Counts the chat-formatted prompt's text tokens as a run would (random presets: byte tokenizer)."""
    if spec.weights == "random":
        tokenizer = build_byte_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(_checkpoint(spec, preset))
        except OSError as exc:
            raise ConfigError(f"cannot load the tokenizer of {spec.weights!r} to count prompt tokens "
                              f"(give --text-tokens): {exc}") from exc

    def count(prompt: str) -> int:
        before, after = chat_segments(prompt)
        return len(tokenizer(before, add_special_tokens=False).input_ids) + len(
            tokenizer(after, add_special_tokens=False).input_ids)

    return count


def chat_segments(prompt: str) -> tuple[str, str]:
    """The chat template around the video placeholder (LLaVA-OneVision's Qwen format)."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n",
            f"\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


def description_from_config(config: LlavaOnevisionConfig, preset: str, count_prompt: Any) -> ModelDescription:
    """The weight-free geometry: every frame is a row of side x side patches, pooled to ceil(side/2)^2
    tokens (a changed token count that is no grid stays one row, unpooled), then one newline."""
    info = info_from_config(config, preset)

    def video(frames: int, height: int | None = None, width: int | None = None) -> VideoInput:
        return VideoInput(None, frames=frames, rows=frames, grid=info.vision_grid, llm_grid=info.pooled_grid)

    def llm_grid(grid: tuple[int, int], tokens: int) -> tuple[int, int]:
        if grid != (0, 0) and grid[0] * grid[1] == tokens:
            return (grid[0] + 1) // 2, (grid[1] + 1) // 2
        return 1, tokens

    return ModelDescription(info=info, dims=dims_from_config(config), count_prompt=count_prompt, video=video,
                            llm_grid=llm_grid, specials=1, position_rank=1, contiguous_positions=True,
                            vision_hidden=config.vision_config.hidden_size,
                            context_length=getattr(config.text_config, "max_position_embeddings", None))


def describe(spec: Any, preset: str) -> ModelDescription:
    """The model's description (info, dims, prompt-token counter, geometry), without building weights."""
    return description_from_config(preset_config(spec, preset), preset, prompt_token_counter(spec, preset))


def build(spec: Any, preset: str) -> LlavaOnevisionAdapter:
    """Build an adapter for ``preset`` from a model spec (weights, dtype, device, attention, image size)."""
    source = None if spec.weights == "random" else _checkpoint(spec, preset)
    model = build_model(LlavaOnevisionForConditionalGeneration, spec, source, lambda: preset_config(spec, preset))
    if source is None:
        return LlavaOnevisionAdapter(model, build_byte_tokenizer(), preset)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ConfigError(f"cannot load the tokenizer of {source!r}: {exc}") from exc
    return LlavaOnevisionAdapter(model, tokenizer, preset)


PRESET_HUB_IDS = {
    "llava-onevision-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "llava-onevision-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "llava-video-7b": "llava-hf/LLaVA-Video-7B-Qwen2-hf",
    "tiny-synth": TINY_SYNTH_CHECKPOINT,
}


class LlavaOnevisionAdapter(TransformersAdapter):
    """The primitives of ``tokcomp.adapter.ModelAdapter`` for one LLaVA-OneVision instance."""

    family = "llava_onevision"
    contiguous_positions = True

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, tokenizer: Any, preset: str):
        self.model = model
        self.tokenizer = tokenizer
        self.preset = preset
        self.config = model.config
        self.description = description_from_config(self.config, preset, self._count_prompt)
        self.info, self.dims = self.description.info, self.description.dims
        tower = model.model.vision_tower
        self.vision = getattr(tower, "vision_model", tower)
        self.language_model = model.model.language_model

    def _count_prompt(self, prompt: str) -> int:
        before, after = chat_segments(prompt)
        return sum(len(self.tokenizer(part, add_special_tokens=False).input_ids) for part in (before, after))

    # ---- inputs ----------------------------------------------------------------------------
    def preprocess(self, frames: Tensor, fps: float | None = None) -> VideoInput:
        """uint8 (T, H, W, 3) -> (T, 3, S, S): bicubic antialiased resize, [0, 1], mean/std 0.5 (SigLIP).
        ``fps`` is unused: LLaVA's 1-D positions carry no time."""
        size = self.config.vision_config.image_size
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0.0, 1.0) - 0.5) / 0.5).to(self.dtype).to(self.device)
        return VideoInput(x, frames=x.shape[0], rows=x.shape[0], grid=self.info.vision_grid,
                          llm_grid=self.info.pooled_grid)

    def prompt(self, text: str, video: VideoInput, visual: int) -> PromptLayout:
        """Chat-formatted ids with ``visual`` video placeholders."""
        before, after = chat_segments(text)
        pre = self.tokenizer(before, add_special_tokens=False).input_ids
        post = self.tokenizer(after, add_special_tokens=False).input_ids
        ids = pre + [self.config.video_token_id] * visual + post
        return PromptLayout(torch.tensor([ids], device=self.device), len(pre), visual)

    def stock_inputs(self, text: str, video: VideoInput) -> dict[str, Tensor]:
        """The uncompressed prompt as the stock model's forward/generate takes it (for reference checks)."""
        layout = self.prompt(text, video, video.rows * video.llm_grid[0] * video.llm_grid[1] + 1)
        return {"input_ids": layout.ids, "pixel_values_videos": video.pixels[None]}

    def full_positions(self, layout: PromptLayout, video: VideoInput) -> Tensor:
        return torch.arange(layout.ids.shape[1], device=self.device)[None]

    # ---- vision encoder ----------------------------------------------------------------------
    def embed_video(self, video: VideoInput) -> Tensor:
        return self.vision.embeddings(video.pixels)

    def vision_layer(self, index: int, hidden: Tensor, sizes: Tensor | None, video: VideoInput,
                     grid: tuple[int, int] | None = None) -> Tensor:
        return self.vision.encoder.layers[index](hidden, _key_mask(sizes, hidden.dtype))

    def vision_attention_block(self, index: int, hidden: Tensor, sizes: Tensor | None, video: VideoInput) -> Tensor:
        """The first half of a SigLIP encoder layer: pre-norm self-attention plus residual."""
        layer = self.vision.encoder.layers[index]
        out, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=_key_mask(sizes, hidden.dtype))
        return hidden + out

    def vision_mlp_block(self, index: int, hidden: Tensor, video: VideoInput) -> Tensor:
        """The second half of a SigLIP encoder layer: pre-norm MLP plus residual."""
        layer = self.vision.encoder.layers[index]
        return hidden + layer.mlp(layer.layer_norm2(hidden))

    def vision_attention_pairs(self, index: int, rows: int, tokens: int, video: VideoInput,
                               grid: tuple[int, int] | None = None) -> int | None:
        return None  # every frame attends within itself

    def vision_qk(self, index: int, hidden: Tensor, queries: bool, video: VideoInput,
                  grid: tuple[int, int] | None = None) -> QK:
        """Queries (when asked) and keys of one SigLIP layer for its input, (frames, heads, tokens, head_dim)."""
        layer = self.vision.encoder.layers[index]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        shape = (*x.shape[:2], attn.num_heads, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        q = attn.q_proj(x).view(shape).transpose(1, 2) if queries else None
        return QK(q, k, attn.scale)

    def vision_to_llm(self, hidden: Tensor, grid: tuple[int, int], stats: dict[str, Tensor],
                      video: VideoInput) -> VisionOutput:
        """Projector, bilinear 2x2 pooling of each frame's grid (statistics alike), the newline feature."""
        features = self.model.model.multi_modal_projector(hidden)
        frames, n_tok = features.shape[:2]
        if grid != (0, 0) and grid[0] * grid[1] == n_tok:
            h, w = grid
            pooled = bilinear_halve(features.view(frames, h, w, -1))
            stats = {name: bilinear_halve(v.view(frames, h, w, -1).float()) for name, v in stats.items()}
        else:  # no grid left (tokens merged inside the encoder): no pooling, one row of tokens
            pooled = features.view(frames, 1, n_tok, -1)
            stats = {name: v.view(frames, 1, n_tok, -1).float() for name, v in stats.items()}
        stats = {name: v[..., 0] if name != "keys" else v for name, v in stats.items()}
        newline = self.model.model.image_newline[None, :].to(pooled.dtype)
        return VisionOutput(pooled, stats, newline)
