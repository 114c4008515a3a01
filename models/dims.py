"""The sizes tokcomp's FLOPs counter needs, read from a LLaVA-OneVision config.

This lives under ``models/`` so that ``tokcomp.flops`` stays free of transformers and config
field names.
"""

from __future__ import annotations

import math
from typing import Any

from tokcomp.flops import ModelDims


def dims_from_config(config: Any) -> ModelDims:
    """``ModelDims`` of a transformers ``LlavaOnevisionConfig`` (SigLIP vision tower, Qwen2 LLM).

    The projector is Linear(vision_hidden -> llm_hidden), GELU, Linear(llm_hidden -> llm_hidden);
    pooling halves each grid side, rounding up (27 -> 14).
    """
    v, t = config.vision_config, config.text_config
    side = v.image_size // v.patch_size
    pooled_side = math.ceil(side / 2)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return ModelDims(
        vision_layers=v.num_hidden_layers, vision_hidden=v.hidden_size, vision_intermediate=v.intermediate_size,
        vision_heads=v.num_attention_heads, patch_size=v.patch_size, image_size=v.image_size,
        channels=getattr(v, "num_channels", 3), vision_tokens_per_frame=side * side,
        projector_in=v.hidden_size, projector_hidden=t.hidden_size, projector_out=t.hidden_size,
        pooled_tokens_per_frame=pooled_side * pooled_side,
        llm_layers=t.num_hidden_layers, llm_hidden=t.hidden_size, llm_intermediate=t.intermediate_size,
        llm_heads=t.num_attention_heads, llm_kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
        llm_head_dim=head_dim, vocab_size=t.vocab_size,
    )
