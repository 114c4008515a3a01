"""The lmms-eval model ``tokcomp``: local lmms-eval tasks over a synthetic video-QA set, fully offline.

The tiny model has random weights, so these check the mechanics (every sample answered and scored,
efficiency recorded, MLflow written, errors that name the problem), not accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from tokcomp.errors import ConfigError, InputError  # noqa: E402
from tokcomp.synth import write_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "quickstart.yaml"
OVERRIDES = "tracking.enabled=false;input.frames=8;timing.warmup=0"
SAMPLES = 3

TASK_UTILS = textwrap.dedent('''
    """Functions of the test tasks (lmms-eval imports this file by path from the YAML's !function)."""
    from tokcomp.evaldata import LETTERS, mcq_prompt, parse_option_letter


    def doc_to_visual(doc):
        return [doc["video"]]


    def doc_to_text(doc, lmms_eval_specific_kwargs=None):
        return mcq_prompt(doc["question"], doc["options"])


    def process_results(doc, results):
        return {"exact_match": float(parse_option_letter(results[0], doc["options"]) == doc["answer_letter"])}


    def doc_to_choice(doc):
        return list(LETTERS[: len(doc["options"])])


    def doc_to_index(doc):
        return doc["options"].index(doc["answer"])


    def rounds_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                           previous_round_info=None):
        if round_idx is None:
            return mcq_prompt(doc["question"], doc["options"])
        if round_idx == 1:
            return None, f"You answered {previous_output[-1]!r}. Are you sure? Letter only.", False, previous_output, 1
        return None, None, True, previous_output, previous_round_info


    def rounds_process_results(doc, results):
        return {"rounds": float(len(results[0]))}
