"""Run an experiment: validate everything first, then one tracked run per configuration.

Everything that can be checked before a forward pass is checked before the first one (strategy
names, parameters, hook points, layer indices against the model, the video), so a typo never
costs a half-finished experiment. A configuration that fails at run time is recorded as FAILED
with its error, and the others still run. The first configuration without strategies is the
baseline: every other configuration gets fidelity metrics against it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tokcomp.config import flatten, to_yaml
from tokcomp.errors import ConfigError, TokcompError
from tokcomp.fidelity import fidelity_metrics
from tokcomp.flops import count_all
from tokcomp.pipeline import run as run_pipeline
from tokcomp.plugins import Plugins
from tokcomp.stack import CompressionStack
from tokcomp.strategy import Strategy
from tokcomp.tables import render_table
from tokcomp.timing import PeakMemory
from tokcomp.tracking import NullTracker, Tracker, machine_tags, resolve_tracking_uri
from tokcomp.video import load_frames, sampled_fps

BASELINE = "uncompressed"


@dataclass
class ConfigurationResult:
    name: str
    status: str  # FINISHED | FAILED | SKIPPED (finished in an earlier sweep attempt)
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    text: str = ""
    new_ids: list[int] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    point: str = ""
    prefill_logits: torch.Tensor | None = None

    @property
    def label(self) -> str:
        return f"{self.name} [{self.point}]" if self.point else self.name


@dataclass
class ExperimentResult:
    name: str
    parent_run_id: str
    tracking_uri: str | None
    configurations: list[ConfigurationResult]

    @property
    def failed(self) -> list[str]:
        return [c.label for c in self.configurations if c.status == "FAILED"]


def build_strategies(plugins: Plugins, cfg: DictConfig) -> dict[str, list[Strategy]]:
    """Instantiate every configuration's strategies, rejecting unknown names, parameters and hooks.

    The baseline (no strategies) comes first so the others can be compared with it.
    """
    built: dict[str, list[Strategy]] = {}
    if cfg.baseline and BASELINE not in cfg.configurations:
        built[BASELINE] = []
    for conf_name, conf in cfg.configurations.items():
        strategies = []
        for i, spec in enumerate(conf.strategies):
            where = f"configurations.{conf_name}.strategies.{i}"
            try:
                cls = plugins.strategy(spec.name)
                strategy = cls.from_params(OmegaConf.to_container(spec.params, resolve=True))
                strategy.restrict_hooks(list(spec.hooks) if spec.hooks is not None else None)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            strategies.append(strategy)
        built[str(conf_name)] = strategies
    baseline = next((name for name, s in built.items() if not s), None)
    if baseline is not None:
        built = {baseline: built[baseline], **{k: v for k, v in built.items() if k != baseline}}
    return built


def configuration_config(cfg: DictConfig, conf_name: str) -> dict[str, Any]:
    """The resolved config of one configuration: what a run of it depends on (no tracking, no names)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    conf = data["configurations"].get(conf_name) or {"description": "no compression", "strategies": []}
    data["configurations"] = {conf_name: conf}
    for key in ("tracking", "name", "baseline"):
        data.pop(key, None)
    return data


