"""Qwen2.5-VL's text side: the chat template, a byte-level tokenizer built in code, and the
random-weight model configs whose vocab and special ids come from that tokenizer.

The random-weight Qwen2.5-VL presets tokenize real prompts without a download: ids 0..255 are the
256 byte symbols (GPT-2 byte alphabet, no merges), the chat and vision special tokens follow in the
order of ``SPECIAL_TOKENS``. Every id is below 300, so it lies inside the tiny vocab (sized to this
tokenizer) and inside the real 151936 / 152064 vocabularies of the bundled 3B / 7B configs, whose
special ids are pointed at it. Checkpoints bring their own tokenizer and config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokcomp.models.tiny_tokenizer import build_byte_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig

from tokcomp.errors import ConfigError

SYSTEM_PROMPT = "You are a helpful assistant."
CONFIG_DIR = Path(__file__).parent / "configs"
_TEXT_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# config field -> special token, for configs whose ids must point into this tokenizer
CONFIG_TOKEN_IDS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges plus Qwen's special tokens; deterministic ids, no files."""
    return build_byte_tokenizer(SPECIAL_TOKENS)


def special_token_ids(tokenizer) -> dict[str, int]:
    """The config fields (``video_token_id``, ...) and text ids (bos, eos, pad) that point into ``tokenizer``."""
    ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in CONFIG_TOKEN_IDS.items()}
    ids.update(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
               eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return ids


def load_tokenizer(source: str | None):
    """The tokenizer of a checkpoint (hub id or path), or with ``source=None`` the built byte tokenizer."""
    if source is None:
        return build_qwen_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of weights {source!r}: {exc}") from exc


def chat_segments(prompt: str) -> tuple[str, str]:
    """Qwen2.5-VL's chat template before and after the video placeholders (vision start / end are text)."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>",
            f"<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")


def count_text_tokens(tokenizer, prompt: str) -> int:
    """Text tokens of the chat-formatted ``prompt`` (everything but the video placeholders)."""
    return sum(len(tokenizer(part, add_special_tokens=False).input_ids) for part in chat_segments(prompt))


def tiny_config(tokenizer: Any) -> Qwen2_5_VLConfig:
    """A few-layer Qwen2.5-VL with the real structure: windowed and full-attention ViT blocks (windows
    of 2x2 merge units, 56 px), the 2x2 merger, a GQA SwiGLU decoder with M-RoPE."""
    ids = special_token_ids(tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False, **{k: ids.pop(k) for k in _TEXT_IDS})
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, hidden_act="silu", in_channels=3,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                  fullatt_block_indexes=[1, 3], out_hidden_size=64, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def bundled_config(preset: str, tokenizer: Any | None = None) -> Qwen2_5_VLConfig:
    """The bundled config of a real size; with ``tokenizer``, the special ids point into it (random weights)."""
    data = json.loads((CONFIG_DIR / f"{preset}.json").read_text())
    data.pop("_source", None)
    data.pop("model_type", None)
    if tokenizer is not None:
        ids = special_token_ids(tokenizer)
        data["text_config"].update({k: ids.pop(k) for k in _TEXT_IDS})
        data.update(ids)
    return Qwen2_5_VLConfig(**data)
