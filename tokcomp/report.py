"""Compare the configurations of one ``tokcomp run`` or ``tokcomp sweep`` from what MLflow recorded.

Everything is read back from the tracking store (never from the runner's memory), so a report can
be made later, on another machine, for any parent run. Ratios and speedups are always relative to
the uncompressed baseline of the same sweep point: a configuration at 8 frames is never compared
with a baseline at 32.

A configuration attempted more than once (a sweep resumed after an interruption or a failure)
shows once: its FINISHED attempt, else its latest. A run still RUNNING whose process is gone is
shown KILLED. A speedup more than 10% above what the FLOPs allow (baseline exact FLOPs over the
configuration's) is flagged as suspect: timing noise, or work the FLOPs count does not see.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokcomp.errors import ConfigError, UnknownNameError
from tokcomp.tables import render_table
from tokcomp.tracking import DEAD, describe_owner, open_client, owner_state, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

PARENT_KINDS = ("experiment", "sweep", "evaluation")
REPORT_ARTIFACT_DIR = "report"
METRICS = (
    "retained_ratio", "ttft.total_ms", "ttft.total_ms_min", "ttft.total_ms_max", "ttft.vision_ms",
    "ttft.token_processing_ms", "ttft.prefill_ms", "ttft.other_ms", "throughput.tokens_per_s",
    "flops.paper.total_T", "flops.paper.vision_T", "flops.paper.llm_T", "flops.exact.total_T",
    "flops.exact.vision_T", "flops.exact.llm_T", "fidelity.kl", "fidelity.top1_agreement",
    "fidelity.exact_match", "memory.peak_mb", "tokens.llm_visual", "tokens.vision_in",
)
TABLE_HEADER = ["configuration", "retained", "FLOPs paper T", "paper %", "FLOPs exact T", "exact %", "TTFT ms",
                "speedup", "tok/s", "KL", "top-1", "exact match", "note"]
TABLE_LEGEND = (
    "paper % / exact %: FLOPs (paper protocol / exact count) as a share of the baseline's; speedup: baseline "
    "TTFT / TTFT;\nKL, top-1 (agreement) and exact match compare with the baseline's output. Every ratio uses "
    "the baseline of the same sweep point. '-': not recorded.\nsuspect: a speedup over 10% above the FLOPs-ideal "
    "one (baseline exact FLOPs / exact FLOPs)."
)
ACCURACY_LEGEND = (
    "\naccuracy: share of the evaluation's samples answered correctly (a failed sample counts as wrong), overall "
    "and per question type;\nretained, FLOPs and TTFT of an evaluation are means over its samples."
)
SUSPECT_MARGIN = 0.10  # a speedup this much above the FLOPs-ideal one is flagged


@dataclass
class Row:
    """One configuration run, flattened: what the table, the CSV and the plots need."""

    run_id: str
    label: str
    configuration: str
    point: str
    status: str
    error: str
    is_baseline: bool
    strategies: str
    start_time: int
    metrics: dict[str, float] = field(default_factory=dict)
    config_hash: str = ""  # the identity of the configuration at its point (attempts share it)
    reuses: str = ""  # a baseline that reuses another point's run: that run's id
    device: str = ""  # what its times were measured on (GPU name, or CPU model), from its tags
    load_ledger: Callable[[], dict[str, Any] | None] | None = field(default=None, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @cached_property
    def ledger(self) -> dict[str, Any] | None:
        """``ledger.json``, fetched on first use: only the per-layer plot needs it."""
        return self.load_ledger() if self.load_ledger else None


# --- finding the parent run -------------------------------------------------------------------

def find_parent_run(client: MlflowClient, target: str | None = None) -> Run:
    """The parent run named by a run id, an experiment YAML or an MLflow experiment name.

    No target: the most recent parent run in the whole store. A configuration's run id resolves to
    its parent, since a comparison is always between siblings.
    """
    if target is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        return _latest_parent(client, experiment_ids, f"the tracking store {client.tracking_uri}")
    run = _run_by_id(client, target)
    if run is not None:
        return run
    name = experiment_name(target)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = [e.name for e in client.search_experiments()]
        error = UnknownNameError("MLflow experiment (or run id)", name, known)
        where = f"{target}: " if name != target else ""
        raise ConfigError(f"{where}{error} (tracking store: {client.tracking_uri})")
    return _latest_parent(client, [experiment.experiment_id], f"MLflow experiment {name!r}")


def experiment_name(target: str) -> str:
    """The MLflow experiment a YAML file logs to, or the target itself when it is a name."""
    if not _is_yaml(target):
        return target
    from tokcomp.config import load_experiment

    cfg = load_experiment(target)
    return str(cfg.tracking.experiment or cfg.name)


def _is_yaml(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def _run_by_id(client: MlflowClient, target: str) -> Run | None:
    if not re.fullmatch(r"[0-9a-f]{32}", target):
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(target)
    except MlflowException:
        return None
    if run.data.tags.get("tokcomp.kind") == "configuration":
        return client.get_run(run.data.tags["mlflow.parentRunId"])
    return run


def _latest_parent(client: MlflowClient, experiment_ids: list[str], where: str) -> Run:
    # MLflow's search cannot OR two tag values, hence one query per kind.
    candidates = []
    for kind in PARENT_KINDS:
        candidates += client.search_runs(experiment_ids, f"tags.`tokcomp.kind` = '{kind}'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
    if not candidates:
        raise ConfigError(f"no tokcomp run or sweep found in {where}: run `tokcomp run <experiment.yaml>` first")
    return max(candidates, key=lambda r: r.info.start_time)


# --- reading the children ---------------------------------------------------------------------

def collect(client: MlflowClient, parent: Run, attempts: bool = False) -> list[Row]:
    """The parent's configuration runs: per sweep point (in run order), baseline first, then by start.
    One row per configuration (its FINISHED attempt, else its latest), or with ``attempts`` every run."""
    runs = _search_all(client, parent.info.experiment_id, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    rows = [_row(client, run) for run in runs]
    if not attempts:
        rows = latest_attempts(rows)
    first_start: dict[str, int] = {}
    for row in sorted(rows, key=lambda r: r.start_time):
        first_start.setdefault(row.point, row.start_time)
    return sorted(rows, key=lambda r: (first_start[r.point], r.point, not r.is_baseline, r.start_time))


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def latest_attempts(rows: list[Row]) -> list[Row]:
    """One row per configuration of a sweep point: the FINISHED attempt if there is one, else the latest."""
    best: dict[tuple[str, str], Row] = {}
    for row in sorted(rows, key=lambda r: r.start_time):
        key = (row.point, row.config_hash or row.label)
        current = best.get(key)
        if current is None or row.finished or not current.finished:
            best[key] = row
    return list(best.values())


def _row(client: MlflowClient, run: Run) -> Row:
    tags = run.data.tags
    configuration = tags.get("tokcomp.configuration", tags.get("mlflow.runName", run.info.run_id))
    # Runs logged before the tokcomp.baseline tag existed: the runner's baseline is "uncompressed".
    baseline = tags.get("tokcomp.baseline", str(configuration == "uncompressed").lower()) == "true"
    status, error = run.info.status, tags.get("tokcomp.error", "")
    if status == "RUNNING":  # in progress, or left behind by a process that is gone
        state = owner_state(tags)
        if state == DEAD:
            status, error = "KILLED", f"{describe_owner(tags)} ended without finishing this run"
        elif state == "alive":
            error = f"in progress ({describe_owner(tags)})"
        elif "tokcomp.pid" in tags:
            error = f"started by {describe_owner(tags)}, which cannot be checked from here"
    return Row(
        run_id=run.info.run_id, label=tags.get("tokcomp.label", configuration), configuration=configuration,
        point=tags.get("tokcomp.sweep_point", ""), status=status, error=error,
        is_baseline=baseline, strategies=tags.get("tokcomp.strategies", ""), start_time=run.info.start_time or 0,
        metrics=dict(run.data.metrics), config_hash=tags.get("tokcomp.config_hash", ""),
        reuses=tags.get("tokcomp.reuses_run", ""), device=timed_on(tags),
        load_ledger=lambda: _download_json(client, run.info.run_id, "ledger.json"),
    )


def timed_on(tags: dict[str, str]) -> str:
    """The device type a run was timed on: its GPU, else its CPU model ("" when not recorded)."""
    if tags.get("host.gpu"):
        return tags["host.gpu"]
    return f"{tags['host.device']}: {tags.get('host.cpu', '?')}" if tags.get("host.device") else ""


def device_warning(rows: list[Row]) -> str:
    """A warning when the timed rows of one table ran on different device types (a sweep spread over a
    mixed cluster): their TTFT and throughput are not comparable."""
    timed = Counter(row.device for row in rows if row.finished and row.device and not row.reuses
                    and "ttft.total_ms" in row.metrics)
    if len(timed) < 2:
        return ""
    kinds = "; ".join(f"{device} ({count} run{'s' * (count > 1)})" for device, count in timed.most_common())
    return (f"warning: these configurations were timed on {len(timed)} different device types ({kinds}): "
            f"compare their times only within one device type")


def _download_json(client: MlflowClient, run_id: str, path: str) -> dict[str, Any] | None:
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(local).read_text())


def baselines(rows: list[Row]) -> dict[str, Row]:
    """The finished baseline of each sweep point; a point whose baseline failed has none."""
    found: dict[str, Row] = {}
    for row in rows:
        if row.is_baseline and row.finished:
            found.setdefault(row.point, row)
    return found


def ratio(row: Row, base: Row | None, key: str) -> float | None:
    """``row / base`` for one metric; None when either is missing or the base is zero."""
    value = row.metrics.get(key)
    reference = base.metrics.get(key) if base else None
    if value is None or not reference:
        return None
    return value / reference


def speedup(row: Row, base: Row | None) -> float | None:
    """Baseline TTFT over this TTFT, as the paper reports it (2.65x = 2.65 times faster)."""
    slowdown = ratio(row, base, "ttft.total_ms")
    return 1 / slowdown if slowdown else None


def ideal_speedup(row: Row, base: Row | None) -> float | None:
    """The speedup the FLOPs allow: baseline exact FLOPs over this configuration's."""
    share = ratio(row, base, "flops.exact.total_T")
    return 1 / share if share else None


