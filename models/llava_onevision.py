"""LLaVA-OneVision (transformers ``LlavaOnevisionForConditionalGeneration``) with tokcomp's hook points.

The adapter runs the model's own modules in the model's own order: SigLIP embeddings, each
encoder layer (frames as the batch) followed by the intra-encoder hook, projector, bilinear pooling
of the 27x27 grid to 14x14, one newline token after the whole video, the pre-LLM hook, splicing
into the prompt embeddings, then Qwen2 prefill (inner-LLM hook as per-instance forward pre-hooks on
the decoder layers, removed afterwards) and greedy decoding with the KV cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokcomp.models.decoder_hooks import DecoderCache, attach_decoder_hooks
from tokcomp.models.dims import dims_from_config
from tokcomp.models.tiny_tokenizer import build_byte_tokenizer
from torch import Tensor
from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

from tokcomp.errors import ConfigError
from tokcomp.ledger import TokenLedger, VisionLayerEntry, vision_stat_record
from tokcomp.ops.attention import (
    head_mean,
    last_query_attention,
    mean_query_saliency,
    received_attention,
    text_query_attention,
)
from tokcomp.ops.pooling import bilinear_halve
from tokcomp.stack import CompressionStack
from tokcomp.state import EncoderState, StrategyContractError, VisualTokens
from tokcomp.strategy import ModelInfo
from tokcomp.timing import StageClock

CONFIG_DIR = Path(__file__).parent / "configs"
SYSTEM_PROMPT = "You are a helpful assistant."
_POOLED_STATS = "tokcomp.vision_statistics"  # meta key: statistics handed from the encoder to the pooling


def _log_sizes(sizes: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
    """Proportional attention: log token sizes, (frames, tokens) float32, or with ``dtype`` an additive
    attention mask (frames, 1, 1, tokens) on the key axis. None without sizes."""
    if sizes is None:
        return None
    bias = torch.log(sizes.float())
    return bias if dtype is None else bias[:, None, None, :].to(dtype)


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
        state = self._encoder(pixels, stack, ledger)
        features = state.hidden
        ledger.vision_out_frames, ledger.vision_out_tokens_per_frame = features.shape[0], features.shape[1]
        features = self.model.model.multi_modal_projector(features)
        frames, n_tok = features.shape[:2]
        stats = state.meta.pop(_POOLED_STATS, {})
        if state.grid != (0, 0) and state.grid[0] * state.grid[1] == n_tok:
            (h, w) = state.grid
            pooled = bilinear_halve(features.view(frames, h, w, -1))
            stats = {name: bilinear_halve(v.view(frames, h, w, -1).float()) for name, v in stats.items()}
        else:  # no grid left (tokens merged inside the encoder): no 2x2 pooling, one row of tokens
            pooled = features.view(frames, 1, n_tok, -1)
            stats = {name: v.view(frames, 1, n_tok, -1).float() for name, v in stats.items()}
        ph, pw = pooled.shape[1:3]
        ledger.pooled_tokens_per_frame = ph * pw
        stats = {name: torch.cat([v.reshape(frames * ph * pw, -1), v.new_zeros(1, v.shape[-1])]) for name, v in stats.items()}
        newline = self.model.model.image_newline[None, :].to(pooled.dtype)
        feats = torch.cat([pooled.reshape(frames * ph * pw, -1), newline])
        n = feats.shape[0]
        dev = feats.device
        frame = torch.arange(frames, device=dev).repeat_interleave(ph * pw)
        cells = torch.arange(ph * pw, device=dev).repeat(frames)
        minus1 = torch.tensor([-1], device=dev)
        scores, saliency = stats.get("attention"), stats.get("saliency")
        tokens = VisualTokens(
            features=feats, frame=torch.cat([frame, minus1]), row=torch.cat([cells // pw, minus1]),
            col=torch.cat([cells % pw, minus1]), is_newline=torch.arange(n, device=dev) == n - 1,
            source=torch.arange(n, device=dev), frame_sources=state.frame_sources, grid=(ph, pw),
            scores=None if scores is None else scores[:, 0], meta=state.meta, keys=stats.get("keys"),
            saliency=None if saliency is None else saliency[:, 0],
        )
        ledger.visual_tokens_before_pre_llm = n
        if stack.has_pre_llm:
            stack.pre_llm(tokens)
        ledger.visual_tokens_after_pre_llm = tokens.num_tokens
        return tokens

    def _encoder(self, pixels: Tensor, stack: CompressionStack, ledger: TokenLedger) -> EncoderState:
        """SigLIP layer by layer, frames as the batch, calling the intra-encoder hook where asked.

        The statistics strategies asked for (received attention, keys, saliency) are computed from
        each layer's input; those of the highest requested layer, as the hooks left them, go to the
        pre-LLM stage in ``state.meta[_POOLED_STATS]``.
        """
        vision = self._vision()
        layers = vision.encoder.layers
        side = self.info.vision_grid[0]
        state = EncoderState(layer=-1, num_layers=len(layers), hidden=vision.embeddings(pixels), grid=(side, side),
                             frame_sources=[[i] for i in range(pixels.shape[0])], position="input")
        ledger.input_frames = pixels.shape[0]
        ledger.embedded_tokens = state.hidden.shape[0] * state.hidden.shape[1]
        if -1 in stack.encoder_layers:
            stack.intra_encoder(state)
        wanted = {"attention": stack.encoder_attention_layers, "keys": stack.encoder_key_layers,
                  "saliency": stack.encoder_saliency_layers}
        last_wanted = {name: max(layers_, default=None) for name, layers_ in wanted.items()}
        kept: dict[str, Tensor] = {}
        for i, layer in enumerate(layers):
            entry = VisionLayerEntry(state.hidden.shape[0], state.hidden.shape[1])
            ledger.vision_layers.append(entry)
            stats = self._vision_statistics(layer, state, {name for name, ls in wanted.items() if i in ls}, ledger, i, stack)
            if i in stack.encoder_mid_layers:
                state.hidden = self._attention_block(layer, state.hidden, _log_sizes(state.sizes, state.hidden.dtype))
                state.layer, state.position = i, "attention"
                state.attention, state.keys, state.saliency = stats.get("attention"), stats.get("keys"), stats.get("saliency")
                stack.intra_encoder(state)
                entry.mlp_tokens_per_frame = state.hidden.shape[1]
                if state.hidden.shape[0] != entry.frames:
                    raise StrategyContractError(f"vision layer {i}: frames cannot change between attention and MLP")
                state.hidden = self._mlp_block(layer, state.hidden)
            else:
                state.hidden = layer(state.hidden, _log_sizes(state.sizes, state.hidden.dtype))
                state.attention, state.keys, state.saliency = stats.get("attention"), stats.get("keys"), stats.get("saliency")
            state.layer, state.position = i, "layer"
            if i in stack.encoder_layers:
                stack.intra_encoder(state)
            for name, at in last_wanted.items():
                if i == at:
                    value = getattr(state, name)
                    if value is not None:
                        kept[name] = value
            for name, value in kept.items():
                if value.shape[:2] != state.hidden.shape[:2]:
                    raise StrategyContractError(
                        f"frames or tokens changed after vision layer {last_wanted[name]}, whose {name} a strategy needs"
                    )
        state.meta[_POOLED_STATS] = kept
        return state

    def _vision_statistics(self, layer: torch.nn.Module, state: EncoderState, names: set[str], ledger: TokenLedger,
                           index: int, stack: CompressionStack) -> dict[str, Tensor]:
        """The requested statistics of one SigLIP layer from its input (q/k recomputed, never eager attention)."""
        if not names:
            return {}
        frames, tokens = state.hidden.shape[:2]
        with stack.clock.stage("token_processing"):
            attn = layer.self_attn
            q, k = self._vision_qk(layer, state.hidden, queries=bool(names & {"attention", "saliency"}))
            bias = _log_sizes(state.sizes)
            out = {}
            if "attention" in names:
                out["attention"] = received_attention(q, k, attn.scale, bias=bias)
            if "keys" in names:
                out["keys"] = head_mean(k)
            if "saliency" in names:
                out["saliency"] = mean_query_saliency(q, k, attn.scale, bias=bias)
        ledger.attention_stats.append(vision_stat_record(names, index, frames, tokens))
        return out

    @staticmethod
    def _vision_qk(layer: torch.nn.Module, hidden: Tensor, queries: bool = True) -> tuple[Tensor | None, Tensor]:
        """Queries (when asked) and keys of one SigLIP layer for its input, (frames, heads, tokens, head_dim)."""
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        shape = (*x.shape[:2], attn.num_heads, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        return (attn.q_proj(x).view(shape).transpose(1, 2) if queries else None), k

    def _received_attention(self, layer: torch.nn.Module, hidden: Tensor) -> Tensor:
        """Mean received attention of one SigLIP layer for ``hidden`` (its input), as strategies get it."""
        q, k = self._vision_qk(layer, hidden)
        return received_attention(q, k, layer.self_attn.scale)

    @staticmethod
    def _attention_block(layer: torch.nn.Module, hidden: Tensor, mask: Tensor | None) -> Tensor:
        """The first half of a SigLIP encoder layer: pre-norm self-attention plus residual."""
        out, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=mask)
        return hidden + out

    @staticmethod
    def _mlp_block(layer: torch.nn.Module, hidden: Tensor) -> Tensor:
        """The second half of a SigLIP encoder layer: pre-norm MLP plus residual."""
        return hidden + layer.mlp(layer.layer_norm2(hidden))

    def _decoder_qk(self, layer: torch.nn.Module, hidden: Tensor, position_embeddings, query_idx: Tensor,
                    past_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rotated queries of the entries ``query_idx`` (heads, Q, head_dim) and keys of every entry,
        after ``past_keys`` (a layer's cache, already rotated) when given, KV heads repeated (heads, L, head_dim)."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        n_heads = self.config.text_config.num_attention_heads
        q = attn.q_proj(x[:, query_idx]).view(1, query_idx.numel(), n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, _ = apply_rotary_pos_emb(q, q, cos[:, query_idx], sin[:, query_idx])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        if past_keys is not None:
            k = torch.cat([past_keys.to(k.dtype), k], dim=2)
        return q[0], repeat_kv(k, attn.num_key_value_groups)[0]

    def _last_token_attention(self, layer: torch.nn.Module, hidden: Tensor, position_embeddings,
                              past_keys: Tensor | None = None) -> Tensor:
        """Head-averaged attention row of the last entry over every key (and the cache's, when given)."""
        last = torch.tensor([hidden.shape[1] - 1], device=hidden.device)
        q, k = self._decoder_qk(layer, hidden, position_embeddings, last, past_keys)
        return last_query_attention(q[:, 0], k, layer.self_attn.scaling)

    def _text_attention(self, layer: torch.nn.Module, hidden: Tensor, position_embeddings, query_idx: Tensor) -> Tensor:
        """Attention from the entries ``query_idx`` (causal) to every entry, max over heads and queries."""
        q, k = self._decoder_qk(layer, hidden, position_embeddings, query_idx)
        return text_query_attention(q, k, query_idx, layer.self_attn.scaling)

    @torch.no_grad()
    def run(self, pixels: Tensor, prompt: str, stack: CompressionStack, *, max_new_tokens: int,
            min_new_tokens: int = 0, seed: int = 0, forced_ids: list[int] | None = None) -> RunOutput:
        """Encode, prefill and greedily decode; with ``forced_ids``, decode teacher-forced on those ids
        and return the model's own argmax at each step as ``new_ids`` (for fidelity)."""
        ledger = TokenLedger()
        clock = StageClock(self.device)
        stack.start(seed, clock)
        hooks = None
        try:
            with clock.stage("ttft"):
                with clock.stage("vision"):
                    tokens = self.encode(pixels, stack, ledger)
                ids, start = self.prompt_ids(prompt, tokens.num_tokens)
                embeds = self.language_model.embed_tokens(ids)
                embeds[0, start : start + tokens.num_tokens] = tokens.features.to(embeds.dtype)
                ledger.text_tokens = ids.shape[1] - tokens.num_tokens
                ledger.newline_tokens = int(tokens.is_newline.sum())
                positions = self._positions(ids.shape[1], start, tokens, ledger.visual_tokens_before_pre_llm)
                visual_mask = torch.zeros(ids.shape[1], dtype=torch.bool, device=self.device)
                visual_mask[start : start + tokens.num_tokens] = True
                visual_group = torch.full((ids.shape[1],), -1, dtype=torch.long, device=self.device)
                if tokens.group is not None:
                    visual_group[start : start + tokens.num_tokens] = tokens.group.to(self.device)
                cache = DecoderCache(config=self.language_model.config)
                hooks = attach_decoder_hooks(self, stack, cache, visual_mask, visual_group, ledger)
                with clock.stage("prefill"):
                    logits = self._prefill(embeds, positions, cache)
                    if hooks is not None:
                        hooks.end_prefill()
                    limit = len(forced_ids) if forced_ids is not None else max_new_tokens
                    first = self._choose(logits, 0, min_new_tokens)
            with clock.stage("decode"):
                new_ids = self._decode(cache, first, int(positions[0, -1]) + 1, limit, min_new_tokens, forced_ids)
        finally:
            if hooks is not None:
                hooks.remove()
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

    def _positions(self, length: int, start: int, tokens: VisualTokens, uncompressed: int) -> Tensor:
        """Position ids of the prompt: contiguous, or with the video's original positions (gaps kept)."""
        if not tokens.original_positions:
            return torch.arange(length, device=self.device)[None]
        after = length - start - tokens.num_tokens
        return torch.cat([torch.arange(start, device=self.device), start + tokens.position_offsets().to(self.device),
                          start + uncompressed + torch.arange(after, device=self.device)])[None]

    def _prefill(self, embeds: Tensor, positions: Tensor, cache) -> Tensor:
        out = self.language_model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1])

    def _choose(self, logits: Tensor, step: int, min_new_tokens: int) -> int:
        """Greedy choice; EOS is suppressed before ``min_new_tokens`` (as transformers' processor does)."""
        eos = self.eos_ids()
        if step < min_new_tokens and eos:
            logits = logits.float().clone()
            logits[:, sorted(eos)] = float("-inf")
        return int(logits.argmax(-1))

    def _decode(self, cache, first: int, next_position: int, limit: int, min_new_tokens: int,
                forced_ids: list[int] | None) -> list[int]:
        lm, eos, new_ids = self.language_model, self.eos_ids(), [first]
        for step in range(1, limit):
            fed = forced_ids[step - 1] if forced_ids is not None else new_ids[-1]
            if forced_ids is None and fed in eos:
                break
            out = lm(inputs_embeds=lm.embed_tokens(torch.tensor([[fed]], device=self.device)),
                     position_ids=torch.tensor([[next_position + step - 1]], device=self.device),
                     past_key_values=cache, use_cache=True)
            new_ids.append(self._choose(self.model.lm_head(out.last_hidden_state[:, -1]), step, min_new_tokens))
        self._sync()
        return new_ids
