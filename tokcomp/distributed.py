"""Sweeps, runs and evaluations on a Ray cluster (``--executor ray``), every worker logging to one
MLflow tracking server.

The driver (the ``tokcomp`` process) keeps the order of events it has locally: it owns the parent run,
resume (FINISHED configurations skipped, the rest retried), FAILED and KILLED. What it hands out is work:

- a sweep or a run: one task per configuration of a grid point, in two waves: first each distinct
  uncompressed baseline, then every other configuration (and the baselines identical to one already run,
  recorded as reuses), each reading the baseline it is compared with back from the tracking server;
- an evaluation: each configuration's remaining samples in shards; every worker writes its shard's
  predictions to the configuration's run as it goes, and the driver merges them into one run.

Workers are Ray actors, each asking ``ray.num_cpus`` / ``ray.num_gpus`` of the cluster: an actor builds
its model once and keeps it for every task it gets, and times on its own device, so TTFT is measured
where the work ran; the runs it starts record its host, process and device. A worker that dies leaves
its runs KILLED and its work to the next resume (the same command again).

Nothing of Ray is imported unless ``--executor ray`` is asked for.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import traceback
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from tokcomp.errors import ConfigError, TokcompError
from tokcomp.tracking import DEFAULT_TRACKING_URI, TrackingError

EXECUTORS = ("local", "ray")
CONNECT_TIMEOUT_S = 5.0
WAIT_S = 0.2  # longest blocking wait on the cluster: how late a Ctrl-C or SIGTERM can be handled


class ClusterError(TokcompError):
    """The Ray cluster cannot be reached, or cannot run what was asked of it."""


def check_executor(name: str) -> None:
    if name not in EXECUTORS:
        raise ConfigError(f"--executor {name!r} is not one of: {', '.join(EXECUTORS)}")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_tracking_server(cfg: Any) -> str:
    """The tracking URI every worker logs to: an MLflow server that answers now. A local store
    (sqlite, a folder) is refused: workers on other nodes could not write it."""
    if not cfg.tracking.enabled:
        raise ConfigError("--executor ray needs tracking (tracking.enabled=true): workers hand their results and "
                          "the baselines they compare with to each other through the tracking server")
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if not uri.startswith(("http://", "https://")):
        raise TrackingError(f"--executor ray needs an MLflow tracking server every worker can reach "
                            f"(tracking.uri=http://HOST:PORT, started with `mlflow server`), not {uri}: workers "
                            f"on other nodes cannot write a store on this machine")
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S) as answer:
            answer.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TrackingError(f"the MLflow tracking server {uri} cannot be reached: {_reason(exc)}") from exc
    return uri


def _check_address(address: str) -> None:
    """An explicit HOST:PORT or ray://HOST:PORT must accept a connection within seconds (``ray.init``
    itself would retry for a minute)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"the Ray cluster at {address} cannot be reached: {_reason(exc)}") from exc


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (``auto``: the one running on this machine; none: ``RAY_ADDRESS``,
    else a new local cluster of this machine). True when this call started Ray (and should stop it)."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--executor ray needs Ray: pip install 'tokcomp[ray]'") from exc
    if address and address != "auto":
        _check_address(address)
    if ray.is_initialized():  # this process already joined a cluster (a test session, a notebook)
        return False
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    ours = signal.getsignal(signal.SIGTERM)  # ray.init installs its own: a SIGTERM must still end runs KILLED
    try:
        ray.init(address=address or None, **options)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
        raise ClusterError(f"cannot connect to the Ray cluster at {where}: {_reason(exc)}") from exc
    finally:
        if threading.current_thread() is threading.main_thread() and ours is not None:
            signal.signal(signal.SIGTERM, ours)
    return True


