"""Sweeps: the grid of comma-separated overrides, run as child runs of one resumable parent run.

``tokcomp sweep exp.yaml a=1,2 b=x,y c=3`` runs the four points (a, b) with c=3 fixed, each point
running all of the experiment's configurations. The parent run is keyed by the resolved base
config and the grid, so running the same sweep again finds it, skips every configuration that
already FINISHED there (by the hash of its resolved config) and retries the rest: an interrupted
or partly failed sweep resumes without losing anything.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from tokcomp.config import flatten, load_experiment
from tokcomp.errors import ConfigError, TokcompError
from tokcomp.runner import (
    AdapterCache,
    ConfigurationResult,
    ExperimentResult,
    ExperimentRunner,
    config_hash,
    format_table,
    open_tracker,
)
from tokcomp.tracking import Tracker, machine_tags


def split_top_level(raw: str) -> list[str]:
    """Split on commas that are not inside brackets, braces or quotes (``[1,2],[3]`` is two values)."""
    parts, depth, quote, current = [], 0, None, []
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def expand_grid(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """Fixed overrides, and the grid points (each a list of ``key=value``) of the comma-list ones."""
    fixed, axes = [], []
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"sweep override {text!r} is not of the form key=value[,value...]")
        key, raw = text.split("=", 1)
        values = split_top_level(raw)
        if len(values) == 1:
            fixed.append(text)
        elif any(v == "" for v in values):
            raise ConfigError(f"sweep override {text!r} has an empty value")
        else:
            axes.append([f"{key}={v}" for v in values])
    points = [list(p) for p in itertools.product(*axes)] if axes else [[]]
    return fixed, points


def short_labels(points: list[list[str]]) -> list[str]:
    """Readable point labels: each swept key shortened to its shortest suffix that stays unique."""
    if not points or not points[0]:
        return ["" for _ in points]
    keys = [item.split("=", 1)[0] for item in points[0]]
    depth = 1
    while depth < max(len(k.split(".")) for k in keys) and len({".".join(k.split(".")[-depth:]) for k in keys}) < len(keys):
        depth += 1
    short = [".".join(k.split(".")[-depth:]) for k in keys]
    return [" ".join(f"{s}={item.split('=', 1)[1]}" for s, item in zip(short, point, strict=True)) for point in points]


def sweep_key(cfg_yaml: str, points: list[list[str]]) -> str:
    text = json.dumps({"base": cfg_yaml, "points": points}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SweepRunner:
    def __init__(self, experiment_file: str, overrides: list[str], trace: bool | None = None):
        self.experiment_file = experiment_file
        self.fixed, self.points = expand_grid(overrides)
        self.base = load_experiment(experiment_file, self.fixed)
        for point in self.points:  # every key must exist, before anything runs
            load_experiment(experiment_file, [*self.fixed, *point])
        self.trace = trace
        self.key = sweep_key(OmegaConf.to_yaml(self.base), self.points)

    def _find_parent(self, tracker) -> str | None:
        if not isinstance(tracker, Tracker):  # tracking disabled: nothing to resume from
            return None
        runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`tokcomp.sweep_key` = '{self.key}'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def _finished_children(self, tracker, parent: str) -> dict[str, Callable[[bool], ConfigurationResult]]:
        """config hash -> loader of the earlier FINISHED result (``loader(True)`` also reads its outputs)."""
        runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        done = {}
        for run in runs:
            if run.info.status == "FINISHED" and "tokcomp.config_hash" in run.data.tags:
                done[run.data.tags["tokcomp.config_hash"]] = partial(self._load_result, tracker, run)
        return done

    @staticmethod
    def _load_result(tracker, run: Any, outputs: bool) -> ConfigurationResult:
        result = ConfigurationResult(run.data.tags["tokcomp.configuration"], "FINISHED", run.info.run_id,
                                     dict(run.data.metrics))
        if outputs:  # a baseline the remaining runs are compared with
            generation = tracker.load_json(run.info.run_id, "generation.json")
            result.text, result.new_ids = generation["text"], generation["new_ids"]
            result.prefill_logits = tracker.load_tensor(run.info.run_id, "prefill_logits.pt")
        return result

    def run(self, log: Callable[[str], None] = print, progress: bool = True) -> ExperimentResult:
        tracker, uri = open_tracker(self.base)
        parent = self._find_parent(tracker)
        resumed = parent is not None
        if parent is None:
            parent = tracker.start(self.base.name, {**machine_tags(self.base.model.device), "tokcomp.kind": "sweep",
                                                    "tokcomp.sweep_key": self.key,
                                                    "tokcomp.experiment_file": str(self.experiment_file)})
            tracker.log_params(parent, flatten(OmegaConf.to_container(self.base, resolve=True)))
            tracker.log_json(parent, {"fixed": self.fixed, "points": self.points}, "sweep.json")
        else:
            tracker.client.update_run(parent, status="RUNNING")  # resumed
            log(f"resuming sweep {parent} (finished configurations are skipped)")
        adapters = AdapterCache()
        total = sum(len(ExperimentRunner(load_experiment(self.experiment_file, [*self.fixed, *p])).strategies)
                    for p in self.points) if self.points else 0
        bar = tqdm(total=total, desc="sweep", disable=not progress, unit="run")
        results: list[ConfigurationResult] = []
        try:
            for point, label in zip(self.points, short_labels(self.points), strict=True):
                finished = self._finished_children(tracker, parent) if isinstance(tracker, Tracker) else {}
                results.extend(self._run_point(tracker, parent, point, label, finished, adapters, bar, log))
            failed = [r.label for r in results if r.status == "FAILED"]
            tracker.set_tags(parent, {"tokcomp.failed_configurations": ",".join(failed) or "none",
                                      "tokcomp.resumed": str(resumed).lower()})
            tracker.log_text(parent, format_table([r for r in results if r.metrics or r.status == "FAILED"]),
                             "summary.txt")
            tracker.finish(parent, "FINISHED")
        except BaseException:
            tracker.finish(parent, "KILLED")
            raise
        finally:
            bar.close()
        return ExperimentResult(self.base.name, parent, uri, results)

    def _run_point(self, tracker, parent, point, label, finished, adapters, bar, log) -> list[ConfigurationResult]:
        try:
            cfg = load_experiment(self.experiment_file, [*self.fixed, *point])
            runner = ExperimentRunner(cfg, trace=self.trace, experiment_file=self.experiment_file, adapters=adapters)
            if all(config_hash(cfg, name) in finished for name in runner.strategies):  # nothing left to run here
                return runner.run_configurations(tracker, parent, {}, point=label, finished=finished,
                                                 log=lambda _: None, on_done=lambda: bar.update(1))
            runner.prepare(log)
        except TokcompError as exc:  # this combination is invalid: record it, go on with the others
            run_id = tracker.start(f"[{label}]", {"tokcomp.kind": "configuration", "tokcomp.configuration": "(point)",
                                                  "tokcomp.label": f"[{label}]", "tokcomp.sweep_point": label,
                                                  "tokcomp.error": str(exc)}, parent=parent)
            tracker.log_text(run_id, traceback.format_exc(), "error.txt")
            tracker.finish(run_id, "FAILED")
            log(f"point [{label}] failed: {exc}")
            bar.update(1)
            return [ConfigurationResult("(point)", "FAILED", run_id, error=str(exc), point=label)]
        tags = {**runner.base_tags(), "tokcomp.sweep_overrides": " ".join(point)}
        return runner.run_configurations(tracker, parent, tags, point=label, finished=finished,
                                         log=lambda _: None, on_done=lambda: bar.update(1))
