"""MLflow tracking through an explicit client: one parent run per invocation, one child per configuration.

The tracking URI is always set explicitly (config, then ``MLFLOW_TRACKING_URI``, then
``sqlite:///results/mlflow.db`` relative to the working directory), never MLflow's own default.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"
_PARAM_VALUE_LIMIT = 6000


def safe_key(key: str) -> str:
    """MLflow keys allow alphanumerics and ``_-. :/``; configuration names may hold more."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def resolve_tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _artifact_root(uri: str) -> str | None:
    """Artifacts next to a sqlite store (``results/mlartifacts``) instead of a stray ./mlruns."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


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
    """Thin wrapper over ``MlflowClient``: no global active run, so nothing leaks between calls."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bar is enough
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=_artifact_root(uri))

    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        tags = {**tags, "mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(safe_key(k)[:250], str(v)[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(safe_key(k), float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v)[:5000])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_json(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_tensor(self, run_id: str, tensor: Any, artifact_file: str) -> None:
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / artifact_file
            torch.save(tensor, path)
            self.client.log_artifact(run_id, str(path))

    def load_tensor(self, run_id: str, artifact_file: str) -> Any:
        import torch

        return torch.load(self.client.download_artifacts(run_id, artifact_file), weights_only=True)

    def load_json(self, run_id: str, artifact_file: str) -> Any:
        return json.loads(Path(self.client.download_artifacts(run_id, artifact_file)).read_text())

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


class NullTracker:
    """Used with ``tracking.enabled=false``: the same calls, nothing recorded."""

    uri = None

    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        return ""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