def suspect(row: Row, base: Row | None) -> bool:
    """A measured speedup more than ``SUSPECT_MARGIN`` above the FLOPs-ideal one."""
    measured, ideal = speedup(row, base), ideal_speedup(row, base)
    return measured is not None and ideal is not None and measured > ideal * (1 + SUSPECT_MARGIN)


# --- the table and the CSV ---------------------------------------------------------------------

def _tera(value: float | None) -> str:
    """T with two decimals; tiny test models get three significant digits instead of 0.00."""
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.3g}"


def accuracy_kinds(rows: list[Row]) -> list[str] | None:
    """The question types with per-type accuracy, when the rows come from ``tokcomp eval`` (else None)."""
    if not any("accuracy" in row.metrics for row in rows):
        return None
    return sorted({k[len("accuracy."):] for row in rows for k in row.metrics if k.startswith("accuracy.")})


def table_header(rows: list[Row]) -> list[str]:
    """Table 1's columns; an evaluation's rows add accuracy overall and per question type after retention."""
    kinds = accuracy_kinds(rows)
    if kinds is None:
        return TABLE_HEADER
    return [*TABLE_HEADER[:2], "accuracy", *[f"acc. {k}" for k in kinds], *TABLE_HEADER[2:]]


def comparison_table(rows: list[Row]) -> str:
    """The paper's Table 1 layout: retention, (accuracy,) FLOPs and their ratio, TTFT and speedup,
    throughput, fidelity."""
    bases, kinds = baselines(rows), accuracy_kinds(rows)
    return render_table(table_header(rows), [_table_cells(row, bases.get(row.point), kinds) for row in rows])


