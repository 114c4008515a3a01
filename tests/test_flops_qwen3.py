"""The exact FLOPs protocol on Qwen3-VL against torch's FlopCounterMode.

Random-weight Qwen3-VL models built in code: a tiny one, and one with Qwen3-VL-2B's layer sizes cut to
2 vision blocks (both DeepStack layers) and 2 decoder layers. The stock vision tower (patch embedding,
blocks, merger and DeepStack mergers) and the language model on input embeddings (then ``lm_head`` on
the last position) run under ``FlopCounterMode``; the ledger of the uncompressed run is written by hand.
"""

from __future__ import annotations

import pytest
import torch
from tokcomp.models.dims import dims_from_config, dims_from_qwen3_vl_config
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from tests.test_flops_qwen import Prefill, counter, module_flops
from tokcomp.flops import TERA, count_flops
from tokcomp.ledger import TokenLedger, VisionLayerEntry

TEXT = 30


def qwen3_config(vision: dict, text: dict, attn: str) -> Qwen3VLConfig:
    vision = dict(patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, **vision)
    text = dict(bos_token_id=1, eos_token_id=2, **text)
    return Qwen3VLConfig(vision_config=vision, text_config=text, attn_implementation=attn,
                         vision_start_token_id=3, vision_end_token_id=4, image_token_id=5, video_token_id=6)


def tiny_config(attn: str = "eager") -> Qwen3VLConfig:
    return qwen3_config(
        dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, num_position_embeddings=64,
             deepstack_visual_indexes=[1, 2, 3]),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=300,
             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                              "mrope_interleaved": True}),
        attn)


def two_b_config(attn: str = "sdpa") -> Qwen3VLConfig:
    """Qwen3-VL-2B's sizes (vision 1024/4096/16 heads; Qwen3 2048/6144, GQA 16/8, head_dim 128), cut to 2 vision
    blocks (DeepStack from both) and 2 decoder layers, vocabulary cut to 4096."""
    return qwen3_config(
        dict(depth=2, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
             num_position_embeddings=2304, deepstack_visual_indexes=[0, 1]),
        dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
             head_dim=128, vocab_size=4096,
             rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                              "mrope_interleaved": True}),
        attn)


def measure(config: Qwen3VLConfig, grid: tuple[int, int, int]) -> tuple[dict, TokenLedger]:
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    v = config.vision_config
    rows, h, w = grid
    pixels = torch.randn(rows * h * w, v.in_channels * v.temporal_patch_size * v.patch_size**2)
    with torch.no_grad(), counter() as mode:
        out = model.model.visual(pixels, grid_thw=torch.tensor([grid]))
    merged = out.pooler_output.shape[0]
    assert len(out.deepstack_features) == len(v.deepstack_visual_indexes)
    vision = {"encoder": module_flops(mode, "patch_embed") + module_flops(mode, r"blocks\.\d+"),
              "projector": module_flops(mode, "merger") + module_flops(mode, r"deepstack_merger_list\.\d+"),
              "total": mode.get_total_flops()}
    length = merged + TEXT
    embeds = torch.randn(1, length, config.text_config.hidden_size)
    with torch.no_grad(), counter() as mode:
        Prefill(model)(embeds)
    llm = mode.get_total_flops()
    layers = [VisionLayerEntry(rows, h * w, attention_pairs=rows * (h * w) ** 2) for _ in range(v.depth)]
    ledger = TokenLedger(input_frames=2 * rows, embedded_tokens=rows * h * w, vision_layers=layers,
                         vision_out_frames=rows, vision_out_tokens_per_frame=h * w, pooled_tokens_per_frame=merged // rows,
                         visual_tokens_before_pre_llm=merged, visual_tokens_after_pre_llm=merged, text_tokens=TEXT,
                         special_tokens=0, uncompressed_visual_tokens=merged,
                         llm_layers=[length] * config.text_config.num_hidden_layers)
    return {**vision, "llm": llm}, ledger


@pytest.mark.parametrize("build, grid", [(tiny_config, (2, 8, 8)), (two_b_config, (2, 8, 12))],
                         ids=["tiny", "2b-widths"])
def test_exact_flops_match_flop_counter(build, grid):
    config = build()
    measured, ledger = measure(config, grid)
    dims = dims_from_qwen3_vl_config(config, grid[1:])
    report = count_flops(ledger, dims, "exact")
    assert measured["encoder"] + measured["projector"] == pytest.approx(measured["total"], rel=1e-9)
    assert report.vision_T * TERA == pytest.approx(measured["encoder"], rel=0.02)
    assert report.projector_T * TERA == pytest.approx(measured["projector"], rel=0.02)
    assert report.llm_T * TERA == pytest.approx(measured["llm"], rel=0.02)


def test_dims_from_config_dispatches_qwen3_vl():
    dims = dims_from_config(tiny_config())
    assert (dims.vision_mlp_matrices, dims.projector_group, dims.projector_count) == (2, 4, 4)
    assert dims.llm_attention_width == 4 * 16
