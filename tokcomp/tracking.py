"""MLflow tracking through an explicit client: one parent run per invocation, one child per configuration.

The tracking URI is always set explicitly (config, then ``MLFLOW_TRACKING_URI``, then
``sqlite:///results/mlflow.db`` relative to the working directory), never MLflow's own default.

Nothing lost, nothing left dangling:

- A sqlite store is opened under a file lock (``<store>.lock``): MLflow creates a new store by
  running its schema migrations, which break when two processes do it at once.
- ``check_store`` tells, before any model is built, whether the store's folder and the
  experiment's artifact root can be written (and have space).
- Every run records the process that owns it (``tokcomp.host``, ``tokcomp.pid``; on Linux also
  the process's start time and the boot id, so a reused pid is not taken for the owner), so a run
  left RUNNING by a process that is gone can be told from one in progress (``owner_state``).
- An artifact that cannot be written raises ``ArtifactError``, a store that cannot be written
  ``TrackingError``: errors that name the path and the cause, never a bare traceback.
- ``terminate_cleanly`` turns SIGTERM into an exception, so the runs in progress are marked KILLED
  on the way out, and then ends the process by that signal as if it had not been handled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tokcomp.errors import TokcompError

DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"
_PARAM_VALUE_LIMIT = 6000
LOCK_TIMEOUT_S = 300.0  # creating a store takes seconds; a lock held longer is someone else's problem
MIN_FREE_MB = 16  # less free space than this where the store or its artifacts live: refuse up front


class TrackingError(TokcompError):
    """The tracking store or an artifact root cannot be created, opened or written."""


class ArtifactError(TrackingError):
    """One artifact could not be written (a read-only or full disk, a folder that cannot be made)."""


def safe_key(key: str) -> str:
    """MLflow keys allow alphanumerics and ``_-. :/``; configuration names may hold more."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _reason(exc: BaseException) -> str:
    """One line: an OS error's message and path, else the exception's type and first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return _reason(cause)
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


def resolve_tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    path = sqlite_path(uri)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the folder of the MLflow store {uri}: {_reason(exc)}") from exc
    return uri


def _artifact_root(uri: str) -> str | None:
    """Artifacts next to a sqlite store (``results/mlartifacts``) instead of a stray ./mlruns."""
    path = sqlite_path(uri)
    if path is not None:
        return (path.resolve().parent / "mlartifacts").as_uri()
    return None


def _local_path(uri: str | None) -> Path | None:
    """The folder behind a ``file:`` URI or a plain path; None for remote locations."""
    if not uri:
        return None
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri) if "://" not in uri and ":" not in uri.split("/")[0] else None


def _check_writable_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tokcomp-probe-"):
            pass
    except OSError as exc:
        raise TrackingError(f"cannot write to {what} ({folder}): {_reason(exc)}") from exc
    free_mb = shutil.disk_usage(folder).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise TrackingError(f"{what} ({folder}) has {free_mb:.1f} MiB free (at least {MIN_FREE_MB} MiB needed)")


def _existing_artifact_location(db: Path, experiment: str) -> str | None:
    """The artifact location an existing experiment was created with, read without opening MLflow."""
    import sqlite3

    if not db.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as con:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
    except sqlite3.Error:
        return None  # a store being created, or another schema: MLflow will tell
    return row[0] if row else None


def check_store(uri: str, experiment: str) -> None:
    """Raise ``TrackingError`` unless this run can write its store and its experiment's artifacts.

    Cheap and creates no database: meant for before a model is built. Remote stores are not probed.
    """
    path = sqlite_path(uri)
    if path is None:
        local = _local_path(uri)
        if local is not None:
            _check_writable_folder(local, "the MLflow store folder")
        return
    if path.exists() and not path.is_file():
        raise TrackingError(f"the MLflow store {uri} is not a file")
    _check_writable_folder(path.parent, f"the folder of the MLflow store {uri}")
    if path.is_file() and not os.access(path, os.W_OK):
        raise TrackingError(f"the MLflow store {uri} is read-only")
    root = _existing_artifact_location(path, experiment) or _artifact_root(uri)
    local = _local_path(root)
    if local is not None:
        _check_writable_folder(local, f"the artifact root of MLflow experiment {experiment!r}")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive, across processes, for a sqlite store (``<store>.lock``); a no-op for other stores."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout as exc:
        raise TrackingError(f"the lock {path}.lock of the MLflow store was held for over {LOCK_TIMEOUT_S:.0f} s") from exc
    except OSError as exc:
        raise TrackingError(f"cannot create the lock {path}.lock of the MLflow store: {_reason(exc)}") from exc
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _quiet_store_creation() -> Iterator[None]:
    """MLflow announces a new store's tables and migrations at INFO level: not news for a user."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def open_client(uri: str):
    """An ``MlflowClient`` whose store exists: created (migrations run) under the store's lock, quietly."""
    from mlflow.tracking import MlflowClient

    try:
        with store_lock(uri), _quiet_store_creation():
            return MlflowClient(tracking_uri=uri)
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"cannot open the MLflow store {uri}: {_reason(exc)}") from exc


