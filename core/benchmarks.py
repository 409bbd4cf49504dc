"""Benchmarks: the LLM-Adapters test sets, their answer types, and answer extraction by the paper's rules.

Registry: seven arithmetic sets (gsm8k, SVAMP, AQuA, MultiArith, AddSub, SingleEq, mawps) and eight
commonsense sets (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge,
openbookqa), looked up case-insensitively with aliases (``siqa``, ``obqa``, ``arc-e``...). Files are
in the LLM-Adapters JSON format: a list of ``{instruction, input, output, answer}``; a file may add a
``choices`` column (a list of option texts; the answer is an option's 0-based index or its text),
whose options ``core.choices`` reads and generation sees listed in the instruction.

Answer extraction follows LLM-Adapters (``evaluate.py`` / ``commonsense_evaluate.py``):

- number: commas removed, the *last* match of ``-?\\d+\\.?\\d*``; correct when within 0.001 of the gold;
- letter (AQuA): the *first* match of ``A|B|C|D|E``;
- true/false, solution1/2, answer1..5, ending1..4, option1/2: the *first* match of the alternatives.

A response with no match extracts to ``None`` and counts wrong.

Standard library only (no torch): the UI lists benchmarks and the service checks names without
loading the engine. Decoding is ``core.decoding``; scoring a model is ``core.evaluate``.

Public API: ``BENCHMARKS``, ``Benchmark``, ``BenchmarkError``, ``BenchmarkInfo``, ``benchmark_info``,
``list_benchmarks``, ``load_benchmark``, ``infer_answer_type``, ``extract_answer``, ``is_correct``,
``answer_text``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .deployment import Deployment, current
from .hub import HubUnavailable, read_hub_dataset
from .sources import ASSETS, SourceError, builtin_rows, resolve_data

BUILTIN_MATH = "builtin:math"
BUILTIN_FILES = {BUILTIN_MATH: ASSETS / "math_eval.json"}
DEFAULT_EVAL_DIR = ASSETS.parents[1] / "shared" / "datasets" / "eval"
EVAL_DIR_ENV = "WORKBENCH_EVAL_DIR"
FILE_TYPES = (".json", ".jsonl", ".csv")
TOLERANCE = 0.001  # LLM-Adapters' ``miss``: |pred - gold| <= 0.001 counts as correct

# --------------------------------------------------------------------------------------------------
# Answer types and extraction.

ANSWER_TYPES = ("number", "letter", "boolean", "solution", "answer", "ending", "option")

# The alternatives each type's extraction looks for (LLM-Adapters' re.findall patterns).
CHOICE_PATTERNS: dict[str, re.Pattern] = {
    "letter": re.compile(r"A|B|C|D|E"),
    "boolean": re.compile(r"true|false"),
    "solution": re.compile(r"solution1|solution2"),
    "answer": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "ending": re.compile(r"ending1|ending2|ending3|ending4"),
    "option": re.compile(r"option1|option2"),
}
_NUMBER = re.compile(r"-?\d+\.?\d*")
_NUMERIC_GOLD = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)")
# Gold answers that identify a type (for files whose name is not a known benchmark).
_GOLD_SHAPES: list[tuple[str, re.Pattern]] = [
    ("letter", re.compile(r"\(?[A-E]\)?")),
    ("boolean", re.compile(r"true|false", re.I)),
    ("solution", re.compile(r"solution[12]")),
    ("answer", re.compile(r"answer[1-5]")),
    ("ending", re.compile(r"ending[1-4]")),
    ("option", re.compile(r"option[12]")),
]


class BenchmarkError(ValueError):
    """A benchmark that cannot be used: unknown name, missing or malformed file (the message names the row)."""


@dataclass(frozen=True)
class BenchmarkInfo:
    name: str  # as LLM-Adapters spells it (and its file name)
    answer_type: str
    group: str  # arithmetic | commonsense
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        """File names looked for in the data directory: ours (``AddSub.json``) and LLM-Adapters' layout."""
        return (f"{self.name}.json", f"{self.name}.jsonl", f"{self.name}/test.json")


