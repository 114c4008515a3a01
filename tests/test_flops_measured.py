"""The exact FLOPs protocol against counts measured on real forward passes.

Two independent counters: torch's ``FlopCounterMode`` (2 per multiply-add, dispatch level, sees the
whole run including strategies) and fvcore's ``FlopCountAnalysis`` (1 per multiply-add, jit trace of
the vision encoder and of the LLM prefill). Both skip elementwise work (norms, softmax, the bilinear
pooling), as the exact protocol does. Runs decode one token after the prefill logits' token, so the
measured total is the prefill plus ``decode_per_token_T``.
"""

from __future__ import annotations

import warnings
from math import prod

import pytest
import torch
from tokcomp.models.dims import dims_from_config
from tokcomp.models.llava_onevision import bundled_config
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tests.conftest import model_spec, run_with
from tests.test_flops import OV_05B, OV_7B
from tokcomp.flops import TERA, count_flops, eq8_layer, paper_video_tokens

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # fvcore calls torch.jit.script at import
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

STRATEGY_CASES = {
    "none": [],
    "pooling": [("pooling", {"ratio": 0.25})],
    "frame_avg": [("frame_avg", {"layer": 1})],
    "fastv": [("fastv", {"layer": 2, "ratio": 0.5})],
    "topk": [("topk", {"ratio": 0.5})],
}


@pytest.fixture(scope="module")
def half(plugins):
    """The 0.5B preset (26 SigLIP layers, 24 Qwen2 layers), random fp32 weights, 112 px: built once."""
    return plugins.model("llava-onevision-0.5b").build(model_spec(image_size=112))


def adapter_and_pixels(request, name: str, frames: Tensor) -> tuple:
    """The tiny model on 8 frames, or the 0.5B preset on 2."""
    adapter = request.getfixturevalue(name)
    return adapter, adapter.preprocess(frames if name == "tiny" else frames[:2])


# Every strategy on the tiny model; on the 0.5B (~10 s to build, ~1 s a run) one case per kind of
# accounting: the plain forward, per-layer LLM lengths with LLM statistics, vision statistics.
RUN_CASES = [("tiny", case) for case in sorted(STRATEGY_CASES)] + [
    pytest.param("half", case, marks=pytest.mark.slow) for case in ("none", "fastv", "topk")]


def strategies(plugins, case: str) -> list:
    return [plugins.strategy(name).from_params(params) for name, params in STRATEGY_CASES[case]]


# ---- torch FlopCounterMode -----------------------------------------------------------------------
def _cpu_flash_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the CPU flash kernel; torch's sdpa count (QK^T and AV) fits it."""
    return sdpa_flop_count(query, key, value)


def measured_run(adapter, pixels, strategy_list) -> tuple[int, object]:
    """FLOPs torch dispatches during one run (prefill + one decode step) and the run's ledger."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = run_with(adapter, pixels, strategy_list, max_new_tokens=2)
    return counter.get_total_flops(), out.ledger


@pytest.mark.parametrize(("name", "case"), RUN_CASES)
def test_exact_protocol_agrees_with_torch_flop_counter_on_a_real_run(request, frames, plugins, name, case):
    adapter, pixels = adapter_and_pixels(request, name, frames)
    measured, ledger = measured_run(adapter, pixels, strategies(plugins, case))
    report = count_flops(ledger, dims_from_config(adapter.config), "exact")
    assert measured == pytest.approx((report.total_T + report.decode_per_token_T) * TERA, rel=0.02)


@pytest.mark.parametrize("case", ["fastv", "topk"])
def test_measured_work_beyond_the_model_forward_is_the_strategy_term(tiny, pixels, plugins, case):
    """What a run measures beyond the model's own forward is the attention statistics strategies ask for."""
    measured, ledger = measured_run(tiny, pixels, strategies(plugins, case))
    report = count_flops(ledger, dims_from_config(tiny.config), "exact")
    assert report.strategy_T > 0
    model_only = (report.total_T - report.strategy_T + report.decode_per_token_T) * TERA
    assert measured - model_only == pytest.approx(report.strategy_T * TERA, rel=0.02)