def task_resources(cfg: Any) -> dict[str, float]:
    """What one task (one worker) asks of the cluster, from ``ray.*`` (GPUs by default where the model is
    on CUDA)."""
    num_cpus = float(cfg.ray.num_cpus)
    num_gpus = cfg.ray.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if str(cfg.model.device).startswith("cuda") else 0.0
    if num_cpus <= 0:
        raise ConfigError(f"ray.num_cpus={cfg.ray.num_cpus} must be above 0")
    if num_gpus < 0:
        raise ConfigError(f"ray.num_gpus={num_gpus} must be 0 or more")
    if cfg.ray.workers is not None and cfg.ray.workers < 1:
        raise ConfigError(f"ray.workers={cfg.ray.workers} must be at least 1")
    return {"CPU": num_cpus, "GPU": float(num_gpus)}


def worker_slots(resources: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers asking ``resources`` the cluster's nodes hold at once; a task that fits no node
    is an error (it would wait forever)."""
    for kind, need in resources.items():
        largest = max((node.get(kind, 0.0) for node in nodes), default=0.0)
        if need > largest:
            key = {"CPU": "num_cpus", "GPU": "num_gpus"}[kind]
            raise ClusterError(f"ray.{key}={need:g} per task: no node of the Ray cluster has more than "
                               f"{largest:g} {kind}(s) (largest of its {len(nodes)} node(s)), so no task could start")
    slots = 0
    for node in nodes:
        slots += min((int(node.get(kind, 0.0) // need) for kind, need in resources.items() if need > 0), default=1)
    return max(1, slots)


@dataclass
class WorkerInfo:
    handle: Any
    host: str
    pid: int
    device: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid} ({self.device})"


class Worker:
    """One Ray actor: keeps its model (and its evaluation's data) from task to task."""

    def __init__(self, threads: int) -> None:
        import torch

        from tokcomp.runner import AdapterCache

        torch.set_num_threads(max(1, threads))  # its share of the node, as a local run would have it
        self.adapters = AdapterCache()
        self.trackers: dict[tuple[str, str], Any] = {}
        self.references: dict[str, Any] = {}  # baseline run id -> its outputs: read from the server once
        self.evaluation: Any = None
        self.evaluation_key = ""
        self.warm: set[str] = set()

    def identity(self) -> tuple[str, int, str]:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        return socket.gethostname(), os.getpid(), device

    def run_configurations(self, cfg: Any, experiment_file: str | None, parent: str, tags: dict[str, str],
                           point: str, names: list[str], trace: bool | None) -> list[Any]:
        """``names`` of one grid point as children of ``parent``, the way a local sweep runs them."""
        from tokcomp.runner import (
            ConfigurationResult,
            ExperimentRunner,
            baseline_key,
            config_hash,
        )
        from tokcomp.sweep import child_runs, finished_children, shared_baselines

        tracker = self._tracker(cfg)
        runs = child_runs(tracker, parent)
        finished = finished_children(tracker, runs, self._remembered)
        baselines = shared_baselines(tracker, runs, self._remembered)
        runner = ExperimentRunner(cfg, trace=trace, experiment_file=experiment_file, adapters=self.adapters)
        base = next((name for name, strategies in runner.strategies.items() if not strategies), None)
        run_tags = dict(tags)
        if not all(config_hash(cfg, n) in finished or (n == base and baseline_key(cfg, n) in baselines) for n in names):
            try:
                runner.prepare(log=lambda _: None)
            except TokcompError as exc:  # the point cannot run here: each configuration asked for records why
                failed = []
                for name in names:
                    run_id = runner.start_run(tracker, parent, tags, name, runner.strategies[name],
                                              config_hash(cfg, name), point, name == base)
                    tracker.fail(run_id, str(exc), traceback.format_exc())
                    failed.append(ConfigurationResult(name, "FAILED", run_id, error=str(exc), point=point))
                return failed
            run_tags = {**runner.base_tags(), **tags}
        results = runner.run_configurations(tracker, parent, run_tags, point=point, finished=finished,
                                            log=lambda _: None, baselines=baselines, only=names)
        for result in results:
            if result.name == base and result.status == "FINISHED" and result.prefill_logits is not None:
                self._keep(result.run_id, replace(result))  # the next tasks here compare with it, no download
            result.prefill_logits = None  # read back from the server by whoever needs it
        return results

    def _tracker(self, cfg: Any) -> Any:
        """One client per tracking server and experiment, kept from task to task."""
        from tokcomp.runner import open_tracker

        key = (cfg.tracking.uri, cfg.tracking.experiment or cfg.name)
        if key not in self.trackers:
            self.trackers[key] = open_tracker(cfg)[0]
        return self.trackers[key]

    def _keep(self, run_id: str, result: Any) -> None:
        self.references[run_id] = result
        while len(self.references) > 8:  # the latest baselines are the ones the next tasks need
            self.references.pop(next(iter(self.references)))

    def _remembered(self, run_id: str, loader: Callable[[bool], Any]) -> Callable[[bool], Any]:
        """``loader`` of a recorded run, its outputs (``loader(True)``) read once per worker."""
        def load(outputs: bool) -> Any:
            if not outputs:
                return loader(False)
            if run_id not in self.references:
                self._keep(run_id, loader(True))
            return replace(self.references[run_id])
        return load

    def evaluate(self, spec: dict[str, Any], run_id: str, name: str, ids: list[str], part: int) -> dict[str, Any]:
        """Answer the samples ``ids`` under configuration ``name``, writing them to ``run_id`` as
        ``predictions/part-<part>.jsonl`` after each one (what a resume reads back)."""
        import json

        from tokcomp.evaluation import Evaluation, jsonl

        key = json.dumps(spec, sort_keys=True)
        if key != self.evaluation_key:
            self.evaluation, self.evaluation_key, self.warm = Evaluation(**spec), key, set()
        evaluation = self.evaluation
        tracker = self._tracker(evaluation.cfg)
        by_id = {s.id: s for s in evaluation.samples}
        samples = [by_id[i] for i in ids]
        evaluation.answerer.build(lambda _: None)
        if name not in self.warm:
            evaluation.warm_up(name, samples[0])
            self.warm.add(name)
        host, pid, device = self.identity()
        evaluation.first_ledger = None
        records: list[dict] = []
        for sample in samples:
            record = evaluation.answer_sample(name, sample)
            record["worker"] = f"{host}:{pid}"
            records.append(record)
            tracker.log_text(run_id, jsonl(records), f"predictions/part-{part:05d}.jsonl")
        from tokcomp.tracking import machine_tags

        return {"records": records, "ledger": evaluation.first_ledger, "worker": f"{host}:{pid} ({device})",
                "machine": machine_tags(str(evaluation.answerer.adapter.device))}


def _interruptible(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking Ray call that lets Ctrl-C and SIGTERM through as themselves: raised by our signal
    handler inside Ray's compiled wait, they come out as a ``SystemError`` that hides them."""
    try:
        return call(*args, **kwargs)
    except SystemError as exc:
        inner = exc.__context__ or exc.__cause__
        if isinstance(inner, BaseException) and not isinstance(inner, Exception):
            raise inner from None
        raise


class WorkerPool:
    """Ray actors asking ``resources`` each; ``map`` keeps every one busy with the next task."""

    def __init__(self, resources: dict[str, float], workers: int | None, tasks: int, slots: int,
                 log: Callable[[str], None] = print) -> None:
        import ray

        self.resources, self.log = resources, log
        self.size = max(1, min(tasks, workers or slots))
        self._actor = ray.remote(Worker).options(num_cpus=resources["CPU"], num_gpus=resources["GPU"],
                                                 max_restarts=0, max_task_retries=0)
        self.workers = self._spawn(self.size)
        self.gone: list[WorkerInfo] = []  # workers that died: their runs left RUNNING are to be closed
        log(f"ray: {self.size} worker(s) of {resources['CPU']:g} CPU, {resources['GPU']:g} GPU: "
            + ", ".join(str(w) for w in self.workers))

    def _spawn(self, count: int) -> list[WorkerInfo]:
        import ray

        handles = [self._actor.remote(max(1, int(self.resources["CPU"]))) for _ in range(count)]
        try:
            found = ray.get([h.identity.remote() for h in handles])
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"Ray workers could not start: {_reason(exc)}") from exc
        return [WorkerInfo(h, host, pid, device) for h, (host, pid, device) in zip(handles, found, strict=True)]

    def map(self, tasks: list[Any], submit: Callable[[Any, Any], Any], on_result: Callable[[Any, Any, WorkerInfo], None],
            on_error: Callable[[Any, str, WorkerInfo], None]) -> None:
        """Each task to the next free worker (``submit(handle, task)`` returns the call's ref); results
        and errors as they come. A worker that dies is replaced; its task goes to ``on_error``."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        queue, running, idle = deque(tasks), {}, list(self.workers)
        while queue or running:
            while queue and idle:
                worker, task = idle.pop(0), queue.popleft()
                running[submit(worker.handle, task)] = (task, worker)
            # in short waits: a signal is only handled between them (Ctrl-C, SIGTERM stop the command now)
            ready, _ = _interruptible(ray.wait, list(running), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                task, worker = running.pop(ref)
                try:
                    value = _interruptible(ray.get, ref)
                except RayActorError as exc:
                    self.gone.append(worker)
                    self.workers.remove(worker)
                    on_error(task, f"worker {worker} died ({_reason(exc)})", worker)
                    worker = self._spawn(1)[0]
                    self.workers.append(worker)
                    self.log(f"ray: replaced the dead worker with {worker}")
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                    on_error(task, f"on worker {worker}: {type(cause).__name__}: {_reason(cause)}", worker)
                else:
                    on_result(task, value, worker)
                idle.append(worker)

    def owners(self) -> list[tuple[str, str]]:
        """(host, pid) of every worker this pool started, alive or not."""
        return [(w.host, str(w.pid)) for w in [*self.workers, *self.gone]]

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker.handle)
        self.workers = []


def close_worker_runs(tracker: Any, parent: str, owners: list[tuple[str, str]], status: str, reason: str) -> int:
    """End the children of ``parent`` still RUNNING in a worker of ``owners`` (one that died, or was
    stopped with the driver): nothing stays RUNNING. Returns how many."""
    from tokcomp.sweep import child_runs

    closed = 0
    for run in child_runs(tracker, parent):
        tags = run.data.tags
        if run.info.status == "RUNNING" and (tags.get("tokcomp.host"), tags.get("tokcomp.pid")) in owners:
            tracker.abandon(run.info.run_id, status, reason)
            closed += 1
    return closed


@dataclass
class _Unit:
    """Configurations of one grid point run as one task."""

    order: tuple[int, int]  # (point, configuration): where its results go in the table
    cfg: Any
    point: list[str]
    label: str
    names: list[str]


class RaySession:
    """Connected to a cluster for one command, its workers started when there is work for them;
    ``close`` stops what it started. Everything that can be refused is refused here, before a run exists:
    no tracking server, an unreachable cluster, a task that fits no node."""

    def __init__(self, cfg: Any, address: str | None, tasks: int, log: Callable[[str], None]) -> None:
        resources = task_resources(cfg)  # a bad value: before connecting
        self.uri = check_tracking_server(cfg)
        self.resources, self.workers, self.tasks, self.log = resources, cfg.ray.workers, tasks, log
        self.started = connect(address)
        self._pool: WorkerPool | None = None
        try:
            import ray

            self.slots = worker_slots(self.resources, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        except BaseException:
            self.shutdown()
            raise

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(self.resources, self.workers, self.tasks, self.slots, self.log)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self.shutdown()

    def shutdown(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def ray_units(sweep: Any, uri: str, tracker: Any, parent: str, results: dict[tuple[int, int], Any],
              bar: Any, log: Callable[[str], None]) -> tuple[list[_Unit], list[_Unit]]:
    """The sweep's work as tasks: the first wave runs each distinct baseline, the second everything else.
    Configurations FINISHED in an earlier attempt go straight to ``results`` (SKIPPED); a point whose
    configurations cannot even be built is recorded FAILED, as locally."""
    from tokcomp.config import load_experiment
    from tokcomp.runner import ExperimentRunner, baseline_key, config_hash
    from tokcomp.sweep import child_runs, finished_children, record_bad_point, shared_baselines, short_labels

    runs = child_runs(tracker, parent)
    finished, seen = finished_children(tracker, runs), set(shared_baselines(tracker, runs))
    first, second = [], []
    for p, (point, label) in enumerate(zip(sweep.points, short_labels(sweep.points), strict=True)):
        try:
            cfg = load_experiment(sweep.experiment_file, [*sweep.fixed, *point])
            cfg.tracking.uri = uri  # as resolved here: a worker's environment may name another store
            runner = ExperimentRunner(cfg, trace=sweep.trace, experiment_file=sweep.experiment_file)
        except TokcompError as exc:
            results[(p, 0)] = record_bad_point(tracker, parent, label, exc, log)
            bar.update(1)
            continue
        base = next((name for name, strategies in runner.strategies.items() if not strategies), None)
        for c, name in enumerate(runner.strategies):
            key = config_hash(cfg, name)
            if key in finished:
                result = finished[key](False)
                result.status, result.point = "SKIPPED", label
                results[(p, c)] = result
                bar.update(1)
                continue
            unit = _Unit((p, c), cfg, point, label, [name])
            if name == base and baseline_key(cfg, name) not in seen:
                seen.add(baseline_key(cfg, name))
                first.append(unit)
            else:
                second.append(unit)
    return first, second


def run_sweep_on_ray(sweep: Any, session: RaySession, tracker: Any, parent: str, bar: Any,
                     log: Callable[[str], None]) -> list[Any]:
    """Every configuration of every point of ``sweep`` as Ray tasks; results in the local order."""
    from tokcomp.runner import ConfigurationResult

    results: dict[tuple[int, int], Any] = {}
    first, second = ray_units(sweep, session.uri, tracker, parent, results, bar, log)
    if not first and not second:  # all finished earlier: no worker needed
        return [results[k] for k in sorted(results)]
    pool = session.pool

    def submit(handle: Any, unit: _Unit) -> Any:
        tags = {"tokcomp.sweep_overrides": " ".join(unit.point), "tokcomp.executor": "ray"}
        return handle.run_configurations.remote(unit.cfg, sweep.experiment_file, parent, tags, unit.label,
                                                unit.names, sweep.trace)

    def on_result(unit: _Unit, value: list[Any], worker: WorkerInfo) -> None:
        for result in value:
            results[(unit.order[0], unit.order[1] + unit.names.index(result.name))] = result
            if result.status == "FAILED":
                log(f"{result.label} FAILED on {worker}: {result.error}")
        bar.update(len(unit.names))

    def on_error(unit: _Unit, message: str, worker: WorkerInfo) -> None:
        closed = close_worker_runs(tracker, parent, [(worker.host, str(worker.pid))], "KILLED", message)
        for i, name in enumerate(unit.names):
            results[(unit.order[0], unit.order[1] + i)] = ConfigurationResult(name, "FAILED", "", error=message,
                                                                              point=unit.label)
        log(f"{', '.join(unit.names)} [{unit.label}]: {message} ({closed} run(s) marked KILLED; the same command "
            f"again retries it)")
        bar.update(len(unit.names))

    try:
        for wave in (first, second):
            pool.map(wave, submit, on_result, on_error)
    except BaseException as exc:
        from tokcomp.runner import describe_stop, end_status

        owners = pool.owners()
        pool.close()
        close_worker_runs(tracker, parent, owners, end_status(exc), describe_stop(exc))
        raise
    return [results[k] for k in sorted(results)]


def shard_size(todo: int, workers: int, largest: int) -> int:
    """Samples per evaluation task: two tasks a worker at least (an even finish), at most ``largest``
    (one predictions part)."""
    return max(1, min(largest, math.ceil(todo / (2 * max(1, workers)))))
