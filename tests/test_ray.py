"""Sweeps, runs and evaluations on a Ray cluster, logging to one MLflow tracking server: a real local
Ray cluster (2 CPUs) and a real ``mlflow server`` on 127.0.0.1 with a sqlite backend, both started here
and stopped after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from mlflow.tracking import MlflowClient  # noqa: E402

from tokcomp.cli import main  # noqa: E402
from tokcomp.distributed import worker_slots  # noqa: E402
from tokcomp.errors import TokcompError  # noqa: E402
from tokcomp.sweep import SweepRunner  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one cluster and one server for all of these (--dist loadgroup)

PLUGIN = textwrap.dedent("""
    import time
    from dataclasses import dataclass
    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class Stall(Strategy):
        \"\"\"Waits ``seconds`` before the LLM, and fails there when asked: a slow or broken method.\"\"\"
        name = "stall"
        seconds: float = 0.0
        fail: bool = False

        @hookimpl
        def tokcomp_pre_llm(self, state):
            time.sleep(self.seconds)
            if self.fail:
                raise RuntimeError("stall was asked to fail")

    @hookimpl
    def tokcomp_register_strategies(register):
        register(Stall)
""")


ONE = "{p: {strategies: [{name: pooling}]}}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on a free local port."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
         str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module; tokcomp joins it (``ray.is_initialized``)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never one already running
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def experiment(folder: Path, uri: str | None, name: str, configurations: str, baseline: bool = False) -> Path:
    (folder / "stall.py").write_text(PLUGIN)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: {name}
        baseline: {str(baseline).lower()}
        input: {{frames: 4, generated: {{length: 8, height: 32, width: 32}}}}
        generation: {{max_new_tokens: 2, min_new_tokens: 2}}
        timing: {{warmup: 0}}
        tracking: {{uri: {f'"{uri}"' if uri else "null"}}}
        plugins: [stall.py]
        configurations: {configurations}
    """))
    return path


def children(uri: str, parent: str) -> list:
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent).info.experiment_id
    return list(client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000))


def test_a_sweep_on_ray_ends_with_every_point_finished_under_one_parent(tmp_path, server, cluster):
    path = experiment(tmp_path, server, "six", "{pooled: {strategies: [{name: pooling, params: {ratio: 0.25}}]}}")
    sweep = SweepRunner(str(path), ["configurations.pooled.strategies.0.params.ratio=0.25,0.5,0.75",
                                    "input.frames=2,4"], executor="ray")
    result = sweep.run(log=lambda _: None, progress=False)
    runs = children(server, result.parent_run_id)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert MlflowClient(server).get_run(result.parent_run_id).info.status == "FINISHED"
    assert not result.failed and len(result.configurations) == 6
    # timed where they ran: in worker processes, which record themselves and their device
    assert {r.data.tags["tokcomp.pid"] for r in runs}.isdisjoint({str(os.getpid())})
    assert all(r.data.tags["tokcomp.executor"] == "ray" and r.data.tags["host.device"] == "cpu" for r in runs)
    assert all("ttft.total_ms" in r.data.metrics for r in runs)
    # the same sweep again finds its parent and runs nothing
    again = SweepRunner(str(path), ["configurations.pooled.strategies.0.params.ratio=0.25,0.5,0.75",
                                    "input.frames=2,4"], executor="ray").run(log=lambda _: None, progress=False)
    assert again.parent_run_id == result.parent_run_id
    assert [c.status for c in again.configurations] == ["SKIPPED"] * 6


