"""The synthetic video-QA set: balanced, reproducible, and every answer readable from the pixels."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from tokcomp.cli import main
from tokcomp.synth import DIRECTIONS, PALETTE, QUESTION_TYPES, generate_samples, write_dataset
from tokcomp.video import read_video


def _mask(frame: np.ndarray, colour: str, tolerance: float = 40.0) -> np.ndarray:
    return np.abs(frame.astype(np.float32) - np.array(PALETTE[colour])).max(axis=-1) < tolerance


def _centroid(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return None if ys.size < 10 else np.array([ys.mean(), xs.mean()])


def read_answer(kind: str, frames: np.ndarray) -> str:
    """What a careful observer reads off the frames, without the generator's facts."""
    if kind == "scenes":
        diffs = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
        return str(int((diffs > 8).sum()) + 1)
    if kind == "corner":
        corner = frames[0, 3:6, 3:6].reshape(-1, 3).astype(np.float32).mean(axis=0)
        return min(PALETTE, key=lambda c: np.abs(corner - np.array(PALETTE[c])).sum())
    if kind == "order":
        first = {c: next((t for t, f in enumerate(frames) if _mask(f, c).sum() > 30), len(frames)) for c in PALETTE}
        return min(first, key=first.get)
    moves = {}
    for colour in PALETTE:
        a, b = _centroid(_mask(frames[0], colour)), _centroid(_mask(frames[-1], colour))
        if a is not None and b is not None:
            moves[colour] = b - a
    colour = max(moves, key=lambda c: np.abs(moves[c]).max())
    if kind == "colour":
        return colour
    dy, dx = moves[colour]
    return ("up", "down")[int(dy > 0)] if abs(dy) > abs(dx) else ("left", "right")[int(dx > 0)]


def test_every_question_types_answers_are_balanced_over_its_options():
    samples = generate_samples(40, seed=3)
    for kind in QUESTION_TYPES:
        answers = Counter(s.answer for s in samples if s.kind == kind)
        assert sorted(answers.values()) == [2, 2, 2, 2], (kind, answers)
        assert set(answers) == set(next(s.options for s in samples if s.kind == kind))


def test_the_same_seed_gives_the_same_set_and_another_seed_another():
    a, b, c = generate_samples(5, seed=7), generate_samples(5, seed=7), generate_samples(5, seed=8)
    assert all(torch.equal(x.frames, y.frames) and x.answer == y.answer for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x.frames, z.frames) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("seed", [0, 1])
def test_every_answer_can_be_read_off_the_frames(seed):
    for sample in generate_samples(20, seed=seed):
        assert read_answer(sample.kind, sample.frames.numpy()) == sample.answer, (sample.id, sample.facts)


def test_only_the_moving_object_moves_and_it_crosses_several_patches():
    sample = next(s for s in generate_samples(10, seed=2) if s.kind == "colour")
    frames = sample.frames.numpy()
    for colour in PALETTE:
        a, b = _centroid(_mask(frames[0], colour)), _centroid(_mask(frames[-1], colour))
        if a is None:
            continue
        shift = np.abs(b - a).max()
        assert shift > 40 if colour == sample.answer else shift < 1.5, (colour, shift)


def test_the_written_set_decodes_to_the_same_answers(tmp_path):
    path = write_dataset(tmp_path / "synth", n=5, seed=4, frames=16, size=112)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in rows] == list(QUESTION_TYPES)
    assert not list(tmp_path.glob("synth/*.partial"))
    for row in rows:
        assert row["answer"] in row["options"] and set(row) == {"id", "video", "question", "options", "answer", "type"}
        frames = read_video(path.parent / row["video"], 16).numpy()  # through H.264 and 4:2:0 chroma
        assert read_answer(row["type"], frames) == row["answer"], row["id"]


def test_data_synth_command_reports_what_it_wrote(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "6", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote 6 samples" in out and "scenes 2" in out and (tmp_path / "d" / "data.jsonl").is_file()


def test_directions_are_the_four_options_of_the_direction_question():
    sample = next(s for s in generate_samples(3, seed=0) if s.kind == "direction")
    assert sample.options == DIRECTIONS