BENCHMARKS: dict[str, BenchmarkInfo] = {b.name: b for b in [
    BenchmarkInfo("gsm8k", "number", "arithmetic", ("gsm", "gsm-8k"), "grade-school math word problems"),
    BenchmarkInfo("SVAMP", "number", "arithmetic", (), "one-unknown arithmetic word problems with variations"),
    BenchmarkInfo("AQuA", "letter", "arithmetic", ("aqua-rat",), "algebra word problems, choices A-E"),
    BenchmarkInfo("MultiArith", "number", "arithmetic", (), "multi-step arithmetic word problems"),
    BenchmarkInfo("AddSub", "number", "arithmetic", (), "addition and subtraction word problems"),
    BenchmarkInfo("SingleEq", "number", "arithmetic", (), "single-equation word problems"),
    BenchmarkInfo("mawps", "number", "arithmetic", (), "math word problems (MAWPS)"),
    BenchmarkInfo("boolq", "boolean", "commonsense", (), "yes/no questions about a passage (true/false)"),
    BenchmarkInfo("piqa", "solution", "commonsense", (), "physical commonsense, two solutions"),
    BenchmarkInfo("social_i_qa", "answer", "commonsense", ("siqa", "socialiqa", "social-iqa"),
                  "social commonsense, three answers"),
    BenchmarkInfo("hellaswag", "ending", "commonsense", ("hella-swag",), "sentence endings, four choices"),
    BenchmarkInfo("winogrande", "option", "commonsense", ("wino", "wg"), "pronoun resolution, two options"),
    BenchmarkInfo("ARC-Easy", "answer", "commonsense", ("arc-e", "arce", "arc_easy", "arceasy"),
                  "grade-school science questions (easy)"),
    BenchmarkInfo("ARC-Challenge", "answer", "commonsense", ("arc-c", "arcc", "arc_challenge", "arcchallenge"),
                  "grade-school science questions (challenge)"),
    BenchmarkInfo("openbookqa", "answer", "commonsense", ("obqa", "openbook-qa", "openbook"),
                  "open-book science questions, four answers"),
]}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name).strip().lower())


_LOOKUP: dict[str, BenchmarkInfo] = {}
for _info in BENCHMARKS.values():
    for _alias in (_info.name, *_info.aliases):
        _LOOKUP[_key(_alias)] = _info


def benchmark_info(name: str) -> BenchmarkInfo | None:
    """The registry entry for ``name`` (case-insensitive; ``-``/``_``/spaces ignored; aliases), or None."""
    return _LOOKUP.get(_key(name))


def _answer_type(benchmark_or_type: Any) -> str:
    if isinstance(benchmark_or_type, Benchmark):
        return benchmark_or_type.answer_type
    if isinstance(benchmark_or_type, BenchmarkInfo):
        return benchmark_or_type.answer_type
    text = str(benchmark_or_type)
    if text in ANSWER_TYPES:
        return text
    info = benchmark_info(text)
    if info is not None:
        return info.answer_type
    if _key(text) == _key(BUILTIN_MATH) or text.startswith(BUILTIN_MATH + "?"):
        return "number"
    raise BenchmarkError(f"unknown answer type or benchmark {text!r}; answer types: {', '.join(ANSWER_TYPES)}")


def extract_answer(benchmark_or_type: Any, response: str | None) -> str | float | None:
    """The answer in ``response`` by LLM-Adapters' rule for the benchmark's type; None when there is none.

    number: the last number (commas removed; negatives and decimals kept) as a float; every other
    type: the first match of its alternatives (``A``-``E``, ``true``/``false``, ``solution1``...).
    """
    kind = _answer_type(benchmark_or_type)
    if not response:
        return None
    if kind == "number":
        found = _NUMBER.findall(response.replace(",", ""))
        if not found:
            return None
        try:
            return float(found[-1])
        except ValueError:  # pragma: no cover - the pattern always parses
            return None
    match = CHOICE_PATTERNS[kind].search(response)
    return match.group(0) if match else None


