"""Run an experiment: validate everything first, then one tracked run per configuration.

Everything that can be checked before a forward pass is checked before the first one (strategy
names, parameters, hook points, layer indices against the model, the video), so a typo never
costs a half-finished experiment. A configuration that fails at run time is recorded as FAILED
with its error, and the others still run.
"""

from __future__ import annotations

import statistics
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokcomp.config import flatten, to_yaml
from tokcomp.errors import ConfigError, TokcompError
from tokcomp.plugins import Plugins
from tokcomp.stack import CompressionStack
from tokcomp.strategy import Strategy
from tokcomp.tables import render_table
from tokcomp.tracking import NullTracker, Tracker, machine_tags, resolve_tracking_uri
from tokcomp.video import load_frames


@dataclass
class ConfigurationResult:
    name: str
    status: str  # FINISHED | FAILED
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    text: str = ""
    new_ids: list[int] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class ExperimentResult:
    name: str
    parent_run_id: str
    tracking_uri: str | None
    configurations: list[ConfigurationResult]

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.configurations if c.status != "FINISHED"]


def build_strategies(plugins: Plugins, cfg: DictConfig) -> dict[str, list[Strategy]]:
    """Instantiate every configuration's strategies, rejecting unknown names, parameters and hooks."""
    built: dict[str, list[Strategy]] = {}
    if cfg.baseline and "uncompressed" not in cfg.configurations:
        built["uncompressed"] = []
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
    return built


def _metrics(out: Any, timings: dict[str, float]) -> dict[str, float]:
    ledger = out.ledger
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
    }
    metrics.update({f"time.{k}": v for k, v in timings.items()})
    return metrics


