"""Checks of an experiment from its resolved config alone, before anything expensive happens.

Everything here runs before a video is decoded, a model is built or a tracking store is touched:
the experiment file is not empty, there is something to run, the prompt is not empty and fits the
model's context with the video's tokens (counted on the preset's weight-free description), the
device is one torch knows and has, the tracking URI has a form MLflow can open and its folder can be
created, a video path is a file, and a checkpoint that must come from the Hugging Face Hub is either
in the local cache or the hub can be reached (offline, this fails in seconds, not after retries).
Each check raises a :class:`~tokcomp.errors.TokcompError` naming the bad value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import OmegaConf

from tokcomp.errors import ConfigError, InputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_KNOWN_SCHEMES = {"", "file", "http", "https", "databricks", "databricks-uc", "uc", "sqlite", "postgresql", "mysql",
                  "mssql"}


def check_experiment(cfg: Any, preset: Any = None, experiment_file: str | Path | None = None, *,
                     run: bool = True) -> Any:
    """Every check for ``cfg``; ``run=False`` skips what only a run needs (device, tracking, context).

    Returns the preset's description when one was computed (None otherwise)."""
    if experiment_file is not None:
        check_experiment_file(experiment_file)
    if not cfg.baseline and not cfg.configurations:
        raise ConfigError("nothing to run: configurations is empty and baseline is false "
                          "(add a configuration or set baseline: true)")
    for conf_name, conf in cfg.configurations.items():
        for i, spec in enumerate(conf.strategies):
            if OmegaConf.is_missing(spec, "name") or not str(spec.name).strip():
                raise ConfigError(f"configurations.{conf_name}.strategies.{i} has no name "
                                  "(`tokcomp list strategies` lists them)")
    if not str(cfg.input.prompt or "").strip():
        raise ConfigError("input.prompt is empty: give the question to ask about the video")
    if cfg.input.video:
        check_video_path(cfg.input.video)
    check_dtype(cfg.model.dtype)
    check_attention(cfg.model.attn_implementation)
    if run:
        check_device(cfg.model.device)
        if cfg.tracking.enabled:
            check_tracking_uri(cfg.tracking.uri)
    if preset is None:
        from tokcomp.plugins import Plugins

        preset = Plugins(list(cfg.plugins)).model(cfg.model.preset)
    check_weights(cfg.model.weights, preset)
    if run and getattr(preset, "describe", None) is not None:
        description = preset.describe(cfg.model)
        check_context(cfg, description)
        return description
    return None


