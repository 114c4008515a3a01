"""Prefill FLOPs of one run, read from its token ledger, under two protocols.

Both protocols read only the ``TokenLedger`` (what actually ran) and a ``ModelDims`` (the model's
sizes), so the counter knows nothing about any model module or strategy. All values are in T
(1e12 units). One counter serves LLaVA-OneVision (SigLIP, 2-layer projector, Qwen2) and Qwen2.5-VL
(windowed ViT on 3-D patches, 2x2 patch merger, Qwen2); ``ModelDims``' family fields
(``vision_mlp_matrices``, ``temporal_patch_size``, ``projector_group``) default to LLaVA-OV's.

``paper`` reproduces the EarlyTom tables (see ``/work/shared/specs/flops-protocol.md``, section 2):
Eq. 8, ``F(L; D, M) = 4LD^2 + 2L^2D + 2LDM`` multiply-adds counted once (no factor 2, no GQA, no
SwiGLU third matrix, no patch embedding, projector or lm_head). The vision encoder is counted as if
all of the video's patch tokens were one long sequence (all frames for LLaVA, all temporal patches
for Qwen2.5-VL, whose windows are ignored too), and the LLM sees only the video tokens (text and
special tokens such as LLaVA's newline are ignored). It reproduces the OneVision 0.5B/7B rows of
Tables 1, 2 and 6 (vanilla, VisionZip/FastVID/DyCoke, FastV, HoliTom, LLaVA-Video vanilla, and
EarlyTom's vision term given its per-layer frame counts) to within 1% after rounding to 0.1 T;
HoliTom OV-7B 25% gives 48.945, which rounds to 48.9 where the paper prints 49.0.

``exact`` counts what the hardware does in our adapter, 2 FLOPs per multiply-add: the patch
embedding (a 2-D conv, or Qwen2.5-VL's 3-D conv over 2 frames), then every encoder layer: Q/K/V/O
projections of every token, QK^T and AV over the layer's attention segments (SigLIP: each frame;
Qwen2.5-VL: 112-px windows, or whole temporal rows in its full-attention blocks, as the ledger's
``attention_pairs`` records), and the MLP (SigLIP: 2 matrices; Qwen2.5-VL: SwiGLU, 3); then the
projector (LLaVA: 2 layers on every frame token; Qwen2.5-VL: the merger's two Linears on every
concatenated 2x2 unit), the Qwen2 prefill on the whole prompt (text, visual and special tokens) with
GQA K/V, full (uncausal) L^2 attention as the kernels compute it and a 3-matrix SwiGLU MLP, plus
lm_head on the last position only. Attention statistics that strategies compute outside the model's
own forward are reported separately as ``strategy_T``. Norms, softmax, activations, rotary
embeddings and the bilinear pooling are elementwise and not counted; neither are biases.
``tests/test_flops_measured.py`` (LLaVA-OV) and ``tests/test_flops_qwen.py`` (Qwen2.5-VL, tiny and
3B layer sizes) check it against torch's FlopCounterMode: the Qwen2.5-VL terms agree exactly.

Qwen2.5-VL-7B, Table 7 (554.7 T full; 91.9 T for both average pooling and uniform subsampling to
15%; 67.7 T EarlyTom), is not reproduced and cannot be (flops-protocol.md, section 6). Applying
Eq. 8 as the paper does for LLaVA (ViT 32 x D 1280 / M 3420 on one sequence of all patches; Qwen2
28 x 3584 / 18944 on the video tokens) at its setting, 768 frames = 384 temporal rows and a
"23k-token context", with the per-row patch grids that give about 23k merged tokens (no prompt text):

====================  ========  ======  ==========================  ================
grid (px)             patches   tokens  Eq. 8 vision + LLM = total  exact (FLOPs)
====================  ========  ======  ==========================  ================
12x20 (168x280)       92 160    23 040  740.9 + 227.3 = 968.2 T     633.3 T
10x24 (140x336)       92 160    23 040  740.9 + 227.3 = 968.2 T     633.4 T
14x16 (196x224)       86 016    21 504  648.2 + 205.5 = 853.8 T     577.9 T
16x16 (224x224)       98 304    24 576  839.8 + 250.0 = 1089.8 T    690.9 T
====================  ========  ======  ==========================  ================

The single-sequence vision term alone (L = 92 160 patches; its 2L^2D part is 94% of it) exceeds the
paper's whole 554.7 T. At 15% on the 12x20 grid Eq. 8 gives 761.4 T for average pooling (encoder
kept, 3 456 LLM tokens) and 43.4 T for uniform subsampling to 116 frames (58 rows, 3 480 tokens):
the two baselines cannot share one number, yet Table 7 prints 91.9 T for both. Eq. 8 reaches 554.7 T
only at about 564 frames of that grid (16.9k tokens), where pooling to 15% would still be ~423 T.
The exact count (vision 117.5 T with windows, merger 2.05 T, LLM 513.8 T at 23 040 tokens) does not
fit either: 633.3 T full, 169.4 T pooled, 68.3 T subsampled. Section 6's solve of the two baseline
rows (only 2 x MAC counting with GQA/SwiGLU gives ~23k LLM tokens, and then a 42 T vision term, far
below the ~118 T the 92k patches cost) points to a different counter (a profiler) and an unstated
video configuration. No constant here is tuned to those numbers; ``tests/test_flops_qwen.py``
recomputes this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tokcomp.errors import ConfigError
from tokcomp.ledger import TokenLedger, VisionLayerEntry

TERA = 1e12


@dataclass(frozen=True)
class ModelDims:
    """The sizes a FLOPs count needs; built from a model config under ``tokcomp.models``.

    "Frame" fields count per encoder *row*: one input frame (LLaVA-OV) or one temporal patch of
    ``temporal_patch_size`` frames (Qwen2.5-VL). Qwen2.5-VL runs at a dynamic resolution, so its
    per-row fields (``image_size``, ``vision_tokens_per_frame``, ``pooled_tokens_per_frame``) describe
    one chosen grid, or are 0; the counter itself reads per-row counts from the ledger only.

    The fields after ``vocab_size`` have defaults that describe LLaVA-OneVision (SigLIP + a 2-layer
    projector on every token), so LLaVA dims and counts are unchanged by them.
    """

    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    patch_size: int
    image_size: int  # side (px) of the square input the per-row counts refer to; 0: dynamic resolution
    channels: int
    vision_tokens_per_frame: int  # patches per row at image_size
    projector_in: int  # width of one projector input: projector_group tokens concatenated
    projector_hidden: int
    projector_out: int
    pooled_tokens_per_frame: int  # LLM tokens per row (after pooling or merging)
    llm_layers: int
    llm_hidden: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    vocab_size: int
    vision_mlp_matrices: int = 2  # 2: fc1/fc2 (SigLIP's GELU MLP); 3: gate/up/down (Qwen2.5-VL's SwiGLU)
    temporal_patch_size: int = 1  # frames in one 3-D patch (Qwen2.5-VL: 2)
    projector_group: int = 1  # encoder tokens concatenated per projector input (Qwen2.5-VL's 2x2 merger: 4)
    vision_head_dim: int | None = None  # None: vision_hidden // vision_heads
    projector_count: int = 1  # projectors run on the same inputs (Qwen3-VL: the merger + one per DeepStack layer)

    @property
    def vision_attention_width(self) -> int:
        """Width of the vision attention space (heads x head_dim), equal to vision_hidden in both families."""
        return self.vision_hidden if self.vision_head_dim is None else self.vision_heads * self.vision_head_dim

    @property
    def patch_embed_macs(self) -> int:
        """One patch through the patch-embedding conv: a (channels x tp x p x p) -> vision_hidden matmul."""
        return self.channels * self.temporal_patch_size * self.patch_size**2 * self.vision_hidden

    @property
    def llm_attention_width(self) -> int:
        """Width of the query/attention space (heads x head_dim), equal to llm_hidden in Qwen2."""
        return self.llm_heads * self.llm_head_dim

    @property
    def llm_kv_width(self) -> int:
        """Width of K and V under GQA."""
        return self.llm_kv_heads * self.llm_head_dim


@dataclass
class FlopsReport:
    """One protocol's count for one run, in T (1e12); paper has no projector/strategy/decode terms."""

    protocol: str
    vision_T: float
    projector_T: float
    llm_T: float
    strategy_T: float
    total_T: float
    decode_per_token_T: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- paper protocol (Eq. 8, multiply-adds counted once) ------------------------------------------
