"""Runs and stores under real trouble: kill -9 and SIGTERM mid-sweep, four runs racing to create one
store, an artifact folder that breaks mid-run, a store that cannot be written. Real processes, real
sqlite stores in tmp; nothing mocked."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tokcomp.cli import main
from tokcomp.report import collect, comparison_table
from tokcomp.sweep import SweepRunner

REPO = Path(__file__).resolve().parents[1]

GATE_PLUGIN = textwrap.dedent("""
    import time
    from dataclasses import dataclass
    from pathlib import Path
    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class Gate(Strategy):
        \"\"\"Says it started (a file), then waits while the flag file exists.\"\"\"
        name = "gate"
        flag: str = ""
        started: str = ""

        @hookimpl
        def tokcomp_pre_llm(self, state):
            Path(self.started).touch()
            while Path(self.flag).exists():
                time.sleep(0.02)

    @hookimpl
    def tokcomp_register_strategies(register):
        register(Gate)
""")

SABOTAGE_PLUGIN = textwrap.dedent("""
    import shutil
    from dataclasses import dataclass
    from pathlib import Path
    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class Sabotage(Strategy):
        \"\"\"When armed: every run folder under the artifact root that holds no ledger.json yet (runs still
        in progress, the parent's) has its artifacts folder replaced by a file, so no artifact of those
        runs can be written any more (a disk gone read-only; root ignores permissions, a file does not).\"\"\"
        name = "sabotage"
        armed: bool = False
        root: str = ""

        @hookimpl
        def tokcomp_pre_llm(self, state):
            if not self.armed:
                return
            for folder in Path(self.root).glob("*/artifacts"):  # <root>/<run id>/artifacts
                if folder.is_dir() and not (folder / "ledger.json").exists():
                    shutil.rmtree(folder)
                    folder.write_text("not a folder")

    @hookimpl
    def tokcomp_register_strategies(register):
        register(Sabotage)
""")


def experiment(folder: Path, name: str, configurations: str, uri: str | None = None) -> Path:
    (folder / "gate.py").write_text(GATE_PLUGIN)
    (folder / "sabotage.py").write_text(SABOTAGE_PLUGIN)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: {name}
        input: {{frames: 2, generated: {{length: 8, height: 32, width: 32}}}}
        generation: {{max_new_tokens: 2, min_new_tokens: 2}}
        timing: {{warmup: 0, repeats: 2}}
        tracking: {{uri: "{uri or f'sqlite:///{folder / "m.db"}'}"}}
        plugins: [gate.py, sabotage.py]
        configurations:
    """) + textwrap.indent(textwrap.dedent(configurations), "  "))
    return path


GATED = """
    pooled: {strategies: [{name: pooling, params: {ratio: 0.25}}]}
    gated: {strategies: [{name: gate, params: {flag: "FLAG", started: "STARTED"}}]}
"""
GRID = ["configurations.pooled.strategies.0.params.ratio=0.25,0.5"]