# --- who owns a run ------------------------------------------------------------------------------

ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """A process's state letter and start time (clock ticks after boot), from /proc; None without it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # fields 3.. of proc(5): state is 3, starttime 22
    return fields[0], fields[19]


def owner_tags() -> dict[str, str]:
    """Tags naming this process, recorded on every run it starts."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {"tokcomp.host": socket.gethostname(), "tokcomp.pid": str(pid),
            "tokcomp.pid_start": stat[1] if stat else "", "tokcomp.boot_id": _boot_id()}


def owner_state(tags: dict[str, str]) -> str:
    """Whether the process that started a run still runs: ``alive``, ``dead``, or ``unknown`` (it was on
    another host, or the run predates the owner tags)."""
    host, pid = tags.get("tokcomp.host", ""), tags.get("tokcomp.pid", "")
    if not host or not pid.isdigit() or host != socket.gethostname():
        return UNKNOWN
    boot = tags.get("tokcomp.boot_id", "")
    if boot and _boot_id() and boot != _boot_id():
        return DEAD  # the machine restarted since
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return DEAD
    except PermissionError:
        pass  # someone else's process: it exists
    except OSError:
        return UNKNOWN
    stat = _proc_stat(int(pid))
    if stat is not None:
        state, start = stat
        if state in "ZX":
            return DEAD  # exited, not yet reaped
        if tags.get("tokcomp.pid_start") and start != tags["tokcomp.pid_start"]:
            return DEAD  # the pid now belongs to another process
    return ALIVE


def describe_owner(tags: dict[str, str]) -> str:
    return f"process {tags.get('tokcomp.pid', '?')} on {tags.get('tokcomp.host', 'an unknown host')}"


# --- ending cleanly on SIGTERM -------------------------------------------------------------------

