"""lmms-eval model ``tokcomp``: any configuration of a tokcomp experiment on any lmms-eval task.

    lmms-eval --model tokcomp --model_args experiment=exp.yaml,configuration=fastv --tasks mvbench --batch_size 1

A thin adapter over ``tokcomp.answering.Answerer``: compression, timing and token/FLOPs accounting
stay in tokcomp's core, so accuracy and efficiency come from the same passes as ``tokcomp eval``.
lmms-eval computes the scores; this adapter keeps each sample's efficiency (``Answer.efficiency()``),
prints per-task means when the requests are done and, with ``track=true``, logs them to MLflow.

lmms-eval 0.7.3 finds plugin models through the entry-point group ``lmms_eval.models``, whose
payload must be a ``ModelManifest`` or a callable returning one (it calls a class with no
arguments), hence the entry point names ``manifest``. Only lmms-eval imports this module:
``import tokcomp`` never imports lmms_eval.
"""

from __future__ import annotations

import json
import logging
import math
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from tokcomp.errors import ConfigError, InputError, TokcompError, UnknownNameError

MODEL_ID = "tokcomp"
# model_args of ours, then those lmms-eval itself passes (``--batch_size``, ``--max_batch_size``, ``--device``)
MODEL_ARGS = ("experiment", "configuration", "overrides", "max_new_tokens", "track")
LMMS_EVAL_ARGS = ("batch_size", "max_batch_size", "device")
MAX_ROUNDS = 100  # a multi-round task whose doc_to_text never says it is done
SUMMARY_KEYS = (("retained", "retained_ratio"), ("LLM visual", "tokens.llm_visual"),
                ("TTFT ms", "ttft.total_ms"), ("vision", "ttft.vision_ms"), ("tok.proc", "ttft.token_processing_ms"),
                ("prefill", "ttft.prefill_ms"), ("FLOPs exact T", "flops.exact.total_T"),
                ("FLOPs paper T", "flops.paper.total_T"))

log = logging.getLogger(__name__)


def manifest() -> ModelManifest:
    """The entry point's payload: lmms-eval imports the class only when ``--model tokcomp`` is asked for."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TokcompLMM")


def _parse_overrides(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [item.strip() for item in str(value).split(";") if item.strip()]


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and not value.is_integer()) or isinstance(value, bool):
        raise ConfigError(f"model_args {name}={value!r} must be a positive integer")
    return number


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    raise ConfigError(f"model_args {name}={value!r} must be true or false")


def _metric_name(key: str) -> str:
    """lmms-eval's ``"<metric>,<filter>"`` as ``<metric>`` (filter ``none``) or ``<metric>.<filter>``."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}.{filt}"


