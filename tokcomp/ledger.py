"""The token ledger: how many tokens are alive at every layer of one run.

It is the single source the FLOPs counter reads, so it records what actually ran (frames and
tokens per frame entering each vision layer, the sequence length entering each decoder layer),
not what a strategy's parameters promise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class VisionLayerEntry:
    frames: int
    tokens_per_frame: int
    mlp_tokens_per_frame: int | None = None  # set when tokens merge between attention and MLP (ToMe)
    attention_pairs: int | None = None  # sum of segment_length**2 over attention segments (windows); None: full rows

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def mlp_tokens(self) -> int:
        per_frame = self.tokens_per_frame if self.mlp_tokens_per_frame is None else self.mlp_tokens_per_frame
        return self.frames * per_frame


@dataclass
class TokenLedger:
    input_frames: int = 0
    embedded_tokens: int = 0  # patches embedded (all input frames); more than layer 0 sees if input is reduced
    vision_layers: list[VisionLayerEntry] = field(default_factory=list)
    vision_out_frames: int = 0
    vision_out_tokens_per_frame: int = 0
    pooled_tokens_per_frame: int = 0
    visual_tokens_before_pre_llm: int = 0
    visual_tokens_after_pre_llm: int = 0
    text_tokens: int = 0
    special_tokens: int = 0  # spliced with the video and kept by the framework (LLaVA-OV's newline: 1; Qwen: 0)
    uncompressed_visual_tokens: int = 0  # content tokens the uncompressed model would give the LLM for this input
    llm_layers: list[int] = field(default_factory=list)
    cache_lengths: list[int] = field(default_factory=list)  # KV entries per layer after prefill, when cut (else llm_layers)
    new_tokens: int = 0
    # Attention statistics computed for strategies (extra work outside the model's own forward):
    # {"where": "vision", "layer": i, "frames": F, "tokens": T} (mean received attention, all queries)
    # {"where": "llm", "layer": j, "seq": L} (one query row: the last token's)
    attention_stats: list[dict] = field(default_factory=list)

    @property
    def vision_tokens_in(self) -> int:
        """Tokens entering the first vision layer (all frames)."""
        return self.vision_layers[0].tokens if self.vision_layers else 0

    @property
    def retained_ratio(self) -> float:
        """Visual content tokens reaching the LLM over those the uncompressed model would give it
        (special tokens such as LLaVA's newline are kept by the framework and not counted)."""
        if self.uncompressed_visual_tokens <= 0:
            return 0.0
        return self.visual_tokens_after_pre_llm / self.uncompressed_visual_tokens

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["vision_tokens_in"] = self.vision_tokens_in
        data["retained_ratio"] = self.retained_ratio
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLedger:
        data = dict(data)
        if "newline_tokens" in data and "special_tokens" not in data:  # ledgers written before special tokens
            data["special_tokens"] = data["newline_tokens"]
            for key in ("visual_tokens_before_pre_llm", "visual_tokens_after_pre_llm"):
                if key in data:  # they counted the newline among the visual tokens
                    data[key] = max(0, data[key] - data["special_tokens"])
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["vision_layers"] = [VisionLayerEntry(**e) for e in data.get("vision_layers", [])]
        return cls(**data)


def vision_stat_record(names: set[str], layer: int, frames: int, tokens: int, pairs: int | None = None) -> dict | None:
    """The ledger entry of the statistics computed at one vision layer (received attention needs q
    and k, so it covers the keys and saliency asked for beside it; saliency covers keys). ``pairs``:
    the layer's query-key pairs when it attends within windows (received attention is computed
    window by window), None for whole rows."""
    for name, where in (("attention", "vision"), ("saliency", "vision_saliency"), ("keys", "vision_keys")):
        if name in names:
            record = {"where": where, "layer": layer, "frames": frames, "tokens": tokens}
            if where == "vision" and pairs is not None:
                record["pairs"] = pairs
            return record
    return None
