"""Local video-QA data: every problem of a data file named by file, line and field; prompting and scoring."""

from __future__ import annotations

import json

import pytest
import torch

from tokcomp.errors import InputError
from tokcomp.evaldata import (
    EvalSample,
    is_correct,
    load_eval_data,
    mcq_prompt,
    normalise_answer,
    parse_option_letter,
)
from tokcomp.synth import write_dataset
from tokcomp.video import write_video

OPTIONS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaldata")
    write_video(folder / "clip.mp4", torch.zeros(4, 32, 32, 3, dtype=torch.uint8))
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return folder


def _row(**overrides):
    row = {"id": "s1", "video": "clip.mp4", "question": "What colour?", "options": list(OPTIONS), "answer": "blue"}
    row.update(overrides)
    return {k: v for k, v in row.items() if v is not ...}


def _write(folder, name, rows):
    path = folder / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_a_valid_file_loads_with_videos_relative_to_it_and_blank_lines_skipped(clip_dir):
    path = _write(clip_dir, "ok.jsonl", [_row(), "", _row(id="s2", options=..., answer="A cat."), _row(id="s3", answer="c")])
    samples = load_eval_data(path)
    assert [s.id for s in samples] == ["s1", "s2", "s3"] and [s.line for s in samples] == [1, 3, 4]
    assert samples[0].video == (clip_dir / "clip.mp4").resolve() and samples[0].answer_letter == "C"
    assert samples[1].options is None and samples[1].answer_letter is None
    assert samples[2].answer == "blue"  # an option letter stands for its option


@pytest.mark.parametrize(("rows", "named"), [
    (["{not json"], ":1: not valid JSON"),
    (["[1, 2]"], ":1: expected a JSON object, got list"),
    ([_row(question=...)], ":1: field 'question' is missing"),
    ([_row(), _row(id="s2", answer=...)], ":2: field 'answer' is missing"),
    ([_row(id="")], ":1: field 'id' must be a non-empty string"),
    ([_row(options=["only"])], ":1: field 'options' must be a list of 2 to 26"),
    ([_row(options=["a", "a"], answer="a")], ":1: field 'options' repeats an option"),
    ([_row(answer="purple")], ":1: field 'answer' 'purple' is not among its options"),
    ([_row(answer="E")], ":1: field 'answer' 'E' is not among its options"),
    ([_row(video="missing.mp4")], ":1: field 'video' 'missing.mp4'"),
    ([_row(video="broken.mp4")], ":1: field 'video' 'broken.mp4'"),
    ([_row(), _row()], ":2: field 'id' 's1' repeats line 1"),
    (["", "  "], "has no samples"),
])
def test_each_problem_is_named_by_file_line_and_field(clip_dir, rows, named):
    path = _write(clip_dir, "bad.jsonl", rows)
    with pytest.raises(InputError) as err:
        load_eval_data(path)
    assert named in str(err.value) and "bad.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_a_missing_or_binary_data_file_is_named(clip_dir):
    with pytest.raises(InputError, match="'nope.jsonl' does not exist"):
        load_eval_data("nope.jsonl")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        load_eval_data(_binary(clip_dir))


def _binary(folder):
    path = folder / "binary.jsonl"
    path.write_bytes(bytes(range(128, 256)))
    return path


def test_the_synthetic_set_loads_as_multiple_choice(tmp_path):
    path = write_dataset(tmp_path / "synth", n=5, seed=0)
    samples = load_eval_data(path)
    assert len(samples) == 5 and all(s.options and s.answer in s.options and s.type for s in samples)


def test_the_prompt_letters_the_options_and_asks_for_the_letter():
    prompt = mcq_prompt("What colour?", OPTIONS)
    assert prompt.splitlines()[:3] == ["What colour?", "A. red", "B. green"]
    assert prompt.endswith("Answer with the option's letter from the given choices directly.")


@pytest.mark.parametrize(("text", "letter"), [
    ("C", "C"), ("(C)", "C"), ("C.", "C"), ("C) blue", "C"), ("Answer: C", "C"), ("The answer is C.", "C"),
    ("blue", "C"), ("Blue.", "C"), ("I think it is the blue one", "C"), ("[B]", "B"),
    ("", None), ("purple", None), ("red or blue", None), ("E", None), ("none of them", None),
])
def test_the_option_letter_is_parsed_as_models_write_it(text, letter):
    assert parse_option_letter(text, OPTIONS) == letter


def test_free_form_answers_match_after_normalisation():
    assert normalise_answer("  The Red, Ball! ") == "red ball"
    free = EvalSample("f", video=None, question="q", answer="a red ball")
    assert is_correct(free, "Red ball.") and not is_correct(free, "a blue ball")
    mcq = EvalSample("m", video=None, question="q", answer="blue", options=OPTIONS)
    assert is_correct(mcq, "C") and is_correct(mcq, "blue") and not is_correct(mcq, "A")