def eq8_layer(length: int, hidden: int, intermediate: int) -> int:
    """Eq. 8 for one layer: Q/K/V/O as four D x D matrices, QK^T and AV, a two-matrix FFN."""
    return 4 * length * hidden**2 + 2 * length**2 * hidden + 2 * length * hidden * intermediate


def special_tokens(ledger: TokenLedger) -> int:
    """Special tokens the framework spliced in with the video (LLaVA-OV's newline: 1; Qwen2.5-VL: 0)."""
    return int(ledger.special_tokens)


def paper_video_tokens(ledger: TokenLedger) -> list[int]:
    """Video tokens alive at each decoder layer: the paper ignores text and special (newline) tokens."""
    other = ledger.text_tokens + special_tokens(ledger)
    return [max(0, n - other) for n in ledger.llm_layers]


def eq8_vision_layer(entry: VisionLayerEntry, dims: ModelDims) -> int:
    """Eq. 8 on all of the layer's tokens as one sequence, with the FFN term on the tokens the MLP saw
    (fewer when tokens merge mid-layer, as ToMe does). Windows, rows and SwiGLU are ignored, as in the paper."""
    d, m = dims.vision_hidden, dims.vision_intermediate
    return eq8_layer(entry.tokens, d, m) - 2 * (entry.tokens - entry.mlp_tokens) * d * m


