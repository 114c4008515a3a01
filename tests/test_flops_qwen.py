"""The exact FLOPs protocol on Qwen2.5-VL against torch's FlopCounterMode, and Table 7 in numbers.

Random-weight Qwen2.5-VL models are built in code from transformers' ``Qwen2_5_VLConfig``: a tiny
one, and one with Qwen2.5-VL-3B's layer sizes cut to 2 vision blocks and 2 decoder layers. The stock
``model.model.visual(pixel_values, grid_thw)`` and the language model (on ``inputs_embeds``, then
``lm_head`` on the last position) run under ``FlopCounterMode``. The ledger is written by hand from
the run's geometry; each block's attention pairs come from the ``cu_seqlens`` the model actually
passed to that block (windows, or whole rows in the full-attention blocks), captured by a hook.
"""

from __future__ import annotations

import re

import pytest
import torch
from tokcomp.models.dims import dims_from_config, dims_from_qwen2_5_vl_config
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLVisionConfig,
    SiglipVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from tokcomp.errors import ConfigError
from tokcomp.flops import TERA, ModelDims, count_flops
from tokcomp.ledger import TokenLedger, VisionLayerEntry

TEXT = 30  # prompt ids around the video (system turn, vision start/end markers, question)


def qwen_config(vision: dict, text: dict, attn: str) -> Qwen2_5_VLConfig:
    vision = dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, **vision)
    text = dict(bos_token_id=1, eos_token_id=2, **text)  # inside the cut vocabularies
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, attn_implementation=attn,
                            vision_start_token_id=3, vision_end_token_id=4, image_token_id=5, video_token_id=6)


def tiny_config(attn: str = "eager") -> Qwen2_5_VLConfig:
    """Vision depth 4 (blocks 1 and 3 full attention, 56-px windows = 2x2 merge units), Qwen2 4 layers, GQA 4/2."""
    return qwen_config(
        dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56, fullatt_block_indexes=[1, 3],
             out_hidden_size=64),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        attn)


def three_b_config(attn: str = "sdpa") -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B's sizes (vision 1280/3420/16 heads, 112-px windows; Qwen2 2048/11008, GQA 16/2),
    depth cut to 2 vision blocks (block 1 full attention) and 2 decoder layers, vocabulary cut to 4096."""
    return qwen_config(
        dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112, fullatt_block_indexes=[1],
             out_hidden_size=2048),
        dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=16,
             num_key_value_heads=2, vocab_size=4096,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        attn)


def build(config: Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


# ---- measuring ---------------------------------------------------------------------------------------
def _cpu_flash_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the CPU flash kernel; torch's sdpa count (QK^T and AV) fits it."""
    return sdpa_flop_count(query, key, value)


def counter() -> FlopCounterMode:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def module_flops(mode: FlopCounterMode, pattern: str) -> int:
    """FLOPs FlopCounterMode attributes to the modules whose dotted name ends with ``pattern`` (a regex)."""
    return sum(sum(ops.values()) for name, ops in mode.get_flop_counts().items() if re.search(rf"\.{pattern}$", name))


def capture_segments(visual) -> tuple[list[list[int]], list]:
    """Segment lengths each vision block attends within, from the ``cu_seqlens`` the model passes it."""
    segments: list[list[int]] = [[] for _ in visual.blocks]

    def hook(index):
        def record(module, args, kwargs):
            cu = kwargs["cu_seqlens"].tolist()
            segments[index] = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
        return record

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(visual.blocks)]
    return segments, handles


def measure_vision(model, grid: tuple[int, int, int]) -> dict:
    """Run the stock vision tower on random pixels of ``grid`` = (rows, h, w) patches."""
    visual, v = model.model.visual, model.config.vision_config
    rows, h, w = grid
    pixels = torch.randn(rows * h * w, v.in_channels * v.temporal_patch_size * v.patch_size**2)
    segments, handles = capture_segments(visual)
    try:
        with torch.no_grad(), counter() as mode:
            merged = visual(pixels, grid_thw=torch.tensor([grid])).pooler_output
    finally:
        for handle in handles:
            handle.remove()
    return {"total": mode.get_total_flops(), "encoder": module_flops(mode, "patch_embed") + module_flops(mode, r"blocks\.\d+"),
            "merger": module_flops(mode, "merger"), "segments": segments, "merged": merged.shape[0]}


