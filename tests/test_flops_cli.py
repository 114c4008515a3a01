"""`tokcomp flops` reproduces the paper's FLOPs column from token schedules, with no hard-coded result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokcomp.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def flops_json(capsys, *args) -> dict:
    assert main(["flops", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("args", "paper_total"),
    [
        (["--model", "llava-onevision-7b"], 82.6),
        (["--model", "llava-onevision-0.5b"], 45.3),
        (["--model", "llava-onevision-7b", "--llm-stage", "2:0.2"], 51.1),  # FastV, K=2, 20% kept
        (["--model", "llava-onevision-7b", "--visual-tokens", "1254"], 48.7),  # VisionZip 20%
        (["--model", "llava-onevision-0.5b", "--visual-tokens", "627"], 42.0),  # VisionZip 10%
        (["--model", "llava-onevision-7b", "--visual-tokens", "940", "--llm-stage", "18:0.5"], 46.0),  # HoliTom 15%
        (["--model", "llava-onevision-7b", "--frames", "64"], 246.2),  # LLaVA-Video counted with 196/frame
    ],
)
def test_paper_rows_come_out_of_the_cli(capsys, args, paper_total):
    data = flops_json(capsys, *args, "--protocol", "paper")
    assert data["paper"]["total_T"] == pytest.approx(paper_total, rel=0.01)


def test_earlytom_style_vision_schedule_from_frames_after_layers(capsys):
    args = ["--model", "llava-onevision-7b", "--vision-frames-after", "6:26", "--vision-frames-after", "21:15",
            "--vision-frames-after", "23:11", "--visual-tokens", "1254", "--llm-stage", "18:0.5"]
    data = flops_json(capsys, *args, "--protocol", "paper")
    assert data["paper"]["vision_T"] == pytest.approx(29.432, rel=1e-3)


def test_experiment_flops_use_declared_schedules(capsys):
    data = flops_json(capsys, str(QUICKSTART), "model.preset=llava-onevision-7b", "input.frames=32")["configurations"]
    base, pooled = data["uncompressed"], data["pooling_25"]
    assert base["paper"]["total_T"] == pytest.approx(82.6, rel=0.001)
    assert pooled["paper"]["llm_T"] == pytest.approx(8.71, rel=0.01)  # 32 x 49 video tokens
    assert data["frame_avg+uniform"]["paper"]["vision_T"] < base["paper"]["vision_T"] / 2
    for row in data.values():
        assert set(row["exact"]) >= {"total_T", "vision_T", "llm_T"}


def test_experiment_flops_from_a_finished_run_match_its_logged_metrics(capsys, tracking_uri):
    assert main(["run", str(QUICKSTART), "input.frames=4", "timing.repeats=1", f"tracking.uri={tracking_uri}",
                 "tracking.experiment=flops-from-run"]) == 0
    out = capsys.readouterr().out
    parent = out.split("parent run ")[1].split()[0]
    data = flops_json(capsys, str(QUICKSTART), "input.frames=4", f"tracking.uri={tracking_uri}",
                      "tracking.experiment=flops-from-run", "--from-run", parent)["configurations"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent).info.experiment_id
    for run in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'"):
        name = run.data.tags["tokcomp.configuration"]
        assert data[name]["exact"]["total_T"] == pytest.approx(run.data.metrics["flops.exact.total_T"])
        assert data[name]["paper"]["total_T"] == pytest.approx(run.data.metrics["flops.paper.total_T"])


def test_data_dependent_strategy_without_a_run_is_reported_not_guessed(capsys, tmp_path):
    plugin = tmp_path / "sim.py"
    plugin.write_text(
        "from dataclasses import dataclass\nfrom tokcomp.hookspecs import hookimpl\nfrom tokcomp.strategy import Strategy\n"
        "@dataclass\nclass Sim(Strategy):\n    name = 'sim_merge'\n    def encoder_layers(self, info):\n        return {1}\n"
        "    @hookimpl\n    def tokcomp_intra_encoder(self, state):\n        pass\n"
        "@hookimpl\ndef tokcomp_register_strategies(register):\n    register(Sim)\n")
    code = main(["flops", str(QUICKSTART), f"plugins=[{plugin}]", "configurations.sim.strategies=[{name: sim_merge}]"])
    out = capsys.readouterr().out
    assert code == 1 and "'sim_merge' has a data-dependent token schedule" in out and "--from-run" in out


def test_flops_needs_a_model_or_an_experiment(capsys):
    assert main(["flops"]) == 2
    assert "either an experiment YAML or --model" in capsys.readouterr().err
    assert main(["flops", "--model", "llava-onevision-7", "--json"]) == 2


def test_planned_flops_of_qwen3_count_the_timestamps_a_run_records(capsys, tracking_uri):
    """Qwen3-VL writes timestamps and markers between rows: the plan counts them like the run does."""
    overrides = ["model.preset=qwen3-vl-tiny", "input.frames=4", "timing.repeats=1", f"tracking.uri={tracking_uri}",
                 "tracking.experiment=flops-qwen3", "configurations={uniform: {strategies: [{name: uniform}]}}"]
    assert main(["run", str(QUICKSTART), *overrides]) == 0
    parent = capsys.readouterr().out.split("parent run ")[1].split()[0]
    planned = flops_json(capsys, str(QUICKSTART), *overrides)["configurations"]
    recorded = flops_json(capsys, str(QUICKSTART), *overrides, "--from-run", parent)["configurations"]
    for name in ("uncompressed", "uniform"):
        assert planned[name]["exact"]["total_T"] == pytest.approx(recorded[name]["exact"]["total_T"], rel=1e-12)
