"""What a model family provides to tokcomp: presets that build adapters.

An adapter owns every piece of model knowledge (module paths, token geometry, prompt format)
and runs the forward pass with the three hook points; the core never imports transformers
model classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelPreset:
    """A named way to build a model adapter (``tiny``, ``llava-onevision-0.5b``, ...)."""

    name: str
    family: str
    summary: str
    build: Callable[..., Any]
    describe: Callable[..., Any] | None = None  # spec -> tokcomp.adapter.ModelDescription, without weights
    hub_id: str | None = None
    capabilities: frozenset[str] = frozenset()  # tokcomp.strategy.CAPABILITIES this family's adapter offers
    dims: dict[str, Any] = field(default_factory=dict)
    # frames a run samples when the experiment leaves input.frames unset: the model's own evaluation
    # setting (LLaVA-OneVision 32, LLaVA-Video 64), so a preset switch keeps the paper's input
    frames: int = 32