class Prefill(nn.Module):
    """The language model on input embeddings (default 3-D positions), then lm_head on the last position."""

    def __init__(self, model):
        super().__init__()
        self.language_model, self.lm_head = model.model.language_model, model.lm_head

    def forward(self, embeds: Tensor) -> Tensor:
        hidden = self.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.lm_head(hidden[:, -1])


def measure_llm(model, length: int) -> dict:
    """Prefill of ``length`` input embeddings."""
    embeds = torch.randn(1, length, model.config.text_config.hidden_size)
    with torch.no_grad(), counter() as mode:
        Prefill(model)(embeds)
    return {"total": mode.get_total_flops(),
            "modules": module_flops(mode, r"layers\.\d+") + module_flops(mode, "lm_head")}


def ledger_of_run(grid: tuple[int, int, int], segments: list[list[int]], merged: int, text: int,
                  llm_layers: int) -> TokenLedger:
    """The ledger of an uncompressed run: rows x patches in every block, each block's attention pairs
    from its captured segments, all merged tokens and ``text`` prompt ids at every decoder layer."""
    rows, h, w = grid
    layers = [VisionLayerEntry(rows, h * w, attention_pairs=sum(n * n for n in seg)) for seg in segments]
    return TokenLedger(input_frames=2 * rows, embedded_tokens=rows * h * w, vision_layers=layers,
                       vision_out_frames=rows, vision_out_tokens_per_frame=h * w, pooled_tokens_per_frame=merged // rows,
                       visual_tokens_before_pre_llm=merged, visual_tokens_after_pre_llm=merged, text_tokens=text,
                       special_tokens=0, uncompressed_visual_tokens=merged, llm_layers=[merged + text] * llm_layers)


def check_against_measured(model, grid: tuple[int, int, int]) -> dict:
    """Measured vs analytic FLOPs of one uncompressed run; returns both for the report."""
    vision = measure_vision(model, grid)
    dims = dims_from_config(model.config)
    ledger = ledger_of_run(grid, vision["segments"], vision["merged"], TEXT, dims.llm_layers)
    llm = measure_llm(model, ledger.llm_layers[0])
    report = count_flops(ledger, dims, "exact")
    # module by module: exactly the same multiply-adds
    assert report.vision_T * TERA == pytest.approx(vision["encoder"], rel=1e-9)
    assert report.projector_T * TERA == pytest.approx(vision["merger"], rel=1e-9)
    assert report.llm_T * TERA == pytest.approx(llm["modules"], rel=1e-9)
    # whole forwards, whatever else torch dispatched (rotary tables, ...): within 2%
    assert (report.vision_T + report.projector_T) * TERA == pytest.approx(vision["total"], rel=0.02)
    assert report.llm_T * TERA == pytest.approx(llm["total"], rel=0.02)
    return {"measured": (vision["encoder"], vision["merger"], llm["total"]),
            "analytic": tuple(x * TERA for x in (report.vision_T, report.projector_T, report.llm_T))}


# ---- dims ---------------------------------------------------------------------------------------------
def test_dims_of_a_qwen2_5_vl_config():
    dims = dims_from_config(tiny_config())
    assert dims == ModelDims(
        vision_layers=4, vision_hidden=32, vision_intermediate=64, vision_heads=2, patch_size=14, image_size=0,
        channels=3, vision_tokens_per_frame=0, projector_in=128, projector_hidden=128, projector_out=64,
        pooled_tokens_per_frame=0, llm_layers=4, llm_hidden=64, llm_intermediate=128, llm_heads=4, llm_kv_heads=2,
        llm_head_dim=16, vocab_size=300, vision_mlp_matrices=3, temporal_patch_size=2, projector_group=4,
        vision_head_dim=16)
    square, wide = (dims_from_qwen2_5_vl_config(tiny_config(), grid) for grid in ((8, 8), (10, 14)))
    assert (square.image_size, square.vision_tokens_per_frame, square.pooled_tokens_per_frame) == (112, 64, 16)
    assert (wide.image_size, wide.vision_tokens_per_frame, wide.pooled_tokens_per_frame) == (0, 140, 35)


def test_dims_agree_with_the_built_model():
    model = build(tiny_config())
    dims, visual = dims_from_config(model.config), model.model.visual
    attn, lm_attn = visual.blocks[0].attn, model.model.language_model.layers[0].self_attn
    assert dims.vision_head_dim == attn.head_dim and dims.vision_attention_width == attn.proj.in_features
    assert dims.patch_embed_macs == visual.patch_embed.proj.weight.numel()
    assert (dims.projector_in, dims.projector_out) == (visual.merger.mlp[0].in_features, visual.merger.mlp[2].out_features)
    assert dims.llm_kv_width == lm_attn.k_proj.out_features and dims.llm_head_dim == lm_attn.head_dim