def start_gated_sweep(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    """A real ``tokcomp sweep`` in a subprocess, held inside its first point (the gate waits on a flag)."""
    flag, started = tmp_path / "flag", tmp_path / "started"
    flag.touch()
    path = experiment(tmp_path, name, GATED.replace("FLAG", str(flag)).replace("STARTED", str(started)))
    proc = subprocess.Popen([sys.executable, "-m", "tokcomp.cli", "sweep", str(path), *GRID, "--no-progress"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 180
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep never reached the gated configuration"
        time.sleep(0.05)
    return proc, path, flag


def sweep_runs(uri: str) -> tuple[MlflowClient, object, list]:
    client = MlflowClient(uri)
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`tokcomp.kind` = 'sweep'")[0]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, children


def test_kill_9_mid_sweep_then_resume_leaves_every_configuration_finished_once(tmp_path, monkeypatch):
    proc, path, flag = start_gated_sweep(tmp_path, "kill9")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client, parent, children = sweep_runs(uri)
    assert parent.info.status == "RUNNING" and parent.data.tags["tokcomp.pid"] == str(proc.pid)
    assert {r.info.status for r in children} == {"RUNNING"} and len(children) == 3  # the first point's, open
    proc.kill()  # SIGKILL: nothing gets to clean up
    proc.wait(timeout=60)
    client, parent, children = sweep_runs(uri)
    assert parent.info.status == "RUNNING" and {r.info.status for r in children} == {"RUNNING"}
    # compare before the resume: the orphans show as KILLED, not as ghosts still RUNNING
    rows = collect(client, parent)
    assert {r.status for r in rows} == {"KILLED"} and all("ended without finishing" in r.error for r in rows)
    flag.unlink()
    monkeypatch.chdir(tmp_path)  # where the sweep ran: its plugin paths, so its key, are relative to there
    result = SweepRunner(str(path), GRID).run(log=lambda _: None, progress=False)
    assert result.parent_run_id == parent.info.run_id and not result.failed
    client, parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["tokcomp.resumed"] == "true"
    statuses = collections.Counter(r.info.status for r in children)
    assert statuses == {"FINISHED": 6, "KILLED": 3}  # nothing RUNNING any more
    finished = collections.Counter((r.data.tags["tokcomp.sweep_point"], r.data.tags["tokcomp.configuration"])
                                   for r in children if r.info.status == "FINISHED")
    assert len(finished) == 6 and set(finished.values()) == {1}  # every configuration of every point, once
    for run in children:
        if run.info.status == "KILLED":
            assert run.data.tags["tokcomp.error"] == (f"process {proc.pid} on {run.data.tags['tokcomp.host']} ended "
                                                      f"without finishing this run (found when the sweep resumed)")
    table = comparison_table(collect(client, parent))
    assert "KILLED" not in table and "RUNNING" not in table and len(table.splitlines()) == 2 + 6


def test_sigterm_marks_the_configurations_in_progress_and_the_parent_killed(tmp_path):
    proc, _, _ = start_gated_sweep(tmp_path, "sigterm")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # ends by the signal, as if unhandled
    assert "Traceback" not in err
    _, parent, children = sweep_runs(f"sqlite:///{tmp_path / 'm.db'}")
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in children] == ["KILLED"] * 3
    assert {r.data.tags["tokcomp.error"] for r in [parent, *children]} == {"interrupted (terminated by signal 15)"}


RACER = """
import sys, time
from pathlib import Path
import tokcomp.cli, tokcomp.runner, mlflow.tracking  # imported before the start line: a tight race
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.002)
sys.exit(tokcomp.cli.main(sys.argv[3:]))
"""


def test_four_runs_started_together_on_a_new_store_all_succeed(tmp_path):
    path = experiment(tmp_path, "race", "pooled: {strategies: [{name: pooling, params: {ratio: 0.25}}]}\n")
    (tmp_path / "racer.py").write_text(RACER)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "racer.py"), str(tmp_path / f"ready{i}"), str(go),
                               "run", str(path), "timing.repeats=1"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for i in range(4)]
    deadline = time.monotonic() + 180
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    assert not (tmp_path / "m.db").exists()  # a new store
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outputs]
    for _, err in outputs:
        assert "Creating initial MLflow database tables" not in err and "Traceback" not in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    assert [e.name for e in client.search_experiments()].count("race") == 1  # created once, not four times
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert collections.Counter(r.data.tags["tokcomp.kind"] for r in runs) == {"experiment": 4, "configuration": 8}
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_an_artifact_that_cannot_be_written_ends_its_configuration_failed_not_the_run(tmp_path, capsys):
    configurations = f"""
        pooled: {{strategies: [{{name: pooling, params: {{ratio: 0.25}}}}]}}
        sab: {{strategies: [{{name: sabotage, params: {{root: "{tmp_path / 'mlartifacts'}"}}}}]}}
    """
    path = experiment(tmp_path, "broken-disk", configurations)
    code = main(["sweep", str(path), "configurations.sab.strategies.0.params.armed=false,true", "--no-progress"])
    assert code == 1  # returned, no exception escaped (so no traceback)
    err = capsys.readouterr().err
    assert "failed: pooled [armed=true], sab [armed=true], parent run (cannot write artifact 'summary.txt'" in err
    _, parent, children = sweep_runs(f"sqlite:///{tmp_path / 'm.db'}")
    assert parent.info.status == "FAILED" and "cannot write artifact 'summary.txt'" in parent.data.tags["tokcomp.error"]
    runs = {r.data.tags["tokcomp.label"]: r for r in children}
    assert {label: r.info.status for label, r in runs.items()} == {
        "uncompressed [armed=false]": "FINISHED", "pooled [armed=false]": "FINISHED", "sab [armed=false]": "FINISHED",
        "uncompressed [armed=true]": "FINISHED",  # reuses the first point's baseline, written before the damage
        "pooled [armed=true]": "FAILED", "sab [armed=true]": "FAILED",
    }
    for label in ("pooled [armed=true]", "sab [armed=true]"):
        tags = runs[label].data.tags
        assert tags["tokcomp.error"].startswith("cannot write artifact 'ledger.json' of run ")
        assert tags["tokcomp.error_artifact"].startswith("error.txt not written: cannot write artifact 'error.txt'")
    finished = runs["pooled [armed=false]"]  # the finished configurations are untouched, artifacts included
    assert (tmp_path / "mlartifacts" / finished.info.run_id / "artifacts" / "ledger.json").is_file()