''')

TASKS = {
    "tokcomp_synth_gen": """
        output_type: generate_until
        doc_to_text: !function tokcomp_task_utils.doc_to_text
        doc_to_target: answer_letter
        generation_kwargs: {max_new_tokens: 3, until: ["\\n"], do_sample: false}
        process_results: !function tokcomp_task_utils.process_results
        metric_list:
          - {metric: exact_match, aggregation: mean, higher_is_better: true}
    """,
    "tokcomp_synth_mc": """
        output_type: multiple_choice
        doc_to_text: !function tokcomp_task_utils.doc_to_text
        doc_to_choice: !function tokcomp_task_utils.doc_to_choice
        doc_to_target: !function tokcomp_task_utils.doc_to_index
        target_delimiter: ""
        metric_list:
          - {metric: acc, aggregation: mean, higher_is_better: true}
    """,
    "tokcomp_synth_rounds": """
        output_type: generate_until_multi_round
        doc_to_text: !function tokcomp_task_utils.rounds_doc_to_text
        doc_to_target: answer_letter
        generation_kwargs: {max_new_tokens: 2, until: ["\\n"]}
        process_results: !function tokcomp_task_utils.rounds_process_results
        metric_list:
          - {metric: rounds, aggregation: mean, higher_is_better: true}
    """,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No network: the hub and datasets offline, the datasets cache in a temporary folder. lmms-eval's
    logger writes to the sys.stdout of its import (a capture pytest closes): errors only, to stderr."""
    import datasets.config
    import huggingface_hub.constants
    from loguru import logger

    logger.remove()
    logger.add(lambda message: sys.stderr.write(message), level="ERROR")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three synthetic questions as a local JSON dataset, and the test tasks reading it."""
    folder = tmp_path_factory.mktemp("lmms")
    data = write_dataset(folder / "synth", SAMPLES, seed=0)
    docs = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        row["video"] = str(data.parent / row["video"])
        row["answer_letter"] = "ABCD"[row["options"].index(row["answer"])]
        docs.append(row)
    (folder / "docs.json").write_text(json.dumps(docs))
    (folder / "tokcomp_task_utils.py").write_text(TASK_UTILS)
    for name, body in TASKS.items():
        head = f"""
            task: {name}
            dataset_path: json
            dataset_kwargs: {{data_files: {{test: "{folder / 'docs.json'}"}}}}
            test_split: test
            doc_to_visual: !function tokcomp_task_utils.doc_to_visual
        """
        (folder / f"{name}.yaml").write_text(textwrap.dedent(head) + textwrap.dedent(body))
    return folder


@pytest.fixture(scope="module")
def lm():
    from tokcomp.lmms_plugin import TokcompLMM

    return TokcompLMM(experiment=str(EXPERIMENT), configuration="fastv", overrides=OVERRIDES)


def evaluate(task_dir: Path, task: str, model, model_args: str = "", **kwargs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("ERROR", include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=manager, batch_size=1,
                           log_samples=True, bootstrap_iters=0, process_docs_parallel=1, verbosity="ERROR", **kwargs)


def request(kind: str, visuals, args: tuple | None = None) -> Instance:
    """One hand-made request about doc 0 of a task ``t`` (set ``lm.task_dict`` to give it that doc)."""
    args = args or ("What happens?", {"max_new_tokens": 1}, lambda _doc: visuals, 0, "t", "test")
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})


def test_tokcomp_is_registered_as_an_lmms_eval_model():
    from lmms_eval.models import get_model

    from tokcomp.lmms_plugin import TokcompLMM

    assert get_model("tokcomp") is TokcompLMM


def test_importing_tokcomp_does_not_import_lmms_eval():
    code = "import sys, tokcomp, tokcomp.answering, tokcomp.cli; print('lmms_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_generate_task_answers_and_scores_every_sample_and_prints_efficiency(task_dir, capsys):
    args = f"experiment={EXPERIMENT},configuration=pooling_25,overrides={OVERRIDES}"
    results = evaluate(task_dir, "tokcomp_synth_gen", "tokcomp", args)
    scores = results["results"]["tokcomp_synth_gen"]
    assert 0.0 <= scores["exact_match,none"] <= 1.0
    samples = results["samples"]["tokcomp_synth_gen"]
    assert len(samples) == SAMPLES
    assert all("\n" not in s["filtered_resps"][0] for s in samples)  # cut at the task's `until`
    out = capsys.readouterr().out
    assert "tokcomp efficiency, configuration 'pooling_25'" in out
    row = next(line for line in out.splitlines() if line.startswith("tokcomp_synth_gen "))
    assert row.split()[1:3] == [str(SAMPLES), "0.25"]  # samples, retained ratio


def test_efficiency_means_per_task_are_positive_and_records_are_kept_per_sample(task_dir, lm):
    evaluate(task_dir, "tokcomp_synth_gen", lm)
    means = lm.efficiency["tokcomp_synth_gen"]
    assert means["samples"] == SAMPLES
    for key in ("ttft.total_ms", "ttft.vision_ms", "ttft.prefill_ms", "tokens.llm_visual", "flops.exact.total_T",
                "flops.paper.total_T", "retained_ratio"):
        assert means[key] > 0, key
    assert means["tokens.llm_seq_last_layer"] < means["tokens.llm_seq_first_layer"]  # FastV pruned inside the LLM
    assert lm.records == []  # handed over by the report


def test_multiple_choice_task_scores_options_by_loglikelihood_in_one_pass_per_question(task_dir, lm, monkeypatch):
    passes = []
    generate = lm.answerer.generate
    monkeypatch.setattr(lm.answerer, "generate", lambda *a, **k: passes.append(a) or generate(*a, **k))
    results = evaluate(task_dir, "tokcomp_synth_mc", lm)
    assert 0.0 <= results["results"]["tokcomp_synth_mc"]["acc,none"] <= 1.0
    samples = results["samples"]["tokcomp_synth_mc"]
    assert len(samples) == SAMPLES and all(len(s["resps"]) == 4 for s in samples)
    assert len(passes) == SAMPLES  # four one-token options share their question's pass
    for sample in samples:
        logprobs = [resp[0][0] for resp in sample["resps"]]
        assert all(lp < 0 for lp in logprobs) and len(set(logprobs)) == 4
        greedy = [resp[0][1] for resp in sample["resps"]]
        assert sum(greedy) <= 1
    assert lm.efficiency["tokcomp_synth_mc"]["ttft.total_ms"] > 0


def test_one_token_options_score_as_teacher_forcing_does_and_longer_ones_are_forced(lm):
    import torch

    lm.task_dict = {"t": {"test": [{}]}}
    frames = torch.zeros(8, 64, 64, 3, dtype=torch.uint8)
    video = lm.answerer.video(frames)

    def requests(continuations):
        return [request("loglikelihood", None, args=("Which?", c, lambda _doc: frames, 0, "t", "test"))
                for c in continuations]

    for continuations in (["A", "B"], [" A", " B"]):  # one token each (one shared pass); two tokens each
        scored = [result.text for result in lm.loglikelihood(requests(continuations))]
        forced = lm.answerer.score(lm.configuration, video, "Which?", continuations)
        assert [lp for lp, _ in scored] == pytest.approx([s.logprob for s in forced], abs=1e-4)
        assert [g for _, g in scored] == [s.greedy for s in forced]
    assert len(lm.records) == 2  # one record per question, with the logprobs of its options
    lm.report(show=lambda _: None)


def test_multi_round_task_answers_every_round_with_the_previous_answers(task_dir, lm, monkeypatch):
    prompts = []
    generate = lm.answerer.generate
    monkeypatch.setattr(lm.answerer, "generate", lambda *a, **k: prompts.append(a[2]) or generate(*a, **k))
    results = evaluate(task_dir, "tokcomp_synth_rounds", lm, limit=2)
    assert results["results"]["tokcomp_synth_rounds"]["rounds,none"] == 2.0
    rounds = [s["resps"][0][0] for s in results["samples"]["tokcomp_synth_rounds"]]
    assert len(rounds) == 2 and all(isinstance(r, list) and len(r) == 2 for r in rounds)
    asked_again = [p for p in prompts if p.startswith("You answered")]
    assert sorted(asked_again) == sorted(f"You answered {r[0]!r}. Are you sure? Letter only." for r in rounds)
    assert lm.efficiency["tokcomp_synth_rounds"]["samples"] == 4  # two docs, two rounds each


def test_frames_given_as_images_are_sampled_to_input_frames(lm):
    from PIL import Image

    lm.task_dict = {"t": {"test": [{}]}}
    images = [Image.new("RGB", (64, 48), (i * 20, 0, 0)) for i in range(12)]
    for given, used in ((images, 8), (images[:3], 3)):
        [text] = lm.generate_until([request("generate_until", given)])
        assert isinstance(text, str) and lm.records[-1]["frames"] == used
    lm.report(show=lambda _: None)


def test_generate_until_stops_decoding_at_the_task_stop_strings(lm, monkeypatch):
    from PIL import Image

    generate, asked = lm.answerer.generate, []

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(lm.answerer, "generate", spy)
    lm.task_dict = {"t": {"test": [{}]}}
    req = request("generate_until", [Image.new("RGB", (32, 32))] * 8)
    req.arguments[1].update(until=["USER:", "\n", ","], max_new_tokens=2)
    [text] = lm.generate_until([req])
    assert asked[-1]["stop"] == ["USER:", "\n", ","] and not any(s in text for s in ("USER:", "\n", ","))
    lm.report(show=lambda _: None)


@pytest.mark.parametrize("visuals", [None, []])
def test_a_request_without_a_video_is_a_one_line_error(lm, visuals):
    lm.task_dict = {"t": {"test": [{}]}}
    with pytest.raises(InputError, match=r"^task 't' doc 0 has no video; .*text-only") as err:
        lm.generate_until([request("generate_until", visuals)])
    assert "\n" not in str(err.value)


def test_unconditional_loglikelihood_requests_are_a_clear_error(lm):
    with pytest.raises(InputError, match="without a video"):
        lm.loglikelihood([request("loglikelihood", None, args=("", " A"))])


def test_audio_or_other_visuals_are_a_clear_error(lm):
    lm.task_dict = {"t": {"test": [{}]}}
    with pytest.raises(InputError, match="visual input of type dict is not supported"):
        lm.generate_until([request("generate_until", [{"array": [0.0], "sampling_rate": 16000}])])


def test_unknown_model_args_key_is_a_one_line_error_listing_the_known_keys():
    from tokcomp.lmms_plugin import TokcompLMM

    with pytest.raises(ConfigError) as err:
        TokcompLMM.create_from_arg_string(f"experiment={EXPERIMENT},fraems=8", {"batch_size": 1})
    message = str(err.value)
    assert "\n" not in message and "'fraems'" in message
    for key in ("experiment", "configuration", "overrides", "max_new_tokens", "track", "batch_size", "device"):
        assert key in message


@pytest.mark.parametrize(("args", "match"), [
    ("configuration=fastv", "needs experiment=PATH.yaml"),
    (f"experiment={EXPERIMENT},configuration=fastvv", "unknown configuration 'fastvv'. Did you mean 'fastv'"),
    (f"experiment={EXPERIMENT},max_new_tokens=0", "max_new_tokens=0 must be a positive integer"),
    (f"experiment={EXPERIMENT},track=maybe", "track='maybe' must be true or false"),
    (f"experiment={EXPERIMENT},overrides=input.frams=8", "input.frams"),
])
def test_bad_model_args_are_one_line_errors(args, match):
    from tokcomp.lmms_plugin import TokcompLMM

    with pytest.raises(ConfigError, match=match) as err:
        TokcompLMM.create_from_arg_string(args)
    assert "\n" not in str(err.value)


def test_batch_size_other_than_one_is_rejected():
    from tokcomp.lmms_plugin import TokcompLMM

    with pytest.raises(ConfigError, match=r"--batch_size '4' is not supported.*--batch_size 1"):
        TokcompLMM.create_from_arg_string(f"experiment={EXPERIMENT}", {"batch_size": "4", "device": "cpu"})


def test_track_logs_one_run_with_params_efficiency_scores_and_samples_to_mlflow(task_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from tokcomp.lmms_plugin import TokcompLMM

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lm = TokcompLMM(experiment=str(EXPERIMENT), configuration="topk_25", track=True,
                    overrides=f"{OVERRIDES};tracking.uri={uri};tracking.experiment=lmms-test")
    results = evaluate(task_dir, "tokcomp_synth_gen", lm)
    scores = lm.log_results(results)
    assert scores["tokcomp_synth_gen.exact_match"] == results["results"]["tokcomp_synth_gen"]["exact_match,none"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lmms-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == lm._finished_run
    assert run.data.tags["tokcomp.kind"] == "lmms-eval" and run.data.tags["lmms_eval.tasks"] == "tokcomp_synth_gen"
    assert run.data.params["configuration"] == "topk_25"
    assert run.data.params["strategies.0.name"] == "topk" and run.data.params["input.frames"] == "8"
    metrics = run.data.metrics
    assert metrics["tokcomp_synth_gen.samples"] == SAMPLES
    assert metrics["tokcomp_synth_gen.ttft.total_ms"] > 0 and metrics["tokcomp_synth_gen.retained_ratio"] == 0.25
    assert "tokcomp_synth_gen.exact_match" in metrics
    lines = Path(client.download_artifacts(run.info.run_id, "samples.jsonl")).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == SAMPLES and {r["doc_id"] for r in records} == set(range(SAMPLES))
    assert all(r["ttft.total_ms"] > 0 and r["configuration"] == "topk_25" for r in records)
    assert "results" in json.loads(Path(client.download_artifacts(run.info.run_id, "lmms_eval_results.json"))
                                   .read_text())
