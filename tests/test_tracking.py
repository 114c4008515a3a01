"""What an experiment leaves in MLflow: a parent run, one child per configuration, and failures kept apart."""

from __future__ import annotations

import json
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from tokcomp.config import load_experiment
from tokcomp.runner import ExperimentRunner

EXPLODING_PLUGIN = textwrap.dedent("""
    from dataclasses import dataclass
    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class Explode(Strategy):
        name = "explode"
        summary = "fails at run time, for tests"

        @hookimpl
        def tokcomp_pre_llm(self, state):
            raise RuntimeError("boom at pre-LLM")

    @hookimpl
    def tokcomp_register_strategies(register):
        register(Explode)
""")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tracking_uri):
    folder = tmp_path_factory.mktemp("exp")
    (folder / "explode.py").write_text(EXPLODING_PLUGIN)
    (folder / "exp.yaml").write_text(textwrap.dedent(f"""
        name: tracking-test
        input: {{frames: 4, generated: {{length: 12, height: 32, width: 32}}}}
        generation: {{max_new_tokens: 3, min_new_tokens: 3}}
        timing: {{warmup: 0, repeats: 2}}
        tracking: {{uri: "{tracking_uri}"}}
        plugins: [explode.py]
        configurations:
          pooled: {{strategies: [{{name: pooling, params: {{ratio: 0.25}}}}]}}
          broken: {{strategies: [{{name: explode}}]}}
          fastv: {{strategies: [{{name: fastv, params: {{layer: 1, ratio: 0.5}}}}]}}
    """))
    result = ExperimentRunner(load_experiment(folder / "exp.yaml")).run(log=lambda _: None)
    return result, MlflowClient(tracking_uri)


def children(client, result):
    runs = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    return {r.data.tags["tokcomp.configuration"]: r for r in runs}


def test_one_child_run_per_configuration_under_a_parent(experiment):
    result, client = experiment
    runs = children(client, result)
    assert set(runs) == {"uncompressed", "pooled", "broken", "fastv"}
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tokcomp.failed_configurations"] == "broken"
    assert parent.data.params["input.frames"] == "4"


def test_failing_configuration_is_failed_and_the_others_are_kept(experiment):
    result, client = experiment
    runs = children(client, result)
    assert runs["broken"].info.status == "FAILED"
    assert "boom at pre-LLM" in runs["broken"].data.tags["tokcomp.error"]
    error = client.download_artifacts(runs["broken"].info.run_id, "error.txt")
    assert "RuntimeError: boom at pre-LLM" in open(error).read()
    assert {n for n, r in runs.items() if r.info.status == "FINISHED"} == {"uncompressed", "pooled", "fastv"}
    assert result.failed == ["broken"]


def test_child_run_holds_params_metrics_tags_and_artifacts(experiment):
    result, client = experiment
    run = children(client, result)["pooled"]
    data = run.data
    assert data.params["strategies.0.name"] == "pooling" and data.params["strategies.0.ratio"] == "0.25"
    assert data.params["model.preset"] == "tiny" and data.params["timing.repeats"] == "2"
    assert data.metrics["tokens.llm_visual"] == 4 * 4  # content tokens; the newline is not counted
    assert data.metrics["tokens.vision_in"] == 4 * 64
    assert data.metrics["retained_ratio"] == pytest.approx(16 / 64)
    assert data.metrics["tokens.llm_seq_first_layer"] == data.metrics["tokens.text"] + 4 * 4 + 1
    for metric in ("ttft.total_ms", "ttft.total_ms_min", "ttft.total_ms_max", "ttft.vision_ms",
                   "ttft.token_processing_ms", "ttft.prefill_ms", "ttft.other_ms", "throughput.tokens_per_s",
                   "memory.peak_mb", "fidelity.kl", "fidelity.top1_agreement", "fidelity.exact_match"):
        assert metric in data.metrics, metric
    assert data.metrics["ttft.total_ms_min"] <= data.metrics["ttft.total_ms"] <= data.metrics["ttft.total_ms_max"]
    assert data.tags["tokcomp.baseline"] == "false"
    for tag in ("torch.version", "transformers.version", "host.cpu", "host.device", "model.dtype",
                "model.attn_implementation"):
        assert data.tags[tag]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ledger.json", "generation.json"} <= artifacts
    ledger = json.load(open(client.download_artifacts(run.info.run_id, "ledger.json")))
    assert ledger["visual_tokens_after_pre_llm"] == 16 and len(ledger["llm_layers"]) == 4
    assert ledger["special_tokens"] == 1 and ledger["uncompressed_visual_tokens"] == 64
    config = open(client.download_artifacts(run.info.run_id, "config.yaml")).read()
    assert "pooling" in config and "fastv" not in config


def test_baseline_run_keeps_its_logits_and_has_no_fidelity(experiment):
    result, client = experiment
    run = children(client, result)["uncompressed"]
    assert run.data.tags["tokcomp.baseline"] == "true" and "fidelity.kl" not in run.data.metrics
    assert "prefill_logits.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_fastv_run_records_the_shorter_late_layers(experiment):
    result, client = experiment
    metrics = children(client, result)["fastv"].data.metrics
    assert metrics["tokens.llm_seq_last_layer"] < metrics["tokens.llm_seq_first_layer"]


def test_default_tracking_uri_is_a_sqlite_file_under_results(monkeypatch, tmp_path):
    from tokcomp.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == DEFAULT_TRACKING_URI == "sqlite:///results/mlflow.db"
    assert (tmp_path / "results").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolve_tracking_uri(None) == "sqlite:///elsewhere.db"
    assert resolve_tracking_uri("sqlite:///cfg.db") == "sqlite:///cfg.db"
