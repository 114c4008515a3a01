"""LLaVA-OneVision (transformers ``LlavaOnevisionForConditionalGeneration``) with tokcomp's hook points.

The adapter runs the model's own modules in the model's own order: SigLIP embeddings, each
encoder layer (frames as the batch) followed by the intra-encoder hook, projector, bilinear pooling
of the 27x27 grid to 14x14, one newline token after the whole video, the pre-LLM hook, splicing
into the prompt embeddings, then Qwen2 prefill (inner-LLM hook as per-instance forward pre-hooks on
the decoder layers, removed afterwards) and greedy decoding with the KV cache.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokcomp.models.dims import dims_from_config
from tokcomp.models.tiny_tokenizer import build_byte_tokenizer
from torch import Tensor
from transformers import (
    AutoTokenizer,
    DynamicCache,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

from tokcomp.errors import ConfigError
from tokcomp.ledger import TokenLedger, VisionLayerEntry
from tokcomp.ops.attention import last_query_attention, received_attention
from tokcomp.ops.pooling import bilinear_halve
from tokcomp.stack import CompressionStack
from tokcomp.state import EncoderState, LLMState, StrategyContractError, VisualTokens
from tokcomp.strategy import ModelInfo
from tokcomp.timing import StageClock

CONFIG_DIR = Path(__file__).parent / "configs"
SYSTEM_PROMPT = "You are a helpful assistant."
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class RunOutput:
    """What one forward pass + greedy decode produced."""

    new_ids: list[int]
    text: str
    prefill_logits: Tensor
    ledger: TokenLedger
    timings_ms: dict[str, float] = field(default_factory=dict)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


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
                     pooled_grid=(pooled, pooled), llm_layers=tc.num_hidden_layers, llm_hidden=tc.hidden_size)


def preset_config(spec: Any, preset: str) -> LlavaOnevisionConfig:
    """The model config a build of ``preset`` with ``spec`` would use, without building weights."""
    if spec.weights == "random":
        if preset == "tiny":
            return tiny_config(build_byte_tokenizer(), spec.image_size or 112)
        return bundled_config(preset, spec.image_size)
    source = _checkpoint(spec, preset)
    try:
        return LlavaOnevisionConfig.from_pretrained(source)
    except OSError as exc:
        raise ConfigError(f"cannot load the config of {source!r}: {exc}") from exc


def _checkpoint(spec: Any, preset: str) -> str:
    if spec.image_size is not None:
        raise ConfigError(f"model.image_size={spec.image_size} only applies to weights: random")
    source = PRESET_HUB_IDS.get(preset) if spec.weights == "pretrained" else spec.weights
    if source is None:
        raise ConfigError(f"preset {preset!r} has no public checkpoint; give weights: <hub id or path>")
    return source


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


def describe(spec: Any, preset: str):
    """(ModelInfo, ModelDims, prompt-token counter) of a preset, without building the model."""
    config = preset_config(spec, preset)
    return info_from_config(config, preset), dims_from_config(config), prompt_token_counter(spec, preset)


def _random_model(config: LlavaOnevisionConfig, dtype: torch.dtype, attn: str, seed: int):
    config._attn_implementation = attn
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = attn
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlavaOnevisionForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def build(spec: Any, preset: str) -> LlavaOnevisionAdapter:
    """Build an adapter for ``preset`` from a model spec (weights, dtype, device, attention, image size)."""
    dtype = torch_dtype(spec.dtype)
    if str(spec.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={spec.device!r} but no CUDA device is available here")
    if spec.weights == "random":
        tokenizer = build_byte_tokenizer()
        model = _random_model(preset_config(spec, preset), dtype, spec.attn_implementation, spec.seed)
    else:
        source = _checkpoint(spec, preset)
        try:
            model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                source, dtype=dtype, attn_implementation=spec.attn_implementation
            )
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as exc:
            raise ConfigError(f"cannot load weights {source!r}: {exc}") from exc
    model.to(spec.device).eval()
    return LlavaOnevisionAdapter(model, tokenizer, preset)


PRESET_HUB_IDS = {
    "llava-onevision-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "llava-onevision-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
}


class LlavaOnevisionAdapter:
    family = "llava_onevision"

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, tokenizer: Any, preset: str):
        self.model = model
        self.tokenizer = tokenizer
        self.preset = preset
        self.config = model.config
        self.info = info_from_config(self.config, preset)
        self.dims = dims_from_config(self.config)

    # ---- model parts ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def attn_implementation(self) -> str:
        return self.config.text_config._attn_implementation or "eager"

    def _vision(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    @property
    def language_model(self):
        return self.model.model.language_model

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.config.text_config.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list | tuple) else {int(eos)}

    # ---- inputs ----------------------------------------------------------------------------
    def preprocess(self, frames: Tensor) -> Tensor:
        """uint8 (T, H, W, 3) -> (T, 3, S, S): bicubic antialiased resize, [0, 1], mean/std 0.5 (SigLIP)."""
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0.0, 1.0) - 0.5) / 0.5).to(self.dtype)
        return x.to(self.device)

    def prompt_ids(self, prompt: str, num_visual: int) -> tuple[Tensor, int]:
        """Chat-formatted ids with ``num_visual`` video placeholders; returns ids and the span start."""
        before, after = chat_segments(prompt)
        pre = self.tokenizer(before, add_special_tokens=False).input_ids
        post = self.tokenizer(after, add_special_tokens=False).input_ids
        ids = pre + [self.config.video_token_id] * num_visual + post
        return torch.tensor([ids], device=self.device), len(pre)

    def decode_text(self, ids: list[int]) -> str:
        """Decoded text; ids the tokenizer lacks (random-weight presets use a byte tokenizer) show as <id>."""
        parts, run = [], []
        for i in ids:
            if i < len(self.tokenizer):
                run.append(i)
                continue
            if run:
                parts.append(self.tokenizer.decode(run, skip_special_tokens=True))
                run = []
            parts.append(f"<{i}>")
        if run:
            parts.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(parts)

    # ---- the forward pass --------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode(self, pixels: Tensor, stack: CompressionStack, ledger: TokenLedger) -> VisualTokens:
        """Vision encoder with the intra-encoder hook, projector, pooling, newline, pre-LLM hook."""
        vision = self._vision()
        layers = vision.encoder.layers
        hidden = vision.embeddings(pixels)
        side = self.info.vision_grid[0]
        state = EncoderState(layer=-1, num_layers=len(layers), hidden=hidden, grid=(side, side),
                             frame_sources=[[i] for i in range(pixels.shape[0])])
        ledger.input_frames = pixels.shape[0]
        score_layer = max(stack.encoder_attention_layers, default=None)
        scores = None
        for i, layer in enumerate(layers):
            ledger.vision_layers.append(VisionLayerEntry(state.hidden.shape[0], state.hidden.shape[1]))
            attention = None
            if i in stack.encoder_attention_layers:
                with stack.clock.stage("token_processing"):
                    attention = self._received_attention(layer, state.hidden)
                ledger.attention_stats.append({"where": "vision", "layer": i, "frames": state.hidden.shape[0],
                                               "tokens": state.hidden.shape[1]})
            state.hidden = layer(state.hidden, None)
            state.layer, state.attention = i, attention
            if i in stack.encoder_layers:
                stack.intra_encoder(state)
            if i == score_layer:
                scores = state.attention
            elif scores is not None and scores.shape[0] != state.hidden.shape[0]:
                raise StrategyContractError(
                    f"frames changed after vision layer {score_layer}, whose attention scores a strategy needs"
                )
        features = state.hidden
        ledger.vision_out_frames, ledger.vision_out_tokens_per_frame = features.shape[0], features.shape[1]
        if state.grid == (0, 0) or state.grid[0] * state.grid[1] != features.shape[1]:
            raise StrategyContractError("pooling needs each frame's full token grid; an intra-encoder strategy changed it")
        features = self.model.model.multi_modal_projector(features)
        frames, (h, w) = features.shape[0], state.grid
        pooled = bilinear_halve(features.view(frames, h, w, -1))
        ph, pw = pooled.shape[1:3]
        ledger.pooled_tokens_per_frame = ph * pw
        if scores is not None:
            scores = bilinear_halve(scores.view(frames, h, w, 1).float()).reshape(-1)
            scores = torch.cat([scores, scores.new_zeros(1)])
        newline = self.model.model.image_newline[None, :].to(pooled.dtype)
        feats = torch.cat([pooled.reshape(frames * ph * pw, -1), newline])
        n = feats.shape[0]
        dev = feats.device
        frame = torch.arange(frames, device=dev).repeat_interleave(ph * pw)
        cells = torch.arange(ph * pw, device=dev).repeat(frames)
        minus1 = torch.tensor([-1], device=dev)
        tokens = VisualTokens(
            features=feats, frame=torch.cat([frame, minus1]), row=torch.cat([cells // pw, minus1]),
            col=torch.cat([cells % pw, minus1]), is_newline=torch.arange(n, device=dev) == n - 1,
            source=torch.arange(n, device=dev), frame_sources=state.frame_sources, grid=(ph, pw), scores=scores,
            meta=state.meta,
        )
        ledger.visual_tokens_before_pre_llm = n
        if stack.has_pre_llm:
            stack.pre_llm(tokens)
        ledger.visual_tokens_after_pre_llm = tokens.num_tokens
        return tokens

    def _received_attention(self, layer: torch.nn.Module, hidden: Tensor) -> Tensor:
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        shape = (*x.shape[:2], attn.num_heads, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        return received_attention(q, k, attn.scale)

    def _last_token_attention(self, layer: torch.nn.Module, hidden: Tensor, position_embeddings) -> Tensor:
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        n_heads = self.config.text_config.num_attention_heads
        q = attn.q_proj(x[:, -1:]).view(1, 1, n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        k = repeat_kv(k, attn.num_key_value_groups)
        return last_query_attention(q[0, :, 0], k[0], attn.scaling)

    @torch.no_grad()
    def run(self, pixels: Tensor, prompt: str, stack: CompressionStack, *, max_new_tokens: int,
            min_new_tokens: int = 0, seed: int = 0, forced_ids: list[int] | None = None) -> RunOutput:
        """Encode, prefill and greedily decode; with ``forced_ids``, decode teacher-forced on those ids
        and return the model's own argmax at each step as ``new_ids`` (for fidelity)."""
        ledger = TokenLedger()
        clock = StageClock(self.device)
        stack.start(seed, clock)
        with clock.stage("ttft"):
            with clock.stage("vision"):
                tokens = self.encode(pixels, stack, ledger)
            ids, start = self.prompt_ids(prompt, tokens.num_tokens)
            embeds = self.language_model.embed_tokens(ids)
            embeds[0, start : start + tokens.num_tokens] = tokens.features.to(embeds.dtype)
            ledger.text_tokens = ids.shape[1] - tokens.num_tokens
            ledger.newline_tokens = int(tokens.is_newline.sum())
            visual_mask = torch.zeros(ids.shape[1], dtype=torch.bool, device=self.device)
            visual_mask[start : start + tokens.num_tokens] = True
            with self._inner_llm_hooks(stack, visual_mask, ledger) as hooks:
                with clock.stage("prefill"):
                    cache, logits = self._prefill(embeds)
                    limit = len(forced_ids) if forced_ids is not None else max_new_tokens
                    first = self._choose(logits, 0, min_new_tokens)
        with self._inner_llm_hooks(stack, visual_mask, ledger, hooks) as hooks:
            with clock.stage("decode"):
                new_ids = self._decode(cache, logits, first, embeds.shape[1], limit, min_new_tokens, forced_ids)
        if not ledger.llm_layers:
            ledger.llm_layers = [ids.shape[1]] * self.info.llm_layers
        ledger.new_tokens = len(new_ids)
        exclusive = clock.exclusive_ms()
        timings = {
            "ttft_ms": clock.inclusive_ms("ttft"),
            "vision_ms": exclusive.get("vision", 0.0),
            "token_processing_ms": exclusive.get("token_processing", 0.0),
            "prefill_ms": exclusive.get("prefill", 0.0),
            "other_ms": exclusive.get("ttft", 0.0),
            "decode_ms": exclusive.get("decode", 0.0),
        }
        timings["total_ms"] = timings["ttft_ms"] + timings["decode_ms"]
        return RunOutput(new_ids, self.decode_text(new_ids), logits[0].detach().float().cpu().clone(), ledger, timings)

    def _prefill(self, embeds: Tensor):
        cache = DynamicCache(config=self.language_model.config)
        out = self.language_model(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1], device=self.device)[None],
                                  past_key_values=cache, use_cache=True)
        return cache, self.model.lm_head(out.last_hidden_state[:, -1])

    def _choose(self, logits: Tensor, step: int, min_new_tokens: int) -> int:
        """Greedy choice; EOS is suppressed before ``min_new_tokens`` (as transformers' processor does)."""
        eos = self.eos_ids()
        if step < min_new_tokens and eos:
            logits = logits.float().clone()
            logits[:, sorted(eos)] = float("-inf")
        return int(logits.argmax(-1))

    def _decode(self, cache, logits: Tensor, first: int, length: int, limit: int, min_new_tokens: int,
                forced_ids: list[int] | None) -> list[int]:
        lm, eos, new_ids = self.language_model, self.eos_ids(), [first]
        for step in range(1, limit):
            fed = forced_ids[step - 1] if forced_ids is not None else new_ids[-1]
            if forced_ids is None and fed in eos:
                break
            out = lm(inputs_embeds=lm.embed_tokens(torch.tensor([[fed]], device=self.device)),
                     position_ids=torch.tensor([[length + step - 1]], device=self.device),
                     past_key_values=cache, use_cache=True)
            new_ids.append(self._choose(self.model.lm_head(out.last_hidden_state[:, -1]), step, min_new_tokens))
        self._sync()
        return new_ids

    @contextmanager
    def _inner_llm_hooks(self, stack: CompressionStack, visual_mask: Tensor, ledger: TokenLedger,
                         previous: _InnerLLMHooks | None = None):
        """Decoder pre-hooks for one run; pass the prefill's hooks object again to decode after it."""
        if not stack.llm_layers and not stack.attention_layers:
            yield None
            return
        hooks = previous or _InnerLLMHooks(self, stack, visual_mask, ledger)
        hooks.prefill = previous is None
        handles = [layer.register_forward_pre_hook(hooks.hook_for(i), with_kwargs=True)
                   for i, layer in enumerate(self.language_model.layers)]
        try:
            yield hooks
        finally:
            for handle in handles:
                handle.remove()