def _paper(ledger: TokenLedger, dims: ModelDims) -> FlopsReport:
    vision = sum(eq8_vision_layer(e, dims) for e in ledger.vision_layers)
    llm = sum(eq8_layer(n, dims.llm_hidden, dims.llm_intermediate) for n in paper_video_tokens(ledger))
    return FlopsReport("paper", vision / TERA, 0.0, llm / TERA, 0.0, (vision + llm) / TERA, None)


# ---- exact protocol (multiply-adds of what the adapter runs; reported x2 as FLOPs) ----------------
def vision_layer_macs(frames: int, tokens: int, dims: ModelDims, mlp_tokens: int | None = None,
                      attention_pairs: int | None = None) -> int:
    """One encoder layer on ``frames`` rows of ``tokens`` each.

    Q/K/V/O projections of every token (SigLIP's four Linears, Qwen's fused qkv plus proj), QK^T and
    AV over ``attention_pairs`` query-key pairs (sum of segment_length^2 over the layer's attention
    segments: Qwen's windows, or whole rows; default every row attends fully, frames x tokens^2),
    and a ``vision_mlp_matrices``-matrix MLP. ``mlp_tokens``: tokens per row the MLP sees, when
    tokens merge between attention and MLP.
    """
    d, m, a = dims.vision_hidden, dims.vision_intermediate, dims.vision_attention_width
    mlp = tokens if mlp_tokens is None else mlp_tokens
    pairs = frames * tokens**2 if attention_pairs is None else attention_pairs
    return frames * (4 * tokens * d * a + dims.vision_mlp_matrices * mlp * d * m) + 2 * pairs * a


def vision_macs(ledger: TokenLedger, dims: ModelDims) -> int:
    """Patch embedding (a strided 2-D or 3-D conv, one matmul per patch) of the input plus every layer."""
    embedded = ledger.embedded_tokens or (ledger.vision_layers[0].tokens if ledger.vision_layers else 0)
    layers = sum(vision_layer_macs(e.frames, e.tokens_per_frame, dims, e.mlp_tokens_per_frame,
                                   e.attention_pairs) for e in ledger.vision_layers)
    return embedded * dims.patch_embed_macs + layers