def test_dims_of_an_unknown_model_type_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"model_type='siglip_vision_model'.*qwen2_5_vl"):
        dims_from_config(SiglipVisionConfig())


# ---- measured cross-checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("grid", [(2, 10, 14), (3, 8, 8)], ids=["4f-140x196px", "6f-112x112px"])
def test_exact_protocol_equals_flop_counter_on_a_tiny_qwen2_5_vl(attn, grid):
    """Partial windows (a 5x7 merge grid in 2x2-unit windows) and a grid the windows tile exactly."""
    model = build(tiny_config(attn))
    result = check_against_measured(model, grid)
    assert result["measured"][0] > 0


def test_window_attention_is_what_the_vision_term_saves():
    """The same run counted as if every block attended to whole rows costs more by exactly the pairs saved."""
    model = build(tiny_config())
    grid = (2, 10, 14)
    vision = measure_vision(model, grid)
    ledger = ledger_of_run(grid, vision["segments"], vision["merged"], TEXT, 4)
    dims = dims_from_config(model.config)
    full_rows = TokenLedger(**{**ledger.__dict__, "vision_layers": [
        VisionLayerEntry(e.frames, e.tokens_per_frame) for e in ledger.vision_layers]})
    saved = sum(e.frames * e.tokens_per_frame**2 - e.attention_pairs for e in ledger.vision_layers)
    assert [e.attention_pairs for e in ledger.vision_layers[1::2]] == [2 * 140**2] * 2  # full blocks: whole rows
    assert saved > 0
    delta = count_flops(full_rows, dims, "exact").vision_T - count_flops(ledger, dims, "exact").vision_T
    assert delta * TERA == pytest.approx(2 * 2 * saved * dims.vision_hidden)


@pytest.fixture(scope="module")
def three_b():
    """~250M random fp32 parameters (1 GB), built once for both grids."""
    return build(three_b_config())


@pytest.mark.slow
@pytest.mark.parametrize("grid", [(2, 8, 12), (3, 8, 8)], ids=["4f-112x168px", "6f-112x112px"])
def test_exact_protocol_equals_flop_counter_at_qwen2_5_vl_3b_sizes(three_b, grid):
    """112x168 px: rows of 8x12 patches in two 112-px windows (64 and 32 patches); 112x112 px: one
    window per row, so windowed blocks attend to whole rows too."""
    result = check_against_measured(three_b, grid)
    assert result["measured"][0] > 0


# ---- Table 7 (Qwen2.5-VL-7B, 768 frames, "23k-token context") -------------------------------------------
QWEN25_VL_7B = ModelDims(
    vision_layers=32, vision_hidden=1280, vision_intermediate=3420, vision_heads=16, patch_size=14, image_size=0,
    channels=3, vision_tokens_per_frame=0, projector_in=5120, projector_hidden=5120, projector_out=3584,
    pooled_tokens_per_frame=0, llm_layers=28, llm_hidden=3584, llm_intermediate=18944, llm_heads=28, llm_kv_heads=4,
    llm_head_dim=128, vocab_size=152064, vision_mlp_matrices=3, temporal_patch_size=2, projector_group=4,
    vision_head_dim=80)
FULLATT_7B = (7, 15, 23, 31)


def qwen25_vl_7b_config() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's sizes (flops-protocol.md, section 3)."""
    return qwen_config(
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
             fullatt_block_indexes=list(FULLATT_7B), out_hidden_size=3584),
        dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, vocab_size=152064,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        "sdpa")


def test_dims_of_qwen2_5_vl_7b():
    assert dims_from_config(qwen25_vl_7b_config()) == QWEN25_VL_7B


@pytest.fixture(scope="module")
def window_pairs_per_row():
    """Window pairs of one row of an (h, w) patch grid under 7B's window settings, read from the
    cu_seqlens a real (narrow, 1-block) 7B-window vision tower passes its windowed block."""
    config = Qwen2_5_VLVisionConfig(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, window_size=112,
                                    fullatt_block_indexes=[], out_hidden_size=16, patch_size=14,
                                    temporal_patch_size=2, spatial_merge_size=2)
    config._attn_implementation = "sdpa"
    visual = Qwen2_5_VisionTransformerPretrainedModel(config).eval()

    def pairs(h: int, w: int) -> int:
        segments, handles = capture_segments(visual)
        with torch.no_grad():
            visual(torch.randn(h * w, 3 * 2 * 14 * 14), grid_thw=torch.tensor([[1, h, w]]))
        for handle in handles:
            handle.remove()
        return sum(n * n for n in segments[0])
    return pairs


