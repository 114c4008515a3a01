"""tokcomp eval: accuracy and per-sample efficiency of every configuration, tracked and resumable."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tokcomp.answering import Answerer
from tokcomp.cli import main
from tokcomp.config import load_experiment
from tokcomp.evaluation import Evaluation
from tokcomp.report import collect, comparison_table
from tokcomp.synth import write_dataset
from tokcomp.video import write_video

COUNTING_INTERRUPT = textwrap.dedent("""
    from dataclasses import dataclass
    from pathlib import Path
    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class InterruptAfter(Strategy):
        \"\"\"Acts like Ctrl-C on its ``after``-th pass while the flag file exists; counts passes in a file.\"\"\"
        name = "interrupt_after"
        flag: str = ""
        after: int = 0

        @hookimpl
        def tokcomp_pre_llm(self, state):
            counter = Path(self.flag + ".count")
            seen = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(seen))
            if Path(self.flag).exists() and seen == self.after:
                raise KeyboardInterrupt

    @hookimpl
    def tokcomp_register_strategies(register):
        register(InterruptAfter)
""")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Six clips of 8 frames, one or two of each question type."""
    return write_dataset(tmp_path_factory.mktemp("synth"), 6, seed=3, frames=8)


BOTH = """
          pooling_25: {strategies: [{name: pooling, params: {ratio: 0.25}}]}
          frame_avg: {strategies: [{name: frame_avg, params: {layer: 1}}]}"""


def experiment(folder: Path, uri: str, name: str, extra: str = "", plugins: str = "[]",
               configurations: str = BOTH) -> Path:
    """An experiment on the tiny random model; ``configurations="{}"``: the baseline alone."""
    path = folder / "eval.yaml"
    path.write_text(textwrap.dedent(f"""
        name: {name}
        model: {{preset: tiny, weights: random, dtype: float32}}
        input: {{frames: 8, prompt: unused by eval}}
        generation: {{max_new_tokens: 3}}
        timing: {{warmup: 1}}
        tracking: {{uri: "{uri}"}}
        plugins: {plugins}
        configurations: {configurations}
        {extra}
    """))
    return path


def predictions(client: MlflowClient, run_id: str, tmp_path: Path) -> list[dict]:
    local = client.download_artifacts(run_id, "predictions.jsonl", str(tmp_path))
    return [json.loads(line) for line in Path(local).read_text().splitlines()]


def test_every_configuration_is_scored_on_every_sample_with_its_cost(synth, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = Evaluation(str(experiment(tmp_path, uri, "eval-all")), str(synth)).run(log=lambda m: None,
                                                                                    progress=False)
    assert [c.name for c in result.configurations] == ["uncompressed", "pooling_25", "frame_avg"]
    assert all(c.status == "FINISHED" for c in result.configurations)
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["tokcomp.kind"] == "evaluation"
    data = [json.loads(line) for line in synth.read_text().splitlines()]
    by_name = {c.name: c for c in result.configurations}
    for conf in result.configurations:
        records = predictions(client, conf.run_id, tmp_path / conf.name)
        assert [r["id"] for r in records] == [d["id"] for d in data]  # every sample once, in the file's order
        for record, sample in zip(records, data, strict=True):
            assert record["answer"] == sample["answer"] and record["failed"] is False
            assert record["correct"] == (record["prediction"] == record["answer_letter"])
            assert record["ttft.total_ms"] > 0 and record["flops.exact.total_T"] > 0
        metrics = client.get_run(conf.run_id).data.metrics
        assert metrics["eval.samples"] == 6
        assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 6)
        kinds = {d["type"] for d in data}
        assert {f"accuracy.{k}" for k in kinds} <= set(metrics)
        assert metrics["ttft.total_ms"] == pytest.approx(sum(r["ttft.total_ms"] for r in records) / 6)
    # the cost is what the strategies did: pooling keeps a quarter of the tokens, frame averaging half the frames
    assert by_name["uncompressed"].metrics["tokens.llm_visual"] == 8 * 16
    assert by_name["pooling_25"].metrics["tokens.llm_visual"] == 8 * 4
    assert by_name["frame_avg"].metrics["tokens.llm_visual"] == 4 * 16
    table = comparison_table(collect(client, parent))
    assert "accuracy" in table and "acc. colour" in table and "baseline" in table


