"""Prefill FLOPs of one run, read from its token ledger, under two protocols.

Both protocols read only the ``TokenLedger`` (what actually ran) and a ``ModelDims`` (the model's
sizes), so the counter knows nothing about any model module or strategy. All values are in T
(1e12 units).

``paper`` reproduces the EarlyTom tables (see ``/work/shared/specs/flops-protocol.md``, section 2):
Eq. 8, ``F(L; D, M) = 4LD^2 + 2L^2D + 2LDM`` multiply-adds counted once (no factor 2, no GQA, no
SwiGLU third matrix, no patch embedding, projector or lm_head). The vision encoder is counted as if
all frames were one long sequence, and the LLM sees only the video tokens (text and the newline
token are ignored). It reproduces the OneVision 0.5B/7B rows of Tables 1, 2 and 6 (vanilla,
VisionZip/FastVID/DyCoke, FastV, HoliTom, LLaVA-Video vanilla, and EarlyTom's vision term given its
per-layer frame counts) to within 1% after rounding to 0.1 T; HoliTom OV-7B 25% gives 48.945, which
rounds to 48.9 where the paper prints 49.0.

``exact`` counts what the hardware does in our adapter, 2 FLOPs per multiply-add: the patch
embedding, SigLIP layers with per-frame attention (frames are the batch), the 2-layer projector on
every frame token, the Qwen2 prefill on the whole prompt (text, visual tokens and newline) with
GQA K/V, full (uncausal) L^2 attention as the kernels compute it and a 3-matrix SwiGLU MLP, plus
lm_head on the last position only. Attention statistics that strategies compute outside the model's
own forward are reported separately as ``strategy_T``. Norms, softmax, activations, rotary
embeddings and the bilinear pooling are elementwise and not counted.
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
    """The sizes a FLOPs count needs; built from a model config under ``tokcomp.models``."""

    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    patch_size: int
    image_size: int
    channels: int
    vision_tokens_per_frame: int
    projector_in: int
    projector_hidden: int
    projector_out: int
    pooled_tokens_per_frame: int
    llm_layers: int
    llm_hidden: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    vocab_size: int

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


def newline_tokens(ledger: TokenLedger) -> int:
    """Newline tokens among the visual tokens that reached the LLM.

    A ledger without the ``newline_tokens`` field predates it and had LLaVA-OV's single newline.
    """
    if ledger.visual_tokens_after_pre_llm <= 0:
        return 0
    return int(getattr(ledger, "newline_tokens", 1))


def paper_video_tokens(ledger: TokenLedger) -> list[int]:
    """Video tokens alive at each decoder layer: the paper ignores text and the newline token."""
    other = ledger.text_tokens + newline_tokens(ledger)
    return [max(0, n - other) for n in ledger.llm_layers]


def eq8_vision_layer(entry: VisionLayerEntry, dims: ModelDims) -> int:
    """Eq. 8 with the FFN term on the tokens the MLP saw (fewer when tokens merge mid-layer, as ToMe does)."""
    d, m = dims.vision_hidden, dims.vision_intermediate
    return eq8_layer(entry.tokens, d, m) - 2 * (entry.tokens - entry.mlp_tokens) * d * m


def _paper(ledger: TokenLedger, dims: ModelDims) -> FlopsReport:
    vision = sum(eq8_vision_layer(e, dims) for e in ledger.vision_layers)
    llm = sum(eq8_layer(n, dims.llm_hidden, dims.llm_intermediate) for n in paper_video_tokens(ledger))
    return FlopsReport("paper", vision / TERA, 0.0, llm / TERA, 0.0, (vision + llm) / TERA, None)


# ---- exact protocol (multiply-adds of what the adapter runs; reported x2 as FLOPs) ----------------
def vision_layer_macs(frames: int, tokens: int, dims: ModelDims, mlp_tokens: int | None = None) -> int:
    """One SigLIP layer on ``frames`` images of ``tokens`` each: attention stays within a frame.

    ``mlp_tokens``: tokens per frame the MLP sees, when tokens merge between attention and MLP."""
    d, m = dims.vision_hidden, dims.vision_intermediate
    mlp = tokens if mlp_tokens is None else mlp_tokens
    return frames * (4 * tokens * d**2 + 2 * tokens**2 * d + 2 * mlp * d * m)


def vision_macs(ledger: TokenLedger, dims: ModelDims) -> int:
    """Patch embedding (a strided conv, one matmul per patch) of the input frames plus every layer."""
    patch = dims.channels * dims.patch_size**2 * dims.vision_hidden
    embedded = ledger.embedded_tokens or (ledger.vision_layers[0].tokens if ledger.vision_layers else 0)
    return embedded * patch + sum(vision_layer_macs(e.frames, e.tokens_per_frame, dims, e.mlp_tokens_per_frame)
                                  for e in ledger.vision_layers)


def projector_macs(ledger: TokenLedger, dims: ModelDims) -> int:
    """Linear -> GELU -> Linear on every frame token leaving the encoder.

    The bilinear 2x2 pooling that follows is an interpolation, not a matmul, so it counts 0.
    """
    tokens = ledger.vision_out_frames * ledger.vision_out_tokens_per_frame
    per_token = dims.projector_in * dims.projector_hidden + dims.projector_hidden * dims.projector_out
    return tokens * per_token


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
    """Extra work of one attention statistic a strategy asked for (softmax and means not counted).

    Vision: q and k projections of every token and the full per-frame QK^T; keys alone: the k
    projection; saliency: q and k projections and one (mean) query row per frame. LLM: q of the
    last token (or of the ``queries`` text tokens after the video), k of every token (GQA width)
    and those query rows against all keys.
    """
    where = stat["where"]
    if where.startswith("vision"):
        t, d = stat["tokens"], dims.vision_hidden
        per_frame = {"vision": 2 * t * d**2 + t**2 * d, "vision_keys": t * d**2,
                     "vision_saliency": 2 * t * d**2 + t * d}.get(where)
        if per_frame is not None:
            return stat["frames"] * per_frame
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
