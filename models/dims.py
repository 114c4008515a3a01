"""The sizes tokcomp's FLOPs counter needs, read from a transformers model config.

This lives under ``models/`` so that ``tokcomp.flops`` stays free of transformers and config
field names. ``dims_from_config`` dispatches on the config's ``model_type``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tokcomp.errors import ConfigError
from tokcomp.flops import ModelDims


def _scalar(value: Any) -> int:
    """A size that transformers allows as an int or a per-axis list (patch sizes): one int, all axes equal."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ConfigError(f"per-axis sizes {value!r} differ; the FLOPs counter assumes square patches")
        value = value[0]
    return int(value)


def _llm_fields(t: Any) -> dict[str, int]:
    """The Qwen2 decoder's sizes (LLaVA-OV's and Qwen2.5-VL's text configs name them alike)."""
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return dict(llm_layers=t.num_hidden_layers, llm_hidden=t.hidden_size, llm_intermediate=t.intermediate_size,
                llm_heads=t.num_attention_heads,
                llm_kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
                llm_head_dim=head_dim, vocab_size=t.vocab_size)


def dims_from_llava_onevision_config(config: Any) -> ModelDims:
    """``ModelDims`` of a transformers ``LlavaOnevisionConfig`` (SigLIP vision tower, Qwen2 LLM).

    The projector is Linear(vision_hidden -> llm_hidden), GELU, Linear(llm_hidden -> llm_hidden);
    pooling halves each grid side, rounding up (27 -> 14).
    """
    v, t = config.vision_config, config.text_config
    side = v.image_size // v.patch_size
    pooled_side = math.ceil(side / 2)
    return ModelDims(
        vision_layers=v.num_hidden_layers, vision_hidden=v.hidden_size, vision_intermediate=v.intermediate_size,
        vision_heads=v.num_attention_heads, patch_size=v.patch_size, image_size=v.image_size,
        channels=getattr(v, "num_channels", 3), vision_tokens_per_frame=side * side,
        projector_in=v.hidden_size, projector_hidden=t.hidden_size, projector_out=t.hidden_size,
        pooled_tokens_per_frame=pooled_side * pooled_side, **_llm_fields(t),
    )


def dims_from_qwen2_5_vl_config(config: Any, grid: tuple[int, int] | None = None) -> ModelDims:
    """``ModelDims`` of a transformers ``Qwen2_5_VLConfig`` (windowed ViT with a 2x2 patch merger, Qwen2 LLM).

    Vision: ``depth`` blocks of width ``hidden_size``, fused qkv + proj, a SwiGLU MLP (gate, up, down:
    3 matrices) of ``intermediate_size``; 3-D patches of ``temporal_patch_size`` x ``patch_size``^2
    pixels. The merger concatenates the ``spatial_merge_size``^2 patches of a unit:
    Linear(4 Dv -> 4 Dv), GELU, Linear(4 Dv -> ``out_hidden_size``). The LLM is Qwen2 (GQA, SwiGLU;
    q/k/v biases are not counted).

    Qwen2.5-VL has no fixed input size: ``grid`` = (h, w), patches per row, fills the per-row fields
    (``image_size`` is ``h * patch_size`` for a square grid, else 0); without it they are 0.
    """
    v = config.vision_config
    t = getattr(config, "text_config", None) or config  # 4.x configs kept the text sizes at top level
    patch, merge = _scalar(v.patch_size), int(v.spatial_merge_size)
    group = merge * merge
    h, w = grid or (0, 0)
    return ModelDims(
        vision_layers=v.depth, vision_hidden=v.hidden_size, vision_intermediate=v.intermediate_size,
        vision_heads=v.num_heads, patch_size=patch, image_size=h * patch if h == w else 0,
        channels=getattr(v, "in_channels", None) or getattr(v, "in_chans", 3), vision_tokens_per_frame=h * w,
        projector_in=group * v.hidden_size, projector_hidden=group * v.hidden_size,
        projector_out=v.out_hidden_size, pooled_tokens_per_frame=(h // merge) * (w // merge), **_llm_fields(t),
        vision_mlp_matrices=3, temporal_patch_size=_scalar(v.temporal_patch_size), projector_group=group,
        vision_head_dim=v.hidden_size // v.num_heads,
    )


def dims_from_qwen3_vl_config(config: Any, grid: tuple[int, int] | None = None) -> ModelDims:
    """``ModelDims`` of a transformers ``Qwen3VLConfig`` (ViT with full attention per row, 2x2 mergers, Qwen3 LLM).

    Vision: ``depth`` blocks of width ``hidden_size``, fused qkv + proj, a GELU MLP of 2 matrices
    (``linear_fc1``/``linear_fc2``); 3-D patches of ``temporal_patch_size`` x ``patch_size``^2 pixels;
    the learned position table is resampled by a weighted sum (elementwise, 0). The merger concatenates
    a unit's ``spatial_merge_size``^2 patches: Linear(4 Dv -> 4 Dv), GELU, Linear(4 Dv -> ``out_hidden_size``),
    and each of the ``deepstack_visual_indexes`` has its own merger of that shape on the same tokens
    (``projector_count`` = 1 + their number). The LLM is Qwen3: q/o of width heads x ``head_dim``
    (wider than ``hidden_size`` on 4B), GQA K/V, SwiGLU; q/k norms and the DeepStack additions are
    elementwise. ``grid`` = (h, w) patches per row fills the per-row fields, as for Qwen2.5-VL.
    """
    v, t = config.vision_config, config.text_config
    patch, merge = _scalar(v.patch_size), int(v.spatial_merge_size)
    group = merge * merge
    h, w = grid or (0, 0)
    return ModelDims(
        vision_layers=v.depth, vision_hidden=v.hidden_size, vision_intermediate=v.intermediate_size,
        vision_heads=v.num_heads, patch_size=patch, image_size=h * patch if h == w else 0,
        channels=getattr(v, "in_channels", 3), vision_tokens_per_frame=h * w,
        projector_in=group * v.hidden_size, projector_hidden=group * v.hidden_size,
        projector_out=v.out_hidden_size, pooled_tokens_per_frame=(h // merge) * (w // merge), **_llm_fields(t),
        vision_mlp_matrices=2, temporal_patch_size=_scalar(v.temporal_patch_size), projector_group=group,
        vision_head_dim=v.hidden_size // v.num_heads, projector_count=1 + len(v.deepstack_visual_indexes or ()),
    )


BUILDERS: dict[str, Callable[[Any], ModelDims]] = {
    "llava_onevision": dims_from_llava_onevision_config,
    "qwen2_5_vl": dims_from_qwen2_5_vl_config,
    "qwen3_vl": dims_from_qwen3_vl_config,
}


def dims_from_config(config: Any) -> ModelDims:
    """``ModelDims`` of a supported transformers config, chosen by its ``model_type``.

    Qwen2.5-VL's per-row fields stay 0 here (dynamic resolution); use ``dims_from_qwen2_5_vl_config``
    with a grid to fill them.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in BUILDERS:
        raise ConfigError(f"no FLOPs dimensions for model_type={model_type!r}; supported: {sorted(BUILDERS)}")
    return BUILDERS[model_type](config)