def test_an_interrupted_evaluation_resumes_after_its_last_sample_and_scores_none_twice(synth, tmp_path):
    (tmp_path / "interrupt.py").write_text(COUNTING_INTERRUPT)
    flag = tmp_path / "flag"
    flag.write_text("")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = (f"  late: {{strategies: [{{name: interrupt_after, params: {{flag: '{flag}', after: 4}}}}, "
             f"{{name: pooling, params: {{ratio: 0.25}}}}]}}")
    path = experiment(tmp_path, uri, "eval-resume", extra=extra, plugins="[interrupt.py]")
    with pytest.raises(KeyboardInterrupt):  # warm-up pass, then samples 1-2 recorded, interrupted on the third
        Evaluation(str(path), str(synth)).run(log=lambda m: None, progress=False)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("eval-resume").experiment_id])
    status = {r.data.tags.get("tokcomp.configuration", "parent"): r.info.status for r in runs}
    assert status == {"parent": "KILLED", "uncompressed": "FINISHED", "pooling_25": "FINISHED",
                      "frame_avg": "FINISHED", "late": "KILLED"}
    late = next(r for r in runs if r.data.tags.get("tokcomp.configuration") == "late")
    parts = [f.path for f in client.list_artifacts(late.info.run_id, "predictions")]
    assert parts == ["predictions/part-00000.jsonl"]
    flag.unlink()
    Path(str(flag) + ".count").write_text("0")
    result = Evaluation(str(path), str(synth)).run(log=lambda m: None, progress=False)
    assert [c.status for c in result.configurations] == ["SKIPPED", "SKIPPED", "SKIPPED", "FINISHED"]
    assert int(Path(str(flag) + ".count").read_text()) == 1 + 4  # one warm-up, then only the 4 samples left
    finished = client.get_run(late.info.run_id)  # the same run, continued
    assert finished.info.status == "FINISHED" and finished.data.metrics["eval.samples"] == 6
    records = predictions(client, late.info.run_id, tmp_path / "late")
    assert len({r["id"] for r in records}) == len(records) == 6
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"


