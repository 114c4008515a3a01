"""Sweeps: the grid of comma-separated overrides, run as child runs of one resumable parent run.

``tokcomp sweep exp.yaml a=1,2 b=x,y c=3`` runs the four points (a, b) with c=3 fixed, each point
running all of the experiment's configurations. The parent run is keyed by the resolved base
config and the grid, so running the same sweep again finds it, skips every configuration that
already FINISHED there (by the hash of its resolved config) and retries the rest: an interrupted
or partly failed sweep resumes without losing anything.

Nothing is left dangling: on resume, the runs of the sweep still RUNNING whose process is gone
(same host, pid no longer alive: a ``kill -9``, a crash) are marked KILLED before anything runs.
A sweep still running on this host is not resumed a second time; one left RUNNING by a process on
another host, which cannot be checked from here, is resumed only when asked explicitly
(``SweepRunner(..., resume=True)``, or ``TOKCOMP_RESUME=1``).

The uncompressed baseline depends only on the model, input, generation and timing: grid points
that share those run it once, and the later points record a baseline run that reuses it (tag
``tokcomp.reuses_run``), with its metrics, for their comparisons.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from tokcomp.config import flatten, identity, load_experiment
from tokcomp.errors import ConfigError, TokcompError
from tokcomp.runner import (
    AdapterCache,
    ConfigurationResult,
    ExperimentResult,
    ExperimentRunner,
    SharedBaseline,
    artifact_errors,
    baseline_key,
    check_tracking,
    config_hash,
    describe_stop,
    end_status,
    finish_parent,
    open_tracker,
)
from tokcomp.tracking import (
    ALIVE,
    UNKNOWN,
    Tracker,
    TrackingError,
    describe_owner,
    machine_tags,
    owner_state,
    terminate_cleanly,
)

RESUME_ENV = "TOKCOMP_RESUME"


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


def sweep_key(base: dict[str, Any], points: list[list[str]]) -> str:
    """Identity of a sweep: its resolved base config (less tracking and executor) and its grid."""
    text = json.dumps({"base": base, "points": points}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SweepRunner:
    def __init__(self, experiment_file: str, overrides: list[str], trace: bool | None = None,
                 resume: bool | None = None, executor: str = "local", address: str | None = None,
                 grid: bool = True):
        """``executor``: ``local`` (this process) or ``ray`` (tasks on the Ray cluster at ``address``);
        ``grid=False``: the overrides are all fixed (``tokcomp run`` on Ray: one point, resumable)."""
        from tokcomp.distributed import check_executor

        check_executor(executor)
        self.executor, self.address = executor, address
        self.experiment_file = experiment_file
        self.fixed, self.points = expand_grid(overrides) if grid else (list(overrides), [[]])
        self.kind = "sweep" if grid else "experiment"
        self.base = load_experiment(experiment_file, self.fixed)
        for point in self.points:  # every key must exist, before anything runs
            load_experiment(experiment_file, [*self.fixed, *point])
        self.trace = trace
        self.key = sweep_key(identity(self.base), self.points)
        # explicit resume: also take over runs whose process cannot be checked from here (another host)
        self.resume = resume if resume is not None else os.environ.get(RESUME_ENV, "").lower() in ("1", "true", "yes")

    def _find_parent(self, tracker) -> Any:
        return latest_run_tagged(tracker, {"tokcomp.sweep_key": self.key})

    @staticmethod
    def _children(tracker, parent: str) -> list[Any]:
        return child_runs(tracker, parent)

    def _claim(self, tracker, parent: Any, log: Callable[[str], None]) -> None:
        claim_parent(tracker, parent, self._children(tracker, parent.info.run_id), self.resume, log,
                     "sweep" if self.kind == "sweep" else "run")

    def run(self, log: Callable[[str], None] = print, progress: bool = True) -> ExperimentResult:
        """Run (or resume) the sweep. Ctrl-C and SIGTERM end the runs in progress and the parent KILLED."""
        with terminate_cleanly():
            total = sum(len(ExperimentRunner(load_experiment(self.experiment_file, [*self.fixed, *p])).strategies)
                        for p in self.points) if self.points else 0
            session = None
            if self.executor == "ray":  # the server, the cluster and the resources: before the parent run
                from tokcomp.distributed import RaySession

                session = RaySession(self.base, self.address, total, log)
            try:
                return self._run(session, total, log, progress)
            finally:
                if session is not None:
                    session.close()

    def _run(self, session: Any, total: int, log: Callable[[str], None], progress: bool) -> ExperimentResult:
        check_tracking(self.base)  # a store or artifact root that cannot be written: before any model
        tracker, uri = open_tracker(self.base)
        found = self._find_parent(tracker)
        resumed, errors = found is not None, []
        if found is None:
            tags = {**machine_tags(self.base.model.device), "tokcomp.kind": self.kind, "tokcomp.sweep_key": self.key,
                    "tokcomp.experiment_file": str(self.experiment_file), "tokcomp.executor": self.executor}
            parent = tracker.start(self.base.name, tags)
        else:
            parent = found.info.run_id
            self._claim(tracker, found, log)
            log(f"resuming {self.kind} {parent} (finished configurations are skipped)")
        bar = tqdm(total=total, desc=self.kind, disable=not progress, unit="run")
        results: list[ConfigurationResult] = []
        try:
            if not resumed:
                tracker.log_params(parent, flatten(OmegaConf.to_container(self.base, resolve=True)))
                errors += artifact_errors(tracker.log_json, parent, {"fixed": self.fixed, "points": self.points},
                                          "sweep.json")
            if session is not None:
                from tokcomp.distributed import run_sweep_on_ray

                results = run_sweep_on_ray(self, session, tracker, parent, bar, log)
            else:
                adapters = AdapterCache()
                children = self._children(tracker, parent) if isinstance(tracker, Tracker) else []
                baselines = shared_baselines(tracker, children)
                for point, label in zip(self.points, short_labels(self.points), strict=True):
                    finished = finished_children(tracker, self._children(tracker, parent)) \
                        if isinstance(tracker, Tracker) else {}
                    results.extend(self._run_point(tracker, parent, point, label, finished, baselines, adapters, bar,
                                                   log))
            error = finish_parent(tracker, parent, results, errors, {"tokcomp.resumed": str(resumed).lower()})
        except BaseException as exc:
            tracker.abandon(parent, end_status(exc), describe_stop(exc))
            raise
        finally:
            bar.close()
        return ExperimentResult(self.base.name, parent, uri, results, error)

    def _run_point(self, tracker, parent, point, label, finished, baselines, adapters, bar,
                   log) -> list[ConfigurationResult]:
        try:
            cfg = load_experiment(self.experiment_file, [*self.fixed, *point])
            runner = ExperimentRunner(cfg, trace=self.trace, experiment_file=self.experiment_file, adapters=adapters)
            baseline = next((name for name, strategies in runner.strategies.items() if not strategies), None)
            if all(config_hash(cfg, name) in finished or (name == baseline and baseline_key(cfg, name) in baselines)
                   for name in runner.strategies):  # nothing left to run here: no model needed
                return runner.run_configurations(tracker, parent, {"tokcomp.sweep_overrides": " ".join(point)},
                                                 point=label, finished=finished, log=lambda _: None,
                                                 on_done=lambda: bar.update(1), baselines=baselines)
            runner.prepare(log)
        except TokcompError as exc:  # this combination is invalid: record it, go on with the others
            bar.update(1)
            return [record_bad_point(tracker, parent, label, exc, log)]
        tags = {**runner.base_tags(), "tokcomp.sweep_overrides": " ".join(point)}
        return runner.run_configurations(tracker, parent, tags, point=label, finished=finished,
                                         log=lambda _: None, on_done=lambda: bar.update(1), baselines=baselines)


def claim_parent(tracker, parent: Any, children: list[Any], resume: bool, log: Callable[[str], None],
                 command: str) -> None:
    """Take over a resumable parent run (a sweep's, an evaluation's). Its runs still RUNNING must belong
    to processes that are gone (they are marked KILLED); one still alive here means the command is
    running: an error, as is one on another host unless the resume is explicit (``--resume``)."""
    parent_id = parent.info.run_id
    running = [run for run in [parent, *children] if run.info.status == "RUNNING"]
    for run in running:
        state, owner = owner_state(run.data.tags), describe_owner(run.data.tags)
        if state == ALIVE:
            raise TrackingError(f"this {command} is running now ({owner}, run {run.info.run_id} of parent run "
                                f"{parent_id}): wait for it, or stop it before resuming")
        if state == UNKNOWN and not resume:
            raise TrackingError(
                f"run {run.info.run_id} of this {command} (parent run {parent_id}) is RUNNING, started by {owner}, "
                f"which cannot be checked from here: if it is no longer running, resume explicitly "
                f"(tokcomp {command} --resume)")
    for run in running:
        if run.info.run_id != parent_id:
            tracker.abandon(run.info.run_id, "KILLED", f"{describe_owner(run.data.tags)} ended without finishing "
                                                       f"this run (found when the {command} resumed)")
    if running:
        log(f"marked {len(running)} run(s) left RUNNING by a process that is gone KILLED")
    tracker.take_over(parent_id)


def child_runs(tracker, parent: str) -> list[Any]:
    """Every child run of ``parent`` (all pages); none without tracking."""
    if not isinstance(tracker, Tracker):
        return []
    runs, token = [], None
    while True:
        page = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'",
                                          max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def latest_run_tagged(tracker, tags: dict[str, str]) -> Any:
    """The most recent run with all of ``tags`` (a resumable command's parent); None without tracking."""
    if not isinstance(tracker, Tracker):  # tracking disabled: nothing to resume from
        return None
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = tracker.client.search_runs([tracker.experiment_id], where, order_by=["attributes.start_time DESC"],
                                      max_results=1)
    return runs[0] if runs else None


Loader = Callable[[bool], ConfigurationResult]


def _as_is(run_id: str, loader: Loader) -> Loader:
    return loader


def finished_children(tracker, runs: list[Any], wrap: Callable[[str, Loader], Loader] = _as_is) -> dict[str, Loader]:
    """config hash -> loader of the earlier FINISHED result (``loader(True)`` also reads its outputs);
    ``wrap(run_id, loader)``: a cache in front of each (a Ray worker keeps what it read)."""
    done = {}
    for run in runs:
        if run.info.status == "FINISHED" and "tokcomp.config_hash" in run.data.tags:
            done[run.data.tags["tokcomp.config_hash"]] = wrap(run.info.run_id, partial(load_result, tracker, run))
    return done


def shared_baselines(tracker, runs: list[Any], wrap: Callable[[str, Loader], Loader] = _as_is) -> dict[str, SharedBaseline]:
    """Baseline key -> the FINISHED baseline run (not itself a reuse) later points can reuse."""
    shared = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        tags = run.data.tags
        if run.info.status == "FINISHED" and tags.get("tokcomp.baseline_key") and not tags.get("tokcomp.reuses_run"):
            load = functools.cache(partial(wrap(run.info.run_id, partial(load_result, tracker, run)), True))
            shared.setdefault(tags["tokcomp.baseline_key"], SharedBaseline(run.info.run_id, load))
    return shared


def load_result(tracker, run: Any, outputs: bool) -> ConfigurationResult:
    """A recorded configuration run as a result; with ``outputs``, also what comparisons need of it."""
    tags = run.data.tags
    result = ConfigurationResult(tags["tokcomp.configuration"], "FINISHED", run.info.run_id, dict(run.data.metrics),
                                 reuses=tags.get("tokcomp.reuses_run", ""))
    if outputs:  # a baseline the remaining runs are compared with: its outputs are the source run's
        source = result.reuses or run.info.run_id
        generation = tracker.load_json(source, "generation.json")
        result.text, result.new_ids = generation["text"], generation["new_ids"]
        result.prefill_logits = tracker.load_tensor(source, "prefill_logits.pt")
        try:
            result.ledger = tracker.load_json(source, "ledger.json")
        except TrackingError:
            result.ledger = {}
    return result


def record_bad_point(tracker, parent: str, label: str, exc: TokcompError,
                     log: Callable[[str], None]) -> ConfigurationResult:
    """A grid point whose configurations cannot be set up: one FAILED run says why; the sweep goes on."""
    run_id = tracker.start(f"[{label}]", {"tokcomp.kind": "configuration", "tokcomp.configuration": "(point)",
                                          "tokcomp.label": f"[{label}]", "tokcomp.sweep_point": label}, parent=parent)
    tracker.fail(run_id, str(exc), traceback.format_exc())
    log(f"point [{label}] failed: {exc}")
    return ConfigurationResult("(point)", "FAILED", run_id, error=str(exc), point=label)