class Terminated(BaseException):
    """SIGTERM, raised where the process was, so the runs it holds are marked KILLED on the way out."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Inside the block SIGTERM raises ``Terminated`` (once; a second SIGTERM waits for the clean-up).
    When it leaves the block, the process ends by SIGTERM as if it had not been handled (exit status
    143 in a shell, no traceback). Only in the main thread, and only where SIGTERM has no handler yet."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Terminated:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise  # only where the signal is not delivered at once
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def machine_tags(device: str) -> dict[str, str]:
    """Package versions and hardware, so every number can be traced to where it came from."""
    import torch
    import transformers

    from tokcomp import __version__

    tags = {
        "tokcomp.version": __version__, "torch.version": torch.__version__,
        "transformers.version": transformers.__version__, "python.version": platform.python_version(),
        "host.platform": platform.platform(), "host.cpu": _cpu_name(), "host.cpu_threads": str(torch.get_num_threads()),
        "host.device": device,
    }
    if torch.cuda.is_available():
        tags["host.gpu"] = torch.cuda.get_device_name(0)
    return tags


def _cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx512f", "amx_bf16", "avx2") if f in flags]
    return f"{name} ({', '.join(extras)})" if extras else name


class Tracker:
    """Thin wrapper over ``MlflowClient``: no global active run, so nothing leaks between calls.

    A store that cannot be written raises ``TrackingError``, an artifact that cannot be written
    ``ArtifactError``; every run started records its owner process (``owner_tags``).
    """

    def __init__(self, uri: str, experiment: str):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bar is enough
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a server's run links: on stdout
        self.uri = uri
        self.client = open_client(uri)
        with store_lock(uri):  # two new runs must not both create the experiment
            found = self._store("read the experiments", self.client.get_experiment_by_name, experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
                self.artifact_location = found.artifact_location
            else:
                self.experiment_id = self._store("create the experiment", self.client.create_experiment, experiment,
                                                 artifact_location=_artifact_root(uri))
                self.artifact_location = self.client.get_experiment(self.experiment_id).artifact_location

    def _store(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            raise TrackingError(f"cannot {what} in the MLflow store {self.uri}: {_reason(exc)}") from exc

    def _artifact(self, run_id: str, artifact_file: str, write: Callable[[], Any]) -> None:
        try:
            write()
        except Exception as exc:
            raise ArtifactError(f"cannot write artifact {artifact_file!r} of run {run_id} under "
                                f"{self.artifact_location}: {_reason(exc)}") from exc

    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        tags = {**tags, **owner_tags(), "mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self._store("start a run", self.client.create_run, self.experiment_id, tags=tags, run_name=name)
        return run.info.run_id

    def take_over(self, run_id: str) -> None:
        """Mark a run RUNNING again, owned by this process (a resumed sweep's parent)."""
        self._store("resume a run", self.client.update_run, run_id, status="RUNNING")
        self.set_tags(run_id, owner_tags())

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(safe_key(k)[:250], str(v)[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._store("log parameters", self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.log_series(run_id, {k: [(0, v, now)] for k, v in metrics.items()})

    def log_series(self, run_id: str, series: dict[str, list[tuple[int, float, int]]]) -> None:
        """Metrics with a history: ``{key: [(step, value, timestamp in ms), ...]}``."""
        from mlflow.entities import Metric

        items = [Metric(safe_key(k), float(v), ts, step) for k, values in series.items() for step, v, ts in values]
        for i in range(0, len(items), 500):
            self._store("log metrics", self.client.log_batch, run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._store("set a tag", self.client.set_tag, run_id, k, str(v)[:5000])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._artifact(run_id, artifact_file, lambda: self.client.log_text(run_id, text, artifact_file))

    def log_json(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_tensor(self, run_id: str, tensor: Any, artifact_file: str) -> None:
        import torch

        def write() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / artifact_file
                torch.save(tensor, path)
                self.client.log_artifact(run_id, str(path))

        self._artifact(run_id, artifact_file, write)

    def load_tensor(self, run_id: str, artifact_file: str) -> Any:
        import torch

        path = self._store(f"read artifact {artifact_file!r} of run {run_id}", self.client.download_artifacts, run_id,
                           artifact_file)
        return torch.load(path, weights_only=True)

    def load_json(self, run_id: str, artifact_file: str) -> Any:
        path = self._store(f"read artifact {artifact_file!r} of run {run_id}", self.client.download_artifacts, run_id,
                           artifact_file)
        return json.loads(Path(path).read_text())

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._store(f"mark run {run_id} {status}", self.client.set_terminated, run_id, status=status)

    def fail(self, run_id: str, message: str, details: str) -> None:
        """End a run FAILED with its error: the tag ``tokcomp.error`` and, where it can be written, the
        artifact ``error.txt`` (else the tag ``tokcomp.error_artifact`` says why not). Raises
        ``TrackingError`` only when the store cannot take even the tag."""
        self.set_tags(run_id, {"tokcomp.error": message})
        try:
            self.log_text(run_id, details, "error.txt")
        except ArtifactError as exc:
            self.set_tags(run_id, {"tokcomp.error_artifact": f"error.txt not written: {exc}"})
        self.finish(run_id, "FAILED")

    def abandon(self, run_id: str, status: str = "KILLED", reason: str = "") -> None:
        """End a run on the way out of an interruption (KILLED) or an unexpected error (FAILED), with the
        reason as ``tokcomp.error``; never raises: what is propagating matters more."""
        with contextlib.suppress(Exception):
            if reason:
                self.set_tags(run_id, {"tokcomp.error": reason})
        with contextlib.suppress(Exception):
            self.finish(run_id, status)


class NullTracker:
    """Used with ``tracking.enabled=false``: the same calls, nothing recorded."""

    uri = None
    artifact_location = None

    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        return ""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
