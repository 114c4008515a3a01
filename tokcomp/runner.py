"""Run an experiment: validate everything first, then one tracked run per configuration.

Everything that can be checked before a forward pass is checked before the first one (strategy
names, parameters, hook points, layer indices against the model, the video), so a typo never
costs a half-finished experiment. A configuration that fails at run time is recorded as FAILED
with its error, and the others still run. The first configuration without strategies is the
baseline: every other configuration gets fidelity metrics against it.

Timing (``timing.order``): ``interleaved`` (the default) opens every configuration's run and warms
it up, then runs repeat k of every configuration before repeat k+1 of any, so load that comes and
goes on a shared machine hits all configurations alike; ``sequential`` runs one configuration's
repeats after another. Every repeat's times are kept (metric history ``repeat.*``, one step per
repeat, with ``repeat.sequence`` its place in the schedule); the fidelity pass runs after the
timed ones. Interrupted (Ctrl-C, SIGTERM), the runs in progress are marked KILLED.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tokcomp.config import TimingOrder, flatten, identity, to_yaml
from tokcomp.errors import ConfigError, TokcompError
from tokcomp.fidelity import fidelity_metrics
from tokcomp.flops import count_all
from tokcomp.pipeline import run as run_pipeline
from tokcomp.plugins import Plugins
from tokcomp.preflight import check_experiment, half_precision_cpu_note
from tokcomp.stack import CompressionStack
from tokcomp.strategy import Strategy
from tokcomp.tables import render_table
from tokcomp.timing import PeakMemory
from tokcomp.tracking import (
    ArtifactError,
    NullTracker,
    Terminated,
    Tracker,
    check_store,
    machine_tags,
    resolve_tracking_uri,
    terminate_cleanly,
)
from tokcomp.video import load_frames, sampled_fps

BASELINE = "uncompressed"


@dataclass
class ConfigurationResult:
    name: str
    # FINISHED | FAILED | SKIPPED (finished in an earlier sweep attempt) | REUSED (a baseline identical
    # to one an earlier sweep point ran: its run records the reuse, ``reuses`` names the source run)
    status: str
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    text: str = ""
    new_ids: list[int] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    point: str = ""
    prefill_logits: torch.Tensor | None = None
    reuses: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} [{self.point}]" if self.point else self.name


@dataclass
class ExperimentResult:
    name: str
    parent_run_id: str
    tracking_uri: str | None
    configurations: list[ConfigurationResult]
    error: str = ""  # the parent run's own failure (e.g. its summary could not be written)

    @property
    def failed(self) -> list[str]:
        failed = [c.label for c in self.configurations if c.status == "FAILED"]
        return [*failed, f"parent run ({self.error})"] if self.error else failed


@dataclass
class SharedBaseline:
    """A finished baseline run that later sweep points with the same baseline reuse."""

    run_id: str
    load: Callable[[], ConfigurationResult]  # its result with outputs (new ids, prefill logits, ledger)


@dataclass
class _Pending:
    """A configuration being run: its open run, its stack and its timed passes so far."""

    index: int
    name: str
    strategies: list[Strategy]
    key: str
    is_baseline: bool
    where: str
    run_id: str = ""  # "" without tracking
    opened: bool = False
    stack: CompressionStack | None = None
    outs: list[Any] = field(default_factory=list)  # one RunOutput per timed repeat
    stamps: list[tuple[int, int]] = field(default_factory=list)  # (place in the schedule, start in ms) per repeat
    peak_mb: float = 0.0
    result: ConfigurationResult | None = None  # set when its run ends

    @property
    def open(self) -> bool:
        """Its run started and has not ended."""
        return self.opened and self.result is None


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


def check_strategies(built: dict[str, list[Strategy]], info: Any, only: str | None = None) -> None:
    """Every configuration's strategies (or ``only`` that one's) against the model's info for a video."""
    for conf_name, strategies in built.items():
        if only is not None and conf_name != only:
            continue
        for i, strategy in enumerate(strategies):
            try:
                strategy.check_model(info)
                strategy.check(info)
            except ConfigError as exc:
                raise ConfigError(f"configurations.{conf_name}.strategies.{i} on model {info.name!r}: {exc}") from exc