class _InnerLLMHooks:
    """Per-run state of the decoder pre-hooks: which original positions are still alive per layer."""

    def __init__(self, adapter: LlavaOnevisionAdapter, stack: CompressionStack, visual_mask: Tensor,
                 ledger: TokenLedger):
        self.adapter, self.stack, self.ledger = adapter, stack, ledger
        self.visual_mask = visual_mask
        self.full_len = visual_mask.numel()
        self.alive: Tensor | None = None  # indices into the full prefill sequence
        self.alive_at: dict[int, Tensor] = {}
        self.attention: dict[int, Tensor] = {}
        self.prefill = True

    def hook_for(self, index: int):
        def hook(module, args, kwargs):
            if self.prefill:
                return self._prefill(index, module, args, kwargs)
            return self._decode(index, args, kwargs)
        return hook

    @staticmethod
    def _slice_kwargs(kwargs: dict, idx: Tensor) -> dict:
        kwargs = dict(kwargs)
        kwargs["position_ids"] = kwargs["position_ids"][:, idx]
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos[:, idx], sin[:, idx])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor):
            kwargs["attention_mask"] = mask[..., idx, :][..., idx]
        return kwargs

    def _prefill(self, index: int, module, args, kwargs):
        if not args:  # hidden states passed by keyword: move them to the front
            args, kwargs = (kwargs["hidden_states"],), {k: v for k, v in kwargs.items() if k != "hidden_states"}
        hidden = args[0]
        full_kwargs = kwargs
        if self.alive is not None:
            kwargs = self._slice_kwargs(full_kwargs, self.alive)
        if index in self.stack.llm_layers:
            alive = self.alive if self.alive is not None else torch.arange(self.full_len, device=hidden.device)
            state = LLMState(layer=index, num_layers=self.adapter.info.llm_layers, hidden=hidden,
                             position_ids=kwargs["position_ids"], visual_mask=self.visual_mask[alive],
                             last_token_attention=dict(self.attention))
            self.stack.inner_llm(state)
            hidden = state.hidden
            self.attention = state.last_token_attention
            if state.kept is not None:
                self.alive = alive[state.kept]
                kwargs = self._slice_kwargs(full_kwargs, self.alive)
        if index in self.stack.attention_layers:
            with self.stack.clock.stage("token_processing"):
                self.attention[index] = self.adapter._last_token_attention(module, hidden, kwargs["position_embeddings"])
            self.ledger.attention_stats.append({"where": "llm", "layer": index, "seq": hidden.shape[1]})
        if self.alive is not None:
            self.alive_at[index] = self.alive
        self.ledger.llm_layers.append(hidden.shape[1])
        return (hidden, *args[1:]), kwargs

    def _decode(self, index: int, args: tuple, kwargs: dict):
        alive = self.alive_at.get(index)
        mask = kwargs.get("attention_mask")
        if alive is None or not isinstance(mask, Tensor):
            return None
        tail = torch.arange(self.full_len, mask.shape[-1], device=mask.device)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask[..., torch.cat([alive.to(mask.device), tail])]
        return args, kwargs
