"""Sweeps: grid expansion, failures recorded, and resuming without re-running finished work."""

from __future__ import annotations

import textwrap

import pytest
from mlflow.tracking import MlflowClient

from tokcomp.errors import ConfigError
from tokcomp.sweep import SweepRunner, expand_grid, short_labels, split_top_level

INTERRUPTING_PLUGIN = textwrap.dedent("""
    from dataclasses import dataclass
    from pathlib import Path
    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class Interrupt(Strategy):
        \"\"\"Acts like Ctrl-C while the flag file exists.\"\"\"
        name = "interrupt"
        flag: str = ""

        @hookimpl
        def tokcomp_pre_llm(self, state):
            if Path(self.flag).exists():
                raise KeyboardInterrupt

    @hookimpl
    def tokcomp_register_strategies(register):
        register(Interrupt)
""")


def test_comma_lists_expand_to_the_grid_and_brackets_stay_whole():
    fixed, points = expand_grid(["a.x=1,2", "b=[1,2],[3]", "c=5"])
    assert fixed == ["c=5"]
    assert points == [["a.x=1", "b=[1,2]"], ["a.x=1", "b=[3]"], ["a.x=2", "b=[1,2]"], ["a.x=2", "b=[3]"]]
    assert split_top_level("'a,b',c") == ["'a,b'", "c"]
    assert short_labels([["x.ratio=1", "y.ratio=2"]]) == ["x.ratio=1 y.ratio=2"]
    with pytest.raises(ConfigError, match="empty value"):
        expand_grid(["a=1,"])


def write_experiment(folder, tracking_uri, name):
    (folder / "interrupt.py").write_text(INTERRUPTING_PLUGIN)
    path = folder / "sweep.yaml"
    path.write_text(textwrap.dedent(f"""
        name: {name}
        input: {{frames: 4, generated: {{length: 8, height: 32, width: 32}}}}
        generation: {{max_new_tokens: 2, min_new_tokens: 2}}
        timing: {{warmup: 0}}
        tracking: {{uri: "{tracking_uri}"}}
        plugins: [interrupt.py]
        configurations:
          pooled: {{strategies: [{{name: pooling, params: {{ratio: 0.25}}}}]}}
          late: {{strategies: [{{name: interrupt, params: {{flag: "{folder / 'flag'}"}}}}, {{name: fastv}}]}}
    """))
    return path


def child_runs(uri, parent):
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_failed_points_are_recorded_and_retried_while_finished_ones_are_skipped(tmp_path, tracking_uri):
    path = write_experiment(tmp_path, tracking_uri, "sweep-failures")
    grid = ["configurations.late.strategies.1.params.layer=1,7"]  # layer 7 does not exist in the tiny LLM
    first = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    assert [r.status for r in first.configurations] == ["FINISHED"] * 3 + ["FAILED"]
    assert "layer=7 is outside the LLM layers" in first.configurations[-1].error
    second = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    assert second.parent_run_id == first.parent_run_id
    assert [r.status for r in second.configurations] == ["SKIPPED"] * 3 + ["FAILED"]
    runs = child_runs(tracking_uri, first.parent_run_id)
    assert len(runs) == 5  # three finished once, the failing point attempted twice
    fidelity = [r for r in runs if r.data.tags["tokcomp.configuration"] == "pooled"][0].data.metrics
    assert 0.0 <= fidelity["fidelity.top1_agreement"] <= 1.0 and fidelity["fidelity.kl"] >= 0.0


@pytest.mark.parametrize("order, first_point, killed", [
    # sequential: the two configurations that finished before the interruption are skipped on resume
    ("sequential", ["SKIPPED", "SKIPPED", "FINISHED"], 1),
    # interleaved: the point's three runs were all open (timed in rounds) when it came: all KILLED, all rerun
    ("interleaved", ["FINISHED", "FINISHED", "FINISHED"], 3),
])
def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, tracking_uri, order, first_point, killed):
    path = write_experiment(tmp_path, tracking_uri, f"sweep-interrupt-{order}")
    grid = ["configurations.pooled.strategies.0.params.ratio=0.25,0.5", f"timing.order={order}"]
    (tmp_path / "flag").touch()
    with pytest.raises(KeyboardInterrupt):
        SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    (tmp_path / "flag").unlink()
    result = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    statuses = [(r.label, r.status) for r in result.configurations]
    assert [s for _, s in statuses[:3]] == first_point
    # the second point's baseline is the first one's (same model, input, generation, timing): reused
    assert [s for _, s in statuses[3:]] == ["REUSED", "FINISHED", "FINISHED"]
    runs = child_runs(tracking_uri, result.parent_run_id)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 6 + ["KILLED"] * killed
    assert all(r.data.tags["tokcomp.error"] == "interrupted (KeyboardInterrupt)"
               for r in runs if r.info.status == "KILLED")  # the interrupted runs are kept, marked KILLED
    late = [r for r in result.configurations if r.name == "late"]
    assert all("fidelity.kl" in r.metrics for r in late)  # compared with a baseline (loaded from MLflow)


def test_sweep_runs_without_tracking(tmp_path, tracking_uri):
    path = write_experiment(tmp_path, tracking_uri, "sweep-untracked")
    grid = ["configurations.pooled.strategies.0.params.ratio=0.25,0.5", "tracking.enabled=false"]
    result = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    assert result.tracking_uri is None
    assert [r.status for r in result.configurations] == ["FINISHED"] * 3 + ["REUSED", "FINISHED", "FINISHED"]


def test_a_baseline_runs_once_per_distinct_baseline_and_later_points_reuse_it(tmp_path, tracking_uri):
    path = write_experiment(tmp_path, tracking_uri, "sweep-reuse")
    grid = ["input.frames=2,4", "configurations.pooled.strategies.0.params.ratio=0.25,0.5"]
    result = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    assert [r.status for r in result.configurations if r.name == "uncompressed"] == \
        ["FINISHED", "REUSED", "FINISHED", "REUSED"]  # input.frames changes the baseline, the ratio does not
    runs = {r.data.tags["tokcomp.label"]: r for r in child_runs(tracking_uri, result.parent_run_id)}
    assert len(runs) == 12 and {r.info.status for r in runs.values()} == {"FINISHED"}
    for frames in (2, 4):
        source = runs[f"uncompressed [frames={frames} ratio=0.25]"]
        reuse = runs[f"uncompressed [frames={frames} ratio=0.5]"]
        assert "tokcomp.reuses_run" not in source.data.tags and "repeat.ttft.total_ms" in source.data.metrics
        assert reuse.data.tags["tokcomp.reuses_run"] == source.info.run_id  # visible: the run it reuses
        assert reuse.data.tags["tokcomp.baseline"] == "true"
        assert reuse.data.metrics["ttft.total_ms"] == source.data.metrics["ttft.total_ms"]
        assert "repeat.ttft.total_ms" not in reuse.data.metrics  # no pass of its own
        pooled = runs[f"pooled [frames={frames} ratio=0.5]"].data.metrics
        assert "fidelity.kl" in pooled and "fidelity.top1_agreement" in pooled
    from tokcomp.report import collect, comparison_table

    client = MlflowClient(tracking_uri)
    table = comparison_table(collect(client, client.get_run(result.parent_run_id)))
    assert table.count("baseline (reuses run ") == 2
    # resumed: everything finished, reused baselines included, is skipped; nothing new is run
    again = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    assert {r.status for r in again.configurations} == {"SKIPPED"}
    assert len(child_runs(tracking_uri, result.parent_run_id)) == 12
