"""Multiple choice: each example's question, its options as texts and the gold option's index.

The LLM-Adapters commonsense files carry their options inside the instruction, one layout per
answer type (``core.benchmarks``):

- boolean (BoolQ): ``Please answer the following question with true or false, question: <q>\\n\\n
  Answer format: true/false``; the options are the labels ``true`` and ``false``;
- solution (PIQA): ``... <q>\\n\\nSolution1: <a>\\n\\nSolution2: <b>\\n\\nAnswer format: solution1/solution2``;
- answer (SIQA, ARC-e/c, OBQA): ``... <q>\\n\\nAnswer1: <a> Answer2: <b> ...\\n\\nAnswer format: answer1/...``;
- ending (HellaSwag): ``... <label>: <context>\\n\\nEnding1: <a> Ending2: <b> ...\\n\\nAnswer format: ...``;
- option (WinoGrande): ``... <sentence>\\n\\nOption1: <a> Option2: <b> Answer format: option1/option2``;
- letter (AQuA): ``<q> Answer Choices: (A) <a> (B) <b> ... (E) <e>``.

The question is the instruction before the first option (its lead sentence, e.g. "Please choose the
correct answer to the question:", stays: it tells the model what kind of continuation is asked for);
an option runs to the next option's marker or the ``Answer format`` line. Where the ``Answer format``
line lists the labels, the options found must be exactly those. User files with a ``choices``
column (``core.benchmarks``) give the options directly.

Public API: ``MultipleChoice``, ``has_choices``, ``parse_choices``, ``example_choices``,
``benchmark_choices``, ``choices_column``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .benchmarks import Benchmark, BenchmarkError

MAX_CHOICES = 5  # the "answer" rule of generation knows answer1..answer5
# The word before each option's number, per answer type.
_MARKER_WORDS = {"solution": "Solution", "answer": "Answer", "ending": "Ending", "option": "Option"}
_FORMAT = re.compile(r"\s*Answer format:\s*([\w/ ]+?)\s*\.?\s*$")
_LETTERS = "ABCDE"
_LETTER_LEAD = re.compile(r"\s*Answer Choices:\s*$")


@dataclass(frozen=True)
class MultipleChoice:
    """One question: the text to condition on, its options' texts, their labels and the gold index."""

    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]  # the benchmark's name for each option: answer1, true, A...
    gold: int


def has_choices(answer_type: str) -> bool:
    """Whether a benchmark of ``answer_type`` has options to score (every type but ``number``)."""
    return answer_type != "number"


def _fail(where: str, message: str) -> BenchmarkError:
    return BenchmarkError(f"{where}: {message}")


def _numbered(word: str, body: str, where: str) -> tuple[str, list[str]]:
    """The text before ``<word>1:`` and each ``<word>k:`` option's text, k = 1, 2, ... in order."""
    spans: list[tuple[int, int]] = []
    k = 1
    while True:
        found = re.compile(rf"(?<![A-Za-z]){word}{k}:").search(body, spans[-1][1] if spans else 0)
        if found is None:
            break
        spans.append(found.span())
        k += 1
    if len(spans) < 2:
        raise _fail(where, f"cannot find the options in the instruction: expected '{word}1: ...' and "
                           f"'{word}2: ...' (found {len(spans)})")
    ends = [s for s, _ in spans[1:]] + [len(body)]
    return body[:spans[0][0]].strip(), [body[e:end].strip() for (_, e), end in zip(spans, ends)]


def _lettered(body: str, where: str) -> tuple[str, list[str]]:
    """AQuA: ``<q> Answer Choices: (A) <a> (B) <b> ...``."""
    spans: list[tuple[int, int]] = []
    for letter in _LETTERS:
        found = re.compile(rf"\({letter}\)").search(body, spans[-1][1] if spans else 0)
        if found is None:
            break
        spans.append(found.span())
    if len(spans) < 2:
        raise _fail(where, f"cannot find the options in the instruction: expected '(A) ...' and '(B) ...' "
                           f"(found {len(spans)})")
    ends = [s for s, _ in spans[1:]] + [len(body)]
    question = _LETTER_LEAD.sub("", body[:spans[0][0]]).strip()
    return question, [body[e:end].strip() for (_, e), end in zip(spans, ends)]