def config_hash(cfg: DictConfig, conf_name: str) -> str:
    """Identity of one configuration's run within its resolved experiment (a sweep point):
    the whole resolved config counts, so each point keeps its own baseline and comparisons."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("tracking", None)
    text = json.dumps({"experiment": data, "configuration": conf_name}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _median_min_max(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run_metrics(outs: list[Any], peak_mb: float) -> dict[str, float]:
    """Token counts from the ledger; TTFT parts and throughput as medians over the repeats."""
    ledger = outs[-1].ledger
    metrics = {
        "tokens.vision_in": ledger.vision_tokens_in,
        "tokens.vision_out": ledger.vision_out_frames * ledger.vision_out_tokens_per_frame,
        "tokens.llm_visual": ledger.visual_tokens_after_pre_llm,
        "tokens.text": ledger.text_tokens,
        "tokens.llm_seq_first_layer": ledger.llm_layers[0],
        "tokens.llm_seq_last_layer": ledger.llm_layers[-1],
        "tokens.new": ledger.new_tokens,
        "frames.vision_out": ledger.vision_out_frames,
        "retained_ratio": ledger.retained_ratio,
        "memory.peak_mb": peak_mb,
    }
    med, lo, hi = _median_min_max([o.timings_ms["ttft_ms"] for o in outs])
    metrics.update({"ttft.total_ms": med, "ttft.total_ms_min": lo, "ttft.total_ms_max": hi})
    for part in ("vision", "token_processing", "prefill", "other"):
        metrics[f"ttft.{part}_ms"] = statistics.median(o.timings_ms[f"{part}_ms"] for o in outs)
    metrics["time.decode_ms"] = statistics.median(o.timings_ms["decode_ms"] for o in outs)
    metrics["time.total_ms"] = statistics.median(o.timings_ms["total_ms"] for o in outs)
    decoded = ledger.new_tokens - 1  # the first new token comes out of prefill
    if decoded > 0:
        rates = [decoded / (o.timings_ms["decode_ms"] / 1e3) for o in outs if o.timings_ms["decode_ms"] > 0]
        if rates:
            metrics["throughput.tokens_per_s"] = statistics.median(rates)
    return metrics


class AdapterCache:
    """Keeps the last built model, so sweep points on the same model do not rebuild it."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._adapter: Any = None

    def get(self, preset: Any, model_cfg: DictConfig, log: Callable[[str], None]) -> Any:
        key = json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True)
        if key != self._key:
            self._adapter = None  # free the old model before building the next
            log(f"building model {model_cfg.preset!r} (weights: {model_cfg.weights}, {model_cfg.dtype}, {model_cfg.device})")
            self._adapter, self._key = preset.build(model_cfg), key
        return self._adapter


