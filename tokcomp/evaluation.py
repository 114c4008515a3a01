"""``tokcomp eval``: every configuration of an experiment on every sample of a video-QA file.

Accuracy and efficiency come from the same passes: each sample is answered once per configuration
(after ``timing.warmup`` untimed passes on the first sample), and its prediction, correctness,
retained tokens, TTFT parts and FLOPs are kept per sample. Multiple choice is scored by parsing the
option letter from the generated text (``scoring: generate``, the usual lmms-eval parsing) or by the
log-probability of each option's letter as the answer (``loglikelihood``); free-form answers by
normalised exact match. A sample that fails (a video that cannot be decoded, a strategy error) is
recorded as failed with its error and counts as not answered correctly; the others go on.

Tracking: one parent run (``tokcomp.kind = evaluation``) keyed by the resolved config, the data
file's contents and the scoring; one child run per configuration, whose predictions are written
to the run as they come (``predictions/part-*.jsonl``, rewritten after every sample) and merged
into ``predictions.jsonl`` when it finishes. Running the same command again resumes: finished
configurations are skipped, an interrupted one continues after its last recorded sample, and no
sample is scored twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from tokcomp.answering import Answerer, mean_metrics
from tokcomp.config import flatten, identity, load_experiment, to_yaml
from tokcomp.errors import ConfigError, InputError, TokcompError
from tokcomp.evaldata import EvalSample, is_correct, load_eval_data, mcq_prompt, parse_option_letter
from tokcomp.runner import (
    AdapterCache,
    artifact_errors,
    check_tracking,
    close_parent,
    config_hash,
    describe_stop,
    end_status,
    error_message,
    open_tracker,
)
from tokcomp.sweep import RESUME_ENV, child_runs, claim_parent, latest_run_tagged
from tokcomp.tables import render_table
from tokcomp.tracking import machine_tags, terminate_cleanly

SCORINGS = ("generate", "loglikelihood")
CHUNK = 50  # predictions per artifact part: a part is rewritten after each of its samples
EFFICIENCY_KEYS = ("tokens.llm_visual", "retained_ratio", "ttft.total_ms", "ttft.vision_ms",
                   "ttft.token_processing_ms", "ttft.prefill_ms", "ttft.other_ms", "flops.exact.total_T",
                   "flops.paper.total_T")


@dataclass
class EvalConfigurationResult:
    name: str
    status: str  # FINISHED | FAILED | SKIPPED (finished in an earlier attempt) | KILLED
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class EvalResult:
    name: str
    parent_run_id: str
    tracking_uri: str | None
    configurations: list[EvalConfigurationResult]
    kinds: list[str]
    error: str = ""

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.configurations if c.status == "FAILED"] + ([self.error] if self.error else [])


def data_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def eval_key(cfg: Any, digest: str, scoring: str, limit: int | None) -> str:
    """Identity of an evaluation: the resolved config (tracking aside), the data file's bytes, the scoring."""
    text = json.dumps({"experiment": identity(cfg), "data": digest, "scoring": scoring, "limit": limit}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prompt_for(sample: EvalSample) -> str:
    return mcq_prompt(sample.question, sample.options) if sample.options is not None else sample.question


class Evaluation:
    """Checked on construction (config, data file and its videos, strategies on the model's geometry),
    before any weights are built or any run is opened."""

    def __init__(self, experiment_file: str, data: str, overrides: list[str] | None = None,
                 scoring: str = "generate", limit: int | None = None, resume: bool | None = None,
                 trace: bool | None = None, executor: str = "local", address: str | None = None):
        """``executor="ray"``: each configuration's samples sharded over the workers of the Ray cluster at
        ``address`` (the data file and its videos must be where every worker can read them)."""
        from tokcomp.distributed import check_executor
        from tokcomp.preflight import check_experiment_file

        check_executor(executor)
        self.executor, self.address, self.session = executor, address, None
        self.spec = {"experiment_file": experiment_file, "data": str(data), "overrides": list(overrides or []),
                     "scoring": scoring, "limit": limit, "trace": trace}  # what a worker rebuilds this from

        if scoring not in SCORINGS:
            raise ConfigError(f"--scoring {scoring!r} is not one of: {', '.join(SCORINGS)}")
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        check_experiment_file(experiment_file)
        self.cfg = load_experiment(experiment_file, overrides or [])
        self.experiment_file = experiment_file
        self.data = Path(data)
        self.samples = load_eval_data(self.data)[:limit]
        if scoring == "loglikelihood":
            free = next((s for s in self.samples if s.options is None), None)
            if free is not None:
                raise ConfigError(f"--scoring loglikelihood ranks options, but sample {free.id!r} "
                                  f"({self.data}:{free.line}) is free-form (no options)")
        self.scoring, self.limit = scoring, limit
        self.answerer = Answerer(self.cfg, experiment_file, AdapterCache(), trace=trace)
        self.key = eval_key(self.cfg, data_digest(self.data), scoring, limit)
        self.resume = resume if resume is not None else os.environ.get(RESUME_ENV, "").lower() in ("1", "true", "yes")
        self.kinds = sorted({s.type for s in self.samples if s.type})
        self.first_ledger: dict | None = None

    # ---- finding earlier attempts ----------------------------------------------------------------
    def _find_parent(self, tracker) -> Any:
        return latest_run_tagged(tracker, {"tokcomp.eval_key": self.key, "tokcomp.kind": "evaluation"})

    @staticmethod
    def _children(tracker, parent: str) -> list[Any]:
        return child_runs(tracker, parent)

    # ---- the command -----------------------------------------------------------------------------
    def run(self, log: Callable[[str], None] = print, progress: bool = True) -> EvalResult:
        """Evaluate (or resume). Ctrl-C and SIGTERM end the runs in progress and the parent KILLED,
        with every prediction made so far kept."""
        with terminate_cleanly():
            if self.executor == "ray":  # the server, the cluster and the resources: before the parent run
                from tokcomp.distributed import RaySession

                self.session = RaySession(self.cfg, self.address, len(self.samples), log)
            try:
                return self._run(log, progress)
            finally:
                if self.session is not None:
                    self.session.close()
                    self.session = None

    def _run(self, log: Callable[[str], None], progress: bool) -> EvalResult:
        check_tracking(self.cfg)
        tracker, uri = open_tracker(self.cfg)
        found = self._find_parent(tracker)
        tags = {**machine_tags(self.cfg.model.device), "tokcomp.kind": "evaluation", "tokcomp.eval_key": self.key,
                "tokcomp.data_file": str(self.data), "tokcomp.scoring": self.scoring,
                "tokcomp.experiment_file": str(self.experiment_file), "model.preset": self.cfg.model.preset,
                "tokcomp.executor": self.executor}
        if found is None:
            parent = tracker.start(self.cfg.name, tags)
            errors = []
        else:
            parent = found.info.run_id
            claim_parent(tracker, found, self._children(tracker, parent), self.resume, log, "eval")
            log(f"resuming evaluation {parent} (finished configurations are skipped, the others continue "
                f"after their last recorded sample)")
            errors = []
        names = self.answerer.configurations()
        bar = tqdm(total=len(names) * len(self.samples), desc="eval", unit="sample", disable=not progress)
        results: list[EvalConfigurationResult] = []
        try:
            if found is None:
                tracker.log_params(parent, {**flatten(OmegaConf.to_container(self.cfg, resolve=True)),
                                            "eval.data": str(self.data), "eval.scoring": self.scoring,
                                            "eval.samples": len(self.samples)})
                errors += artifact_errors(tracker.log_text, parent, to_yaml(self.cfg), "experiment.yaml")
            earlier = {}
            for run in self._children(tracker, parent):
                attempt = run.data.tags.get("tokcomp.config_hash")
                if attempt and (attempt not in earlier or run.info.status == "FINISHED"):
                    earlier[attempt] = run
            for index, name in enumerate(names):
                where = f"[{index + 1}/{len(names)}] {name}"
                results.append(self._configuration(tracker, parent, name, earlier.get(config_hash(self.cfg, name)),
                                                   where, bar, log))
            error = self._finish_parent(tracker, parent, results, errors, resumed=found is not None)
        except BaseException as exc:
            tracker.abandon(parent, end_status(exc), describe_stop(exc))
            raise
        finally:
            bar.close()
        return EvalResult(self.cfg.name, parent, uri, results, self.kinds, error)

    def _configuration(self, tracker, parent: str, name: str, earlier: Any, where: str, bar: tqdm,
                       log: Callable[[str], None]) -> EvalConfigurationResult:
        if earlier is not None and earlier.info.status == "FINISHED":
            log(f"{where} (finished earlier, skipped)")
            bar.update(len(self.samples))
            return EvalConfigurationResult(name, "SKIPPED", earlier.info.run_id, dict(earlier.data.metrics))
        records: dict[str, dict] = {}
        part = 0
        if earlier is not None:  # an interrupted attempt: continue it, keeping what it scored
            run_id = earlier.info.run_id
            tracker.take_over(run_id)
            records, part = _recorded_predictions(tracker, run_id)
            records = {k: v for k, v in records.items() if k in {s.id for s in self.samples}}
            log(f"{where} (continuing: {len(records)} of {len(self.samples)} samples recorded earlier)")
        else:
            log(where)
            strategies = self.answerer.strategies[name]
            baseline = not strategies and name == next(n for n, s in self.answerer.strategies.items() if not s)
            run_id = tracker.start(name, {
                "tokcomp.kind": "configuration", "tokcomp.configuration": name, "tokcomp.label": name,
                "tokcomp.sweep_point": "", "tokcomp.config_hash": config_hash(self.cfg, name),
                "tokcomp.baseline": str(baseline).lower(), "tokcomp.eval_key": self.key,
                "tokcomp.strategies": ",".join(s.name for s in strategies) or "none",
                "model.preset": self.cfg.model.preset, **machine_tags(self.cfg.model.device)}, parent=parent)
        bar.update(len(records))
        chunk: list[dict] = []
        self.first_ledger = None  # the first sample answered in this attempt: its ledger is the run's ledger.json
        try:
            if earlier is None:
                self._describe(tracker, run_id, name)
            todo = [s for s in self.samples if s.id not in records]
            if todo and self.session is not None:
                self._answer_on_ray(tracker, run_id, name, todo, records, part, bar)
                todo = []
            if todo:
                self.answerer.build(log)
                self.warm_up(name, todo[0])
            for sample in todo:
                record = self.answer_sample(name, sample)
                records[sample.id] = record
                chunk.append(record)
                tracker.log_text(run_id, jsonl(chunk), f"predictions/part-{part:05d}.jsonl")
                if len(chunk) == CHUNK:
                    chunk, part = [], part + 1
                bar.update(1)
                bar.set_postfix_str(f"{name}: {sum(r['correct'] for r in records.values())}/{len(records)} correct")
            ordered = [records[s.id] for s in self.samples]
            metrics = self.metrics(ordered)
            tracker.log_metrics(run_id, metrics)
            tracker.log_text(run_id, jsonl(ordered), "predictions.jsonl")
            if self.first_ledger is not None:
                tracker.log_json(run_id, self.first_ledger, "ledger.json")
            tracker.finish(run_id, "FINISHED")
        except BaseException as exc:
            if isinstance(exc, Exception):
                message = error_message(exc)
                tracker.fail(run_id, message, traceback.format_exc())
                log(f"{where} FAILED: {message}")
                return EvalConfigurationResult(name, "FAILED", run_id, error=message)
            tracker.abandon(run_id, end_status(exc), describe_stop(exc))
            raise
        return EvalConfigurationResult(name, "FINISHED", run_id, metrics)

    def _answer_on_ray(self, tracker, run_id: str, name: str, todo: list[EvalSample], records: dict[str, dict],
                       part: int, bar: tqdm) -> None:
        """``todo`` in shards over the Ray workers, each writing its own predictions part as it goes;
        their records join ``records``. A shard whose worker died leaves its samples unanswered: the
        configuration fails, and the same command again continues it from what was written."""
        from tokcomp.distributed import shard_size

        pool = self.session.pool
        spec = {**self.spec, "overrides": [*self.spec["overrides"], f"tracking.uri={self.session.uri}"]}
        size = shard_size(len(todo), pool.size, CHUNK)
        shards = [(part + i, [s.id for s in todo[start:start + size]])
                  for i, start in enumerate(range(0, len(todo), size))]
        lost: list[str] = []
        workers: set[str] = set()

        def on_result(shard: tuple[int, list[str]], value: dict[str, Any], worker: Any) -> None:
            for record in value["records"]:
                records[record["id"]] = record
            if self.first_ledger is None and value["ledger"] is not None:
                self.first_ledger = value["ledger"]
            if not workers:  # where the samples were timed, not where the driver runs
                tracker.set_tags(run_id, value["machine"])
            workers.add(value["worker"])
            bar.update(len(value["records"]))
            bar.set_postfix_str(f"{name}: {sum(r['correct'] for r in records.values())}/{len(records)} correct")

        def on_error(shard: tuple[int, list[str]], message: str, worker: Any) -> None:
            lost.append(f"samples {shard[1][0]}..{shard[1][-1]} ({len(shard[1])}): {message}")

        pool.map(shards, lambda handle, shard: handle.evaluate.remote(spec, run_id, name, shard[1], shard[0]),
                 on_result, on_error)
        tracker.set_tags(run_id, {"tokcomp.executor": "ray", "tokcomp.workers": ", ".join(sorted(workers))})
        if lost:  # the parts already written stay: a resume continues after them
            missing = sum(1 for s in todo if s.id not in records)
            raise TokcompError(f"{missing} of {len(todo)} samples not answered: " + "; ".join(lost))

    def _describe(self, tracker, run_id: str, name: str) -> None:
        from tokcomp.runner import configuration_config

        resolved = configuration_config(self.cfg, name)
        params = flatten({k: resolved[k] for k in ("model", "input", "generation", "timing")})
        params.update(flatten({"strategies": [s.describe() for s in self.answerer.strategies[name]]}))
        params.update({"configuration": name, "seed": self.cfg.seed, "eval.data": str(self.data),
                       "eval.scoring": self.scoring, "eval.samples": len(self.samples)})
        tracker.log_params(run_id, params)
        tracker.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")

    def warm_up(self, name: str, sample: EvalSample) -> None:
        """Untimed passes before the first timed sample, so the first sample's TTFT is not a cold start."""
        if self.cfg.timing.warmup < 1:
            return
        try:
            video = self.answerer.read(sample.video)
        except InputError:
            return  # that sample will be recorded as failed; no warm-up is better than none at all
        for _ in range(self.cfg.timing.warmup):
            self.answerer.generate(name, video, prompt_for(sample), max_new_tokens=1)

    def answer_sample(self, name: str, sample: EvalSample) -> dict[str, Any]:
        """One sample's record: what was predicted, whether it is correct, what it cost; or its error."""
        record: dict[str, Any] = {"id": sample.id, "type": sample.type, "answer": sample.answer}
        if sample.options is not None:
            record["answer_letter"] = sample.answer_letter
        try:
            video = self.answerer.read(sample.video)
            prompt = prompt_for(sample)
            answer = self.answerer.generate(name, video, prompt,
                                            max_new_tokens=1 if self.scoring == "loglikelihood" else None)
            record["output"] = answer.text
            if self.scoring == "loglikelihood":
                letters = [chr(ord("A") + i) for i in range(len(sample.options))]
                logprobs = self.answerer.first_token_logprobs(answer, letters)
                if logprobs is None:  # letters of several tokens: one teacher-forced pass per option
                    logprobs = [s.logprob for s in self.answerer.score(name, video, prompt, letters)]
                record["prediction"] = letters[max(range(len(letters)), key=logprobs.__getitem__)]
                record["logprobs"] = dict(zip(letters, logprobs, strict=True))
                record["correct"] = record["prediction"] == sample.answer_letter
            elif sample.options is not None:
                record["prediction"] = parse_option_letter(answer.text, sample.options)
                record["correct"] = is_correct(sample, answer.text)
            else:
                record["prediction"] = answer.text.strip()
                record["correct"] = is_correct(sample, answer.text)
            efficiency = answer.efficiency()
            if self.first_ledger is None:
                self.first_ledger = answer.ledger.to_dict()
            record.update({key: efficiency.get(key) for key in EFFICIENCY_KEYS})
            record["failed"] = False
        except Exception as exc:  # recorded, and the evaluation goes on
            record.update({"prediction": None, "correct": False, "failed": True, "error": error_message(exc)})
        return record

    def metrics(self, records: list[dict]) -> dict[str, float]:
        """Accuracy (failed samples count as wrong), per question type, and per-sample means of efficiency."""
        metrics: dict[str, float] = {
            "accuracy": sum(r["correct"] for r in records) / len(records),
            "eval.samples": len(records), "eval.correct": sum(r["correct"] for r in records),
            "eval.failed": sum(r["failed"] for r in records),
            "eval.unparsed": sum(1 for r in records if not r["failed"] and r.get("prediction") is None),
        }
        for kind in self.kinds:
            of_kind = [r for r in records if r["type"] == kind]
            metrics[f"accuracy.{kind}"] = sum(r["correct"] for r in of_kind) / len(of_kind)
        answered = [{k: r[k] for k in EFFICIENCY_KEYS if r.get(k) is not None} for r in records if not r["failed"]]
        metrics.update(mean_metrics(answered))
        return metrics

    def _finish_parent(self, tracker, parent: str, results: list[EvalConfigurationResult], errors: list[str],
                       resumed: bool) -> str:
        return close_parent(tracker, parent, [r.name for r in results if r.status == "FAILED"], errors,
                            accuracy_table(results, self.kinds), {"tokcomp.resumed": str(resumed).lower()})


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, default=str) + "\n" for r in records)


