"""The strategy base class: a typed, declarative parameter set plus one method per hook point.

A strategy is a dataclass. Its fields are its parameters (validated from YAML by their type
hints); its ``tokcomp_*`` methods, marked with ``hookimpl``, are the hook points it implements;
its ``encoder_layers``/``llm_layers`` say where it wants to be called, so the pipeline calls it
only there; ``statistics`` names the attention statistics it needs and at which layers
(``tokcomp.statistics``); ``check`` validates parameters against the model (layer indices, sizes).
Score-plus-budget methods build on ``tokcomp.strategies._scorer``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

from tokcomp.errors import ConfigError, UnknownNameError

HOOK_POINTS: tuple[str, ...] = ("intra_encoder", "pre_llm", "inner_llm", "inner_llm_decode")


CAPABILITIES: dict[str, str] = {
    "intra_encoder": "the intra-encoder hook on the vision states (frames x tokens in spatial order, merge services)",
    "vision_split": "calls between a vision layer's attention and its MLP (ToMe)",
}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a strategy may know about the model it runs on and this run's video (no module paths).

    ``vision_grid`` and ``pooled_grid`` are the per-row patch grid inside the encoder and the LLM
    token grid of the video at hand (fixed for LLaVA, following the resolution for Qwen); a model's
    description before any video is seen gives those of its default input.
    """

    name: str
    vision_layers: int
    vision_grid: tuple[int, int]
    pooled_grid: tuple[int, int]
    llm_layers: int
    llm_hidden: int
    family: str = ""
    capabilities: frozenset[str] = frozenset()
    grid_multiple: int = 1  # a changed patch grid's sides must be multiples of this (Qwen's 2x2 patch merger: 2)
    capability_notes: tuple[tuple[str, str], ...] = ()  # (capability, why this model cannot offer it)

    def for_video(self, vision_grid: tuple[int, int], pooled_grid: tuple[int, int]) -> ModelInfo:
        return dataclasses.replace(self, vision_grid=tuple(vision_grid), pooled_grid=tuple(pooled_grid))