def _gold_number(gold: Any) -> float | None:
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return float(gold)
    text = str(gold).strip().replace(",", "")
    if "####" in text:  # GSM8K-style worked answer: "... #### 72"
        text = text.rsplit("####", 1)[1].strip()
    try:
        return float(text)
    except ValueError:
        found = _NUMBER.findall(text)
        return float(found[-1]) if found else None


def _gold_choice(kind: str, gold: Any) -> str:
    text = str(gold).strip()
    if kind == "boolean":
        return text.lower()
    if kind == "letter":
        match = re.search(r"[A-E]", text)
        return match.group(0) if match else text
    return text


def is_correct(benchmark_or_type: Any, response: str | None, gold: Any) -> bool:
    """Whether ``response`` answers ``gold`` (numbers: within 0.001; other types: the exact label)."""
    kind = _answer_type(benchmark_or_type)
    pred = extract_answer(kind, response)
    if pred is None:
        return False
    if kind == "number":
        target = _gold_number(gold)
        return target is not None and abs(float(pred) - target) <= TOLERANCE
    return pred == _gold_choice(kind, gold)


def answer_text(value: Any) -> str | None:
    """An extracted answer as text for samples: ``4.0`` -> ``"4"``; None stays None."""
    if value is None:
        return None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def infer_answer_type(golds: list[Any], name: str = "benchmark") -> str:
    """The answer type shared by every gold answer: number, letter, boolean, solution, answer, ending, option."""
    golds = [g for g in golds if g is not None and str(g).strip() != ""]
    if not golds:
        raise BenchmarkError(f"{name}: no gold answers to tell the answer type from")
    texts = [str(g).strip() for g in golds]
    if not any(isinstance(g, bool) for g in golds) and all(
            _NUMERIC_GOLD.fullmatch(t) or ("####" in t and _gold_number(t) is not None) for t in texts):
        return "number"
    for kind, shape in _GOLD_SHAPES:
        if all(shape.fullmatch(t) for t in texts):
            return kind
    example = next((t for t in texts if not any(s.fullmatch(t) for _, s in _GOLD_SHAPES)), texts[0])
    raise BenchmarkError(f"{name}: cannot tell the answer type: the gold answers are not all numbers, letters "
                         f"A-E, true/false, solutionN, answerN, endingN or optionN (e.g. {example[:60]!r})")


# --------------------------------------------------------------------------------------------------
# Loading benchmarks.

@dataclass
class Benchmark:
    name: str
    answer_type: str
    examples: list[dict[str, Any]]  # instruction, input, answer, output (+ question, choices: a choices column)
    source: str = ""  # the file path or hub id it was read from

    def __len__(self) -> int:
        return len(self.examples)


def eval_dir(data_dir: str | Path | None = None) -> Path:
    """Where registry benchmarks are looked for: ``data_dir``, else ``$WORKBENCH_EVAL_DIR``, else
    ``../shared/datasets/eval`` beside the repository."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(EVAL_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_EVAL_DIR


def _find_file(info: BenchmarkInfo, directory: Path) -> Path | None:
    for name in info.files:
        path = directory / name
        if path.is_file():
            return path
    if directory.is_dir():  # a differently-cased file name (addsub.json)
        wanted = {n.lower() for n in info.files if "/" not in n}
        for path in directory.iterdir():
            if path.name.lower() in wanted and path.is_file():
                return path
    return None


def _info_for_path(path: Path) -> BenchmarkInfo | None:
    """The registry entry a file name points at: ``AddSub.json``, ``addsub_test.json``, ``AddSub/test.json``."""
    stem = path.stem
    for candidate in (stem, re.sub(r"[_\-.](test|eval|dev|val|validation)$", "", stem, flags=re.I),
                      path.parent.name if stem.lower() in ("test", "eval", "dev", "validation") else ""):
        if candidate:
            info = benchmark_info(candidate)
            if info is not None:
                return info
    return None


def _read_rows(path: Path, name: str | None = None, fmt: str | None = None,
               deployment: Deployment | None = None) -> list[tuple[str, Any]]:
    from .data import DataError, read_rows

    d = deployment or current()
    try:
        return read_rows(path, name, fmt, max_bytes=int(d.limits.upload_file_bytes or 0))
    except DataError as err:
        raise BenchmarkError(err.message) from None


def _read_hub(source: str) -> list[tuple[str, Any]]:
    """A hub dataset's test split (else validation, else train); fails fast offline (``core.sources``)."""
    try:
        split, rows = read_hub_dataset(source, ("test", "validation", "train"))
    except HubUnavailable as err:
        known = ", ".join(BENCHMARKS)
        raise BenchmarkError(f"{source!r} is not a local file or a known benchmark ({known}), and as a hub "
                             f"dataset: {err.reason}") from None
    return [(f"row {n} ({split} split)", row) for n, row in enumerate(rows, 1)]