def parse_choices(answer_type: str, instruction: str, answer: Any, where: str) -> MultipleChoice:
    """The question, options and gold index of an LLM-Adapters instruction of ``answer_type``.

    ``where`` names the file and row for errors (``BenchmarkError``): options that cannot be found,
    an empty option, a count that disagrees with the ``Answer format`` line, a gold answer that is not
    one of the options.
    """
    if not has_choices(answer_type):
        raise _fail(where, "a numeric answer has no options")
    text = str(instruction)
    fmt = _FORMAT.search(text)
    body = text[:fmt.start()] if fmt else text
    gold_text = str(answer).strip()
    if answer_type == "boolean":
        question, choices, labels = body.strip(), ["true", "false"], ["true", "false"]
        gold_text = gold_text.lower()
    elif answer_type == "letter":
        question, choices = _lettered(body, where)
        labels = list(_LETTERS[:len(choices)])
        letter = re.search(r"[A-E]", gold_text)
        gold_text = letter.group(0) if letter else gold_text
    else:
        word = _MARKER_WORDS[answer_type]
        question, choices = _numbered(word, body, where)
        labels = [f"{word.lower()}{k}" for k in range(1, len(choices) + 1)]
    if fmt is not None and answer_type != "letter":
        listed = [s.strip() for s in fmt.group(1).split("/") if s.strip()]
        if [s.lower() for s in listed] != labels:
            raise _fail(where, f"the instruction has {len(choices)} options ({'/'.join(labels)}) but its answer "
                               f"format lists {'/'.join(listed)}")
    if not question:
        raise _fail(where, "the instruction has no question before its options")
    empty = [labels[i] for i, c in enumerate(choices) if not c]
    if empty:
        raise _fail(where, f"option {empty[0]} is empty")
    if gold_text not in labels:
        raise _fail(where, f"the gold answer {gold_text!r} is not one of the options ({', '.join(labels)})")
    return MultipleChoice(question, tuple(choices), tuple(labels), labels.index(gold_text))


def example_choices(answer_type: str, example: dict[str, Any], where: str) -> MultipleChoice:
    """An example's options: its ``choices`` (a user file's column) or those in its instruction."""
    if example.get("choices") is not None:
        choices = tuple(example["choices"])
        labels = tuple(f"answer{k}" for k in range(1, len(choices) + 1))
        return MultipleChoice(example["question"], choices, labels, labels.index(example["answer"]))
    return parse_choices(answer_type, example["instruction"], example["answer"], where)


def benchmark_choices(benchmark: Benchmark, indices: list[int] | None = None) -> list[MultipleChoice]:
    """The options of ``benchmark``'s examples ``indices`` (all by default).

    ``BenchmarkError`` naming the benchmark when its answers are numbers, and the file and row when a
    row's options cannot be read.
    """
    if not has_choices(benchmark.answer_type):
        raise BenchmarkError(
            f"benchmark {benchmark.name!r} has no choices (its answers are numbers): the loglikelihood protocol "
            "scores multiple-choice benchmarks only; use protocol 'generate' for it")
    source = benchmark.source or benchmark.name
    chosen = range(len(benchmark.examples)) if indices is None else indices
    return [example_choices(benchmark.answer_type, benchmark.examples[i], f"{source}: row {i + 1}") for i in chosen]


def choices_column(value: Any, answer: Any, where: str) -> tuple[list[str], str]:
    """A user file's ``choices`` (a list of texts, or such a list as JSON text, e.g. from CSV) and its
    ``answer`` (the gold option's 0-based index, or its text) as the options and the gold label
    ``answer<k>`` (1-based, the generation rule's labels)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _fail(where, "'choices' is text that is not a JSON list of options") from None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _fail(where, f"'choices' must be a list of texts (got {type(value).__name__})")
    choices = [c.strip() for c in value]
    if not 2 <= len(choices) <= MAX_CHOICES:
        raise _fail(where, f"'choices' has {len(choices)} options; give 2 to {MAX_CHOICES}")
    if any(not c for c in choices):
        raise _fail(where, f"'choices' option {[not c for c in choices].index(True)} is empty")
    if isinstance(answer, str) and answer.strip() in choices:
        index = choices.index(answer.strip())
    elif (isinstance(answer, int) and not isinstance(answer, bool)) or (isinstance(answer, str)
                                                                        and answer.strip().isdigit()):
        index = int(answer)
        if not 0 <= index < len(choices):
            raise _fail(where, f"'answer' {index} is not an option's index (0 to {len(choices) - 1})")
    else:
        raise _fail(where, f"'answer' {answer!r} is neither one of the choices nor an index (0 to {len(choices) - 1})")
    return choices, f"answer{index + 1}"
