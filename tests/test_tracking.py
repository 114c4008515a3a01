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


def test_every_repeat_is_kept_with_median_min_max_and_spread(experiment):
    result, client = experiment
    run = children(client, result)["pooled"]
    history = client.get_metric_history(run.info.run_id, "repeat.ttft.total_ms")
    assert sorted(m.step for m in history) == [0, 1]  # one step per timed repeat
    values = sorted(m.value for m in history)
    metrics = run.data.metrics
    assert metrics["ttft.total_ms"] == pytest.approx(sum(values) / 2)  # the median of two
    assert (metrics["ttft.total_ms_min"], metrics["ttft.total_ms_max"]) == pytest.approx(tuple(values))
    assert metrics["ttft.total_ms_std"] == pytest.approx((values[1] - values[0]) / 2 ** 0.5)
    assert metrics["ttft.total_ms_spread"] == pytest.approx((values[1] - values[0]) / metrics["ttft.total_ms"])
    for name in ("repeat.ttft.vision_ms", "repeat.ttft.prefill_ms", "repeat.time.decode_ms", "repeat.sequence"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2, name


def test_timed_repeats_are_interleaved_across_configurations(experiment):
    """Repeat k of every configuration runs before repeat k+1 of any (``repeat.sequence``: place in the schedule)."""
    result, client = experiment
    places = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, "repeat.sequence")}
              for name, run in children(client, result).items() if run.info.status == "FINISHED"}
    assert set(places) == {"uncompressed", "pooled", "fastv"}
    assert max(p[0] for p in places.values()) < min(p[1] for p in places.values())
    assert places["uncompressed"][0] < places["pooled"][0] < places["fastv"][0]  # in configuration order


PROBE_PLUGIN = textwrap.dedent("""
    from dataclasses import dataclass
    from pathlib import Path
    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class Probe(Strategy):
        \"\"\"Appends its tag to a file at every pass; raises at pass ``fail_at`` (0: never).\"\"\"
        name = "probe"
        tag: str = ""
        log: str = ""
        fail_at: int = 0

        @hookimpl
        def tokcomp_pre_llm(self, state):
            with open(self.log, "a") as f:
                f.write(self.tag)
            if self.fail_at and Path(self.log).read_text().count(self.tag) == self.fail_at:
                raise RuntimeError(f"probe {self.tag} fails at pass {self.fail_at}")

    @hookimpl
    def tokcomp_register_strategies(register):
        register(Probe)
""")


def probe_experiment(folder, order: str, fail_at: int = 0):
    (folder / "probe.py").write_text(PROBE_PLUGIN)
    log = folder / f"calls-{order}.txt"

    def probe(tag: str, fail: int = 0) -> str:
        return f"{{strategies: [{{name: probe, params: {{tag: {tag}, log: '{log}', fail_at: {fail}}}}}]}}"

    (folder / f"{order}.yaml").write_text(textwrap.dedent(f"""
        name: probe-{order}
        input: {{frames: 2, generated: {{length: 8, height: 32, width: 32}}}}
        generation: {{max_new_tokens: 2, min_new_tokens: 2}}
        timing: {{warmup: 1, repeats: 2, order: {order}}}
        tracking: {{enabled: false}}
        plugins: [probe.py]
        configurations:
          a: {probe("a")}
          b: {probe("b", fail_at)}
          c: {probe("c")}
    """))
    result = ExperimentRunner(load_experiment(folder / f"{order}.yaml")).run(log=lambda _: None)
    return result, log.read_text()


def test_interleaved_order_warms_up_each_configuration_then_runs_the_repeats_in_rounds(tmp_path):
    interleaved, calls = probe_experiment(tmp_path, "interleaved")
    assert calls == "abc" + "abc" + "abc" + "abc"  # warm-ups, repeat 1, repeat 2, then each fidelity pass
    sequential, calls = probe_experiment(tmp_path, "sequential")
    assert calls == "aaa" + "bbb" + "ccc"  # per configuration: repeat 1, repeat 2, fidelity pass
    for a, b in zip(interleaved.configurations, sequential.configurations, strict=True):
        assert (a.name, a.status, a.new_ids, a.ledger) == (b.name, b.status, b.new_ids, b.ledger)


def test_a_configuration_failing_in_a_later_repeat_is_failed_and_the_others_go_on(tmp_path):
    result, calls = probe_experiment(tmp_path, "interleaved", fail_at=3)  # b: warm-up, repeat 1, fails in repeat 2
    assert calls == "abc" + "abc" + "abc" + "ac"
    statuses = {r.name: r.status for r in result.configurations}
    assert statuses == {"uncompressed": "FINISHED", "a": "FINISHED", "b": "FAILED", "c": "FINISHED"}
    assert result.configurations[2].error == "RuntimeError: probe b fails at pass 3"
    assert "fidelity.kl" in result.configurations[3].metrics and result.failed == ["b"]


def test_an_unknown_timing_order_is_refused_with_the_valid_ones():
    from tokcomp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Invalid value 'random', expected one of \[interleaved, sequential\]"):
        load_experiment(None, ["timing.order=random"])
