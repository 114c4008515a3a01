"""Built-in model adapters, registered through tokcomp's plugin hooks like any third-party model."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from functools import partial

from tokcomp.models.base import ModelPreset

from tokcomp.hookspecs import hookimpl

_LLAVA_OV, _QWEN2_5_VL = "llava_onevision", "qwen2_5_vl"
# LLaVA-OneVision's adapter runs SigLIP layer by layer on frames x tokens (and can split a layer).
LLAVA_ONEVISION_CAPABILITIES = frozenset({"intra_encoder", "vision_split"})


def _call(module: str, function: str, spec, preset: str):
    """``tokcomp.models.<module>.<function>(spec, preset)``, importing transformers only when called."""
    return getattr(importlib.import_module(f"tokcomp.models.{module}"), function)(spec, preset)


def _bundled_dims(name: str, vision: Callable[[dict], str]) -> dict:
    from importlib.resources import files

    data = json.loads(files("tokcomp.models").joinpath("configs", f"{name}.json").read_text())
    t = data["text_config"]
    return {"vision": vision(data["vision_config"]),
            "llm": f"Qwen2 {t['num_hidden_layers']}L/{t['hidden_size']}d GQA {t['num_attention_heads']}/{t['num_key_value_heads']}"}


def _preset(name: str, family: str, module: str, summary: str, dims: dict, hub_id: str | None = None,
            capabilities: frozenset[str] = frozenset()) -> ModelPreset:
    return ModelPreset(name=name, family=family, summary=summary, capabilities=capabilities, hub_id=hub_id, dims=dims,
                       build=partial(_call, module, "build", preset=name),
                       describe=partial(_call, module, "describe", preset=name))


def _siglip(v: dict) -> str:
    return f"SigLIP {v['num_hidden_layers']}L/{v['hidden_size']}d @{v['image_size']}px"


def _qwen_vit(v: dict) -> str:
    return f"Qwen2.5-ViT {v['depth']}L/{v['hidden_size']}d window {v['window_size']}px"


@hookimpl
def tokcomp_register_models(register):
    llava = partial(_preset, family=_LLAVA_OV, module="llava_onevision", capabilities=LLAVA_ONEVISION_CAPABILITIES)
    register(llava("tiny", summary="random-weight LLaVA-OneVision built in code (byte tokenizer), for tests and the demo",
                   dims={"vision": "SigLIP 4L/32d @112px", "llm": "Qwen2 4L/64d GQA 4/2"}))
    for size in ("0.5b", "7b"):
        name = f"llava-onevision-{size}"
        register(llava(name, summary=f"LLaVA-OneVision {size.upper()}: weights: random (bundled config) or "
                                     "pretrained / hub id / path",
                       dims=_bundled_dims(name, _siglip), hub_id=f"llava-hf/llava-onevision-qwen2-{size}-ov-hf"))
    # Qwen2.5-VL's vision blocks need the full patch grid (windows, 2-D rotary): no intra-encoder hook yet.
    qwen = partial(_preset, family=_QWEN2_5_VL, module="qwen2_5_vl")
    register(qwen("qwen2.5-vl-tiny", summary="random-weight Qwen2.5-VL built in code (byte tokenizer, frames resized "
                                             "to about 112x112 px), for tests",
                  dims={"vision": "Qwen2.5-ViT 4L/32d window 56px", "llm": "Qwen2 4L/64d GQA 4/2"}))
    for size in ("3b", "7b"):
        name = f"qwen2.5-vl-{size}"
        register(qwen(name, summary=f"Qwen2.5-VL {size.upper()}-Instruct: weights: random (bundled config) or "
                                    "pretrained / hub id / path",
                      dims=_bundled_dims(name, _qwen_vit), hub_id=f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"))