class ExperimentRunner:
    def __init__(self, cfg: DictConfig, trace: bool | None = None, experiment_file: str | None = None):
        self.cfg = cfg
        self.experiment_file = experiment_file
        self.plugins = Plugins(list(cfg.plugins), trace=trace)
        self.preset = self.plugins.model(cfg.model.preset)
        self.strategies = build_strategies(self.plugins, cfg)
        self.trace = trace

    def run(self, log: Callable[[str], None] = print) -> ExperimentResult:
        cfg = self.cfg
        frames = load_frames(cfg.input)
        for key in ("warmup", "repeats"):
            if cfg.timing[key] < (0 if key == "warmup" else 1):
                raise ConfigError(f"timing.{key}={cfg.timing[key]} is too small")
        if cfg.generation.max_new_tokens < 1 or cfg.generation.min_new_tokens > cfg.generation.max_new_tokens:
            raise ConfigError(
                f"generation: need 1 <= max_new_tokens and min_new_tokens <= max_new_tokens, got "
                f"{cfg.generation.max_new_tokens} / {cfg.generation.min_new_tokens}"
            )
        log(f"building model {cfg.model.preset!r} (weights: {cfg.model.weights}, {cfg.model.dtype}, {cfg.model.device})")
        adapter = self.preset.build(cfg.model)
        for conf_name, strategies in self.strategies.items():
            for i, strategy in enumerate(strategies):
                try:
                    strategy.check(adapter.info)
                except ConfigError as exc:
                    raise ConfigError(f"configurations.{conf_name}.strategies.{i}: {exc}") from exc
        pixels = adapter.preprocess(frames)
        gen = dict(max_new_tokens=cfg.generation.max_new_tokens, min_new_tokens=cfg.generation.min_new_tokens,
                   seed=cfg.seed)
        for _ in range(cfg.timing.warmup):
            adapter.run(pixels, cfg.input.prompt, CompressionStack([], adapter.info), **gen)

        tracker, uri = self._tracker()
        tags = {**machine_tags(str(adapter.device)), "model.preset": cfg.model.preset, "model.dtype": cfg.model.dtype,
                "model.attn_implementation": adapter.attn_implementation}
        if self.experiment_file:
            tags["tokcomp.experiment_file"] = self.experiment_file
        parent = tracker.start(cfg.name, {**tags, "tokcomp.kind": "experiment"})
        results: list[ConfigurationResult] = []
        try:
            tracker.log_params(parent, flatten(OmegaConf.to_container(cfg, resolve=True)))
            tracker.log_text(parent, to_yaml(cfg), "experiment.yaml")
            for conf_name, strategies in self.strategies.items():
                log(f"[{len(results) + 1}/{len(self.strategies)}] {conf_name}")
                results.append(self._run_one(tracker, parent, tags, adapter, pixels, conf_name, strategies, gen))
            failed = [r.name for r in results if r.status != "FINISHED"]
            tracker.set_tags(parent, {"tokcomp.failed_configurations": ",".join(failed) or "none"})
            tracker.log_text(parent, format_table(results), "summary.txt")
            tracker.finish(parent, "FINISHED")
        except BaseException:
            tracker.finish(parent, "KILLED")
            raise
        return ExperimentResult(cfg.name, parent, uri, results)

    def _tracker(self):
        if not self.cfg.tracking.enabled:
            return NullTracker(), None
        uri = resolve_tracking_uri(self.cfg.tracking.uri)
        return Tracker(uri, self.cfg.tracking.experiment or self.cfg.name), uri

    def _run_one(self, tracker, parent, tags, adapter, pixels, conf_name, strategies, gen) -> ConfigurationResult:
        cfg = self.cfg
        conf = cfg.configurations.get(conf_name) or OmegaConf.create({"description": "no compression", "strategies": []})
        run_id = tracker.start(conf_name, {**tags, "tokcomp.kind": "configuration",
                                           "tokcomp.configuration": conf_name,
                                           "tokcomp.strategies": ",".join(s.name for s in strategies) or "none"},
                               parent=parent)
        params = flatten({k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "input", "generation", "timing")})
        params.update(flatten({"strategies": [s.describe() for s in strategies]}))
        params["configuration"] = conf_name
        params["seed"] = cfg.seed
        tracker.log_params(run_id, params)
        single = OmegaConf.to_container(cfg, resolve=True)
        single["configurations"] = {conf_name: OmegaConf.to_container(conf, resolve=True)}
        tracker.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(single)), "config.yaml")
        stack = CompressionStack(strategies, adapter.info, trace=self.trace)
        try:
            outs = [adapter.run(pixels, cfg.input.prompt, stack, **gen) for _ in range(cfg.timing.repeats)]
            out = outs[-1]
            timings = {k: statistics.median(o.timings_ms[k] for o in outs) for k in out.timings_ms}
            metrics = _metrics(out, timings)
            tracker.log_metrics(run_id, metrics)
            tracker.log_json(run_id, out.ledger.to_dict(), "ledger.json")
            tracker.log_json(run_id, {"text": out.text, "new_ids": out.new_ids}, "generation.json")
            tracker.finish(run_id, "FINISHED")
            return ConfigurationResult(conf_name, "FINISHED", run_id, metrics, out.text, out.new_ids, out.ledger.to_dict())
        except Exception as exc:  # a configuration's failure is recorded, the experiment goes on
            message = str(exc) if isinstance(exc, TokcompError) else f"{type(exc).__name__}: {exc}"
            tracker.set_tags(run_id, {"tokcomp.error": message})
            tracker.log_text(run_id, traceback.format_exc(), "error.txt")
            tracker.finish(run_id, "FAILED")
            return ConfigurationResult(conf_name, "FAILED", run_id, error=message)
        finally:
            stack.close()


def format_table(results: list[ConfigurationResult]) -> str:
    """A plain-text comparison table, uncompressed-relative where it helps."""
    header = ["configuration", "status", "vision tok", "LLM visual", "retained", "LLM seq (first>last)",
              "total ms", "vision ms", "prefill ms", "output"]
    rows = []
    for r in results:
        if r.status != "FINISHED":
            rows.append([r.name, r.status, "", "", "", "", "", "", "", r.error[:60]])
            continue
        m = r.metrics
        rows.append([
            r.name, r.status, f"{int(m['tokens.vision_in'])}>{int(m['tokens.vision_out'])}",
            str(int(m["tokens.llm_visual"])), f"{m['retained_ratio']:.3f}",
            f"{int(m['tokens.llm_seq_first_layer'])}>{int(m['tokens.llm_seq_last_layer'])}",
            f"{m['time.total_ms']:.1f}", f"{m['time.vision_ms']:.1f}", f"{m['time.prefill_ms']:.1f}",
            repr(r.text[:24]),
        ])
    return render_table(header, rows)
