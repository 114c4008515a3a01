"""Local video-QA data for accuracy runs: reading and checking a JSONL file, prompting and scoring.

The file is checked whole before any model is built, so a typo on line 900 does not cost 899 samples
of compute: every problem is an error that names the file, the line and the field. Scoring follows
what lmms-eval's multiple-choice tasks do (the option letter parsed from the generated text) and a
normalised exact match for free-form answers.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from tokcomp.errors import InputError

LETTERS = string.ascii_uppercase
REQUIRED = ("id", "video", "question", "answer")
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class EvalSample:
    """One question about one video; ``answer`` is an option's text for multiple choice."""

    id: str
    video: Path
    question: str
    answer: str
    options: tuple[str, ...] | None = None
    type: str | None = None
    line: int = 0

    @property
    def answer_letter(self) -> str | None:
        return None if self.options is None else LETTERS[self.options.index(self.answer)]


def _field_error(path: Path, line: int, field: str, problem: str) -> InputError:
    return InputError(f"{path}:{line}: field {field!r} {problem}")


def _parse_line(path: Path, number: int, text: str, check_video) -> EvalSample:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(row, dict):
        raise InputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    for name in REQUIRED:
        if name not in row:
            raise _field_error(path, number, name, "is missing")
    for name in ("id", "video", "question"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise _field_error(path, number, name, f"must be a non-empty string, got {row[name]!r}")
    options = row.get("options")
    if options is not None:
        if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
                or not all(isinstance(o, str) and o.strip() for o in options)):
            raise _field_error(path, number, "options", f"must be a list of 2 to 26 non-empty strings, got {options!r}")
        if len(set(options)) != len(options):
            raise _field_error(path, number, "options", f"repeats an option: {options!r}")
        options = tuple(options)
    answer = row["answer"]
    if not isinstance(answer, str) or not answer.strip():
        raise _field_error(path, number, "answer", f"must be a non-empty string, got {answer!r}")
    if options is not None and answer not in options:
        letter = answer.strip().upper()
        if len(letter) == 1 and letter in LETTERS[: len(options)]:
            answer = options[LETTERS.index(letter)]  # an option letter stands for its option
        else:
            raise _field_error(path, number, "answer", f"{answer!r} is not among its options {list(options)}")
    video = (path.parent / row["video"]).resolve()
    try:
        check_video(video)
    except InputError as exc:
        raise _field_error(path, number, "video", f"{row['video']!r}: {exc}") from exc
    kind = row.get("type")
    return EvalSample(row["id"], video, row["question"], answer, options, None if kind is None else str(kind), number)


def load_eval_data(path: str | Path, check_videos: bool = True) -> list[EvalSample]:
    """Every sample of a JSONL file (blank lines skipped), or an InputError naming file, line and field.
    With ``check_videos`` each video is opened (not decoded) so a missing or unreadable one is found now."""
    from tokcomp.video import video_size

    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"data file {str(path)!r} is not UTF-8 text (JSONL expected)") from exc
    check = video_size if check_videos else (lambda _: None)
    samples: list[EvalSample] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        sample = _parse_line(path, number, text, check)
        if sample.id in seen:
            raise _field_error(path, number, "id", f"{sample.id!r} repeats line {seen[sample.id]}")
        seen[sample.id] = number
        samples.append(sample)
    if not samples:
        raise InputError(f"data file {str(path)!r} has no samples")
    return samples


def mcq_prompt(question: str, options: tuple[str, ...] | list[str]) -> str:
    """The question, its lettered options and the usual instruction to answer with the letter."""
    listed = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return f"{question}\n{listed}\n{MCQ_INSTRUCTION}"


def parse_option_letter(text: str, options: tuple[str, ...] | list[str]) -> str | None:
    """The option letter a generated answer gives, or None when it names none (or several).

    Accepts what models write: "B", "(B)", "B.", "B) blue", "Answer: B", "The answer is B", the
    option's text alone ("blue"), or a sentence naming exactly one option's text. In that order: an
    exact option text, a leading letter, the one stand-alone capital letter, the one option named.
    """
    valid = LETTERS[: len(options)]
    cleaned = text.strip()
    if not cleaned:
        return None
    exact = [LETTERS[i] for i, option in enumerate(options) if normalise_answer(option) == normalise_answer(cleaned)]
    if len(exact) == 1:
        return exact[0]
    cleaned = re.sub(r"^(the\s+)?(correct\s+)?(answer|option)\s*(is|:)?\s*", "", cleaned, flags=re.IGNORECASE)
    first = re.match(r"^[(\[]?([A-Z])[)\].:]?(\s|$)", cleaned)
    if first and first.group(1) in valid:
        return first.group(1)
    standalone = set(re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", cleaned)) & set(valid)
    if len(standalone) == 1:
        return standalone.pop()
    named = [LETTERS[i] for i, option in enumerate(options) if normalise_answer(option) and
             re.search(rf"(?<!\w){re.escape(normalise_answer(option))}(?!\w)", normalise_answer(cleaned))]
    return named[0] if len(named) == 1 else None


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: free-form exact match compares these."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def is_correct(sample: EvalSample, generated: str) -> bool:
    """Multiple choice: the parsed letter is the answer's; free form: normalised exact match."""
    if sample.options is not None:
        return parse_option_letter(generated, sample.options) == sample.answer_letter
    return normalise_answer(generated) == normalise_answer(sample.answer)