class ExperimentRunner:
    def __init__(self, cfg: DictConfig, trace: bool | None = None, experiment_file: str | None = None,
                 adapters: AdapterCache | None = None):
        self.cfg = cfg
        self.experiment_file = experiment_file
        self.plugins = Plugins(list(cfg.plugins), trace=trace)
        self.preset = self.plugins.model(cfg.model.preset)
        self.strategies = build_strategies(self.plugins, cfg)
        self.trace = trace
        self.adapters = adapters or AdapterCache()
        self.adapter: Any = None
        self.video: Any = None  # tokcomp.adapter.VideoInput
        self.info: Any = None  # the model's ModelInfo for this run's video

    @property
    def generation(self) -> dict[str, int]:
        g = self.cfg.generation
        return dict(max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens, seed=self.cfg.seed)

    def prepare(self, log: Callable[[str], None] = print) -> None:
        """Check the input, build (or reuse) the model, check strategies against it, warm up."""
        cfg = self.cfg
        for key, minimum in (("warmup", 0), ("repeats", 1)):
            if cfg.timing[key] < minimum:
                raise ConfigError(f"timing.{key}={cfg.timing[key]} must be at least {minimum}")
        g = cfg.generation
        if g.max_new_tokens < 1 or not 0 <= g.min_new_tokens <= g.max_new_tokens:
            raise ConfigError(
                f"generation: need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, got "
                f"max_new_tokens={g.max_new_tokens}, min_new_tokens={g.min_new_tokens}"
            )
        frames = load_frames(cfg.input)
        if self.preset.describe is not None:  # the config and the preset's geometry alone, before any weights
            description = self.preset.describe(cfg.model)
            geometry = description.video(*frames.shape[:3])  # e.g. too few frames for a temporal patch
            self._check_strategies(description.info.for_video(geometry.grid, geometry.llm_grid))
        adapter = self.adapters.get(self.preset, cfg.model, log)
        video = adapter.preprocess(frames, fps=sampled_fps(cfg.input.video, cfg.input.frames) if cfg.input.video else None)
        self.info = adapter.info.for_video(video.grid, video.llm_grid)
        self._check_strategies(self.info)
        self.adapter, self.video = adapter, video
        for _ in range(cfg.timing.warmup):
            run_pipeline(adapter, video, cfg.input.prompt, CompressionStack([], self.info), **self.generation)

    def _check_strategies(self, info) -> None:
        for conf_name, strategies in self.strategies.items():
            for i, strategy in enumerate(strategies):
                try:
                    strategy.check_model(info)
                    strategy.check(info)
                except ConfigError as exc:
                    raise ConfigError(f"configurations.{conf_name}.strategies.{i} on model {info.name!r}: {exc}") from exc

    def base_tags(self) -> dict[str, str]:
        cfg, adapter = self.cfg, self.adapter
        tags = {**machine_tags(str(adapter.device)), "model.preset": cfg.model.preset, "model.family": adapter.family,
                "model.dtype": cfg.model.dtype,
                "model.attn_implementation": adapter.attn_implementation}
        if self.experiment_file:
            tags["tokcomp.experiment_file"] = str(self.experiment_file)
        return tags

    def run(self, log: Callable[[str], None] = print) -> ExperimentResult:
        """A plain run: one parent run, every configuration once."""
        self.prepare(log)
        tracker, uri = open_tracker(self.cfg)
        tags = self.base_tags()
        parent = tracker.start(self.cfg.name, {**tags, "tokcomp.kind": "experiment"})
        try:
            tracker.log_params(parent, flatten(OmegaConf.to_container(self.cfg, resolve=True)))
            tracker.log_text(parent, to_yaml(self.cfg), "experiment.yaml")
            results = self.run_configurations(tracker, parent, tags, log=log)
            failed = [r.label for r in results if r.status == "FAILED"]
            tracker.set_tags(parent, {"tokcomp.failed_configurations": ",".join(failed) or "none"})
            tracker.log_text(parent, format_table(results), "summary.txt")
            tracker.finish(parent, "FINISHED")
        except BaseException:
            tracker.finish(parent, "KILLED")
            raise
        return ExperimentResult(self.cfg.name, parent, uri, results)

    def run_configurations(self, tracker, parent: str, tags: dict[str, str], point: str = "",
                           finished: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                           on_done: Callable[[], None] | None = None) -> list[ConfigurationResult]:
        """Run every configuration as a child of ``parent``; ``finished`` maps config hashes to
        results of an earlier attempt, which are reused instead of run again."""
        results: list[ConfigurationResult] = []
        baseline: Callable[[], ConfigurationResult] | None = None  # loaded only when a run needs it
        for index, (conf_name, strategies) in enumerate(self.strategies.items()):
            key = config_hash(self.cfg, conf_name)
            is_baseline = not strategies and baseline is None
            if finished is not None and key in finished:
                result = finished[key](False)
                result.status, result.point = "SKIPPED", point
                log(f"[{index + 1}/{len(self.strategies)}] {conf_name} {point} (finished earlier, skipped)")
                if is_baseline:
                    baseline = functools.cache(lambda loader=finished[key]: loader(True))
            else:
                log(f"[{index + 1}/{len(self.strategies)}] {conf_name} {point}".rstrip())
                result = self._run_one(tracker, parent, tags, conf_name, strategies, key, point, is_baseline,
                                       baseline)
                if is_baseline and result.status != "FAILED":
                    baseline = functools.cache(lambda r=result: r)
            results.append(result)
            if on_done:
                on_done()
        return results

    def _run_one(self, tracker, parent, tags, conf_name, strategies, key, point, is_baseline,
                 baseline: Callable[[], ConfigurationResult] | None) -> ConfigurationResult:
        cfg, adapter = self.cfg, self.adapter
        label = f"{conf_name} [{point}]" if point else conf_name
        run_id = tracker.start(label, {
            **tags, "tokcomp.kind": "configuration", "tokcomp.configuration": conf_name, "tokcomp.label": label,
            "tokcomp.sweep_point": point, "tokcomp.config_hash": key, "tokcomp.baseline": str(is_baseline).lower(),
            "tokcomp.strategies": ",".join(s.name for s in strategies) or "none",
        }, parent=parent)
        resolved = configuration_config(cfg, conf_name)
        params = flatten({k: resolved[k] for k in ("model", "input", "generation", "timing")})
        params.update(flatten({"strategies": [s.describe() for s in strategies]}))
        params.update({"configuration": conf_name, "seed": cfg.seed})
        tracker.log_params(run_id, params)
        tracker.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")
        stack = CompressionStack(strategies, self.info, trace=self.trace)
        try:
            with PeakMemory(adapter.device) as memory:
                outs = [run_pipeline(adapter, self.video, cfg.input.prompt, stack, **self.generation)
                        for _ in range(cfg.timing.repeats)]
            out = outs[-1]
            metrics = run_metrics(outs, memory.peak_mb)
            metrics.update(self._flops_metrics(out.ledger))
            if baseline is not None and not is_baseline:
                reference = baseline()
                forced = run_pipeline(adapter, self.video, cfg.input.prompt, stack, forced_ids=reference.new_ids,
                                      **self.generation)
                metrics.update(fidelity_metrics(reference, out, forced.new_ids))
            tracker.log_metrics(run_id, metrics)
            tracker.log_json(run_id, out.ledger.to_dict(), "ledger.json")
            tracker.log_json(run_id, {"text": out.text, "new_ids": out.new_ids}, "generation.json")
            if is_baseline:
                tracker.log_tensor(run_id, out.prefill_logits, "prefill_logits.pt")
            tracker.finish(run_id, "FINISHED")
            return ConfigurationResult(conf_name, "FINISHED", run_id, metrics, out.text, out.new_ids,
                                       out.ledger.to_dict(), point=point, prefill_logits=out.prefill_logits)
        except Exception as exc:  # a configuration's failure is recorded, the experiment goes on
            message = str(exc) if isinstance(exc, TokcompError) else f"{type(exc).__name__}: {exc}"
            tracker.set_tags(run_id, {"tokcomp.error": message})
            tracker.log_text(run_id, traceback.format_exc(), "error.txt")
            tracker.finish(run_id, "FAILED")
            return ConfigurationResult(conf_name, "FAILED", run_id, error=message, point=point)
        except BaseException:
            tracker.finish(run_id, "KILLED")
            raise
        finally:
            stack.close()

    def _flops_metrics(self, ledger) -> dict[str, float]:
        return flops_metrics(ledger, self.adapter.dims)