def _table_cells(row: Row, base: Row | None, kinds: list[str] | None = None) -> list[str]:
    accuracy = [] if kinds is None else ["accuracy", *kinds]
    if not row.finished:
        return [row.label, *["-"] * (len(TABLE_HEADER) - 2 + len(accuracy)), _note(row)]
    m = row.metrics
    paper, exact = ratio(row, base, "flops.paper.total_T"), ratio(row, base, "flops.exact.total_T")
    scores = [_fmt(_percent(m.get(key if key == "accuracy" else f"accuracy.{key}")), "{:.1f}%") for key in accuracy]
    return [
        row.label, _fmt(_percent(m.get("retained_ratio")), "{:.1f}%"), *scores,
        _tera(m.get("flops.paper.total_T")), _fmt(_percent(paper), "{:.1f}%"),
        _tera(m.get("flops.exact.total_T")), _fmt(_percent(exact), "{:.1f}%"),
        _fmt(m.get("ttft.total_ms"), "{:.1f}"), _fmt(speedup(row, base), "x{:.2f}"),
        _fmt(m.get("throughput.tokens_per_s"), "{:.1f}"), _fmt(m.get("fidelity.kl"), "{:.4f}"),
        _fmt(_percent(m.get("fidelity.top1_agreement")), "{:.1f}%"), _yes_no(m.get("fidelity.exact_match")),
        _note(row, base),
    ]


def legend(rows: list[Row]) -> str:
    return TABLE_LEGEND + (ACCURACY_LEGEND if accuracy_kinds(rows) is not None else "")