_INSTRUCTION_KEYS = ("instruction", "question", "prompt")
_ANSWER_KEYS = ("answer", "label", "gold")


def _normalise(rows: list[tuple[str, Any]], name: str, from_hub: bool = False) -> list[dict[str, Any]]:
    examples = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise BenchmarkError(f"{name}: {where} is not an object (got {type(row).__name__})")
        ins_keys = _INSTRUCTION_KEYS if from_hub else ("instruction",)
        ans_keys = _ANSWER_KEYS if from_hub else ("answer",)
        instruction = next((row[k] for k in ins_keys if row.get(k) not in (None, "")), None)
        answer = next((row[k] for k in ans_keys if row.get(k) not in (None, "")), None)
        columns = ", ".join(repr(k) for k in list(row)[:12])
        if not isinstance(instruction, str) or not instruction.strip():
            what = "has no 'instruction'" if instruction is None else "has an 'instruction' that is not text"
            raise BenchmarkError(f"{name}: {where} {what} (its columns: {columns or 'none'})")
        if answer is None:
            raise BenchmarkError(f"{name}: {where} has no 'answer' (the gold answer; its columns: {columns})")
        if isinstance(answer, bool):
            answer = "true" if answer else "false"
        if not isinstance(answer, (str, int, float)):
            raise BenchmarkError(f"{name}: {where}: 'answer' is a {type(answer).__name__}, not text or a number")
        ex_input = row.get("input") or ""
        output = row.get("output") or ""
        example: dict[str, Any] = {"instruction": instruction,
                                   "input": ex_input if isinstance(ex_input, str) else str(ex_input),
                                   "answer": str(answer).strip(),
                                   "output": output if isinstance(output, str) else str(output)}
        has_choices = row.get("choices") is not None
        if examples and has_choices != ("choices" in examples[0]):
            raise BenchmarkError(f"{name}: {where} {'has' if has_choices else 'has no'} 'choices', unlike row 1: "
                                 "give every row its choices, or none")
        if has_choices:
            example.update(_with_choices(instruction, row["choices"], answer, f"{name}: {where}"))
        examples.append(example)
    if not examples:
        raise BenchmarkError(f"{name}: the benchmark is empty")
    return examples


def _with_choices(question: str, choices: Any, answer: Any, where: str) -> dict[str, Any]:
    """A row with a ``choices`` column (``core.choices.choices_column``): the options listed in the
    instruction in the LLM-Adapters ``answer`` layout for generation, gold ``answer<k>``, and the
    question and options kept for log-likelihood scoring."""
    from .choices import choices_column

    options, label = choices_column(choices, answer, where)
    listed = " ".join(f"Answer{k}: {c}" for k, c in enumerate(options, 1))
    labels = "/".join(f"answer{k}" for k in range(1, len(options) + 1))
    return {"instruction": f"{question}\n\n{listed}\n\nAnswer format: {labels}", "answer": label,
            "question": question, "choices": options}