def projector_macs(ledger: TokenLedger, dims: ModelDims) -> int:
    """Linear -> GELU -> Linear on every projector input leaving the encoder.

    LLaVA-OV: every frame token is one input (``projector_group`` 1); the bilinear 2x2 pooling that
    follows is an interpolation, not a matmul, so it counts 0. Qwen2.5-VL's patch merger
    concatenates the 4 patches of each 2x2 unit of a row (``projector_group`` 4) into one input
    (a partial group would be one more input); its RMSNorm counts 0. Qwen3-VL runs its merger and one
    DeepStack merger per DeepStack layer on the same inputs (``projector_count``).
    """
    group = dims.projector_group
    inputs = ledger.vision_out_frames * -(-ledger.vision_out_tokens_per_frame // group)
    per_input = dims.projector_in * dims.projector_hidden + dims.projector_hidden * dims.projector_out
    return inputs * per_input * dims.projector_count


def llm_layer_macs(length: int, dims: ModelDims) -> int:
    """One Qwen2 decoder layer on ``length`` tokens: GQA K/V, full L^2 attention, SwiGLU MLP."""
    h, a, kv, m = dims.llm_hidden, dims.llm_attention_width, dims.llm_kv_width, dims.llm_intermediate
    return 2 * length * h * a + 2 * length * h * kv + 2 * length**2 * a + 3 * length * h * m


def llm_prefill_macs(ledger: TokenLedger, dims: ModelDims) -> int:
    """Every decoder layer on the sequence that entered it, plus lm_head on the last position only."""
    return sum(llm_layer_macs(n, dims) for n in ledger.llm_layers) + dims.llm_hidden * dims.vocab_size


def decode_step_macs(ledger: TokenLedger, dims: ModelDims) -> int:
    """The first decode step: one token attending to layer j's cached ``llm_layers[j]`` keys plus itself."""
    h, a, kv, m = dims.llm_hidden, dims.llm_attention_width, dims.llm_kv_width, dims.llm_intermediate
    cached = ledger.cache_lengths or ledger.llm_layers
    per_layer = sum(2 * h * a + 2 * h * kv + 2 * (n + 1) * a + 3 * h * m for n in cached)
    return per_layer + h * dims.vocab_size


def attention_stat_macs(stat: dict, dims: ModelDims) -> int:
    """Extra work of one attention statistic a strategy asked for (softmax's exponentials not counted).

    Vision: q and k projections of every token, QK^T over the layer's query-key pairs (whole rows,
    or the ``pairs`` of its windows when the record has them) and the column sums of the
    probabilities, one multiply-add per head and pair (``received_attention`` forms them as a
    vector-matrix product); keys alone: the k projection; saliency: q and k projections and one
    (mean) query row per row. LLM: q of the last token (or of the ``queries`` text tokens after the
    video), k of every token (GQA width) and those query rows against all keys.
    """
    where = stat["where"]
    if where.startswith("vision"):
        frames, t, d, a = stat["frames"], stat["tokens"], dims.vision_hidden, dims.vision_attention_width
        if where == "vision":
            pairs = stat.get("pairs") or frames * t**2
            return frames * 2 * t * d * a + pairs * (a + dims.vision_heads)
        per_frame = {"vision_keys": t * d * a, "vision_saliency": 2 * t * d * a + t * a}.get(where)
        if per_frame is not None:
            return frames * per_frame
    if where in ("llm", "llm_text"):
        seq, h, a, q = stat["seq"], dims.llm_hidden, dims.llm_attention_width, stat.get("queries", 1)
        return q * h * a + seq * h * dims.llm_kv_width + q * seq * a
    raise ConfigError(f"attention statistic with unknown where={where!r}; expected one of "
                      "vision, vision_keys, vision_saliency, llm, llm_text")


def _exact(ledger: TokenLedger, dims: ModelDims) -> FlopsReport:
    vision = 2 * vision_macs(ledger, dims) / TERA
    projector = 2 * projector_macs(ledger, dims) / TERA
    llm = 2 * llm_prefill_macs(ledger, dims) / TERA
    strategy = 2 * sum(attention_stat_macs(s, dims) for s in ledger.attention_stats) / TERA
    decode = 2 * decode_step_macs(ledger, dims) / TERA
    return FlopsReport("exact", vision, projector, llm, strategy, vision + projector + llm + strategy, decode)


PROTOCOLS: dict[str, Callable[[TokenLedger, ModelDims], FlopsReport]] = {"paper": _paper, "exact": _exact}


def count_flops(ledger: TokenLedger, dims: ModelDims, protocol: str) -> FlopsReport:
    """Prefill FLOPs of the run ``ledger`` records, under ``protocol`` ("paper" or "exact")."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown FLOPs protocol {protocol!r}; use one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol](ledger, dims)


def count_all(ledger: TokenLedger, dims: ModelDims) -> dict[str, FlopsReport]:
    """Every protocol's report, keyed by protocol name."""
    return {name: count_flops(ledger, dims, name) for name in PROTOCOLS}