def check_experiment_file(path: str | Path) -> None:
    """An existing experiment file with nothing in it (or only comments) is a mistake, not the defaults."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"experiment file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return  # the loader reports it with its position
    if data is None or data == {}:
        raise ConfigError(f"experiment file {str(path)!r} is empty: give at least a model, an input or "
                          "configurations (see experiments/quickstart.yaml)")


def check_video_path(video: str | Path) -> None:
    path = Path(video)
    if path.is_dir():
        raise InputError(f"video file {str(path)!r} is a directory, not a video file (input.video)")
    if not path.is_file():
        raise InputError(f"video file {str(path)!r} does not exist (input.video)")


def check_dtype(dtype: str) -> None:
    from tokcomp.models._hf import DTYPES

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not a dtype tokcomp builds models in; use one of "
                          f"{', '.join(sorted(DTYPES))}")


def half_precision_cpu_note(dtype: str, device: str) -> str | None:
    """A one-line warning when half-precision weights will run on a CPU that has no native kernels
    for them: there torch falls back to scalar matrix products (measured on an AVX2-only EPYC:
    1.6 GFLOPS in bfloat16 against 140 in float32), so a run meant to take minutes takes hours and
    its timings measure the fallback, not the model."""
    import torch

    if dtype not in ("bfloat16", "float16") or not str(device).startswith("cpu"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("DEFAULT", "AVX2"):  # AVX512 (with BF16/AMX kernels), or a non-x86 CPU
        return None
    return (f"warning: model.dtype={dtype} on a CPU whose best vector unit is {capability}: torch has no fast "
            f"{dtype} matrix product here (tens of times slower than float32); use model.dtype=float32 for CPU timings")


def check_attention(name: str) -> None:
    """An attention implementation transformers has (a hub kernel, ``org/name``, is its to check)."""
    if "/" in str(name):
        return
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    except Exception:  # an internal registry: without it, transformers checks when the model is built
        return
    if name not in known:
        raise ConfigError(f"model.attn_implementation={name!r} is not one transformers has; use one of "
                          f"{', '.join(sorted(k for k in known if '|' not in k))}")


def check_device(device: str) -> None:
    """A device string torch parses, of a kind this machine has, with an index it has."""
    import torch

    try:
        parsed = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"model.device={device!r} is not a device torch knows: use cpu, cuda, cuda:N "
                          "or mps") from None
    kind = parsed.type
    if kind == "cpu" or kind == "meta":
        if kind == "meta":
            raise ConfigError(f"model.device={device!r} holds no data: use cpu, cuda, cuda:N or mps")
        return
    backend = getattr(torch, kind, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ConfigError(f"model.device={device!r} but no {kind} device is available here (use cpu)")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise ConfigError(f"model.device={device!r} but this machine has {count()} {kind} device(s) "
                          f"({kind}:0..{kind}:{count() - 1})")


def resolved_tracking_uri(configured: str | None) -> str:
    """The URI a run would use (config, ``$MLFLOW_TRACKING_URI``, the default), without creating anything."""
    from tokcomp.tracking import DEFAULT_TRACKING_URI

    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _known_schemes() -> set[str]:
    try:  # MLflow's own registry also holds schemes that plugins add
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return set(_tracking_store_registry._registry) | _KNOWN_SCHEMES
    except Exception:  # a private API: fall back to the schemes MLflow ships with
        return set(_KNOWN_SCHEMES)


def check_tracking_uri(configured: str | None, *, must_exist: bool = False) -> str:
    """The resolved tracking URI, after checking its form: a scheme MLflow knows, a sqlite file URI
    whose folder exists or can be created (or, with ``must_exist``, an existing store)."""
    uri = resolved_tracking_uri(configured)
    where = "tracking.uri" if configured else ("$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                                               else "the default tracking URI")
    schemes = _known_schemes()
    if uri in schemes:  # "databricks"
        return uri
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0].lower()
    if len(scheme) == 1:  # a Windows drive letter: a path
        scheme = ""
    if scheme not in schemes:
        known = ", ".join(f"{s}:" for s in sorted(schemes - {""}))
        raise ConfigError(f"{where} {uri!r} has an unknown scheme {parsed.scheme!r}: use sqlite:///path.db, "
                          f"a folder, or one of {known}")
    if scheme in ("http", "https") and not parsed.netloc:
        raise ConfigError(f"{where} {uri!r} names no host")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or len(uri.split("?", 1)[0]) == len("sqlite:///"):
            raise ConfigError(f"{where} {uri!r} is not a sqlite file URI: use sqlite:///relative/path.db "
                              "or sqlite:////absolute/path.db")
        _check_store_path(Path(uri[len("sqlite:///"):].split("?", 1)[0]), uri, where, must_exist, file=True)
    elif scheme in ("", "file"):
        path = Path(parsed.path if scheme == "file" else uri)
        _check_store_path(path, uri, where, must_exist, file=False)
    return uri


def _check_store_path(path: Path, uri: str, where: str, must_exist: bool, file: bool) -> None:
    if must_exist and not path.exists():
        raise ConfigError(f"no MLflow store at {uri}: run `tokcomp run <experiment.yaml>` first, "
                          f"or pass --tracking-uri")
    if file and path.is_dir():
        raise ConfigError(f"{where} {uri!r} names a directory, not a database file")
    if not file and path.exists() and not path.is_dir():
        raise ConfigError(f"{where} {uri!r} names a file, not a store folder")
    folder = path.parent if file else path
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ConfigError(f"{where} {uri!r}: folder {str(folder)!r} cannot be created, {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK) and not (path.exists() and os.access(path, os.W_OK)):
        raise ConfigError(f"{where} {uri!r}: {str(ancestor)!r} is not writable")


def hub_source(weights: str, preset: Any, what: str = "model.weights") -> str | None:
    """The hub id a build would download from, None for random weights or a local folder."""
    if weights == "random":
        return None
    if weights == "pretrained":
        source = getattr(preset, "hub_id", None)
        if source is None:
            raise ConfigError(f"{what}=pretrained: preset {preset.name!r} has no public checkpoint; "
                              "give weights: random, a hub id or a local folder")
        return source
    path = Path(weights).expanduser()
    if path.exists():
        return None
    if weights.startswith((".", "/", "~")) or "\\" in weights or weights.count("/") > 1:
        raise ConfigError(f"{what}={weights!r}: no such checkpoint folder")
    if not _HUB_ID.match(weights):
        raise ConfigError(f"{what}={weights!r} is not random, pretrained, an existing folder or a hub id "
                          "(org/name)")
    return weights


def check_weights(weights: str, preset: Any, what: str = "model.weights") -> None:
    """A local checkpoint folder holds a config; a hub checkpoint is cached, or the hub is reachable."""
    bundled = getattr(preset, "hub_id", None)
    if weights == "pretrained" and bundled and Path(bundled).is_absolute():  # shipped inside the package
        if not (Path(bundled) / "config.json").is_file():
            raise ConfigError(f"{what}=pretrained: preset {preset.name!r}'s bundled checkpoint is missing "
                              f"({bundled}); rebuild it with `tokcomp train-tiny --out {bundled}`")
        return
    source = hub_source(str(weights), preset, what)
    if source is None:
        path = Path(str(weights)).expanduser()
        if weights != "random":
            if not path.is_dir():
                raise ConfigError(f"{what}={weights!r} is a file: give the checkpoint's folder")
            if not (path / "config.json").is_file():
                raise ConfigError(f"{what}={weights!r} has no config.json: not a checkpoint folder")
        return
    check_hub_checkpoint(source, f"{what}={weights}" + (f" ({source})" if weights == "pretrained" else ""))


def _offline() -> bool:
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if any(v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    except Exception:
        return "~/.cache/huggingface/hub"


def check_hub_checkpoint(repo_id: str, what: str, timeout: float = 5.0) -> None:
    """``repo_id``'s config is in the local cache, or (online) the hub answers for it within seconds."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # transformers depends on it; without it from_pretrained fails anyway
        return
    cache = _hub_cache()
    try:
        cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    except Exception:  # e.g. an id the hub library rejects
        raise ConfigError(f"{what}: {repo_id!r} is not a valid hub id (org/name) or local folder") from None
    if isinstance(cached, str):
        return
    hint = (f"download it where there is a network (`hf download {repo_id} --local-dir DIR`) and point "
            f"{what.split('=')[0]} at that folder")
    if _offline():
        raise ConfigError(f"{what}: offline mode is on (HF_HUB_OFFLINE) and {repo_id!r} is not in the cache "
                          f"{cache}: {hint}")
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo_id, timeout=timeout)
    except Exception as exc:
        kind = type(exc).__name__
        if "RepositoryNotFound" in kind or "GatedRepo" in kind or "RevisionNotFound" in kind:
            raise ConfigError(f"{what}: no model {repo_id!r} on the Hugging Face Hub (private or gated: set "
                              "HF_TOKEN); or give a local folder") from None
        reason = str(exc).splitlines()[0] if str(exc) else kind
        raise ConfigError(f"{what}: the Hugging Face Hub cannot be reached ({reason}) and {repo_id!r} is not in "
                          f"the cache {cache}: {hint}") from None


