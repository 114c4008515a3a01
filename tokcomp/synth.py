"""A synthetic video-QA set with known answers, for questions that token compression can break.

Each question type stresses a different thing a compressor may throw away:

- ``scenes``: how many scenes (hard cuts) the clip has: removing or merging frames across a cut hides it.
- ``colour``: the colour of the one object that moves (others are still): needs two frames compared.
- ``direction``: which way the object moves: needs the order of frames.
- ``order``: which of two objects appears first: needs the order of frames.
- ``corner``: the colour of a small square in the top-left corner: fine spatial detail that blind
  pooling averages away.

Colours come from a fixed palette of four, far apart, on a desaturated background so no background
blob can be mistaken for an object. Answers are balanced exactly per type (each of the four options
is the answer equally often, up to ``n`` mod 4) and the option order is fixed, so a model that always
answers "A" scores 25%. Everything follows from ``seed``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokcomp.errors import ConfigError

PALETTE = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40)}
COLOURS = list(PALETTE)
DIRECTIONS = ["left", "right", "up", "down"]
SCENE_COUNTS = ["1", "2", "3", "4"]
QUESTION_TYPES = ("scenes", "colour", "direction", "order", "corner")
QUESTIONS = {
    "scenes": "How many different scenes does the video show?",
    "colour": "What colour is the object that moves?",
    "direction": "In which direction does the moving object move?",
    "order": "Which colour of object appears first in the video?",
    "corner": "What colour is the small square in the top-left corner?",
}
OPTIONS = {"scenes": SCENE_COUNTS, "colour": COLOURS, "direction": DIRECTIONS, "order": COLOURS,
           "corner": COLOURS}


@dataclass
class SynthSample:
    """One clip (uint8 (T, H, W, 3)) and its question."""

    id: str
    kind: str
    question: str
    options: list[str]
    answer: str
    frames: torch.Tensor
    facts: dict = field(default_factory=dict)  # what the clip was built from (cut frames, positions), for checks


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth, desaturated background whose overall tone differs from scene to scene."""
    coarse = rng.uniform(0, 1, size=(3, max(2, height // 28), max(2, width // 28))).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=(height, width), mode="bicubic",
                                        align_corners=False)[0].permute(1, 2, 0).numpy()
    tone = rng.uniform(60, 180)
    grey = x.mean(axis=2, keepdims=True)
    return np.clip(tone + 40 * (grey - 0.5) + 12 * (x - grey), 0, 255)


def _disc(frame: np.ndarray, cy: float, cx: float, radius: float, colour: tuple[int, int, int]) -> None:
    """Paint the pixels within ``radius`` of (cy, cx); only its bounding box is looked at."""
    y0, x0 = max(0, int(np.floor(cy - radius))), max(0, int(np.floor(cx - radius)))
    y1, x1 = min(frame.shape[0], int(np.ceil(cy + radius)) + 1), min(frame.shape[1], int(np.ceil(cx + radius)) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    frame[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = colour


def _square(frame: np.ndarray, y: int, x: int, side: int, colour: tuple[int, int, int]) -> None:
    frame[y : y + side, x : x + side] = colour


def _spots(rng: np.random.Generator, count: int, size: int, radius: float, keep_out: float) -> list[np.ndarray]:
    """Object centres at least ``keep_out`` apart and away from the top-left corner square."""
    spots: list[np.ndarray] = []
    while len(spots) < count:
        p = rng.uniform(radius + 2, size - radius - 2, size=2)
        if p.max() < size * 0.3:
            continue
        if all(np.linalg.norm(p - q) >= keep_out for q in spots):
            spots.append(p)
    return spots


def _clip(kind: str, answer: int, rng: np.random.Generator, frames: int, size: int) -> tuple[np.ndarray, dict]:
    video = np.empty((frames, size, size, 3), dtype=np.float32)
    radius = size * 0.09
    if kind == "scenes":
        scenes = answer + 1
        cuts = np.linspace(0, frames, scenes + 1).round().astype(int)
        for s in range(scenes):
            background = _background(rng, size, size)
            objects = [(p, COLOURS[int(rng.integers(4))]) for p in _spots(rng, 2, size, radius, 3 * radius)]
            for t in range(cuts[s], cuts[s + 1]):
                video[t] = background
                for (cy, cx), colour in objects:
                    _disc(video[t], cy, cx, radius, PALETTE[colour])
        return video, {"cuts": cuts[:-1].tolist()}
    background = _background(rng, size, size)
    if kind == "corner":
        others = [c for c in COLOURS if c != COLOURS[answer]]
        objects = list(zip(_spots(rng, 2, size, 1.5 * radius, 4 * radius), rng.permutation(others)[:2], strict=True))
        side = max(3, size // 14)
        for t in range(frames):
            video[t] = background
            for (cy, cx), colour in objects:
                _disc(video[t], cy, cx, 1.5 * radius, PALETTE[str(colour)])
            _square(video[t], 2, 2, side, PALETTE[COLOURS[answer]])
        return video, {"side": side}
    if kind == "order":
        first, second = COLOURS[answer], COLOURS[int(rng.choice([c for c in range(4) if c != answer]))]
        (p1, p2), appear = _spots(rng, 2, size, radius, 3 * radius), (frames // 5, frames // 2 + frames // 8)
        for t in range(frames):
            video[t] = background
            if t >= appear[0]:
                _disc(video[t], *p1, radius, PALETTE[first])
            if t >= appear[1]:
                _disc(video[t], *p2, radius, PALETTE[second])
        return video, {"appear": {first: appear[0], second: appear[1]}}
    # colour / direction: one object crosses about half the frame; in ``colour`` two others stand still
    moving = COLOURS[answer] if kind == "colour" else COLOURS[int(rng.integers(4))]
    direction = DIRECTIONS[answer] if kind == "direction" else DIRECTIONS[int(rng.integers(4))]
    step = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[direction]
    travel = size * 0.5
    start = np.array([size / 2, size / 2]) - np.array(step) * travel / 2 + rng.uniform(-size / 10, size / 10, 2)
    still = []
    if kind == "colour":
        others = [c for c in COLOURS if c != moving]
        path = [start + np.array(step) * travel * f for f in np.linspace(0, 1, 9)]
        spots = []
        while len(spots) < 2:  # still objects off the moving one's path
            p = rng.uniform(radius + 2, size - radius - 2, size=2)
            if all(np.linalg.norm(p - q) >= 2.5 * radius for q in path + spots):
                spots.append(p)
        still = list(zip(spots, rng.permutation(others)[:2], strict=True))
    for t in range(frames):
        video[t] = background
        for (cy, cx), colour in still:
            _disc(video[t], cy, cx, radius, PALETTE[str(colour)])
        cy, cx = start + np.array(step) * travel * t / max(1, frames - 1)
        _disc(video[t], cy, cx, radius, PALETTE[moving])
    return video, {"moving": moving, "direction": direction, "start": start.tolist()}


def generate_samples(n: int, seed: int = 0, frames: int = 16, size: int = 112,
                     kinds: tuple[str, ...] = QUESTION_TYPES) -> list[SynthSample]:
    """``n`` samples, question types in turn, answers balanced per type, all from ``seed``."""
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if frames < 8:
        raise ConfigError(f"--frames must be at least 8 (four scenes need two frames each), got {frames}")
    if size < 56 or size % 2:
        raise ConfigError(f"--size must be even and at least 56 pixels, got {size}")
    unknown = [k for k in kinds if k not in QUESTION_TYPES]
    if unknown:
        raise ConfigError(f"unknown question type {unknown[0]!r}; known: {', '.join(QUESTION_TYPES)}")
    rng = np.random.default_rng(seed)
    # per type, the answers of its samples: each option in turn, in a seeded order
    counts = {k: len(range(i, n, len(kinds))) for i, k in enumerate(kinds)}
    answers = {k: list(rng.permutation(np.resize(np.arange(4), counts[k]))) for k in kinds}
    samples = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        answer = int(answers[kind].pop())
        clip_rng = np.random.default_rng([seed, i])
        video, facts = _clip(kind, answer, clip_rng, frames, size)
        video += clip_rng.normal(0, 2.0, size=video.shape)
        pixels = torch.from_numpy(np.clip(video, 0, 255).astype(np.uint8))
        samples.append(SynthSample(f"{kind}-{i:05d}", kind, QUESTIONS[kind], list(OPTIONS[kind]),
                                   OPTIONS[kind][answer], pixels, facts))
    return samples


def write_dataset(out: str | Path, n: int, seed: int = 0, frames: int = 16, size: int = 112,
                  fps: int = 8) -> Path:
    """Write ``n`` samples to ``out``: ``videos/<id>.mp4`` and ``data.jsonl`` (one JSON object per line:
    id, video (relative to the file), question, options, answer, type). The JSONL is written last and
    atomically, so an interrupted run leaves no data file that points at missing videos."""
    from tokcomp.video import write_video

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    samples = generate_samples(n, seed, frames, size)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        relative = f"videos/{s.id}.mp4"
        write_video(out / relative, s.frames, fps=fps)
        lines.append(json.dumps({"id": s.id, "video": relative, "question": s.question, "options": s.options,
                                 "answer": s.answer, "type": s.kind}))
    path = out / "data.jsonl"
    partial = path.with_suffix(".jsonl.partial")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, path)
    return path