@dataclasses.dataclass
class Strategy:
    """Base class. Subclasses are ``@dataclass`` with a unique ``name``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()  # model capabilities beyond the intra-encoder hook's

    @classmethod
    def required_capabilities(cls) -> frozenset[str]:
        """What a model must offer for this strategy (``tokcomp.strategy.CAPABILITIES``)."""
        needs = set(cls.requires)
        if "intra_encoder" in cls.hook_points():
            needs.add("intra_encoder")
        return frozenset(needs)

    def check_model(self, info: ModelInfo) -> None:
        """Raise ConfigError if the model lacks a capability this strategy (as configured) needs."""
        needs = set(self.required_capabilities())
        if "intra_encoder" not in self.active_hooks():
            needs.discard("intra_encoder")
            needs.discard("vision_split")
        missing = sorted(needs - set(info.capabilities))
        if missing:
            notes = dict(info.capability_notes)
            why = "".join(f": {notes[m]}" for m in missing if m in notes)
            raise ConfigError(
                f"strategy {self.name!r} needs {', '.join(missing)} ({'; '.join(CAPABILITIES[m] for m in missing)}), "
                f"which model {info.name!r} ({info.family}) does not offer{why}"
            )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Instances are pluggy plugins, which must be hashable; identity is the right equality
        # for objects that carry per-run state. Set before @dataclass runs so it keeps them.
        super().__init_subclass__(**kwargs)
        cls.__hash__ = object.__hash__  # type: ignore[method-assign]
        cls.__eq__ = object.__eq__  # type: ignore[method-assign]

    # --- where the strategy acts (override as needed) ---------------------------------------
    def encoder_layers(self, info: ModelInfo) -> set[int]:
        """Vision layers after which ``tokcomp_intra_encoder`` must be called (-1: at the encoder input,
        after the patch and position embeddings, before layer 0)."""
        return set()

    def encoder_mid_layers(self, info: ModelInfo) -> set[int]:
        """Vision layers at which ``tokcomp_intra_encoder`` is called between attention and MLP (ToMe)."""
        return set()

    def llm_layers(self, info: ModelInfo) -> set[int]:
        """Decoder layers before which ``tokcomp_inner_llm`` must be called (prefill only)."""
        return set()

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        """The attention statistics this strategy needs: name -> layers, e.g. ``{"vision.attention": {-1}}``
        (names from ``tokcomp.statistics.STATISTICS``; a vision layer -1 is the last). Requested whichever
        of its hooks are enabled; they arrive in the fields the registry names (``state.attention``,
        ``VisualTokens.scores``, ``LLMState.last_token_attention[layer]``, ...)."""
        return {}

    def decode_layers(self, info: ModelInfo) -> set[int]:
        """Decoder layers before which ``tokcomp_inner_llm_decode`` is called on every decode step."""
        return set()

    def check(self, info: ModelInfo) -> None:
        """Raise ConfigError if the parameters do not fit this model."""

    def start(self, seed: int) -> None:
        """Called before each forward pass: reset per-run state, seed randomness."""

    # --- declared token schedules (override when counts follow from the parameters alone) ---
    def plan_intra_encoder(self, info: ModelInfo, layer: int, frames: int,
                           tokens: int) -> tuple[int, int] | tuple[int, int, tuple[int, int]]:
        """(frames, tokens per frame) after this strategy acts at vision layer ``layer``, plus the new
        patch grid (h, w) when the tokens form a grid of another shape (input pooling)."""
        raise NotImplementedError

    def plan_pre_llm(self, info: ModelInfo, tokens: Any) -> None:
        """Update a ``tokcomp.plan.PlannedTokens`` (``per_frame`` counts, ``grid``) in place; the special
        tokens are the framework's and not counted there."""
        raise NotImplementedError

    def plan_inner_llm(self, info: ModelInfo, layer: int, visual: int) -> int:
        """Visual tokens kept when acting before decoder layer ``layer`` with ``visual`` alive."""
        raise NotImplementedError

    def restrict_hooks(self, hooks: list[str] | None) -> None:
        """Enable only these hook points (from YAML ``hooks:``); each must be one it implements."""
        if hooks is None:
            return
        for hook in hooks:
            if hook not in HOOK_POINTS:
                raise UnknownNameError(f"hook point for strategy {self.name!r}", hook, HOOK_POINTS)
            if hook not in self.hook_points():
                raise ConfigError(
                    f"strategy {self.name!r} does not implement hook point {hook!r} "
                    f"(it implements: {', '.join(self.hook_points())})"
                )
        self._active_hooks = list(hooks)

    def active_hooks(self) -> list[str]:
        return getattr(self, "_active_hooks", None) or self.hook_points()

    # --- introspection --------------------------------------------------------------------
    @classmethod
    def hook_points(cls) -> list[str]:
        return [hp for hp in HOOK_POINTS if callable(getattr(cls, f"tokcomp_{hp}", None))]

    @classmethod
    def parameters(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Strategy:
        """Build from YAML parameters, rejecting unknown names and wrong types with the valid ones."""
        fields = cls.parameters()
        for key in params:
            if key not in fields:
                raise UnknownNameError(f"parameter of strategy {cls.name!r}", key, fields)
        hints = typing.get_type_hints(cls)
        values = {key: _coerce(cls.name, key, value, hints[key]) for key, value in params.items()}
        for key in ("layer", "layers"):  # layer parameters: an index, or a fraction of the depth in (0, 1)
            given = values.get(key)
            for value in given if isinstance(given, list | tuple) else [given]:
                if isinstance(value, float) and not 0.0 < value < 1.0:
                    raise ConfigError(f"strategy {cls.name!r} parameter {key!r}: {value!r} is neither a layer index "
                                      "(int) nor a fraction of the depth in (0, 1)")
        try:
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"strategy {cls.name!r}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def _coerce(strategy: str, key: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against a field's type hint; ints are accepted where floats are."""
    where = f"strategy {strategy!r} parameter {key!r}"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(strategy, key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {hint}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(strategy, key, v, item) for v in value]
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def check_ratio(strategy: str, name: str, value: float) -> None:
    """Ratios are fractions of tokens kept: 0 < r <= 1."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} is outside (0, 1]")


def depth_layer(layer: int | float, depth: int) -> int:
    """A layer index given as an int, or as a fraction of the model's depth (0 < f < 1: round(f * depth)),
    so one default fits models of any depth (PyramidDrop's 8/16/24 of 32 layers are 0.25/0.5/0.75)."""
    if isinstance(layer, float):
        if not 0.0 < layer < 1.0:
            raise ConfigError(f"layer {layer!r}: a fraction of the depth must be in (0, 1)")
        return round(layer * depth)
    return layer


def check_layer(strategy: str, name: str, layer: int | float, count: int, where: str, minimum: int = 0) -> None:
    given = layer
    layer = depth_layer(layer, count)
    if isinstance(given, float) and not minimum <= layer < count:
        raise ConfigError(f"strategy {strategy!r}: {name}={given} is {layer} of {count} {where} layers, "
                          f"outside {minimum}..{count - 1}")
    if not minimum <= layer < count:
        raise ConfigError(
            f"strategy {strategy!r}: {name}={layer} is outside the {where} layers {minimum}..{count - 1}"
        )
