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


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, tracking_uri):
    path = write_experiment(tmp_path, tracking_uri, "sweep-interrupt")
    grid = ["configurations.pooled.strategies.0.params.ratio=0.25,0.5"]
    (tmp_path / "flag").touch()
    with pytest.raises(KeyboardInterrupt):
        SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    (tmp_path / "flag").unlink()
    result = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    statuses = [(r.label, r.status) for r in result.configurations]
    assert statuses[:2] == [("uncompressed [ratio=0.25]", "SKIPPED"), ("pooled [ratio=0.25]", "SKIPPED")]
    assert [s for _, s in statuses[2:]] == ["FINISHED"] * 4
    runs = child_runs(tracking_uri, result.parent_run_id)
    by_status = sorted(r.info.status for r in runs)
    assert by_status == ["FINISHED"] * 6 + ["KILLED"]  # the interrupted run is kept, marked KILLED
    late = [r for r in result.configurations if r.name == "late"]
    assert all("fidelity.kl" in r.metrics for r in late)  # compared with a baseline loaded from MLflow


def test_sweep_runs_without_tracking(tmp_path, tracking_uri):
    path = write_experiment(tmp_path, tracking_uri, "sweep-untracked")
    grid = ["configurations.pooled.strategies.0.params.ratio=0.25,0.5", "tracking.enabled=false"]
    result = SweepRunner(str(path), grid).run(log=lambda _: None, progress=False)
    assert result.tracking_uri is None and [r.status for r in result.configurations] == ["FINISHED"] * 6