def test_a_store_folder_that_cannot_be_created_is_a_clear_error_before_the_model_is_built(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'sub' / 'm.db'}"
    path = experiment(tmp_path, "no-store", "pooled: {strategies: [{name: pooling}]}\n", uri=uri)
    assert main(["run", str(path)]) == 2  # the command line names the problem (its own early check or ours)
    err = capsys.readouterr().err
    assert f"tokcomp: error: tracking.uri '{uri}'" in err or f"store {uri}" in err
    assert "building model" not in err and "Traceback" not in err
    from tokcomp.config import load_experiment
    from tokcomp.runner import ExperimentRunner
    from tokcomp.tracking import TrackingError

    said = []
    with pytest.raises(TrackingError, match=f"cannot create the folder of the MLflow store {uri}: "):
        ExperimentRunner(load_experiment(path)).run(log=said.append)
    assert said == []  # no model was built


def test_an_artifact_root_that_cannot_be_written_is_a_clear_error_before_the_model_is_built(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).create_experiment("no-artifacts", artifact_location=(tmp_path / "a-file" / "arts").as_uri())
    path = experiment(tmp_path, "no-artifacts", "pooled: {strategies: [{name: pooling}]}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tokcomp: error: cannot write to the artifact root of MLflow experiment 'no-artifacts'" in err
    assert "building model" not in err
    assert MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("no-artifacts").experiment_id]) == []


@pytest.mark.parametrize("owner, message", [
    ("alive", "this sweep is running now"),
    ("elsewhere", "which cannot be checked from here: if it is no longer running, resume explicitly"),
])
def test_a_sweep_still_running_or_on_another_host_is_not_resumed_implicitly(tmp_path, owner, message):
    from tokcomp.errors import TokcompError

    path = experiment(tmp_path, f"held-{owner}", "pooled: {strategies: [{name: pooling}]}\n")
    grid = ["input.frames=2,4", "timing.repeats=1"]
    first = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    client.update_run(first.parent_run_id, status="RUNNING")  # as if its process were still at it ...
    if owner == "elsewhere":  # ... or had been on another machine
        client.set_tag(first.parent_run_id, "tokcomp.host", "some-other-host")
    with pytest.raises(TokcompError, match=message):
        SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    if owner == "elsewhere":
        again = SweepRunner(str(path), grid, resume=True).run(log=lambda _: None, progress=False)
        assert again.parent_run_id == first.parent_run_id and {r.status for r in again.configurations} == {"SKIPPED"}
