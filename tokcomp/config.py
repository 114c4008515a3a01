"""Experiment configuration: an OmegaConf structured schema, YAML files and dotted overrides.

Overrides follow Hydra's grammar for plain assignments (``a.b.c=value``; the value is parsed as
YAML). Keys of the fixed schema are checked and an unknown one is rejected with the valid keys at
that level; ``configurations.<name>`` and strategy ``params`` are free-form here and validated
against the strategy registry when the experiment is built.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokcomp.errors import ConfigError, UnknownNameError


@dataclass
class ModelConfig:
    preset: str = "tiny"
    weights: str = "random"  # random | pretrained | <hub id> | <local path>
    dtype: str = "float32"
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    image_size: int | None = None  # random weights only: a smaller image for speed
    seed: int = 0  # random-weight initialisation


@dataclass
class GeneratedVideoConfig:
    """A synthetic clip with known temporal structure: shots of static backgrounds and moving objects."""

    length: int = 96  # source frames before sampling
    height: int = 128
    width: int = 128
    shots: int = 3  # scene cuts = shots - 1
    objects: int = 3  # moving objects per shot
    motion: float = 1.5  # object speed in pixels per source frame (0: fully static shots)
    noise: float = 2.0  # per-frame sensor noise, in 0..255 intensity units
    seed: int = 0


@dataclass
class InputConfig:
    video: str | None = None  # a video file; null: the generated video
    frames: int | None = None  # null: the model preset's own setting (ModelPreset.frames: 32 OV, 64 LLaVA-Video)
    prompt: str = "Describe what happens in the video."
    generated: GeneratedVideoConfig = field(default_factory=GeneratedVideoConfig)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 16
    min_new_tokens: int = 0


class TimingOrder(StrEnum):
    """How the timed passes of one run's (or one sweep point's) configurations follow each other."""

    interleaved = "interleaved"  # repeat k of every configuration before repeat k+1 of any: drift hits all alike
    sequential = "sequential"  # all repeats of one configuration, then the next


@dataclass
class TimingConfig:
    # untimed passes: interleaved, of each configuration before the timed rounds; sequential, of the
    # uncompressed model before the first configuration
    warmup: int = 1
    repeats: int = 1  # timed passes per configuration; median, min, max and spread are reported
    order: TimingOrder = TimingOrder.interleaved


@dataclass
class TrackingConfig:
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db
    experiment: str | None = None  # default: the experiment's name
    enabled: bool = True


@dataclass
class RayConfig:
    """What each task asks of a Ray cluster (``--executor ray``); not part of any run's identity, so a
    sweep started locally resumes on a cluster and back."""

    num_cpus: float = 1.0  # per task (one worker holds one model); also its torch threads
    num_gpus: float | None = None  # per task; null: 1 when model.device is cuda, else 0
    workers: int | None = None  # actors (each builds its model once); null: as many as the cluster fits


# sections that say where and how a run is executed or logged, not what it computes
NOT_IDENTITY = ("tracking", "ray")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config less what does not change a result (tracking, executor resources)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IDENTITY:
        data.pop(key, None)
    return data


@dataclass
class StrategySpec:
    name: str = "???"
    params: dict[str, Any] = field(default_factory=dict)
    hooks: list[str] | None = None  # restrict to these hook points (default: all it implements)


@dataclass
class ConfigurationSpec:
    description: str = ""
    strategies: list[StrategySpec] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    baseline: bool = True  # run the uncompressed model first as configuration "uncompressed"
    configurations: dict[str, ConfigurationSpec] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _schema_keys(node: Any) -> list[str] | None:
    """Valid keys of a structured node, or None where any key is allowed."""
    if isinstance(node, DictConfig):
        kind = OmegaConf.get_type(node)
        if kind is not None and dataclasses.is_dataclass(kind):
            return [f.name for f in dataclasses.fields(kind)]
    return None


def check_key(cfg: DictConfig, dotted: str) -> None:
    """Raise with the valid keys if ``dotted`` names nothing in the schema."""
    node: Any = cfg
    walked = []
    for part in dotted.split("."):
        where = ".".join(walked) or "the experiment"
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted!r}: {part!r} is not an index of {where} (0..{len(node) - 1})")
            node = node[int(part)]
        elif isinstance(node, DictConfig):
            keys = _schema_keys(node)
            if keys is not None and part not in keys:
                raise UnknownNameError(f"key in {where} (override {dotted!r})", part, keys)
            if part not in node:
                rest = dotted.split(".")[len(walked) + 1 :]
                if any(r.isdigit() for r in rest):
                    raise UnknownNameError(f"entry of {where} (override {dotted!r})", part, [str(k) for k in node])
                return  # a new free-form key (a configuration or a parameter)
            node = node._get_node(part)
            if isinstance(node, DictConfig | ListConfig):
                pass
            else:
                node = None
        else:
            raise ConfigError(f"override {dotted!r}: {where} is a value, not a section")
        walked.append(part)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.strip(), value


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    for text in overrides:
        key, value = parse_override(text)
        check_key(cfg, key)
        parts = key.split(".")
        try:
            if any(part.isdigit() for part in parts):  # into an existing list item (checked above)
                OmegaConf.update(cfg, key, value, merge=True)
            else:  # a merge builds typed nodes for new entries (a new configuration)
                nested: Any = value
                for part in reversed(parts):
                    nested = {part: nested}
                cfg.merge_with(nested)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {text!r}: {str(exc).splitlines()[0]}") from exc
    return cfg


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> DictConfig:
    """Schema defaults, then the YAML file, then the overrides; paths resolved against the YAML's folder."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"experiment file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"experiment file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"experiment file {str(path)!r} must hold a mapping at the top level")
        _check_tree(cfg, data, "")
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"experiment file {str(path)!r}: {str(exc).splitlines()[0]}") from exc
        _resolve_paths(cfg, path.parent)
    apply_overrides(cfg, overrides or [])
    if cfg.input.frames is None:
        cfg.input.frames = preset_frames(cfg.model.preset, tuple(cfg.plugins))
    return cfg