def load_benchmark(name_or_path: str | Path, data_dir: str | Path | None = None,
                   deployment: Deployment | None = None) -> Benchmark:
    """A benchmark by registry name (looked up in ``data_dir``), file path, ``builtin:math`` or hub id.

    Registry names and ``builtin:math`` are read from the server's own folders; anything else is a
    data source, checked by ``core.sources.resolve_data`` against the deployment (data folders, the
    public allowlist of hub datasets). Raises ``BenchmarkError`` naming the file and row at fault.
    """
    source = str(name_or_path).strip()
    if not source:
        raise BenchmarkError("name a benchmark: a registry name (e.g. AddSub), a file path or builtin:math")
    if _key(source) == _key(BUILTIN_MATH) or source.startswith("builtin:"):
        return _builtin_benchmark(BUILTIN_MATH if _key(source) == _key(BUILTIN_MATH) else source)
    info = benchmark_info(source)
    if info is not None:
        directory = eval_dir(data_dir)
        found = _find_file(info, directory)
        if found is None:
            raise BenchmarkError(
                f"benchmark {info.name!r} is not available locally: no {info.files[0]} in {directory}. Put the "
                f"LLM-Adapters file there (or set {EVAL_DIR_ENV} to its folder), or give a file path")
        examples = _normalise(_read_rows(found), found.name)
        return Benchmark(info.name, info.answer_type, examples, str(found))
    bare = not any(c in source for c in "/\\") and not source.startswith((".", "~"))
    if bare and Path(source).suffix.lower() not in FILE_TYPES:
        raise BenchmarkError(f"unknown benchmark {source!r}; known: {', '.join(BENCHMARKS)}, {BUILTIN_MATH}; "
                             "or give a file path or a hub dataset id (owner/name)")
    try:
        where = resolve_data(source, deployment, field="eval.benchmarks")
    except SourceError as err:
        raise BenchmarkError(err.message) from None
    if where.kind == "hub":
        examples = _normalise(_read_hub(where.location), source, from_hub=True)
        return Benchmark(source, infer_answer_type([e["answer"] for e in examples], source), examples, source)
    path = Path(where.location)
    examples = _normalise(_read_rows(path, where.display_name, where.format, deployment), where.display_name)
    named = Path(where.display_name) if where.kind == "upload" else Path(source)
    info = _info_for_path(named)
    kind = info.answer_type if info else infer_answer_type([e["answer"] for e in examples], where.display_name)
    if "choices" in examples[0]:  # the options of a choices column are labelled answer1, answer2...
        kind = "answer"
    return Benchmark(info.name if info else named.stem, kind, examples, str(path))


def _builtin_benchmark(source: str) -> Benchmark:
    """``builtin:math``'s evaluation set, or the part its ``ops`` filter keeps (``builtin:math?ops=mul,div``:
    named so, its evaluations are recorded apart from the whole set's)."""
    path = BUILTIN_FILES[BUILTIN_MATH]
    if not path.is_file():
        raise BenchmarkError(f"the built-in math benchmark is missing ({path}); reinstall the workbench")
    try:
        rows = builtin_rows(source, _read_rows(path), field="eval.benchmarks")
    except SourceError as err:
        raise BenchmarkError(err.message) from None
    return Benchmark(source, "number", _normalise(rows, source), str(path))


_count_cache: dict[tuple[str, int, int], int] = {}


def _count(path: Path) -> int | None:
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in _count_cache:
            if path.suffix.lower() == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
                _count_cache[key] = len(data) if isinstance(data, list) else 1
            else:
                _count_cache[key] = len(_read_rows(path))
        return _count_cache[key]
    except (OSError, ValueError):
        return None


def list_benchmarks(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every registry benchmark (and ``builtin:math``): name, type, group, available locally, count, path."""
    directory = eval_dir(data_dir)
    out = []
    builtin = BUILTIN_FILES[BUILTIN_MATH]
    out.append({"name": BUILTIN_MATH, "type": "number", "group": "arithmetic", "aliases": [],
                "available": builtin.is_file(), "count": _count(builtin) if builtin.is_file() else None,
                "path": str(builtin) if builtin.is_file() else None,
                "description": "built-in offline sample of arithmetic word problems"})
    for info in BENCHMARKS.values():
        path = _find_file(info, directory)
        out.append({"name": info.name, "type": info.answer_type, "group": info.group, "aliases": list(info.aliases),
                    "available": path is not None, "count": _count(path) if path else None,
                    "path": str(path) if path else None, "description": info.description})
    return out