def check_context(cfg: Any, description: Any) -> None:
    """The prompt's text and the video's tokens (uncompressed) and the new tokens fit the model's context."""
    context = getattr(description, "context_length", None)
    frames = cfg.input.frames
    if frames < 1:
        raise InputError(f"input.frames must be positive, got {frames}")
    if cfg.input.video:
        from tokcomp.video import video_size

        height, width = video_size(cfg.input.video)
    else:
        from tokcomp.video import uniform_frame_indices

        uniform_frame_indices(cfg.input.generated.length, frames)  # fewer frames than asked: that error first
        height, width = cfg.input.generated.height, cfg.input.generated.width
    video = description.video(frames, height, width)
    visual = video.rows * video.llm_grid[0] * video.llm_grid[1] + description.specials
    if not context:
        return
    from tokcomp.plan import prompt_text_tokens

    text = prompt_text_tokens(description, cfg.input.prompt, frames, height, width)
    new = max(int(cfg.generation.max_new_tokens), 0)
    if text + visual + new > context:
        raise ConfigError(
            f"input of {text + visual} tokens ({text} prompt text + {visual} video for input.frames={frames}) plus "
            f"generation.max_new_tokens={new} exceeds the context of model {cfg.model.preset!r} ({context} positions): "
            "use fewer input.frames or a shorter input.prompt")
