"""One experiment's model answering questions about any video, under any of its configurations.

``tokcomp eval`` and the lmms-eval plugin share this: the model is built once, each configuration's
strategies are checked against it once, and every question gets a fresh compression stack (a stack
holds per-run state and hooks, removed after the answer). An answer carries what a run records:
the generated text, the token ledger, the Figure-3 TTFT parts and both FLOPs protocols, so accuracy
and efficiency are measured on the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tokcomp.adapter import VideoInput
from tokcomp.errors import ConfigError
from tokcomp.pipeline import run as run_pipeline
from tokcomp.plugins import Plugins
from tokcomp.preflight import check_experiment
from tokcomp.runner import AdapterCache, build_strategies, check_strategies, flops_metrics
from tokcomp.stack import CompressionStack
from tokcomp.strategy import Strategy
from tokcomp.video import read_video, sampled_fps


@dataclass
class Answer:
    """One generation: its text, ids and what it cost."""

    text: str
    new_ids: list[int]
    ledger: Any  # tokcomp.ledger.TokenLedger
    timings_ms: dict[str, float]
    flops: dict[str, float]
    first_logits: torch.Tensor | None = None  # (vocab,) float32: the logits the first new token came from

    def efficiency(self) -> dict[str, float]:
        """Per-sample efficiency under the metric names of ``tokcomp run`` (so reports read both alike)."""
        ledger, t = self.ledger, self.timings_ms
        metrics = {"tokens.vision_in": ledger.vision_tokens_in,
                   "tokens.llm_visual": ledger.visual_tokens_after_pre_llm,
                   "tokens.text": ledger.text_tokens,
                   "tokens.llm_seq_first_layer": ledger.llm_layers[0] if ledger.llm_layers else 0,
                   "tokens.llm_seq_last_layer": ledger.llm_layers[-1] if ledger.llm_layers else 0,
                   "retained_ratio": ledger.retained_ratio,
                   "ttft.total_ms": t["ttft_ms"], "ttft.vision_ms": t["vision_ms"],
                   "ttft.token_processing_ms": t["token_processing_ms"], "ttft.prefill_ms": t["prefill_ms"],
                   "ttft.other_ms": t["other_ms"], "time.total_ms": t["total_ms"]}
        metrics.update(self.flops)
        return metrics


@dataclass
class Scored:
    """A continuation's log-probability given the prompt, and whether greedy decoding would produce it."""

    logprob: float
    greedy: bool
    tokens: int


