"""Built-in model adapters, registered through tokcomp's plugin hooks like any third-party model."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tokcomp.models.base import ModelPreset

from tokcomp.hookspecs import hookimpl

_LLAVA_OV, _QWEN2_5_VL = "llava_onevision", "qwen2_5_vl"
# LLaVA-OneVision's adapter runs SigLIP layer by layer on frames x tokens (and can split a layer); the Qwen
# adapters run their towers on any rows of temporal patches and any even patch grid, not on token subsets.
LLAVA_ONEVISION_CAPABILITIES = frozenset({"intra_encoder", "vision_split"})
QWEN_CAPABILITIES = frozenset({"intra_encoder"})
# the trained tiny model shipped inside the package (``tiny-synth``, weights: pretrained)
TINY_SYNTH_CHECKPOINT = str(Path(__file__).parent / "checkpoints" / "tiny-synth")


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
            capabilities: frozenset[str] = frozenset(), frames: int = 32) -> ModelPreset:
    return ModelPreset(name=name, family=family, summary=summary, capabilities=capabilities, hub_id=hub_id, dims=dims,
                       frames=frames, build=partial(_call, module, "build", preset=name),
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
    register(llava("tiny-synth", frames=8, hub_id=TINY_SYNTH_CHECKPOINT,
                   summary="the tiny LLaVA-OneVision a little wider, trained on the synthetic video-QA set "
                           "(tokcomp data synth): weights: pretrained (bundled, ~1 MB) or random",
                   dims={"vision": "SigLIP 4L/48d @112px", "llm": "Qwen2 4L/96d GQA 6/2"}))
    for size in ("0.5b", "7b"):
        name = f"llava-onevision-{size}"
        register(llava(name, summary=f"LLaVA-OneVision {size.upper()}: weights: random (bundled config) or "
                                     "pretrained / hub id / path",
                       dims=_bundled_dims(name, _siglip), hub_id=f"llava-hf/llava-onevision-qwen2-{size}-ov-hf"))
    # LLaVA-Video-7B-Qwen2: transformers runs it as LLaVA-OneVision (same adapter); it samples 64 frames.
    register(llava("llava-video-tiny", frames=64,
                   summary="random-weight LLaVA-Video stand-in built in code: the tiny model with an odd 7x7 patch "
                           "grid (pooled up to 4x4, as 27x27 -> 14x14) and 64 frames by default",
                   dims={"vision": "SigLIP 4L/32d @98px", "llm": "Qwen2 4L/64d GQA 4/2"}))
    register(llava("llava-video-7b", frames=64,
                   summary="LLaVA-Video-7B-Qwen2 (64 frames): weights: random (bundled config) or pretrained / hub id / "
                           "path; transformers pools it as OneVision (bilinear, one newline)",
                   dims=_bundled_dims("llava-video-7b", _siglip), hub_id="llava-hf/LLaVA-Video-7B-Qwen2-hf"))
    # Qwen2.5-VL: windows, boundaries and 2-D rotary positions are rebuilt for the rows and grid a hook leaves.
    qwen = partial(_preset, family=_QWEN2_5_VL, module="qwen2_5_vl", capabilities=QWEN_CAPABILITIES)
    register(qwen("qwen2.5-vl-tiny", summary="random-weight Qwen2.5-VL built in code (byte tokenizer, frames resized "
                                             "to about 112x112 px), for tests",
                  dims={"vision": "Qwen2.5-ViT 4L/32d window 56px", "llm": "Qwen2 4L/64d GQA 4/2"}))
    for size in ("3b", "7b"):
        name = f"qwen2.5-vl-{size}"
        register(qwen(name, summary=f"Qwen2.5-VL {size.upper()}-Instruct: weights: random (bundled config) or "
                                    "pretrained / hub id / path",
                      dims=_bundled_dims(name, _qwen_vit), hub_id=f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"))
    # Qwen3-VL: DeepStack states ride with the tokens through every drop and merge; timestamps between rows.
    qwen3 = partial(_preset, family="qwen3_vl", module="qwen3_vl", capabilities=QWEN_CAPABILITIES)
    register(qwen3("qwen3-vl-tiny", summary="random-weight Qwen3-VL built in code (byte tokenizer, DeepStack from "
                                            "3 of 4 vision blocks, frames resized to 128x128 px), for tests",
                   dims={"vision": "Qwen3-ViT 4L/32d DeepStack 1,2,3", "llm": "Qwen3 4L/64d GQA 4/2"}))
    for size in ("2b", "4b", "8b"):
        name = f"qwen3-vl-{size}"
        register(qwen3(name, summary=f"Qwen3-VL {size.upper()}-Instruct: weights: random (bundled config) or "
                                     "pretrained / hub id / path",
                       dims=_qwen3_dims(name), hub_id=f"Qwen/Qwen3-VL-{size.upper()}-Instruct"))


def _qwen3_dims(name: str) -> dict:
    """The `tokcomp list models` sizes of a bundled Qwen3-VL config."""
    from importlib.resources import files

    data = json.loads(files("tokcomp.models").joinpath("configs", f"{name}.json").read_text())
    v, t = data["vision_config"], data["text_config"]
    return {"vision": f"Qwen3-ViT {v['depth']}L/{v['hidden_size']}d DeepStack "
                      + ",".join(str(i) for i in v["deepstack_visual_indexes"]),
            "llm": f"Qwen3 {t['num_hidden_layers']}L/{t['hidden_size']}d GQA {t['num_attention_heads']}/{t['num_key_value_heads']}"}