# ---- fvcore (jit trace) ----------------------------------------------------------------------------
class VisionEncoder(nn.Module):
    """Patch embedding and every encoder layer, as the adapter runs them (no post-layernorm)."""

    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision

    def forward(self, pixels: Tensor) -> Tensor:
        hidden = self.vision.embeddings(pixels)
        for layer in self.vision.encoder.layers:
            hidden = layer(hidden, None)
        return hidden


class Prefill(nn.Module):
    """Qwen2 prefill on the whole prompt and lm_head on the last position only."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.language_model, self.lm_head = language_model, lm_head

    def forward(self, embeds: Tensor) -> Tensor:
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        hidden = self.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        return self.lm_head(hidden[:, -1])


def _sdpa_macs(inputs, outputs) -> int:
    """QK^T and AV over the query heads (GQA keys are broadcast)."""
    batch, heads, queries, dim = get_shape(inputs[0])
    keys, value_dim = get_shape(inputs[1])[2], get_shape(inputs[2])[-1]
    return batch * heads * queries * keys * (dim + value_dim)


def _conv_mode_macs(inputs, outputs) -> int:
    """SigLIP's padding="valid" conv traces to aten::_convolution_mode, which fvcore does not know."""
    return prod(get_shape(outputs[0])) * prod(get_shape(inputs[1])[1:])


def fvcore_macs(module: nn.Module, *inputs: Tensor) -> int:
    """fvcore's multiply-adds; layer norms count 0 as in the exact protocol (a None handle would not
    replace fvcore's default one)."""
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(
        "aten::scaled_dot_product_attention", _sdpa_macs,
        "aten::_convolution_mode", _conv_mode_macs,
        "aten::layer_norm", lambda inputs, outputs: 0,
    )
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # jit TracerWarnings from transformers' shape checks
        return analysis.total()


@pytest.mark.parametrize("name", ["tiny", pytest.param("half", marks=pytest.mark.slow)])
def test_exact_protocol_agrees_with_fvcore_on_vision_and_llm(request, frames, name):
    adapter, pixels = adapter_and_pixels(request, name, frames)
    ledger = run_with(adapter, pixels, [], max_new_tokens=1).ledger
    report = count_flops(ledger, dims_from_config(adapter.config), "exact")
    vision = fvcore_macs(VisionEncoder(adapter.vision), pixels.pixels)
    embeds = torch.randn(1, ledger.llm_layers[0], adapter.config.text_config.hidden_size, dtype=adapter.dtype)
    llm = fvcore_macs(Prefill(adapter.language_model, adapter.model.lm_head), embeds)
    assert 2 * vision == pytest.approx(report.vision_T * TERA, rel=0.02)
    assert 2 * llm == pytest.approx(report.llm_T * TERA, rel=0.02)


# ---- dims and the paper protocol on real configs and ledgers -----------------------------------------
@pytest.mark.parametrize(("preset", "expected"), [("llava-onevision-7b", OV_7B), ("llava-onevision-0.5b", OV_05B)])
def test_dims_of_bundled_configs_are_the_paper_architectures(preset, expected):
    assert dims_from_config(bundled_config(preset)) == expected


def test_dims_of_the_tiny_model_agree_with_the_adapter_geometry(tiny):
    dims = dims_from_config(tiny.config)
    side, pooled = tiny.info.vision_grid[0], tiny.info.pooled_grid[0]
    assert (dims.vision_layers, dims.llm_layers) == (tiny.info.vision_layers, tiny.info.llm_layers)
    assert (dims.vision_tokens_per_frame, dims.pooled_tokens_per_frame) == (side * side, pooled * pooled)
    assert dims.llm_head_dim == tiny.model.model.language_model.layers[0].self_attn.head_dim


@pytest.mark.parametrize(("case", "per_frame"), [("none", 16), ("pooling", 4)])
def test_paper_protocol_sees_only_the_video_tokens_of_a_real_run(tiny, pixels, plugins, case, per_frame):
    ledger = run_with(tiny, pixels, strategies(plugins, case), max_new_tokens=1).ledger
    dims = dims_from_config(tiny.config)
    assert paper_video_tokens(ledger) == [8 * per_frame] * dims.llm_layers
    expected = dims.llm_layers * eq8_layer(8 * per_frame, dims.llm_hidden, dims.llm_intermediate)
    assert count_flops(ledger, dims, "paper").llm_T == pytest.approx(expected / TERA)