def _note(row: Row, base: Row | None = None) -> str:
    if not row.finished:
        first_line = row.error.strip().splitlines()[0] if row.error.strip() else "no error recorded"
        return f"{row.status}: {_shorten(first_line, 80)}"
    if row.is_baseline:
        return f"baseline (reuses run {row.reuses[:8]})" if row.reuses else "baseline"
    if suspect(row, base):
        return f"suspect: x{speedup(row, base):.2f} > FLOPs-ideal x{ideal_speedup(row, base):.2f}"
    return ""


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _yes_no(value: float | None) -> str:
    return "-" if value is None else ("yes" if value >= 0.5 else "no")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_csv(rows: list[Row], path: Path) -> Path:
    """Every recorded metric, raw, plus the baseline ratios: for spreadsheets and scripts."""
    bases = baselines(rows)
    # repeat.* hold one value per repeat (metric history); the run's metrics keep only the last
    extra = sorted({k for row in rows for k in row.metrics if not k.startswith("repeat.")} - set(METRICS))
    header = ["run_id", "label", "configuration", "sweep_point", "status", "baseline", "strategies", *METRICS,
              *extra, "flops.paper.ratio", "flops.exact.ratio", "ttft.speedup", "flops.ideal_speedup",
              "reuses_run", "note", "error"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            base = bases.get(row.point)
            derived = [ratio(row, base, "flops.paper.total_T"), ratio(row, base, "flops.exact.total_T"),
                       speedup(row, base), ideal_speedup(row, base)]
            writer.writerow([row.run_id, row.label, row.configuration, row.point, row.status, row.is_baseline,
                             row.strategies, *(row.metrics.get(k) for k in (*METRICS, *extra)),
                             *derived, row.reuses, _note(row, base) if row.finished else "", row.error])
    return path


# --- the report --------------------------------------------------------------------------------

def write_report(client: MlflowClient, parent: Run, out_dir: Path, rows: list[Row] | None = None) -> list[Path]:
    """Table, CSV and plots into ``out_dir``, also logged on the parent run under ``report/``."""
    from tokcomp import plots

    rows = collect(client, parent) if rows is None else rows
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "comparison.txt"
    text.write_text(f"{_title(client, parent)}\n\n{comparison_table(rows)}\n\n{legend(rows)}\n")
    paths = [text, write_csv(rows, out_dir / "comparison.csv")]
    for name, plot in (("ttft_breakdown.png", plots.plot_ttft_breakdown), ("pareto.png", plots.plot_pareto),
                       ("tokens_per_layer.png", plots.plot_tokens_per_layer)):
        plot(rows, out_dir / name)
        paths.append(out_dir / name)
    for path in paths:
        client.log_artifact(parent.info.run_id, str(path), REPORT_ARTIFACT_DIR)
    return paths


def _title(client: MlflowClient, parent: Run) -> str:
    tags = parent.data.tags
    experiment = client.get_experiment(parent.info.experiment_id).name
    return (f"{tags.get('mlflow.runName', experiment)} ({tags.get('tokcomp.kind', 'run')}): parent run "
            f"{parent.info.run_id} in MLflow experiment {experiment!r} at {client.tracking_uri}")


def default_out_dir(client: MlflowClient, parent: Run) -> Path:
    """``results/compare/<experiment>/<parent run id>/``: one folder per run or sweep, so comparing
    another run of the same experiment never overwrites an earlier report."""
    name = client.get_experiment(parent.info.experiment_id).name
    folder = re.sub(r"[^\w.-]+", "_", name).strip("._") or "experiment"
    return Path("results") / "compare" / folder / parent.info.run_id[:12]


# --- the command -------------------------------------------------------------------------------

def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default=None,
                        help="parent run id, experiment YAML or MLflow experiment name "
                             "(default: the most recent run or sweep in the store)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: the YAML's tracking.uri, $MLFLOW_TRACKING_URI, "
                             "sqlite:///results/mlflow.db)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where to write the report (default: results/compare/<experiment>/)")


def cmd_compare(args: argparse.Namespace) -> int:
    # The report downloads one small ledger per configuration: no progress bar for each.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(args.tracking_uri or _configured_uri(args.target))
    _require_store(uri)
    client = open_client(uri)  # under the store's lock: a store being created by a run is not half-read
    parent = find_parent_run(client, args.target)
    rows = collect(client, parent)
    if not rows:
        raise ConfigError(f"parent run {parent.info.run_id} has no configuration runs")
    paths = write_report(client, parent, Path(args.out) if args.out else default_out_dir(client, parent), rows)
    warning = device_warning(rows)
    if warning:
        print(warning, file=sys.stderr)
    print(f"{_title(client, parent)}\n\n{comparison_table(rows)}\n\n{legend(rows)}\n")
    print(f"written (and logged on the parent run under {REPORT_ARTIFACT_DIR}/):")
    print("\n".join(f"  {path}" for path in paths))
    return 0


def _configured_uri(target: str | None) -> str | None:
    """A YAML target brings its own ``tracking.uri``, as ``tokcomp run`` would use it."""
    if target is None or not _is_yaml(target):
        return None
    from tokcomp.config import load_experiment

    return load_experiment(target).tracking.uri


def _require_store(uri: str) -> None:
    """MLflow would silently create an empty sqlite store; a missing one is a user error."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"no MLflow store at {uri}: run `tokcomp run <experiment.yaml>` first, "
                          f"or pass --tracking-uri")
