"""What every adapter over a transformers model with a Qwen2-style decoder shares.

Dtype names, random-weight construction, the device/dtype/EOS/decoder-layer accessors, the cache
keyword of the decoder's forward (``cache`` since transformers 5.2x, where ``past_key_values`` is
deprecated for removal in 5.40; ``past_key_values`` before), greedy-decoding text with ids the
tokenizer lacks, prefill/decode through the decoder, and the rotated q/k of one decoder layer for
attention statistics. Model families add their own vision side and prompt.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from tokcomp.adapter import QK
from tokcomp.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_device(spec: Any) -> None:
    if str(spec.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={spec.device!r} but no CUDA device is available here")


def random_model(model_class: type, config: Any, dtype: torch.dtype, attn: str, seed: int,
                 device: torch.device | str = "cpu"):
    """``model_class(config)`` with seeded random weights, built directly in ``dtype`` on ``device``.

    Built where it will run: drawing a 7B model's 8e9 random numbers on one CPU thread takes minutes and
    then a 16 GB copy, on a GPU about a second. The weights of one seed therefore differ between devices
    (each has its own generator); within a device they are reproducible.
    """
    for sub in (config, *(getattr(config, name) for name in ("vision_config", "text_config"))):
        sub._attn_implementation = attn
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(config).to(dtype)
    finally:
        torch.set_default_dtype(previous)


def checkpoint_source(spec: Any, preset: str, hub_ids: dict[str, str]) -> str | None:
    """The hub id or path a build of ``preset`` loads (``weights: pretrained | <hub id> | <path>``), None
    for random weights."""
    if spec.weights == "random":
        return None
    source = hub_ids.get(preset) if spec.weights == "pretrained" else spec.weights
    if source is None:
        raise ConfigError(f"preset {preset!r} has no public checkpoint; give weights: <hub id or path>")
    return source


def load_config(config_class: type, source: str) -> Any:
    """A checkpoint's config, or a one-line ConfigError naming the source."""
    try:
        return config_class.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the config of weights {source!r}: {exc}") from exc


def build_model(model_class: type, spec: Any, source: str | None, random_config: Any) -> Any:
    """The model of a spec: random weights from ``random_config()`` (no source) or ``from_pretrained``,
    on the spec's device, in eval mode; load failures are one-line ConfigErrors."""
    dtype = torch_dtype(spec.dtype)
    check_device(spec)
    if source is None:
        model = random_model(model_class, random_config(), dtype, spec.attn_implementation, spec.seed, spec.device)
    else:
        try:
            model = model_class.from_pretrained(source, dtype=dtype, attn_implementation=spec.attn_implementation)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load weights {source!r}: {exc}") from exc
    return model.to(spec.device).eval()


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    """Decoded text; ids the tokenizer lacks (random-weight presets use a byte tokenizer) show as <id>."""
    parts, run = [], []
    for i in [*ids, None]:
        if i is not None and i < len(tokenizer):
            run.append(i)
            continue
        if run:
            parts.append(tokenizer.decode(run, skip_special_tokens=True))
            run = []
        parts.append("" if i is None else f"<{i}>")
    return "".join(parts)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding as Qwen2 applies it (halves rotated), cos/sin (1, L, head_dim) on (1, H, L, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class TransformersAdapter:
    """Base of the built-in adapters: ``self.model`` (a ...ForConditionalGeneration), ``self.config``,
    ``self.tokenizer`` and ``self.language_model`` (its Qwen2-style decoder) are set by the subclass."""

    model: Any
    config: Any
    tokenizer: Any
    language_model: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        return self.config.text_config._attn_implementation or "eager"

    @property
    def decoder_layers(self):
        return self.language_model.layers

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = self.config.text_config.eos_token_id if eos is None else eos
        return set() if eos is None else set(eos) if isinstance(eos, list | tuple) else {int(eos)}

    def decode_text(self, ids: list[int]) -> str:
        return decode_ids(self.tokenizer, ids)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.language_model.embed_tokens(ids)

    def new_cache(self):
        from tokcomp.decoding import DecoderCache

        return DecoderCache(config=self.language_model.config)

    def llm_positions(self, positions: Tensor) -> Tensor:
        """The pipeline's (R, L) position ids as the decoder's forward takes them."""
        return positions

    def forward_llm(self, embeds: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """Logits (1, vocab) of the last position, the cache updated (prefill or one decode step)."""
        keyword = getattr(type(self), "_cache_keyword", None)
        if keyword is None:
            params = inspect.signature(type(self.language_model).forward).parameters
            keyword = type(self)._cache_keyword = "cache" if "cache" in params else "past_key_values"
        out = self.language_model(inputs_embeds=embeds, position_ids=self.llm_positions(positions), use_cache=True,
                                  **{keyword: cache})
        return self.model.lm_head(out.last_hidden_state[:, -1])

    def decoder_qk(self, layer: torch.nn.Module, hidden: Tensor, position_embeddings, query_idx: Tensor,
                   past_keys: Tensor | None = None) -> QK:
        """Rotated queries of the entries ``query_idx`` (heads, Q, head_dim) and keys of every entry,
        after ``past_keys`` (a layer's cache, already rotated) when given, KV heads repeated (heads, L, head_dim).
        ``position_embeddings``: the layer's (cos, sin), (1, L, head_dim) (after M-RoPE's recomposition)."""
        attn = layer.self_attn
        q, k = self.decoder_qk_heads(attn, layer.input_layernorm(hidden), query_idx)
        cos, sin = position_embeddings
        q, k = _rotate(q, cos[:, query_idx], sin[:, query_idx]), _rotate(k, cos, sin)
        if past_keys is not None:
            k = torch.cat([past_keys.to(k.dtype), k], dim=2)
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
        return QK(q[0], k[0], attn.scaling)

    def decoder_qk_heads(self, attn: Any, x: Tensor, query_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Unrotated queries of ``query_idx`` (1, heads, Q, head_dim) and keys of every entry (1, kv, L,
        head_dim) of a decoder layer's attention on its normalised input ``x``; families whose decoders
        normalise q/k per head (Qwen3) extend this."""
        q = attn.q_proj(x[:, query_idx]).view(1, query_idx.numel(), -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        return q, k