def configuration_config(cfg: DictConfig, conf_name: str) -> dict[str, Any]:
    """The resolved config of one configuration: what a run of it depends on (no tracking, no names)."""
    data = identity(cfg)
    conf = data["configurations"].get(conf_name) or {"description": "no compression", "strategies": []}
    data["configurations"] = {conf_name: conf}
    for key in ("name", "baseline"):
        data.pop(key, None)
    return data


def config_hash(cfg: DictConfig, conf_name: str) -> str:
    """Identity of one configuration's run within its resolved experiment (a sweep point):
    the whole resolved config counts, so each point keeps its own baseline and comparisons."""
    text = json.dumps({"experiment": identity(cfg), "configuration": conf_name}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


BASELINE_INPUTS = ("model", "input", "generation", "timing", "seed", "plugins")


def baseline_key(cfg: DictConfig, conf_name: str) -> str:
    """Identity of an uncompressed run: only what it depends on (model, input, generation, timing),
    so sweep points that change a compressed configuration share one baseline."""
    data = OmegaConf.to_container(cfg, resolve=True)
    text = json.dumps({"baseline": {k: data.get(k) for k in BASELINE_INPUTS}, "configuration": conf_name},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _median_min_max(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


REPEAT_TIMINGS = {"ttft_ms": "ttft.total_ms", "vision_ms": "ttft.vision_ms",
                  "token_processing_ms": "ttft.token_processing_ms", "prefill_ms": "ttft.prefill_ms",
                  "other_ms": "ttft.other_ms", "decode_ms": "time.decode_ms", "total_ms": "time.total_ms"}


def repeat_series(outs: list[Any], stamps: list[tuple[int, int]]) -> dict[str, list[tuple[int, float, int]]]:
    """Every repeat's times as metric history (``repeat.<metric>``, step = repeat, timestamp = its start),
    and ``repeat.sequence``: the repeat's place among all timed passes of its run or sweep point."""
    series: dict[str, list[tuple[int, float, int]]] = {f"repeat.{name}": [] for name in REPEAT_TIMINGS.values()}
    series["repeat.sequence"] = []
    for k, (out, (place, start_ms)) in enumerate(zip(outs, stamps, strict=True)):
        for timing, name in REPEAT_TIMINGS.items():
            series[f"repeat.{name}"].append((k, out.timings_ms[timing], start_ms))
        series["repeat.sequence"].append((k, place, start_ms))
    return series


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
    totals = [o.timings_ms["ttft_ms"] for o in outs]
    med, lo, hi = _median_min_max(totals)
    metrics.update({"ttft.total_ms": med, "ttft.total_ms_min": lo, "ttft.total_ms_max": hi,
                    "ttft.total_ms_std": statistics.stdev(totals) if len(totals) > 1 else 0.0,
                    "ttft.total_ms_spread": (hi - lo) / med if med > 0 else 0.0})  # (max - min) / median
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
    """Keeps the last built model, so sweep points on the same model do not rebuild it, and the last
    input read and preprocessed for it (a Ray worker runs one configuration a task, many on one video)."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._adapter: Any = None
        self._frames_key: str | None = None
        self._frames: Any = None
        self._video_key: str | None = None
        self._video: Any = None

    def frames(self, input_cfg: DictConfig) -> Any:
        """The frames ``input_cfg`` names (read or generated), once per input."""
        key = json.dumps(OmegaConf.to_container(input_cfg, resolve=True), sort_keys=True)
        if key != self._frames_key:
            self._frames, self._frames_key = load_frames(input_cfg), key
        return self._frames

    def video(self, adapter: Any, input_cfg: DictConfig) -> Any:
        """The cached model's ``VideoInput`` of those frames, preprocessed once per model and input."""
        frames = self.frames(input_cfg)
        key = json.dumps([self._key, self._frames_key])
        if key != self._video_key:
            fps = sampled_fps(input_cfg.video, input_cfg.frames) if input_cfg.video else None
            self._video, self._video_key = adapter.preprocess(frames, fps=fps), key
        return self._video

    def get(self, preset: Any, model_cfg: DictConfig, log: Callable[[str], None]) -> Any:
        key = json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True)
        if key != self._key:
            self._adapter = None  # free the old model before building the next
            log(f"building model {model_cfg.preset!r} (weights: {model_cfg.weights}, {model_cfg.dtype}, {model_cfg.device})")
            note = half_precision_cpu_note(model_cfg.dtype, model_cfg.device)
            if note:
                log(note)
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
        """Check the input, build (or reuse) the model, check strategies against it."""
        check_experiment(self.cfg, self.preset, self.experiment_file)  # the config alone, before any work
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
        frames = self.adapters.frames(cfg.input)
        if self.preset.describe is not None:  # the config and the preset's geometry alone, before any weights
            description = self.preset.describe(cfg.model)
            geometry = description.video(*frames.shape[:3])  # e.g. too few frames for a temporal patch
            self._check_strategies(description.info.for_video(geometry.grid, geometry.llm_grid))
        adapter = self.adapters.get(self.preset, cfg.model, log)
        video = self.adapters.video(adapter, cfg.input)
        self.info = adapter.info.for_video(video.grid, video.llm_grid)
        self._check_strategies(self.info)
        self.adapter, self.video = adapter, video  # warm-up passes: run_configurations, by timing.order

    def _check_strategies(self, info) -> None:
        check_strategies(self.strategies, info)

    def base_tags(self) -> dict[str, str]:
        cfg, adapter = self.cfg, self.adapter
        tags = {**machine_tags(str(adapter.device)), "model.preset": cfg.model.preset, "model.family": adapter.family,
                "model.dtype": cfg.model.dtype,
                "model.attn_implementation": adapter.attn_implementation}
        if self.experiment_file:
            tags["tokcomp.experiment_file"] = str(self.experiment_file)
        return tags

    def run(self, log: Callable[[str], None] = print) -> ExperimentResult:
        """A plain run: one parent run, every configuration once. Ctrl-C and SIGTERM end the runs in
        progress and the parent KILLED before the process ends."""
        with terminate_cleanly():
            check_tracking(self.cfg)  # a store or artifact root that cannot be written: before the model
            self.prepare(log)
            tracker, uri = open_tracker(self.cfg)
            tags = self.base_tags()
            parent = tracker.start(self.cfg.name, {**tags, "tokcomp.kind": "experiment"})
            try:
                tracker.log_params(parent, flatten(OmegaConf.to_container(self.cfg, resolve=True)))
                errors = artifact_errors(tracker.log_text, parent, to_yaml(self.cfg), "experiment.yaml")
                results = self.run_configurations(tracker, parent, tags, log=log)
                error = finish_parent(tracker, parent, results, errors)
            except BaseException as exc:
                tracker.abandon(parent, end_status(exc), describe_stop(exc))
                raise
        return ExperimentResult(self.cfg.name, parent, uri, results, error)

    def run_configurations(self, tracker, parent: str, tags: dict[str, str], point: str = "",
                           finished: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                           on_done: Callable[[], None] | None = None,
                           baselines: dict[str, SharedBaseline] | None = None,
                           only: Collection[str] | None = None) -> list[ConfigurationResult]:
        """Run every configuration as a child of ``parent``, timed in ``timing.order``.

        ``finished`` maps config hashes to loaders of an earlier attempt's FINISHED results, which are
        reused instead of run again. ``baselines`` (a sweep's, shared by its points) maps baseline keys
        to baseline runs: an identical baseline is not run again but recorded as a run that reuses that
        one, and a baseline run here is added for the points after this one. ``only``: run just these
        configurations (a distributed task); a baseline left out is still the reference of the others,
        through ``finished`` or ``baselines``, where an earlier task recorded it.
        """
        done = on_done or (lambda: None)
        results: list[ConfigurationResult | None] = []
        pending: list[_Pending] = []
        reference: Callable[[], ConfigurationResult] | None = None  # the baseline's outputs, loaded when needed
        baseline_name = next((name for name, strategies in self.strategies.items() if not strategies), None)
        for index, (conf_name, strategies) in enumerate(self.strategies.items()):
            key, is_baseline = config_hash(self.cfg, conf_name), conf_name == baseline_name
            where = f"[{index + 1}/{len(self.strategies)}] {conf_name} {point}".rstrip()
            shared = baselines.get(baseline_key(self.cfg, conf_name)) if is_baseline and baselines else None
            if only is not None and conf_name not in only:
                if is_baseline and finished is not None and key in finished:
                    reference = functools.cache(lambda loader=finished[key]: loader(True))
                elif is_baseline and shared is not None:
                    reference = functools.cache(shared.load)
                results.append(None)
                continue
            if finished is not None and key in finished:
                result = finished[key](False)
                result.status, result.point = "SKIPPED", point
                log(f"{where} (finished earlier, skipped)")
                if is_baseline:
                    reference = functools.cache(lambda loader=finished[key]: loader(True))
            elif shared is not None:
                log(f"{where} (the same baseline ran earlier in this sweep: reused)")
                result = self._reuse_baseline(tracker, parent, tags, conf_name, key, point, shared)
                reference = functools.cache(shared.load)
            else:
                pending.append(_Pending(index, conf_name, strategies, key, is_baseline, where))
                results.append(None)
                continue
            results.append(result)
            done()
        if pending:
            self._run_pending(tracker, parent, tags, point, pending, reference, baselines, log, done)
        for p in pending:
            results[p.index] = p.result
        return [r for r in results if r is not None]

    def _run_pending(self, tracker, parent: str, tags: dict[str, str], point: str, pending: list[_Pending],
                     reference: Callable[[], ConfigurationResult] | None, baselines: dict[str, SharedBaseline] | None,
                     log: Callable[[str], None], done: Callable[[], None]) -> None:
        """Warm-up, timed repeats in ``timing.order``, then per configuration its metrics, the fidelity
        pass and artifacts. A configuration that fails is FAILED and the others go on; an interruption
        ends every run still open KILLED."""
        cfg = self.cfg
        places = iter(range(len(pending) * cfg.timing.repeats))  # each timed pass's place in the schedule
        try:
            if cfg.timing.order == TimingOrder.sequential:
                for _ in range(cfg.timing.warmup):  # the uncompressed model, before the first configuration
                    self._pass(CompressionStack([], self.info))
                for p in pending:
                    log(p.where)
                    self._open(tracker, parent, tags, p, point, warmup=0)
                    for _ in range(cfg.timing.repeats):
                        self._timed_pass(tracker, p, point, next(places))
                    reference = self._close(tracker, p, point, reference, baselines)
                    done()
                return
            for p in pending:  # interleaved: every configuration opened and warmed up, then the rounds
                log(p.where)
                self._open(tracker, parent, tags, p, point, warmup=cfg.timing.warmup)
            for k in range(cfg.timing.repeats):
                alive = [p for p in pending if p.open]
                if alive and cfg.timing.repeats > 1:
                    log(f"timed repeat {k + 1}/{cfg.timing.repeats} of {len(alive)} configurations {point}".rstrip())
                for p in alive:
                    self._timed_pass(tracker, p, point, next(places))
            for p in pending:
                reference = self._close(tracker, p, point, reference, baselines)
                done()
        except BaseException as exc:
            for p in pending:
                if p.open:
                    tracker.abandon(p.run_id, end_status(exc), describe_stop(exc))
            raise
        finally:
            for p in pending:
                if p.stack is not None:
                    p.stack.close()

    def _pass(self, stack: CompressionStack, forced_ids: list[int] | None = None) -> Any:
        return run_pipeline(self.adapter, self.video, self.cfg.input.prompt, stack, forced_ids=forced_ids,
                            **self.generation)

    def start_run(self, tracker, parent: str, tags: dict[str, str], conf_name: str, strategies: list[Strategy],
                   key: str, point: str, is_baseline: bool, extra: dict[str, str] | None = None) -> str:
        label = f"{conf_name} [{point}]" if point else conf_name
        run_tags = {
            **tags, "tokcomp.kind": "configuration", "tokcomp.configuration": conf_name, "tokcomp.label": label,
            "tokcomp.sweep_point": point, "tokcomp.config_hash": key, "tokcomp.baseline": str(is_baseline).lower(),
            "tokcomp.strategies": ",".join(s.name for s in strategies) or "none", **(extra or {}),
        }
        if is_baseline:
            run_tags["tokcomp.baseline_key"] = baseline_key(self.cfg, conf_name)
        return tracker.start(label, run_tags, parent=parent)

    def _describe_run(self, tracker, run_id: str, conf_name: str, strategies: list[Strategy]) -> None:
        resolved = configuration_config(self.cfg, conf_name)
        params = flatten({k: resolved[k] for k in ("model", "input", "generation", "timing")})
        params.update(flatten({"strategies": [s.describe() for s in strategies]}))
        params.update({"configuration": conf_name, "seed": self.cfg.seed})
        tracker.log_params(run_id, params)
        tracker.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")

    def _open(self, tracker, parent: str, tags: dict[str, str], p: _Pending, point: str, warmup: int) -> None:
        """Start the configuration's run (params, config.yaml), build its stack, warm it up."""
        p.run_id, p.opened = self.start_run(tracker, parent, tags, p.name, p.strategies, p.key, point,
                                             p.is_baseline), True
        try:
            self._describe_run(tracker, p.run_id, p.name, p.strategies)
            p.stack = CompressionStack(p.strategies, self.info, trace=self.trace)
            for _ in range(warmup):
                self._pass(p.stack)
        except Exception as exc:
            self._fail(tracker, p, point, exc)

    def _timed_pass(self, tracker, p: _Pending, point: str, place: int) -> None:
        if not p.open:
            return
        try:
            start_ms = int(time.time() * 1000)
            with PeakMemory(self.adapter.device) as memory:
                out = self._pass(p.stack)
            p.outs.append(out)
            p.stamps.append((place, start_ms))
            p.peak_mb = max(p.peak_mb, memory.peak_mb)
        except Exception as exc:
            self._fail(tracker, p, point, exc)

    def _close(self, tracker, p: _Pending, point: str, reference: Callable[[], ConfigurationResult] | None,
               baselines: dict[str, SharedBaseline] | None) -> Callable[[], ConfigurationResult] | None:
        """Metrics over the timed passes, the fidelity pass against the baseline, artifacts; FINISHED.
        Returns the reference for the configurations after this one (this one, if it is the baseline)."""
        if not p.open:
            return reference
        try:
            out = p.outs[-1]
            metrics = run_metrics(p.outs, p.peak_mb)
            metrics.update(self._flops_metrics(out.ledger))
            if reference is not None and not p.is_baseline:
                base = reference()
                forced = self._pass(p.stack, forced_ids=base.new_ids)
                metrics.update(fidelity_metrics(base, out, forced.new_ids))
            tracker.log_metrics(p.run_id, metrics)
            tracker.log_series(p.run_id, repeat_series(p.outs, p.stamps))
            tracker.log_json(p.run_id, out.ledger.to_dict(), "ledger.json")
            tracker.log_json(p.run_id, {"text": out.text, "new_ids": out.new_ids}, "generation.json")
            if p.is_baseline:
                tracker.log_tensor(p.run_id, out.prefill_logits, "prefill_logits.pt")
            tracker.finish(p.run_id, "FINISHED")
        except Exception as exc:  # a configuration's failure is recorded, the experiment goes on
            self._fail(tracker, p, point, exc)
            return reference
        result = ConfigurationResult(p.name, "FINISHED", p.run_id, metrics, out.text, out.new_ids, out.ledger.to_dict(),
                                     point=point, prefill_logits=out.prefill_logits)
        p.result, p.outs = result, []
        if not p.is_baseline:
            return reference
        if baselines is not None:
            baselines[baseline_key(self.cfg, p.name)] = SharedBaseline(p.run_id, lambda: result)
        return lambda: result

    def _fail(self, tracker, p: _Pending, point: str, exc: Exception) -> None:
        """The configuration ends FAILED with its error (tag, and error.txt where it can be written)."""
        message = error_message(exc)
        p.result = ConfigurationResult(p.name, "FAILED", p.run_id, error=message, point=point)
        if p.stack is not None:
            p.stack.close()
            p.stack = None
        tracker.fail(p.run_id, message, traceback.format_exc())

    def _reuse_baseline(self, tracker, parent: str, tags: dict[str, str], conf_name: str, key: str, point: str,
                        shared: SharedBaseline) -> ConfigurationResult:
        """This point's baseline is identical to one an earlier point ran: no pass of its own, a run that
        records the reuse (tag ``tokcomp.reuses_run``) with the source's metrics, ledger and output."""
        run_id = self.start_run(tracker, parent, tags, conf_name, [], key, point, True,
                                 {"tokcomp.reuses_run": shared.run_id})
        try:
            self._describe_run(tracker, run_id, conf_name, [])
            source = shared.load()
            metrics = {k: v for k, v in source.metrics.items() if not k.startswith("repeat.")}
            tracker.log_metrics(run_id, metrics)
            if source.ledger:
                tracker.log_json(run_id, source.ledger, "ledger.json")
            tracker.log_json(run_id, {"text": source.text, "new_ids": source.new_ids, "reuses_run": shared.run_id},
                             "generation.json")
            tracker.finish(run_id, "FINISHED")
        except Exception as exc:
            message = error_message(exc)
            tracker.fail(run_id, message, traceback.format_exc())
            return ConfigurationResult(conf_name, "FAILED", run_id, error=message, point=point)
        return ConfigurationResult(conf_name, "REUSED", run_id, metrics, source.text, source.new_ids, source.ledger,
                                   point=point, prefill_logits=source.prefill_logits, reuses=shared.run_id)

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


def check_tracking(cfg: DictConfig) -> None:
    """Before any model is built: a store or artifact root this run could not write is an error now."""
    if cfg.tracking.enabled:
        check_store(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment or cfg.name)


def error_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, TokcompError) else f"{type(exc).__name__}: {exc}"


def end_status(exc: BaseException) -> str:
    """How a run that something stopped ends: KILLED when interrupted (Ctrl-C, SIGTERM), else FAILED."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt | Terminated) else "FAILED"


def describe_stop(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    if isinstance(exc, Terminated):
        return f"interrupted ({exc})"
    return f"stopped by an error elsewhere: {error_message(exc)}"


def artifact_errors(write: Callable[[str, Any, str], None], run_id: str, data: Any, artifact_file: str) -> list[str]:
    """Write one artifact of a parent run; what could not be written is returned, not raised."""
    try:
        write(run_id, data, artifact_file)
    except ArtifactError as exc:
        return [str(exc)]
    return []


def finish_parent(tracker, parent: str, results: list[ConfigurationResult], errors: list[str],
                  tags: dict[str, str] | None = None) -> str:
    """End a parent run: its tags and summary table, FINISHED; FAILED with ``tokcomp.error`` when its own
    artifacts could not be written. Returns that error ("" when there is none)."""
    summary = format_table([r for r in results if r.metrics or r.status == "FAILED"])
    return close_parent(tracker, parent, [r.label for r in results if r.status == "FAILED"], errors, summary, tags)


def close_parent(tracker, parent: str, failed: list[str], errors: list[str], summary: str,
                 tags: dict[str, str] | None = None) -> str:
    """A parent run's end: tags (the failed configurations), ``summary.txt``, FINISHED, or FAILED with
    ``tokcomp.error`` when its own artifacts could not be written (that error is returned)."""
    tracker.set_tags(parent, {"tokcomp.failed_configurations": ",".join(failed) or "none", **(tags or {})})
    errors = [*errors, *artifact_errors(tracker.log_text, parent, summary, "summary.txt")]
    if errors:
        tracker.set_tags(parent, {"tokcomp.error": "; ".join(errors)})
        tracker.finish(parent, "FAILED")
        return "; ".join(errors)
    tracker.finish(parent, "FINISHED")
    return ""


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