def flops_metrics(ledger, dims) -> dict[str, float]:
    """Both protocols from the run's own ledger: ``flops.<protocol>.<part>_T``."""
    metrics = {}
    for protocol, report in count_all(ledger, dims).items():
        for key, value in report.to_dict().items():
            if key != "protocol" and value is not None:
                metrics[f"flops.{protocol}.{key}"] = value
    return metrics


def open_tracker(cfg: DictConfig):
    if not cfg.tracking.enabled:
        return NullTracker(), None
    uri = resolve_tracking_uri(cfg.tracking.uri)
    return Tracker(uri, cfg.tracking.experiment or cfg.name), uri


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[ConfigurationResult]) -> str:
    """A plain-text comparison table of one invocation (``tokcomp compare`` gives the full report)."""
    header = ["configuration", "status", "vision tok", "LLM visual", "retained", "LLM seq (first>last)",
              "TTFT ms", "vision", "tok.proc", "prefill", "other", "tok/s", "KL", "top-1", "output"]
    rows = []
    for r in results:
        if r.status == "FAILED":
            rows.append([r.label, r.status, *[""] * 12, r.error[:60]])
            continue
        m = r.metrics
        rows.append([
            r.label, r.status, f"{int(m['tokens.vision_in'])}>{int(m['tokens.vision_out'])}",
            str(int(m["tokens.llm_visual"])), f"{m['retained_ratio']:.3f}",
            f"{int(m['tokens.llm_seq_first_layer'])}>{int(m['tokens.llm_seq_last_layer'])}",
            _fmt(m.get("ttft.total_ms"), ".1f"), _fmt(m.get("ttft.vision_ms"), ".1f"),
            _fmt(m.get("ttft.token_processing_ms"), ".1f"), _fmt(m.get("ttft.prefill_ms"), ".1f"),
            _fmt(m.get("ttft.other_ms"), ".1f"), _fmt(m.get("throughput.tokens_per_s"), ".1f"),
            _fmt(m.get("fidelity.kl"), ".3f"), _fmt(100 * m["fidelity.top1_agreement"], ".0f") + "%"
            if "fidelity.top1_agreement" in m else "-", repr(r.text[:20]),
        ])
    return render_table(header, rows)