def table7_ledger(frames: int, grid: tuple[int, int], pairs_per_row: int, keep: float = 1.0) -> TokenLedger:
    """An encoder run on ``frames`` frames of ``grid`` patches (no text: the paper protocol ignores it),
    with ``keep`` of the merged tokens reaching the LLM (average pooling keeps the encoder whole)."""
    rows, (h, w) = frames // 2, grid
    layers = [VisionLayerEntry(rows, h * w, attention_pairs=rows * (h * w) ** 2 if i in FULLATT_7B else rows * pairs_per_row)
              for i in range(32)]
    merged = rows * (h // 2) * (w // 2)
    visual = int(merged * keep)
    return TokenLedger(input_frames=frames, embedded_tokens=rows * h * w, vision_layers=layers, vision_out_frames=rows,
                       vision_out_tokens_per_frame=h * w, pooled_tokens_per_frame=(h // 2) * (w // 2),
                       visual_tokens_before_pre_llm=merged, visual_tokens_after_pre_llm=visual,
                       uncompressed_visual_tokens=merged, llm_layers=[visual] * 28)


# (patch grid per row, merged tokens at 768 frames, paper-protocol vision / LLM / total, exact total) in T
TABLE7_GRIDS = [
    ((12, 20), 23040, 740.9, 227.3, 968.2, 633.3),
    ((10, 24), 23040, 740.9, 227.3, 968.2, 633.4),
    ((14, 16), 21504, 648.2, 205.5, 853.8, 577.9),
    ((16, 16), 24576, 839.8, 250.0, 1089.8, 690.9),
]


@pytest.mark.parametrize(("grid", "tokens", "vision", "llm", "total", "exact"), TABLE7_GRIDS,
                         ids=[f"{g[0]}x{g[1]}" for g, *_ in TABLE7_GRIDS])
def test_table7_setting_under_the_paper_protocol(window_pairs_per_row, grid, tokens, vision, llm, total, exact):
    """The numbers in tokcomp.flops' docstring: Eq. 8 at 768 frames and ~23k tokens is far above 554.7 T."""
    ledger = table7_ledger(768, grid, window_pairs_per_row(*grid))
    paper, measured_like = count_flops(ledger, QWEN25_VL_7B, "paper"), count_flops(ledger, QWEN25_VL_7B, "exact")
    assert ledger.visual_tokens_after_pre_llm == tokens
    assert (paper.vision_T, paper.llm_T, paper.total_T) == pytest.approx((vision, llm, total), abs=0.05)
    assert measured_like.total_T == pytest.approx(exact, abs=0.05)
    assert paper.vision_T > 554.7 or paper.total_T > 1.5 * 554.7  # the paper's full-model number is not Eq. 8


def test_table7_baselines_cannot_share_one_number_under_the_paper_protocol(window_pairs_per_row):
    """Average pooling to 15% keeps the encoder, uniform subsampling to 15% of frames cuts it: Eq. 8
    gives 761.4 T and 43.4 T at the 12x20 grid, where Table 7 prints 91.9 T for both."""
    grid, pairs = (12, 20), window_pairs_per_row(12, 20)
    pooled = count_flops(table7_ledger(768, grid, pairs, keep=0.15), QWEN25_VL_7B, "paper").total_T
    subsampled = count_flops(table7_ledger(116, grid, pairs), QWEN25_VL_7B, "paper").total_T
    assert (pooled, subsampled) == pytest.approx((761.4, 43.4), abs=0.05)
    assert pooled > 8 * 91.9 and subsampled < 0.5 * 91.9


def test_table7_full_number_needs_about_564_frames_under_eq8(window_pairs_per_row):
    """Eq. 8 reaches 554.7 T at ~564 frames of the 12x20 grid (16.9k tokens); pooling to 15% there is ~423 T."""
    totals = {f: count_flops(table7_ledger(f, (12, 20), 0), QWEN25_VL_7B, "paper").total_T for f in (560, 568)}
    assert totals[560] < 554.7 < totals[568]
    pooled = count_flops(table7_ledger(564, (12, 20), 0, keep=0.15), QWEN25_VL_7B, "paper").total_T
    assert pooled == pytest.approx(422.9, abs=0.5)