class Answerer:
    """The experiment's model and its configurations' strategies, checked before any weights are built.

    ``configurations()`` lists them in the experiment's order (the baseline first when there is one).
    """

    def __init__(self, cfg: DictConfig, experiment_file: str | Path | None = None, adapters: AdapterCache | None = None,
                 trace: bool | None = None):
        self.cfg = cfg
        self.plugins = Plugins(list(cfg.plugins), trace=trace)
        self.preset = self.plugins.model(cfg.model.preset)
        self.strategies: dict[str, list[Strategy]] = build_strategies(self.plugins, cfg)
        self.trace = trace
        self.description = check_experiment(cfg, self.preset, experiment_file)
        if self.description is not None:  # the geometry of input.frames alone, before any weights
            geometry = self.description.video(cfg.input.frames, None, None)
            self._check_strategies(self.description.info.for_video(geometry.grid, geometry.llm_grid))
        self.adapters = adapters or AdapterCache()
        self.adapter: Any = None
        self._checked: set[tuple] = set()

    def configurations(self) -> list[str]:
        return list(self.strategies)

    def build(self, log: Callable[[str], None] = print) -> Any:
        """Build (or reuse) the model."""
        if self.adapter is None:
            self.adapter = self.adapters.get(self.preset, self.cfg.model, log)
        return self.adapter

    def _check_strategies(self, info: Any, only: str | None = None) -> None:
        check_strategies(self.strategies, info, only)

    def _strategies(self, configuration: str) -> list[Strategy]:
        if configuration not in self.strategies:
            raise ConfigError(f"unknown configuration {configuration!r}; the experiment has: "
                              f"{', '.join(self.strategies)}")
        return self.strategies[configuration]

    # ---- inputs --------------------------------------------------------------------------------
    def read(self, path: str | Path, frames: int | None = None) -> VideoInput:
        """``frames`` (default ``input.frames``) frames sampled uniformly from a video file, preprocessed."""
        count = frames or self.cfg.input.frames
        return self.video(read_video(path, count), sampled_fps(path, count))

    def video(self, frames: torch.Tensor, fps: float | None = None) -> VideoInput:
        """uint8 (T, H, W, 3) frames, preprocessed for the model."""
        return self.build().preprocess(frames, fps=fps)

    def _stack(self, configuration: str, video: VideoInput) -> CompressionStack:
        strategies = self._strategies(configuration)
        info = self.adapter.info.for_video(video.grid, video.llm_grid)
        key = (configuration, video.grid, video.llm_grid, video.rows)
        if key not in self._checked:  # a video of another geometry (Qwen: another aspect ratio)
            self._check_strategies(info, only=configuration)
            self._checked.add(key)
        return CompressionStack(strategies, info, trace=self.trace)

    # ---- answers -------------------------------------------------------------------------------
    def generate(self, configuration: str, video: VideoInput, prompt: str, max_new_tokens: int | None = None,
                 min_new_tokens: int = 0, stop: tuple[str, ...] | list[str] = ()) -> Answer:
        """Greedy answer to ``prompt`` about ``video`` under ``configuration``, with its cost; decoding ends
        at the first of the ``stop`` strings, which the text is cut before."""
        adapter = self.build()
        stack = self._stack(configuration, video)
        try:
            out = run_pipeline(adapter, video, prompt, stack, seed=self.cfg.seed, min_new_tokens=min_new_tokens,
                               max_new_tokens=max_new_tokens or self.cfg.generation.max_new_tokens,
                               stop=tuple(s for s in stop if s))
        finally:
            stack.close()
        text = out.text
        cuts = [text.index(s) for s in stop if s and s in text]
        if cuts:
            text = text[: min(cuts)]
        return Answer(text, out.new_ids, out.ledger, out.timings_ms, flops_metrics(out.ledger, adapter.dims),
                      out.prefill_logits)

    def first_token_logprobs(self, answer: Answer, continuations: list[str]) -> list[float] | None:
        """Log-probabilities of one-token continuations (option letters) as the answer's first token, from
        the pass that produced ``answer``; None when one of them is not a single token (then use ``score``)."""
        encoded = [self.build().tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
        if answer.first_logits is None or any(len(ids) != 1 for ids in encoded):
            return None
        logprobs = torch.log_softmax(answer.first_logits.float(), -1)
        return [float(logprobs[ids[0]]) for ids in encoded]

    def score(self, configuration: str, video: VideoInput, prompt: str, continuations: list[str]) -> list[Scored]:
        """Log-probability of each continuation after the prompt (the assistant's turn), teacher-forced
        through the compressed model; continuations of one token share one prefill."""
        adapter = self.build()
        encoded = [adapter.tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
        for text, ids in zip(continuations, encoded, strict=True):
            if not ids:
                raise ConfigError(f"continuation {text!r} has no tokens to score")
        if all(len(ids) == 1 for ids in encoded):
            _, logprobs, argmax = self._forced(configuration, video, prompt, encoded[0])
            first = logprobs[0]
            return [Scored(float(first[ids[0]]), int(argmax[0]) == ids[0], 1) for ids in encoded]
        results = []
        for ids in encoded:
            chosen, _, _ = self._forced(configuration, video, prompt, ids)
            results.append(Scored(float(sum(chosen)), chosen.greedy, len(ids)))
        return results

    def _forced(self, configuration: str, video: VideoInput, prompt: str, ids: list[int]):
        """(chosen log-probs with ``.greedy``, the first step's full log-probs, the arg-max per step)."""
        adapter = self.build()
        stack = self._stack(configuration, video)
        try:
            out = run_pipeline(adapter, video, prompt, stack, seed=self.cfg.seed, max_new_tokens=len(ids),
                               forced_ids=ids, logprobs=True)
        finally:
            stack.close()
        chosen = _Chosen(float(step[i]) for step, i in zip(out.forced_logprobs, ids, strict=True))
        chosen.greedy = all(int(a) == i for a, i in zip(out.new_ids, ids, strict=True))
        return chosen, out.forced_logprobs, out.new_ids


class _Chosen(list):
    greedy: bool = False


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key means over samples (keys missing from a sample are averaged over the samples that have them)."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sums.items()}
