"""Built-in model adapters, registered through tokcomp's plugin hooks like any third-party model."""

from __future__ import annotations

import json
from functools import partial

from tokcomp.models.base import ModelPreset

from tokcomp.hookspecs import hookimpl

_LLAVA_OV = "llava_onevision"
# LLaVA-OneVision's adapter runs SigLIP layer by layer on frames x tokens (and can split a layer).
LLAVA_ONEVISION_CAPABILITIES = frozenset({"intra_encoder", "vision_split"})


def _build_llava_onevision(spec, preset: str):
    from tokcomp.models import llava_onevision  # heavy import (transformers) only when building

    return llava_onevision.build(spec, preset)


def _describe_llava_onevision(spec, preset: str):
    from tokcomp.models import llava_onevision

    return llava_onevision.describe(spec, preset)


def _bundled_dims(name: str) -> dict:
    from importlib.resources import files

    data = json.loads(files("tokcomp.models").joinpath("configs", f"{name}.json").read_text())
    v, t = data["vision_config"], data["text_config"]
    return {"vision": f"SigLIP {v['num_hidden_layers']}L/{v['hidden_size']}d @{v['image_size']}px",
            "llm": f"Qwen2 {t['num_hidden_layers']}L/{t['hidden_size']}d GQA {t['num_attention_heads']}/{t['num_key_value_heads']}"}


@hookimpl
def tokcomp_register_models(register):
    register(ModelPreset(
        name="tiny", family=_LLAVA_OV, capabilities=LLAVA_ONEVISION_CAPABILITIES,
        summary="random-weight LLaVA-OneVision built in code (byte tokenizer), for tests and the demo",
        build=partial(_build_llava_onevision, preset="tiny"),
        describe=partial(_describe_llava_onevision, preset="tiny"),
        dims={"vision": "SigLIP 4L/32d @112px", "llm": "Qwen2 4L/64d GQA 4/2"},
    ))
    for size in ("0.5b", "7b"):
        name = f"llava-onevision-{size}"
        register(ModelPreset(
            name=name, family=_LLAVA_OV, capabilities=LLAVA_ONEVISION_CAPABILITIES,
            summary=f"LLaVA-OneVision {size.upper()}: weights: random (bundled config) or pretrained / hub id / path",
            build=partial(_build_llava_onevision, preset=name),
            describe=partial(_describe_llava_onevision, preset=name),
            hub_id=f"llava-hf/llava-onevision-qwen2-{size}-ov-hf", dims=_bundled_dims(name),
        ))
    _register_qwen2_5_vl(register)


# ---- Qwen2.5-VL --------------------------------------------------------------------------------------
_QWEN2_5_VL = "qwen2_5_vl"


def _build_qwen2_5_vl(spec, preset: str):
    from tokcomp.models import qwen2_5_vl  # heavy import (transformers) only when building

    return qwen2_5_vl.build(spec, preset)


def _describe_qwen2_5_vl(spec, preset: str):
    from tokcomp.models import qwen2_5_vl

    return qwen2_5_vl.describe(spec, preset)


def _qwen_bundled_dims(name: str) -> dict:
    from importlib.resources import files

    data = json.loads(files("tokcomp.models").joinpath("configs", f"{name}.json").read_text())
    v, t = data["vision_config"], data["text_config"]
    return {"vision": f"Qwen2.5-ViT {v['depth']}L/{v['hidden_size']}d window {v['window_size']}px",
            "llm": f"Qwen2 {t['num_hidden_layers']}L/{t['hidden_size']}d GQA {t['num_attention_heads']}/{t['num_key_value_heads']}"}


def _register_qwen2_5_vl(register) -> None:
    # the adapter's vision blocks need the full patch grid (windows, 2-D rotary): no intra-encoder hook yet
    register(ModelPreset(
        name="qwen2.5-vl-tiny", family=_QWEN2_5_VL,
        summary="random-weight Qwen2.5-VL built in code (byte tokenizer, frames resized to about 112x112 px), for tests",
        build=partial(_build_qwen2_5_vl, preset="qwen2.5-vl-tiny"),
        describe=partial(_describe_qwen2_5_vl, preset="qwen2.5-vl-tiny"),
        dims={"vision": "Qwen2.5-ViT 4L/32d window 56px", "llm": "Qwen2 4L/64d GQA 4/2"},
    ))
    for size in ("3b", "7b"):
        name = f"qwen2.5-vl-{size}"
        register(ModelPreset(
            name=name, family=_QWEN2_5_VL,
            summary=f"Qwen2.5-VL {size.upper()}-Instruct: weights: random (bundled config) or pretrained / hub id / path",
            build=partial(_build_qwen2_5_vl, preset=name), describe=partial(_describe_qwen2_5_vl, preset=name),
            hub_id=f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct", dims=_qwen_bundled_dims(name),
        ))
