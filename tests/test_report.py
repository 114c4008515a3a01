"""`tokcomp compare`: reading a parent run back from MLflow into a table, a CSV and plots."""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from dataclasses import replace

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tokcomp.errors import TokcompError
from tokcomp.plots import fidelity_axis, pareto_front, plot_tokens_per_layer
from tokcomp.report import (
    add_compare_arguments,
    cmd_compare,
    collect,
    comparison_table,
    find_parent_run,
    write_report,
)

T0 = int(time.time() * 1000) - 3_600_000  # explicit start times: order must not depend on clock resolution

BASELINE = {"retained_ratio": 1.0, "flops.paper.total_T": 82.6, "flops.exact.total_T": 80.0,
            "ttft.total_ms": 889.9, "ttft.total_ms_min": 870.0, "ttft.total_ms_max": 910.0,
            "ttft.vision_ms": 323.0, "ttft.token_processing_ms": 64.0, "ttft.prefill_ms": 450.0, "ttft.other_ms": 52.9,
            "throughput.tokens_per_s": 24.4}
TOPK = {"retained_ratio": 0.25, "flops.paper.total_T": 50.5, "flops.exact.total_T": 48.0, "ttft.total_ms": 516.6,
        "ttft.vision_ms": 323.0, "ttft.token_processing_ms": 40.0, "ttft.prefill_ms": 120.0, "ttft.other_ms": 33.6,
        "throughput.tokens_per_s": 29.4, "fidelity.kl": 0.0512, "fidelity.top1_agreement": 0.95,
        "fidelity.exact_match": 1.0}
FASTV = {"retained_ratio": 1.0, "flops.paper.total_T": 51.1, "flops.exact.total_T": 50.0, "ttft.total_ms": 820.0,
         "ttft.vision_ms": 323.0, "ttft.token_processing_ms": 5.0, "ttft.prefill_ms": 440.0, "ttft.other_ms": 52.0,
         "throughput.tokens_per_s": 28.4, "fidelity.kl": 0.1, "fidelity.top1_agreement": 0.9,
         "fidelity.exact_match": 0.0}
LEDGER = {"vision_layers": [{"frames": 8, "tokens_per_frame": 64}] * 3, "llm_layers": [300, 300, 200],
          "text_tokens": 20, "visual_tokens_after_pre_llm": 280}