def test_a_run_on_ray_compares_every_configuration_with_the_baseline_of_another_task(tmp_path, server, cluster,
                                                                                       capsys):
    path = experiment(tmp_path, server, "fidelity", "{pooled: {strategies: [{name: pooling, params: {ratio: 0.25}}]}, "
                      "fast: {strategies: [{name: fastv}]}}", baseline=True)
    assert main(["run", str(path), "--executor", "ray", "--no-progress"]) == 0
    parent = capsys.readouterr().out.split("parent run ")[1].split()[0]
    runs = {r.data.tags["tokcomp.configuration"]: r for r in children(server, parent)}
    assert set(runs) == {"uncompressed", "pooled", "fast"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # the baseline's logits came from the server: KL and top-1 agreement exist for the compressed ones
    assert "fidelity.kl" in runs["pooled"].data.metrics and "fidelity.kl" in runs["fast"].data.metrics
    assert not any(k.startswith("fidelity.") for k in runs["uncompressed"].data.metrics)


def test_workers_log_where_the_driver_logs_whatever_their_own_environment_says(tmp_path, server, cluster,
                                                                              monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)  # the driver's environment: the workers started before it
    path = experiment(tmp_path, None, "fromenv", ONE)
    result = SweepRunner(str(path), ["seed=1,2"], executor="ray").run(log=lambda _: None, progress=False)
    assert result.tracking_uri == server and not result.failed
    assert sorted(r.info.status for r in children(server, result.parent_run_id)) == ["FINISHED", "FINISHED"]


def test_a_point_that_fails_is_failed_and_the_others_finish(tmp_path, server, cluster):
    path = experiment(tmp_path, server, "onefails", "{s: {strategies: [{name: stall, params: {fail: false}}]}}")
    result = SweepRunner(str(path), ["configurations.s.strategies.0.params.fail=false,true",
                                     "input.frames=2,4"], executor="ray").run(log=lambda _: None, progress=False)
    status = Counter(r.info.status for r in children(server, result.parent_run_id))
    assert status == {"FINISHED": 2, "FAILED": 2}
    assert [c.status for c in result.configurations] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    assert "stall was asked to fail" in result.configurations[2].error
    assert MlflowClient(server).get_run(result.parent_run_id).data.tags["tokcomp.failed_configurations"]


def test_a_worker_killed_mid_sweep_leaves_its_point_to_the_resume_and_nothing_running(tmp_path, server, cluster):
    path = experiment(tmp_path, server, "killed", "{s: {strategies: [{name: stall, params: {seconds: 4}}]}}")
    grid = ["configurations.s.strategies.0.params.seconds=4,4.5"]
    killed: list[str] = []

    def kill_a_worker() -> None:  # the first run a worker process has open: kill -9 that process
        client, deadline = MlflowClient(server), time.time() + 120
        while time.time() < deadline and not killed:
            for exp in client.search_experiments(filter_string="name = 'killed'"):
                for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
                    pid = run.data.tags.get("tokcomp.pid")
                    if run.data.tags.get("tokcomp.kind") == "configuration" and pid and pid != str(os.getpid()):
                        os.kill(int(pid), signal.SIGKILL)
                        killed.append(run.info.run_id)
                        return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_a_worker, daemon=True)
    watcher.start()
    first = SweepRunner(str(path), grid, executor="ray").run(log=lambda _: None, progress=False)
    watcher.join(timeout=5)
    assert killed, "no worker run was seen RUNNING"
    runs = {r.info.run_id: r for r in children(server, first.parent_run_id)}
    assert runs[killed[0]].info.status == "KILLED"
    assert "died" in runs[killed[0]].data.tags["tokcomp.error"]
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert sorted(c.status for c in first.configurations) == ["FAILED", "FINISHED"]

    second = SweepRunner(str(path), grid, executor="ray").run(log=lambda _: None, progress=False)
    assert second.parent_run_id == first.parent_run_id and not second.failed
    assert sorted(c.status for c in second.configurations) == ["FINISHED", "SKIPPED"]
    runs = children(server, first.parent_run_id)
    finished = Counter(r.data.tags["tokcomp.config_hash"] for r in runs if r.info.status == "FINISHED")
    assert len(finished) == 2 and set(finished.values()) == {1}  # each point finished once: nothing duplicated
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_sigterm_to_the_driver_ends_its_runs_killed_and_stops_its_workers(tmp_path, server, cluster):
    path = experiment(tmp_path, server, "terminated", "{s: {strategies: [{name: stall, params: {seconds: 30}}]}}")
    driver = subprocess.Popen([str(Path(sys.executable).with_name("tokcomp")), "sweep", str(path), "seed=1,2",
                               "--executor", "ray", "--address", cluster, "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client, deadline, parent = MlflowClient(server), time.time() + 300, None  # slow when the suite loads the CPUs
    while parent is None and time.time() < deadline and driver.poll() is None:
        found = client.get_experiment_by_name("terminated")
        running = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'") if found else []
        if any(r.data.tags.get("tokcomp.kind") == "configuration" for r in running):
            parent = next(r for r in running if r.data.tags.get("tokcomp.kind") == "sweep").info.run_id
        time.sleep(0.3)
    if parent is None:
        driver.kill()
        pytest.fail(f"no configuration of the driver was seen RUNNING: {driver.communicate(timeout=30)}")
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == -signal.SIGTERM and "Traceback" not in err, err
    assert client.get_run(parent).info.status == "KILLED", err
    runs = children(server, parent)
    statuses = [(r.info.status, r.data.tags.get("tokcomp.error")) for r in runs]
    assert runs and [r.info.status for r in runs] == ["KILLED"] * len(runs), (statuses, err)  # none could finish
    deadline = time.time() + 20
    alive = {int(r.data.tags["tokcomp.pid"]) for r in runs}
    while alive and time.time() < deadline:  # the workers were stopped with the driver, not left stalling
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()}
        time.sleep(0.2)
    assert not alive, (alive, err)


def test_an_evaluation_on_ray_shards_the_samples_and_merges_what_a_local_one_predicts(tmp_path, server, cluster):
    from tokcomp.evaluation import Evaluation
    from tokcomp.synth import write_dataset

    data = write_dataset(tmp_path / "synth", 10, seed=3)
    path = tmp_path / "eval.yaml"
    path.write_text(textwrap.dedent(f"""
        name: sharded
        model: {{preset: tiny-synth, weights: pretrained}}
        input: {{frames: 8}}
        generation: {{max_new_tokens: 3}}
        timing: {{warmup: 0}}
        tracking: {{uri: "{server}"}}
        configurations:
          pooled: {{strategies: [{{name: pooling, params: {{ratio: 0.25}}}}]}}
    """))
    remote = Evaluation(str(path), str(data), executor="ray").run(log=lambda _: None, progress=False)
    local = Evaluation(str(path), str(data), [f"tracking.uri=sqlite:///{tmp_path / 'local.db'}"]).run(
        log=lambda _: None, progress=False)
    client = MlflowClient(server)
    for result, mine in zip(remote.configurations, local.configurations, strict=True):
        assert result.status == "FINISHED" and result.metrics["accuracy"] == mine.metrics["accuracy"]
        folder = client.download_artifacts(result.run_id, "predictions.jsonl", str(tmp_path / result.name))
        lines = Path(folder).read_text().splitlines()
        assert len(lines) == 10 and all('"worker": ' in line for line in lines)
        parts = client.list_artifacts(result.run_id, "predictions")
        assert len(parts) >= 2  # written by shards, merged by the driver
        run = client.get_run(result.run_id)
        assert run.data.tags["tokcomp.executor"] == "ray" and run.data.tags["tokcomp.workers"]


def test_executor_ray_refuses_a_local_store_before_anything_starts(tmp_path, capsys):
    path = experiment(tmp_path, f"sqlite:///{tmp_path / 'x.db'}", "local", ONE)
    assert main(["sweep", str(path), "seed=1,2", "--executor", "ray"]) != 0
    err = capsys.readouterr().err.strip()
    assert "sqlite:///" in err and "tracking server" in err and "Traceback" not in err
    assert not (tmp_path / "x.db").exists()


def test_an_unreachable_tracking_server_or_cluster_fails_in_seconds_naming_it(tmp_path, server, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    path = experiment(tmp_path, dead, "dead", ONE)
    started = time.time()
    assert main(["sweep", str(path), "seed=1,2", "--executor", "ray"]) != 0
    assert dead in capsys.readouterr().err and time.time() - started < 30
    path = experiment(tmp_path, server, "nocluster", ONE)
    address = f"127.0.0.1:{free_port()}"
    started = time.time()
    assert main(["sweep", str(path), "seed=1,2", "--executor", "ray", "--address", address]) != 0
    err = capsys.readouterr().err
    assert address in err and "cannot be reached" in err and time.time() - started < 30


def test_a_task_no_node_can_hold_is_refused_before_a_run_exists(tmp_path, server, cluster, capsys):
    path = experiment(tmp_path, server, "toobig", ONE)
    assert main(["sweep", str(path), "seed=1,2", "ray.num_gpus=8", "--executor", "ray"]) != 0
    err = capsys.readouterr().err
    assert "ray.num_gpus=8" in err and "no node" in err
    client = MlflowClient(server)
    assert client.get_experiment_by_name("toobig") is None  # nothing was created


def test_worker_slots_count_what_the_nodes_hold_and_refuse_what_none_can():
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}]
    assert worker_slots({"CPU": 2.0, "GPU": 1.0}, nodes) == 6
    assert worker_slots({"CPU": 4.0, "GPU": 0.0}, nodes) == 6
    with pytest.raises(TokcompError, match=r"ray.num_gpus=8 per task: no node .* more than 4 GPU"):
        worker_slots({"CPU": 1.0, "GPU": 8.0}, nodes)


def test_ray_is_not_imported_by_a_local_sweep(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from tokcomp.sweep import SweepRunner
        SweepRunner({str(experiment(tmp_path, f'sqlite:///{tmp_path / "l.db"}', 'plain', ONE))!r}, ["seed=1,2"])
        from tokcomp.cli import main
        assert "ray" not in sys.modules, "ray was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