def _recorded_predictions(tracker, run_id: str) -> tuple[dict[str, dict], int]:
    """The predictions an interrupted attempt wrote (its parts), and the next part's number."""
    client = tracker.client
    with tempfile.TemporaryDirectory() as tmp:
        try:
            listed = client.list_artifacts(run_id, "predictions")
        except Exception:
            return {}, 0
        records: dict[str, dict] = {}
        numbers = []
        for item in sorted(listed, key=lambda f: f.path):
            name = Path(item.path).name
            if not (name.startswith("part-") and name.endswith(".jsonl")):
                continue
            numbers.append(int(name[len("part-"):-len(".jsonl")]))
            local = client.download_artifacts(run_id, item.path, tmp)
            for line in Path(local).read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    records[record["id"]] = record
        return records, (max(numbers) + 1 if numbers else 0)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def accuracy_table(results: list[EvalConfigurationResult], kinds: list[str]) -> str:
    """Accuracy (%) overall and per question type next to retained tokens, TTFT and FLOPs (per-sample means)."""
    header = ["configuration", "status", "samples", "accuracy %", *kinds, "retained", "LLM visual", "TTFT ms",
              "vision ms", "FLOPs exact T", "failed"]
    rows = []
    for r in results:
        m = r.metrics
        if not m:
            rows.append([r.name, r.status, *["-"] * (len(header) - 3), r.error[:60]])
            continue
        tera = m.get("flops.exact.total_T")
        rows.append([r.name, r.status, str(int(m.get("eval.samples", 0))), _pct(m.get("accuracy")),
                     *[_pct(m.get(f"accuracy.{k}")) for k in kinds], _pct(m.get("retained_ratio")) + "%",
                     "-" if m.get("tokens.llm_visual") is None else f"{m['tokens.llm_visual']:.0f}",
                     "-" if m.get("ttft.total_ms") is None else f"{m['ttft.total_ms']:.1f}",
                     "-" if m.get("ttft.vision_ms") is None else f"{m['ttft.vision_ms']:.1f}",
                     "-" if tera is None else (f"{tera:.2f}" if tera >= 0.01 else f"{tera:.3g}"),
                     str(int(m.get("eval.failed", 0)))])
    return render_table(header, rows)