class Store:
    """Writes runs the way the runner does, with explicit start times."""

    def __init__(self, uri: str, artifacts: str):
        self.client = MlflowClient(uri)
        self.artifacts = artifacts
        self.clock = T0

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name, artifact_location=f"{self.artifacts}/{name}")

    def _start(self, experiment_id: str, tags: dict[str, str]) -> str:
        self.clock += 1000
        return self.client.create_run(experiment_id, start_time=self.clock, tags=tags).info.run_id

    def parent(self, experiment_id: str, name: str, kind: str = "experiment") -> str:
        run_id = self._start(experiment_id, {"mlflow.runName": name, "tokcomp.kind": kind})
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def child(self, experiment_id: str, parent: str, name: str, metrics: dict[str, float], point: str = "",
              status: str = "FINISHED", error: str = "", ledger: dict | None = None) -> str:
        tags = {"mlflow.runName": name, "mlflow.parentRunId": parent, "tokcomp.kind": "configuration",
                "tokcomp.configuration": name, "tokcomp.label": f"{name} [{point}]" if point else name,
                "tokcomp.sweep_point": point, "tokcomp.strategies": name if name != "uncompressed" else "none"}
        if name == "uncompressed":
            tags["tokcomp.baseline"] = "true"
        if error:
            tags["tokcomp.error"] = error
        run_id = self._start(experiment_id, tags)
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        if ledger is not None:
            self.client.log_text(run_id, json.dumps(ledger), "ledger.json")
        self.client.set_terminated(run_id, status)
        return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A plain run (baseline started after one config, one failure) and, later, a two-point sweep."""
    folder = tmp_path_factory.mktemp("report")
    s = Store(f"sqlite:///{folder / 'm.db'}", (folder / "artifacts").as_uri())
    exp = s.experiment("report-test")
    s.ids = {"plain": s.parent(exp, "report-test")}
    s.ids["topk"] = s.child(exp, s.ids["plain"], "topk_25", TOPK, ledger=LEDGER)
    s.ids["uncompressed"] = s.child(exp, s.ids["plain"], "uncompressed", BASELINE, ledger=LEDGER)
    s.ids["broken"] = s.child(exp, s.ids["plain"], "broken", {}, status="FAILED",
                              error="RuntimeError: boom at pre-LLM\nmore detail")
    s.ids["fastv"] = s.child(exp, s.ids["plain"], "fastv", FASTV, ledger=LEDGER)
    s.experiment("empty-experiment")
    sweep_exp = s.experiment("report-sweep")
    s.ids["sweep"] = s.parent(sweep_exp, "report-sweep", kind="sweep")
    for frames, scale in ((8, 0.25), (16, 0.5)):
        point = f"input.frames={frames}"
        s.child(sweep_exp, s.ids["sweep"], "uncompressed", {k: v * scale for k, v in BASELINE.items()}, point)
        s.child(sweep_exp, s.ids["sweep"], "topk_25", {**TOPK, "ttft.total_ms": 100.0 * scale * 2}, point)
    return s


@pytest.fixture(scope="module")
def rows(store):
    return collect(store.client, store.client.get_run(store.ids["plain"]))


@pytest.fixture(scope="module")
def report(store, rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return write_report(store.client, store.client.get_run(store.ids["plain"]), out, rows), out


def table_cells(table: str) -> dict[str, dict[str, str]]:
    """Parse the rendered table back into {label: {column: cell}} (columns are 2+ spaces apart)."""
    lines = table.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    cells = [re.split(r"\s{2,}", line) for line in lines[2:]]
    return {c[0]: dict(zip(header, c + [""] * (len(header) - len(c)), strict=True)) for c in cells}


def test_parent_run_is_found_by_run_id_by_experiment_name_and_by_yaml(store, tmp_path):
    client, plain = store.client, store.ids["plain"]
    assert find_parent_run(client, plain).info.run_id == plain
    assert find_parent_run(client, "report-test").info.run_id == plain
    yaml = tmp_path / "exp.yaml"
    yaml.write_text("name: something-else\ntracking: {experiment: report-test}\n")
    assert find_parent_run(client, str(yaml)).info.run_id == plain


def test_configuration_run_id_resolves_to_its_parent(store):
    assert find_parent_run(store.client, store.ids["fastv"]).info.run_id == store.ids["plain"]


def test_no_target_means_the_most_recent_parent_in_the_store(store):
    assert find_parent_run(store.client).info.run_id == store.ids["sweep"]


def test_unknown_target_is_an_error_that_names_it_and_suggests_close_names(store):
    with pytest.raises(TokcompError, match=r"'report-tset'.*Did you mean 'report-test'"):
        find_parent_run(store.client, "report-tset")


def test_experiment_without_parent_runs_is_an_error(store):
    with pytest.raises(TokcompError, match="no tokcomp run or sweep found in MLflow experiment 'empty-exp"):
        find_parent_run(store.client, "empty-experiment")


def test_rows_start_with_the_baseline_then_follow_start_time(rows):
    assert [r.label for r in rows] == ["uncompressed", "topk_25", "broken", "fastv"]
    assert rows[0].is_baseline and not any(r.is_baseline for r in rows[1:])
    assert rows[2].status == "FAILED" and rows[2].error.startswith("RuntimeError: boom")


def test_ledger_is_downloaded_only_when_asked_for(rows):
    topk, broken = rows[1], rows[2]
    assert "ledger" not in vars(topk)
    assert topk.ledger == LEDGER
    assert broken.ledger is None


def test_table_gives_flops_ratios_and_speedup_against_the_baseline(rows):
    cells = table_cells(comparison_table(rows))
    topk = cells["topk_25"]
    assert topk["retained"] == "25.0%"
    assert (topk["FLOPs paper T"], topk["paper %"]) == ("50.50", "61.1%")  # 50.5 / 82.6
    assert (topk["FLOPs exact T"], topk["exact %"]) == ("48.00", "60.0%")
    assert (topk["TTFT ms"], topk["speedup"]) == ("516.6", "x1.72")  # 889.9 / 516.6
    assert (topk["tok/s"], topk["KL"], topk["top-1"], topk["exact match"]) == ("29.4", "0.0512", "95.0%", "yes")
    assert cells["fastv"]["exact match"] == "no"
    base = cells["uncompressed"]
    assert (base["paper %"], base["speedup"], base["note"]) == ("100.0%", "x1.00", "baseline")


def test_missing_values_print_as_a_dash(rows):
    base = table_cells(comparison_table(rows))["uncompressed"]
    assert base["KL"] == base["top-1"] == base["exact match"] == "-"


def test_failed_row_shows_its_error_instead_of_numbers(rows):
    broken = table_cells(comparison_table(rows))["broken"]
    assert broken["note"] == "FAILED: RuntimeError: boom at pre-LLM"
    assert {broken[c] for c in ("retained", "FLOPs paper T", "TTFT ms", "speedup")} == {"-"}


def test_sweep_points_compare_with_their_own_baseline(store):
    rows = collect(store.client, store.client.get_run(store.ids["sweep"]))
    assert [r.label for r in rows] == ["uncompressed [input.frames=8]", "topk_25 [input.frames=8]",
                                       "uncompressed [input.frames=16]", "topk_25 [input.frames=16]"]
    cells = table_cells(comparison_table(rows))
    # baseline FLOPs scale with the point (x0.25, x0.5); topk's are the same at both points
    assert cells["topk_25 [input.frames=8]"]["paper %"] == f"{100 * 50.5 / (82.6 * 0.25):.1f}%"
    assert cells["topk_25 [input.frames=16]"]["paper %"] == f"{100 * 50.5 / (82.6 * 0.5):.1f}%"
    assert cells["topk_25 [input.frames=8]"]["speedup"] == f"x{889.9 * 0.25 / 50.0:.2f}"
    assert cells["topk_25 [input.frames=16]"]["speedup"] == f"x{889.9 * 0.5 / 100.0:.2f}"


def test_report_writes_table_csv_and_plots(report):
    paths, out = report
    assert sorted(p.name for p in paths) == ["comparison.csv", "comparison.txt", "pareto.png",
                                             "tokens_per_layer.png", "ttft_breakdown.png"]
    assert all(p.parent == out for p in paths)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "FAILED: RuntimeError: boom at pre-LLM" in (out / "comparison.txt").read_text()


def test_report_csv_has_one_row_per_configuration_with_raw_ratios(report):
    _, out = report
    with (out / "comparison.csv").open() as f:
        records = {r["label"]: r for r in csv.DictReader(f)}
    assert list(records) == ["uncompressed", "topk_25", "broken", "fastv"]
    assert float(records["topk_25"]["flops.exact.ratio"]) == pytest.approx(0.6)
    assert float(records["topk_25"]["ttft.speedup"]) == pytest.approx(889.9 / 516.6)
    assert records["broken"]["status"] == "FAILED" and records["broken"]["ttft.total_ms"] == ""
    assert records["broken"]["error"] == "RuntimeError: boom at pre-LLM\nmore detail"


def test_report_is_logged_on_the_parent_run(store, report):
    logged = {a.path for a in store.client.list_artifacts(store.ids["plain"], "report")}
    assert logged == {f"report/{p.name}" for p in report[0]}


def test_compare_command_prints_the_table_and_writes_under_results_compare(store, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    monkeypatch.chdir(tmp_path)
    assert cmd_compare(parser.parse_args(["report-sweep", "--tracking-uri", store.client.tracking_uri])) == 0
    printed = capsys.readouterr().out
    assert "topk_25 [input.frames=16]" in printed and store.ids["sweep"] in printed
    folder = f"results/compare/report-sweep/{store.ids['sweep'][:12]}"
    assert f"{folder}/pareto.png" in printed
    assert (tmp_path / folder / "comparison.csv").is_file()  # one folder per parent run: nothing overwritten


def test_compare_refuses_a_store_that_does_not_exist(tmp_path):
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    with pytest.raises(TokcompError, match="no MLflow store"):
        cmd_compare(parser.parse_args(["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"]))


def test_pareto_front_keeps_points_nothing_beats_on_cost_and_fidelity():
    points = [(3.0, 90.0), (1.0, 50.0), (2.0, 40.0), (2.0, 60.0), (4.0, 80.0)]
    assert pareto_front(points) == [(1.0, 50.0), (2.0, 60.0), (3.0, 90.0)]


def test_fidelity_is_top1_percent_else_negative_kl_with_an_exact_baseline(rows):
    label, value = fidelity_axis(rows)
    assert "top-1" in label and value(rows[1]) == pytest.approx(95.0) and value(rows[0]) == 100.0
    without_top1 = [replace(r, metrics={k: v for k, v in r.metrics.items() if "top1" not in k}) for r in rows]
    label, value = fidelity_axis(without_top1)
    assert "KL" in label and value(without_top1[1]) == pytest.approx(-0.0512) and value(without_top1[0]) == 0.0


def test_plot_without_data_still_writes_an_explanatory_image(rows, tmp_path):
    plot_tokens_per_layer([rows[2]], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_ghost_runs_show_killed_superseded_attempts_are_hidden_and_impossible_speedups_flagged(tmp_path):
    """A run left RUNNING by a process that is gone shows KILLED; a configuration attempted twice shows once;
    a speedup above what the FLOPs allow (+10%) is marked suspect."""
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    s = Store(f"sqlite:///{tmp_path / 'm.db'}", (tmp_path / "artifacts").as_uri())
    exp = s.experiment("ghosts")
    parent = s.parent(exp, "ghosts", kind="sweep")
    s.child(exp, parent, "uncompressed", BASELINE)
    # exact FLOPs at 50% of the baseline's allow x2.00; x889.9/300 = x2.97 is more than 10% above that
    s.child(exp, parent, "too_fast", {**TOPK, "flops.exact.total_T": 40.0, "ttft.total_ms": 300.0})
    s.child(exp, parent, "fair", {**TOPK, "flops.exact.total_T": 40.0, "ttft.total_ms": 460.0})  # x1.93
    first = s.child(exp, parent, "retried", {}, status="KILLED", error="interrupted (KeyboardInterrupt)")
    second = s.child(exp, parent, "retried", FASTV)  # the same configuration (hash), resumed and finished
    for run_id in (first, second):
        s.client.set_tag(run_id, "tokcomp.config_hash", "abc")
    ghost = s.child(exp, parent, "ghost", {}, status="FINISHED")
    s.client.update_run(ghost, status="RUNNING")  # as a kill -9 leaves it
    s.client.set_tag(ghost, "tokcomp.host", socket.gethostname())
    s.client.set_tag(ghost, "tokcomp.pid", str(gone.pid))
    rows = collect(s.client, s.client.get_run(parent))
    assert [r.label for r in rows] == ["uncompressed", "too_fast", "fair", "retried", "ghost"]
    assert rows[3].run_id == second  # the finished attempt, not the killed one
    assert len(collect(s.client, s.client.get_run(parent), attempts=True)) == 6
    cells = table_cells(comparison_table(rows))
    assert cells["ghost"]["note"] == f"KILLED: process {gone.pid} on {socket.gethostname()} ended without finishing this run"
    assert cells["too_fast"]["note"] == "suspect: x2.97 > FLOPs-ideal x2.00"
    assert cells["fair"]["note"] == "" and cells["retried"]["note"] == ""
    out = tmp_path / "out"
    out.mkdir()
    from tokcomp.report import write_csv

    with write_csv(rows, out / "c.csv").open() as f:
        records = {r["label"]: r for r in csv.DictReader(f)}
    assert float(records["too_fast"]["flops.ideal_speedup"]) == pytest.approx(2.0)
    assert records["too_fast"]["note"].startswith("suspect") and "repeat.ttft.total_ms" not in records["fair"]


def test_compare_warns_when_the_configurations_were_timed_on_different_device_types(rows):
    from tokcomp.report import device_warning

    same = [replace(r, device="cuda: NVIDIA H100") for r in rows]
    assert device_warning(same) == ""
    mixed = [replace(r, device="NVIDIA H100" if i % 2 else "NVIDIA A100") for i, r in enumerate(same)]
    warning = device_warning(mixed)
    assert "2 different device types" in warning and "NVIDIA H100" in warning and "NVIDIA A100" in warning
    unrecorded = [replace(r, device="") for r in rows]  # runs from before the tags: nothing to say
    assert device_warning(unrecorded) == ""