def test_a_sample_that_fails_is_recorded_with_its_error_and_the_others_go_on(synth, tmp_path):
    data = tmp_path / "data.jsonl"
    lines = synth.read_text().splitlines()[:2]
    short = tmp_path / "videos" / "short.mp4"
    short.parent.mkdir()
    write_video(short, torch.zeros(4, 112, 112, 3, dtype=torch.uint8), fps=4)  # fewer frames than input.frames
    for line in lines:
        sample = json.loads(line)
        sample["video"] = str(synth.parent / sample["video"])
        data.open("a").write(json.dumps(sample) + "\n")
    data.open("a").write(json.dumps({"id": "short", "video": "videos/short.mp4", "question": "Colour?",
                                     "options": ["red", "blue"], "answer": "red"}) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = Evaluation(str(experiment(tmp_path, uri, "eval-fail", configurations="{}")),
                        str(data)).run(log=lambda m: None, progress=False)
    (baseline,) = result.configurations
    assert baseline.status == "FINISHED"
    assert baseline.metrics["eval.failed"] == 1 and baseline.metrics["eval.samples"] == 3
    records = predictions(MlflowClient(uri), baseline.run_id, tmp_path / "p")
    failed = next(r for r in records if r["id"] == "short")
    assert failed["failed"] is True and failed["correct"] is False and "fewer than the 8" in failed["error"]
    assert sum(not r["failed"] for r in records) == 2


def test_loglikelihood_scoring_ranks_the_option_letters_as_teacher_forcing_scores_them(synth, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = experiment(tmp_path, uri, "eval-ll", configurations="{}")
    result = Evaluation(str(path), str(synth), scoring="loglikelihood",
                        limit=2).run(log=lambda m: None, progress=False)
    records = predictions(MlflowClient(uri), result.configurations[0].run_id, tmp_path / "p")
    assert len(records) == 2
    answerer = Answerer(load_experiment(path))
    first = json.loads(synth.read_text().splitlines()[0])
    video = answerer.read(synth.parent / first["video"])
    from tokcomp.evaldata import mcq_prompt

    forced = answerer.score("uncompressed", video, mcq_prompt(first["question"], first["options"]), ["A", "B", "C", "D"])
    assert [s.tokens for s in forced] == [1, 1, 1, 1]
    assert records[0]["logprobs"] == pytest.approx({k: s.logprob for k, s in zip("ABCD", forced, strict=True)},
                                                   abs=1e-4)
    assert records[0]["prediction"] == max(records[0]["logprobs"], key=records[0]["logprobs"].get)
    # a continuation of several tokens is scored teacher-forced: the sum of its tokens' log-probabilities
    (two,) = answerer.score("uncompressed", video, "Say it.", ["AB"])
    (a,) = answerer.score("uncompressed", video, "Say it.", ["A"])
    assert two.tokens == 2 and two.logprob < a.logprob


def test_free_form_answers_are_scored_by_normalised_exact_match(synth, tmp_path):
    sample = json.loads(synth.read_text().splitlines()[0])
    video = str(synth.parent / sample["video"])
    path = experiment(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "eval-free", configurations="{}")
    answerer = Answerer(load_experiment(path))
    output = answerer.generate("uncompressed", answerer.read(video), "What?", max_new_tokens=2).text
    data = tmp_path / "free.jsonl"
    with data.open("w") as f:  # the model's own words, restyled, are right; other words are wrong
        f.write(json.dumps({"id": "same", "video": video, "question": "What?", "answer": f" {output}. "}) + "\n")
        f.write(json.dumps({"id": "other", "video": video, "question": "What?", "answer": output + "xyz"}) + "\n")
    result = Evaluation(str(path), str(data), ["generation.max_new_tokens=2"],
                        ).run(log=lambda m: None, progress=False)
    records = {r["id"]: r for r in predictions(MlflowClient(result.tracking_uri), result.configurations[0].run_id,
                                                 tmp_path / "p")}
    assert records["same"]["prediction"] == output.strip() and records["same"]["correct"] is True
    assert records["other"]["correct"] is False


def test_eval_command_prints_the_accuracy_table(synth, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["eval", str(experiment(tmp_path, uri, "eval-cli", configurations="{}")), "--data", str(synth),
                 "--limit", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "accuracy %" in out and "uncompressed" in out and "2 samples" in out


def test_decoding_ends_at_a_stop_string_and_the_answer_is_cut_before_it(synth, tmp_path):
    sample = json.loads(synth.read_text().splitlines()[0])
    answerer = Answerer(load_experiment(experiment(tmp_path, "sqlite:///unused.db", "eval-stop", configurations="{}")))
    video = answerer.read(synth.parent / sample["video"])
    full = answerer.generate("uncompressed", video, "Go on.", max_new_tokens=8, min_new_tokens=8)
    stop = full.text[0]
    # decoding ends after the first token whose text holds the stop string
    k = next(k for k in range(1, 9) if stop in answerer.adapter.decode_text(full.new_ids[:k]))
    cut = answerer.generate("uncompressed", video, "Go on.", max_new_tokens=8, min_new_tokens=8, stop=[stop])
    assert cut.new_ids == full.new_ids[:k] and cut.text == ""
    assert cut.ledger.new_tokens == k < 8