DEFAULT_FRAMES = 32


@functools.lru_cache(maxsize=32)
def preset_frames(preset: str, plugins: tuple[str, ...] = ()) -> int:
    """The frame count preset ``preset`` samples by default, resolved once here so the resolved config
    (printed, logged, hashed for sweep resume) carries the number. An unknown preset or a plugin
    that fails to load gives the default: the preflight checks report those with their own message."""
    from tokcomp.errors import TokcompError
    from tokcomp.plugins import Plugins

    try:
        return int(getattr(Plugins(list(plugins)).model(preset), "frames", DEFAULT_FRAMES))
    except TokcompError:
        return DEFAULT_FRAMES


def _check_tree(cfg: Any, data: Any, prefix: str) -> None:
    """Reject unknown keys of a YAML file with the same message as an override would get."""
    if not isinstance(data, dict) or not isinstance(cfg, DictConfig):
        return
    keys = _schema_keys(cfg)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if keys is not None and key not in keys:
            raise UnknownNameError(f"key in {prefix.rstrip('.') or 'the experiment'}", str(key), keys)
        if key in cfg and isinstance(cfg._get_node(key), DictConfig):
            _check_tree(cfg._get_node(key), value, dotted + ".")


def _resolve_paths(cfg: DictConfig, base: Path) -> None:
    """Relative plugin and video paths in a YAML file are relative to that file when they exist there."""
    def resolve(p: str) -> str:
        candidate = base / p
        return str(candidate) if not Path(p).is_absolute() and candidate.exists() and not Path(p).exists() else p

    cfg.plugins = [resolve(p) for p in cfg.plugins]
    if cfg.input.video:
        cfg.input.video = resolve(cfg.input.video)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists to dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        if not data and prefix:
            out[prefix.rstrip(".")] = "{}"
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list):
        if not data and prefix:
            out[prefix.rstrip(".")] = "[]"
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = data
    return out