class TokcompLMM(lmms):
    """One configuration of a tokcomp experiment, answering lmms-eval's requests one at a time.

    After each evaluation ``efficiency`` holds per-task means of the per-sample efficiency and
    ``records`` the samples; with ``track=true`` both are in one MLflow run (``run_id``), and
    ``log_results(results)`` adds the scores ``simple_evaluate`` returned.
    """

    def __init__(self, experiment: str | None = None, configuration: str | None = None,
                 overrides: str | list[str] | None = None, max_new_tokens: int | None = None, track: Any = False,
                 batch_size: Any = 1, max_batch_size: Any = None, device: str | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise UnknownNameError("model_args key", sorted(unknown)[0], MODEL_ARGS + LMMS_EVAL_ARGS)
        if experiment is None or experiment == "":
            raise ConfigError("model_args needs experiment=PATH.yaml (a tokcomp experiment file)")
        if str(batch_size) != "1":
            raise ConfigError(f"--batch_size {batch_size!r} is not supported: tokcomp answers one request at a "
                              "time (its timings are per sample); use --batch_size 1")
        if max_batch_size is not None:
            _positive_int("max_batch_size", max_batch_size)  # accepted, unused: the batch is always 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']}: tokcomp's lmms-eval model runs in one "
                              "process (launch lmms-eval without accelerate/torchrun)")
        self.track = _flag("track", track)
        self.max_new_tokens = None if max_new_tokens is None else _positive_int("max_new_tokens", max_new_tokens)

        from tokcomp.answering import Answerer
        from tokcomp.config import load_experiment

        extra = [f"model.device={device}"] if device else []
        self.experiment_file = Path(str(experiment))
        self.cfg = load_experiment(self.experiment_file, _parse_overrides(overrides) + extra)
        self.answerer = Answerer(self.cfg, experiment_file=self.experiment_file)
        known = self.answerer.configurations()
        if not known:
            raise ConfigError(f"experiment {str(experiment)!r} has no configurations (and baseline: false)")
        self.configuration = known[0] if configuration is None else str(configuration)
        if self.configuration not in known:
            raise UnknownNameError("configuration", self.configuration, known)
        if self.track:
            from tokcomp.tracking import check_store, resolve_tracking_uri

            check_store(resolve_tracking_uri(self.cfg.tracking.uri), self._mlflow_experiment())
        self.answerer.build()
        self.records: list[dict[str, Any]] = []
        self.efficiency: dict[str, dict[str, float]] = {}
        self.run_id: str | None = None  # the MLflow run of the evaluation in progress
        self._finished_run: str | None = None  # ... and of the last one reported, for log_results
        self._tracker: Any = None
        self._warm = False
        self._warned: set[tuple[str, str]] = set()

    # ---- what lmms-eval reads ----------------------------------------------------------------------
    @property
    def device(self) -> str:
        return str(self.cfg.model.device)

    @property
    def batch_size(self) -> int:
        return 1

    # ---- requests ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, cut at the first of the task's ``until`` strings."""
        out = []
        with self._guard():
            for req in self._progress(requests):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                video = self._video(doc_to_visual(doc), task, doc_id)
                text, _ = self._answer(task, doc_id, video, context, gen_kwargs, "generate_until")
                out.append(text)
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Round 0 answers the request's context; then the task's ``doc_to_text`` (called with the answers so
        far, the round index and its own state) gives each next round's visuals and context, or says it is
        done. A round without visuals keeps the last video. Each request's result is its rounds' answers."""
        out = []
        with self._guard():
            for req in self._progress(requests):
                context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                visuals, answers, state = doc_to_visual(doc), [], None
                for round_idx in range(MAX_ROUNDS + 1):
                    if round_idx > 0:
                        next_visuals, context, done, previous, state = doc_to_text(
                            doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=state)
                        answers = list(previous)
                        if done:
                            break
                        visuals = visuals if _empty(next_visuals) else next_visuals
                    if round_idx == MAX_ROUNDS:
                        raise InputError(f"task {task!r} doc {doc_id}: doc_to_text did not end the rounds after "
                                         f"{MAX_ROUNDS} rounds")
                    video = self._video(visuals, task, doc_id)
                    text, record = self._answer(task, doc_id, video, context, gen_kwargs, "generate_until_multi_round")
                    record["round"] = round_idx
                    answers.append(text)
                out.append(answers)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(log-probability, is greedy) of each continuation as the assistant's answer, as the ``text`` of a
        ``GenerationResult``: lmms-eval 0.7.3's evaluator turns a bare tuple into its ``str()``
        (``unwrap_generation_output``), which breaks ``multiple_choice`` scoring, and passes ``text`` through.
        The options of one question share one pass (a one-token answer each): its efficiency is the sample's."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            if len(req.args) < 6:
                raise InputError(f"task {req.task_name!r}: a log-likelihood request without a video (such as "
                                 "acc_mutual_info's unconditional one); tokcomp scores text about a video only")
            context, _, _, doc_id, task, split = req.args[:6]
            groups.setdefault((task, split, doc_id, context), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        with self._guard():
            for (task, split, doc_id, context), indices in self._progress(list(groups.items())):
                doc = self.task_dict[task][split][doc_id]
                continuations = [self._continuation(requests[i].args[1], doc, task, doc_id) for i in indices]
                video = self._video(requests[indices[0]].args[2](doc), task, doc_id)
                for i, scored in zip(indices, self._score(task, doc_id, video, context, continuations), strict=True):
                    results[i] = GenerationResult(text=scored)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    # ---- one sample ----------------------------------------------------------------------------------
    def _video(self, visuals: Any, task: str, doc_id: Any) -> Any:
        """A task's visuals as one preprocessed video: a video file, or frames (PIL images or a (T, H, W, 3)
        array, e.g. MVBench's frame folders), sampled uniformly to ``input.frames`` when there are more."""
        import numpy as np
        import torch

        where = f"task {task!r} doc {doc_id}"
        if _empty(visuals):
            raise InputError(f"{where} has no video; tokcomp answers questions about a video (text-only "
                             "requests are not supported)")
        if isinstance(visuals, np.ndarray | torch.Tensor) and visuals.ndim == 4:
            frames = torch.as_tensor(np.asarray(visuals))
        else:
            items = list(visuals) if isinstance(visuals, list | tuple) else [visuals]
            if all(isinstance(v, str | os.PathLike) for v in items):
                if len(items) > 1:
                    raise InputError(f"{where} gives {len(items)} videos; tokcomp answers about one video per "
                                     "question")
                try:
                    return self.answerer.read(items[0])
                except InputError as exc:
                    raise InputError(f"{where}: {exc}") from exc
            frames = self._frames(items, where)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"{where}: frames of shape {tuple(frames.shape)}; expected (T, H, W, 3)")
        if frames.dtype != torch.uint8:
            frames = frames.clamp(0, 255).to(torch.uint8)
        count = frames.shape[0]
        if count > self.cfg.input.frames:
            from tokcomp.video import uniform_frame_indices

            frames = frames[uniform_frame_indices(count, self.cfg.input.frames)]
        elif count < self.cfg.input.frames:
            self._warn_once(task, "few-frames", f"task {task!r} gives {count} frame(s) (fewer than input.frames="
                            f"{self.cfg.input.frames}): answered as a video of those frames")
        return self.answerer.video(frames)

    def _frames(self, items: list[Any], where: str) -> Any:
        import numpy as np
        import torch
        from PIL import Image

        if not all(isinstance(v, Image.Image) for v in items):
            kinds = sorted({type(v).__name__ for v in items})
            raise InputError(f"{where}: visual input of type {', '.join(kinds)} is not supported; tokcomp takes a "
                             "video file path, frames as PIL images or a (T, H, W, 3) array")
        sizes = {im.size for im in items}
        if len(sizes) > 1:
            raise InputError(f"{where}: {len(items)} images of {len(sizes)} different sizes cannot be one video's "
                             "frames")
        return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in items]))

    def _max_new_tokens(self, gen_kwargs: dict[str, Any], task: str) -> int:
        sampling = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0 or \
            int(gen_kwargs.get("num_beams") or 1) > 1
        if sampling:
            self._warn_once(task, "greedy", f"task {task!r} asks for sampling or beam search; tokcomp decodes "
                            "greedily")
        value = gen_kwargs.get("max_new_tokens") or gen_kwargs.get("max_gen_toks")
        if value is not None:
            return _positive_int("max_new_tokens", value)
        return self.max_new_tokens or int(self.cfg.generation.max_new_tokens)

    def _warm_up(self, video: Any, context: str) -> None:
        """``timing.warmup`` untimed passes before the first timed one, so sample 1's TTFT is not a cold start."""
        if not self._warm:
            for _ in range(int(self.cfg.timing.warmup)):
                self.answerer.generate(self.configuration, video, context, max_new_tokens=1)
            self._warm = True

    def _answer(self, task: str, doc_id: Any, video: Any, context: str, gen_kwargs: dict[str, Any],
                request: str) -> tuple[str, dict[str, Any]]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new_tokens = self._max_new_tokens(gen_kwargs, task)
        self._warm_up(video, context)
        answer = self.answerer.generate(self.configuration, video, context, max_new_tokens=max_new_tokens,
                                        min_new_tokens=int(gen_kwargs.get("min_new_tokens") or 0), stop=until)
        text = answer.text  # cut before the first ``until`` string; decoding stopped there
        record = self._record(task, doc_id, request, video, answer, output=text)
        return text, record

    def _continuation(self, target: Any, doc: Any, task: str, doc_id: Any) -> str:
        value = target(doc) if callable(target) else target  # output_type loglikelihood passes doc_to_target
        if not isinstance(value, str):
            raise InputError(f"task {task!r} doc {doc_id}: continuation {value!r} is not text")
        return value

    def _score(self, task: str, doc_id: Any, video: Any, context: str,
               continuations: list[str]) -> list[tuple[float, bool]]:
        self._warm_up(video, context)
        answer = self.answerer.generate(self.configuration, video, context, max_new_tokens=1)
        logprobs = self.answerer.first_token_logprobs(answer, continuations)
        if logprobs is not None:
            tokenizer = self.answerer.build().tokenizer
            first = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in continuations]
            scored = [(lp, answer.new_ids[:1] == [tok]) for lp, tok in zip(logprobs, first, strict=True)]
        else:  # a continuation of several tokens: teacher-forced passes (their cost is not the sample's)
            scored = [(s.logprob, s.greedy) for s in self.answerer.score(self.configuration, video, context,
                                                                         continuations)]
        self._record(task, doc_id, "loglikelihood", video, answer, continuations=continuations,
                     logprobs=[lp for lp, _ in scored])
        return scored

    def _record(self, task: str, doc_id: Any, request: str, video: Any, answer: Any, **fields: Any) -> dict[str, Any]:
        record = {"task": task, "doc_id": doc_id, "request": request, "configuration": self.configuration,
                  "frames": video.frames, **fields, **answer.efficiency()}
        self.records.append(record)
        return record

    def _warn_once(self, task: str, kind: str, message: str) -> None:
        if (task, kind) not in self._warned:
            self._warned.add((task, kind))
            log.warning(message)

    def _progress(self, items: list[Any]) -> Iterator[Any]:
        from tqdm import tqdm

        return iter(tqdm(items, desc=f"tokcomp {self.configuration}", disable=self.rank != 0))

    # ---- reporting -----------------------------------------------------------------------------------
    def clean(self) -> None:
        """lmms-eval calls this once all requests are answered (before scoring): report the efficiency."""
        self.report()
        super().clean()

    def report(self, show: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
        """Per-task means of the efficiency of the samples answered since the last report: shown, kept in
        ``efficiency`` and, with ``track=true``, logged (metrics ``<task>.<key>``, artifact ``samples.jsonl``)."""
        from tokcomp.answering import mean_metrics
        from tokcomp.tables import render_table

        if not self.records:
            return self.efficiency
        tasks = list(dict.fromkeys(r["task"] for r in self.records))
        numeric = [{k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)
                    and k not in ("doc_id", "round")} for r in self.records]
        self.efficiency = {}
        for task in tasks:
            rows = [n for n, r in zip(numeric, self.records, strict=True) if r["task"] == task]
            self.efficiency[task] = {"samples": float(len(rows)), **mean_metrics(rows)}
        rows = [[task, f"{m['samples']:.0f}", *(_fmt(m.get(key)) for _, key in SUMMARY_KEYS)]
                for task, m in self.efficiency.items()]
        show(f"\ntokcomp efficiency, configuration {self.configuration!r} (per-sample means):\n"
             + render_table(["task", "samples", *(label for label, _ in SUMMARY_KEYS)], rows))
        if self.track and self.run_id:
            from tokcomp.runner import artifact_errors

            metrics = {f"{task}.{key}": value for task, means in self.efficiency.items() for key, value in means.items()}
            self._tracker.log_metrics(self.run_id, metrics)
            self._tracker.set_tags(self.run_id, {"lmms_eval.tasks": ",".join(tasks)})
            samples = "".join(json.dumps(r, default=str) + "\n" for r in self.records)
            errors = artifact_errors(self._tracker.log_text, self.run_id, samples, "samples.jsonl")
            if errors:
                self._tracker.fail(self.run_id, "; ".join(errors), "; ".join(errors))
            else:
                self._tracker.finish(self.run_id, "FINISHED")
            show(f"MLflow: run {self.run_id} at {self._tracker.uri} (per-sample records: samples.jsonl)")
        self.records = []
        self._finished_run, self.run_id = self.run_id, None
        return self.efficiency

    def log_results(self, results: dict[str, Any]) -> dict[str, float]:
        """Add ``simple_evaluate``'s scores (``<task>.<metric>``) and its results as ``lmms_eval_results.json``
        to the MLflow run of the last evaluation; returns the scores (also without tracking)."""
        scores = {f"{task}.{_metric_name(key)}": float(value)
                  for task, metrics in (results.get("results") or {}).items() for key, value in metrics.items()
                  if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}
        run_id = self._finished_run
        if self.track and run_id:
            self._tracker.log_metrics(run_id, scores)
            self._tracker.log_json(run_id, {k: results.get(k) for k in ("results", "n-samples", "config")},
                                   "lmms_eval_results.json")
        return scores

    # ---- MLflow --------------------------------------------------------------------------------------
    def _mlflow_experiment(self) -> str:
        return self.cfg.tracking.experiment or self.cfg.name

    def _start_run(self) -> None:
        if self.run_id is not None:
            return
        from omegaconf import OmegaConf

        from tokcomp.config import flatten
        from tokcomp.runner import configuration_config
        from tokcomp.tracking import Tracker, machine_tags, resolve_tracking_uri

        if self._tracker is None:
            self._tracker = Tracker(resolve_tracking_uri(self.cfg.tracking.uri), self._mlflow_experiment())
        adapter = self.answerer.build()
        strategies = self.answerer.strategies[self.configuration]
        tags = {**machine_tags(str(adapter.device)), "tokcomp.kind": "lmms-eval",
                "tokcomp.configuration": self.configuration, "tokcomp.experiment_file": str(self.experiment_file),
                "tokcomp.strategies": ",".join(s.name for s in strategies) or "none",
                "model.preset": self.cfg.model.preset, "model.dtype": self.cfg.model.dtype}
        self.run_id = self._tracker.start(f"lmms-eval {self.configuration}", tags)
        resolved = configuration_config(self.cfg, self.configuration)
        params = flatten({k: resolved[k] for k in ("model", "input", "generation", "timing")})
        params.update(flatten({"strategies": [s.describe() for s in strategies]}))
        params.update({"configuration": self.configuration, "seed": self.cfg.seed,
                       "lmms_eval.default_max_new_tokens": self.max_new_tokens or self.cfg.generation.max_new_tokens})
        self._tracker.log_params(self.run_id, params)
        self._tracker.log_text(self.run_id, OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Requests run inside an MLflow run (with ``track``); one that fails ends it FAILED with the error."""
        try:
            if self.track:
                self._start_run()
            yield
        except BaseException as exc:
            if self.track and self.run_id:
                message = str(exc) if isinstance(exc, TokcompError) else f"{type(exc).__name__}: {exc}"
                if isinstance(exc, Exception):
                    self._tracker.fail(self.run_id, message, traceback.format_exc())
                else:
                    self._tracker.abandon(self.run_id, "KILLED", message)
                self.run_id = None
            raise


def _empty(visuals: Any) -> bool:
    return visuals is None or (isinstance(visuals, list | tuple) and len(visuals) == 0)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
