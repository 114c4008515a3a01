"""The attention statistics a strategy can ask for, by name: one registry for every model.

A strategy says which statistics it needs, and at which layers, with ``Strategy.statistics(info)``
(name -> layers). The framework computes each one beside the layer (q/k recomputed from the
layer's input, never by switching the model to eager attention), records the work in the ledger,
and hands it to the strategies in the field named here:

- ``vision.*``: computed at vision-encoder layers (-1 names the last one), received as
  ``EncoderState.<field>`` by the intra-encoder hook; those of the highest requested layer, as the
  hooks left them, are pooled with the features and reach the pre-LLM hook as
  ``VisualTokens.<tokens_field>``.
- ``llm.*``: computed at decoder layers during prefill, received by the inner-LLM hook as
  ``LLMState.<field>[layer]`` (one value per sequence entry).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tokcomp.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    from tokcomp.strategy import ModelInfo


@dataclass(frozen=True)
class Statistic:
    """One attention statistic: its name, where it is computed, what it is, and the field it arrives in."""

    name: str
    where: Literal["vision", "llm"]
    field: str  # EncoderState.<field> (vision) or LLMState.<field>[layer] (llm)
    summary: str
    tokens_field: str | None = None  # VisualTokens.<tokens_field>: the pooled vision statistic at pre-LLM


STATISTICS: dict[str, Statistic] = {s.name: s for s in (
    Statistic("vision.attention", "vision", "attention",
              "mean attention each token receives (over heads and queries, within its attention segment), "
              "(frames, tokens)", tokens_field="scores"),
    Statistic("vision.keys", "vision", "keys",
              "the layer's keys averaged over heads, (frames, tokens, head_dim) (ToMe's and VisionZip's metric)",
              tokens_field="keys"),
    Statistic("vision.saliency", "vision", "saliency",
              "per-row attention of the mean query to each key, averaged over heads, (frames, tokens) "
              "(FastVID's CLS-free saliency)", tokens_field="saliency"),
    Statistic("llm.last_token", "llm", "last_token_attention",
              "the last prompt token's attention row over the sequence, averaged over heads, (L,) (FastV's score)"),
    Statistic("llm.text", "llm", "text_attention",
              "attention from the text after the video to every entry, max over heads and those queries, (L,) "
              "(PruneVid's score)"),
)}

VISION: tuple[Statistic, ...] = tuple(s for s in STATISTICS.values() if s.where == "vision")


def statistic(name: str) -> Statistic:
    """The registered statistic ``name``; a ConfigError listing the known ones otherwise."""
    try:
        return STATISTICS[name]
    except KeyError:
        raise UnknownNameError("attention statistic", name, STATISTICS) from None


def collect(requests: Iterable[tuple[str, Mapping[str, Iterable[int]]]], info: ModelInfo) -> dict[str, set[int]]:
    """Every registered statistic -> the layers some request needs it at (vision -1: the last layer).

    ``requests`` are (strategy name, ``Strategy.statistics(info)``) pairs; names are checked against
    the registry and layers against the model, vision layers are wrapped to 0..n-1."""
    wanted: dict[str, set[int]] = {name: set() for name in STATISTICS}
    for who, request in requests:
        for name, layers in request.items():
            stat = statistic(name)
            count = info.vision_layers if stat.where == "vision" else info.llm_layers
            low = -count if stat.where == "vision" else 0
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int) or not low <= layer < count:
                    raise ConfigError(f"strategy {who!r} asks for {name} at layer {layer!r}, outside the "
                                      f"{stat.where} layers {low}..{count - 1} of model {info.name!r}")
                wanted[name].add(layer % count)
    return wanted
