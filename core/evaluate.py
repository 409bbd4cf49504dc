"""Benchmarks: the 14 LLM-Adapters test sets, answer extraction by the paper's rules, fast evaluation.

Registry: seven arithmetic sets (gsm8k, SVAMP, AQuA, MultiArith, AddSub, SingleEq, mawps) and eight
commonsense sets (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge,
openbookqa), looked up case-insensitively with aliases (``siqa``, ``obqa``, ``arc-e``...). Files are
in the LLM-Adapters JSON format: a list of ``{instruction, input, output, answer}``.

Answer extraction follows LLM-Adapters (``evaluate.py`` / ``commonsense_evaluate.py``):

- number: commas removed, the *last* match of ``-?\\d+\\.?\\d*``; correct when within 0.001 of the gold;
- letter (AQuA): the *first* match of ``A|B|C|D|E``;
- true/false, solution1/2, answer1..5, ending1..4, option1/2: the *first* match of the alternatives.

A response with no match extracts to ``None`` and counts wrong.

Evaluation (``evaluate``) is batched greedy decoding with a key/value cache: prompts sorted by length
(longest first), left padded; a row stops at EOS, at the template's next ``###`` marker, or once its
answer is final (number / letter: a completed sentence "The answer is ..."; choice types: the first
match, which the extraction rule can no longer change); finished rows leave the batch at once and,
when the cache allows it, new prompts take their places. ``reference_generate`` is the LLM-Adapters
protocol (one prompt at a time, beam search with 4 beams) for speed and agreement comparisons.

Public API: ``BENCHMARKS``, ``Benchmark``, ``BenchmarkError``, ``EvalResult``, ``benchmark_info``,
``list_benchmarks``, ``load_benchmark``, ``infer_answer_type``, ``extract_answer``, ``is_correct``,
``evaluate``, ``reference_generate``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import EvalSettings
from .deployment import Deployment, current
from .sources import HubUnavailable, SourceError, read_hub_dataset, resolve_data
from .templates import render_prompt

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
BUILTIN_MATH = "builtin:math"
BUILTIN_FILES = {BUILTIN_MATH: ASSETS / "math_eval.json"}
DEFAULT_EVAL_DIR = ROOT.parent / "shared" / "datasets" / "eval"
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
    if _key(text) == _key(BUILTIN_MATH):
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


def _display(value: Any) -> str | None:
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
    examples: list[dict[str, str]]  # instruction, input, answer, output
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


def _normalise(rows: list[tuple[str, Any]], name: str, from_hub: bool = False) -> list[dict[str, str]]:
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
        examples.append({"instruction": instruction, "input": ex_input if isinstance(ex_input, str) else str(ex_input),
                         "answer": str(answer).strip(), "output": output if isinstance(output, str) else str(output)})
    if not examples:
        raise BenchmarkError(f"{name}: the benchmark is empty")
    return examples


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
    if _key(source) == _key(BUILTIN_MATH):
        path = BUILTIN_FILES[BUILTIN_MATH]
        if not path.is_file():
            raise BenchmarkError(f"the built-in math benchmark is missing ({path}); reinstall the workbench")
        return Benchmark(BUILTIN_MATH, "number", _normalise(_read_rows(path), BUILTIN_MATH), str(path))
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
    return Benchmark(info.name if info else named.stem, kind, examples, str(path))


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


# --------------------------------------------------------------------------------------------------
# When a row is done.

STOP_MARKERS = ("###", "Below is an instruction")
_SENTENCE_END = r"(?:[.!?](?=\s)|\n)"
# The answer is final: a completed sentence "The answer is ... <number>" / "... <letter A-E>".
_FINAL = {
    "number": re.compile(r"[Tt]he answer is[^\n]*?\d[^\n]*?" + _SENTENCE_END),
    "letter": re.compile(r"[Tt]he answer is[^\n]*?[A-E][^\n]*?" + _SENTENCE_END),
}
_WINDOW = 48  # tokens decoded from the end of a row to check its stop rules


class _StopRule:
    """Decides, token by token, when a row is done; returns the reason (eos, length, marker, answer) or None."""

    def __init__(self, tokenizer: Any, answer_type: str | None, eos_ids: set[int], max_new_tokens: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.final = _FINAL.get(answer_type) if answer_type else None
        self.first_match = CHOICE_PATTERNS.get(answer_type) if answer_type not in (None, "letter") else None

    def __call__(self, tokens: list[int]) -> str | None:
        if tokens and tokens[-1] in self.eos_ids:
            return "eos"
        tail = self.tokenizer.decode(tokens[-_WINDOW:], skip_special_tokens=True)
        if any(m in tail for m in STOP_MARKERS):
            return "marker"
        if self.final is not None and self.final.search(tail):
            return "answer"
        if self.first_match is not None and self.first_match.search(tail):
            return "answer"
        if len(tokens) >= self.max_new_tokens:
            return "length"
        return None

    def text(self, tokens: list[int], reason: str | None) -> str:
        """The response: the generated text cut at the next template marker, or after the final answer."""
        if tokens and tokens[-1] in self.eos_ids:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for marker in STOP_MARKERS:
            text = text.split(marker)[0]
        if reason == "answer" and self.final is not None:
            match = self.final.search(text)
            if match:
                text = text[:match.end()]
        return text.strip()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None),
               getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(getattr(model, "config", None), "eos_token_id", None)]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if v is not None)
    return ids


# --------------------------------------------------------------------------------------------------
# Batched greedy decoding with a key/value cache.

def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):  # pragma: no cover
        return torch.device("cpu")


_RESERVE = 64  # time columns a cache buffer grows by at once


def _growing_layer_class() -> type | None:
    """A ``DynamicLayer`` that appends into a buffer with spare columns instead of concatenating.

    ``DynamicLayer.update`` copies the whole cache on every decoding step (``torch.cat``); this layer
    copies only when its buffer is full or was replaced (after rows leave or join the batch). Its
    ``keys``/``values`` are views of the buffer, so everything reading them works unchanged.
    """
    global _GROWING
    if _GROWING is not None:
        return _GROWING
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover
        return None

    class GrowingLayer(DynamicLayer):
        _kbuf: torch.Tensor | None = None
        _vbuf: torch.Tensor | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self.lazy_initialization(key_states, value_states)
                self.keys = self.values = None
                self._kbuf = self._vbuf = None
                length = 0
            else:
                length = self.keys.shape[-2]
            n = key_states.shape[-2]
            kb, vb = self._kbuf, self._vbuf
            if (kb is None or self.keys is None or self.keys.data_ptr() != kb.data_ptr()
                    or self.values.data_ptr() != vb.data_ptr() or kb.shape[0] != key_states.shape[0]
                    or kb.shape[-2] < length + n or kb.dtype != key_states.dtype):
                cap = length + n + _RESERVE
                kb = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
                vb = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
                if length:
                    kb[:, :, :length] = self.keys
                    vb[:, :, :length] = self.values
                self._kbuf, self._vbuf = kb, vb
            kb[:, :, length:length + n] = key_states
            vb[:, :, length:length + n] = value_states
            self.keys, self.values = kb[:, :, :length + n], vb[:, :, :length + n]
            return self.keys, self.values

    _GROWING = GrowingLayer
    return GrowingLayer


_GROWING: type | None = None


def _use_growing_layers(cache: Any) -> Any:
    """Swap a fresh cache's plain ``DynamicLayer``s for growing ones (same behaviour, fewer copies)."""
    cls = _growing_layer_class()
    if cls is None:
        return cache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer and not layer.is_initialized:
                layers[i] = cls()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = cls
    return cache


def _plain_layers(cache: Any) -> list[Any] | None:
    """The cache's layers when every one is a plain, filled ``DynamicLayer`` of equal length; else None.

    Only such caches can be trimmed and merged along the time axis (sliding-window and quantised layers
    keep their own bookkeeping); others are still shrunk with ``batch_select_indices``.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover
        return None
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    length = None
    for layer in layers:
        if type(layer) not in (DynamicLayer, _GROWING) or not getattr(layer, "is_initialized", False):
            return None
        keys, values = layer.keys, layer.values
        if keys is None or keys.dim() != 4 or values is None or values.dim() != 4:
            return None
        if length is None:
            length = keys.shape[-2]
        if keys.shape[-2] != length or values.shape[-2] != length:
            return None
    return list(layers)


def _pad_time(t: torch.Tensor, extra: int, pad: int) -> torch.Tensor:
    """Insert ``pad`` zero columns at time offset ``extra`` (after any virtual-token positions)."""
    if pad <= 0:
        return t
    zeros = t.new_zeros(*t.shape[:2], pad, *t.shape[3:])
    return torch.cat([t[:, :, :extra], zeros, t[:, :, extra:]], dim=2)


@dataclass
class _Group:
    """Rows decoding together: their cache, attention mask and per-row bookkeeping."""

    cache: Any
    mask: torch.Tensor  # (rows, columns): 1 for real tokens; the cache has ``extra`` columns more in front
    lengths: torch.Tensor  # real tokens per row in the cache (the next position id)
    last: torch.Tensor  # the token each row feeds next
    rows: list[int]  # example numbers
    extra: int  # virtual-token columns the cache holds before the mask's columns (prefix / prompt tuning)
    plain: bool  # the cache can be trimmed and merged along time


class _Decoder:
    """Greedy decoding of many prompts with a shared, shrinking and refilled batch."""

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, device: torch.device, batch_size: int,
                 refill_fraction: float = 0.25, growing: bool = True):
        self.model, self.tokenizer, self.pad_id, self.device = model, tokenizer, pad_id, device
        self.batch_size = max(1, int(batch_size))
        self.refill_at = max(1, int(round(self.batch_size * refill_fraction)))
        self.pass_positions = _accepts(model, "position_ids")
        self.keep_logits = _accepts(model, "logits_to_keep")
        self.config = getattr(model, "config", None)
        self.growing = growing

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.config) if self.config is not None else DynamicCache()
        except Exception:  # pragma: no cover - exotic configs
            cache = DynamicCache()
        return _use_growing_layers(cache) if self.growing else cache

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any):
        kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        if self.pass_positions:
            kwargs["position_ids"] = positions
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return out.logits[:, -1, :].argmax(-1), out.past_key_values

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> tuple[_Group, list[int]]:
        width = max(len(prompts[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            p = prompts[r]
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt, cache = self._forward(ids, mask, positions, self._new_cache())
        extra = cache.get_seq_length() - width if hasattr(cache, "get_seq_length") else 0
        group = _Group(cache=cache, mask=mask, lengths=mask.sum(-1), last=nxt, rows=list(rows),
                       extra=max(0, extra), plain=_plain_layers(cache) is not None and extra >= 0)
        return group, nxt.tolist()

    def step(self, g: _Group) -> list[int]:
        g.mask = torch.cat([g.mask, g.mask.new_ones(g.mask.shape[0], 1)], dim=1)
        nxt, g.cache = self._forward(g.last.unsqueeze(1), g.mask, g.lengths.unsqueeze(1), g.cache)
        g.lengths = g.lengths + 1
        g.last = nxt
        return nxt.tolist()

    def keep(self, g: _Group, keep: list[int]) -> None:
        """Keep only rows ``keep`` (positions in the group); drop time columns no row needs any more."""
        idx = torch.tensor(keep, dtype=torch.long, device=g.mask.device)
        g.mask, g.lengths, g.last = g.mask[idx], g.lengths[idx], g.last[idx]
        g.rows = [g.rows[i] for i in keep]
        layers = _plain_layers(g.cache) if g.plain else None
        if layers is None:
            g.cache.batch_select_indices(idx)
            return
        used = g.mask.any(0).nonzero()
        trim = int(used[0]) if used.numel() else 0
        trim = min(trim, g.mask.shape[1] - 1)
        e = g.extra
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name).index_select(0, idx)
                if trim > 0:
                    t = t[:, :, e + trim:] if e == 0 else torch.cat([t[:, :, :e], t[:, :, e + trim:]], dim=2)
                setattr(layer, name, t)
        if trim > 0:
            g.mask = g.mask[:, trim:]

    @staticmethod
    def can_merge(a: _Group, b: _Group) -> bool:
        if not (a.plain and b.plain and a.extra == b.extra):
            return False
        la, lb = _plain_layers(a.cache), _plain_layers(b.cache)
        return la is not None and lb is not None and len(la) == len(lb)

    @staticmethod
    def merge(a: _Group, b: _Group) -> _Group:
        """``a`` and ``b`` as one batch: the shorter left-padded (after the virtual positions) to the longer."""
        ta, tb = a.mask.shape[1], b.mask.shape[1]
        width, e = max(ta, tb), a.extra
        for la, lb in zip(_plain_layers(a.cache), _plain_layers(b.cache)):
            for name in ("keys", "values"):
                ka, kb = getattr(la, name), getattr(lb, name)
                setattr(la, name, torch.cat([_pad_time(ka, e, width - ta), _pad_time(kb.to(ka.dtype), e, width - tb)]))
        a.mask = torch.cat([torch.nn.functional.pad(a.mask, (width - ta, 0)),
                            torch.nn.functional.pad(b.mask, (width - tb, 0))])
        a.lengths = torch.cat([a.lengths, b.lengths])
        a.last = torch.cat([a.last, b.last])
        a.rows = a.rows + b.rows
        return a


def _batched_greedy(model: Any, tokenizer: Any, prompts: list[list[int]], batch_size: int,
                    stop: Callable[[int, list[int]], str | None], pad_id: int,
                    on_done: Callable[[int, list[int], str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, refill: bool = True,
                    refill_fraction: float = 0.25) -> tuple[dict[int, tuple[list[int], str]], bool]:
    """Greedy continuations of ``prompts`` (token ids): {prompt number: (generated ids, stop reason)}.

    ``stop(i, tokens)`` says when row ``i`` is done. Prompts run longest first; a finished row leaves
    the batch at once; with ``refill``, pending prompts join when a quarter of the batch is free.
    Returns the results and whether ``should_stop`` cut the run short.
    """
    dec = _Decoder(model, tokenizer, pad_id, _model_device(model), batch_size, refill_fraction)
    pending = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    pending.reverse()  # pop() from the end takes the longest first
    generated: dict[int, list[int]] = {}
    results: dict[int, tuple[list[int], str]] = {}
    group: _Group | None = None

    def advance(g: _Group, tokens: list[int]) -> _Group | None:
        keep = []
        for pos, (row, tok) in enumerate(zip(g.rows, tokens)):
            seq = generated.setdefault(row, [])
            seq.append(tok)
            reason = stop(row, seq)
            if reason is None:
                keep.append(pos)
            else:
                results[row] = (seq, reason)
                if on_done is not None:
                    on_done(row, seq, reason)
        if not keep:
            return None
        if len(keep) < len(g.rows):
            dec.keep(g, keep)
        return g

    while pending or group is not None:
        if should_stop is not None and should_stop():
            return results, True
        active = 0 if group is None else len(group.rows)
        free = dec.batch_size - active
        if pending and (group is None or (refill and group.plain and free >= min(dec.refill_at, len(pending)))):
            take = [pending.pop() for _ in range(min(free, len(pending)))]
            new, tokens = dec.prefill(take, prompts)
            new = advance(new, tokens)
            if group is None:
                group = new
            elif new is not None:
                if dec.can_merge(group, new):
                    group = dec.merge(group, new)
                else:  # cannot share a cache: finish the current batch first, then this one
                    pending.extend(reversed(new.rows))
                    for r in new.rows:
                        generated.pop(r, None)
                    refill = False
            continue
        tokens = dec.step(group)
        group = advance(group, tokens)
    return results, False


def _hf_generate(model: Any, tokenizer: Any, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                 stop: Callable[[int, list[int]], str | None], pad_id: int, eos_ids: set[int],
                 on_done: Callable[[int, list[int], str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[dict[int, tuple[list[int], str]], bool]:
    """The same contract as ``_batched_greedy`` through ``model.generate`` (for models our loop cannot drive)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: dict[int, tuple[list[int], str]] = {}
    for start in range(0, len(order), batch_size):
        if should_stop is not None and should_stop():
            return results, True
        rows = order[start:start + batch_size]
        width = max(len(prompts[r]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(prompts[r]):] = torch.tensor(prompts[r])
            mask[i, width - len(prompts[r]):] = 1
        done: dict[int, tuple[list[int], str]] = {}

        class RowStop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                flags = []
                for i, r in enumerate(rows):
                    if r not in done:
                        seq = input_ids[i, width:].tolist()
                        reason = stop(r, seq)
                        if reason is not None:
                            done[r] = (seq, reason)
                    flags.append(r in done)
                return torch.tensor(flags, device=input_ids.device)

        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                       eos_token_id=sorted(eos_ids) or None, stopping_criteria=StoppingCriteriaList([RowStop()]))
        for r in rows:
            seq, reason = done.get(r, ([], "length"))
            results[r] = (seq, reason)
            if on_done is not None:
                on_done(r, seq, reason)
    return results, False


# --------------------------------------------------------------------------------------------------
# Evaluation.

@dataclass
class EvalResult:
    benchmark: str
    answer_type: str
    accuracy: float
    correct: int
    total: int
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)  # index, question, gold, response, extracted, correct
    stopped: bool = False  # should_stop cut the run short: the numbers cover the finished examples
    generated_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_examples(n_examples: int, limit: int, sample_seed: int) -> list[int]:
    """The example numbers to evaluate: all, the first ``limit``, or a seeded sample of ``limit`` (sorted)."""
    if not limit or limit >= n_examples:
        return list(range(n_examples))
    if sample_seed is not None and sample_seed >= 0:
        return sorted(random.Random(sample_seed).sample(range(n_examples), limit))
    return list(range(limit))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def evaluate(model: Any, tokenizer: Any, benchmark: Benchmark | str, settings: EvalSettings | None = None,
             progress: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None,
             dtype: torch.dtype | None = None, template: str = "alpaca", engine: str = "loop") -> EvalResult:
    """Accuracy of ``model`` on ``benchmark`` by batched greedy decoding (see the module docstring).

    ``settings``: ``limit`` (0 = all; first N, or a seeded sample when ``sample_seed >= 0``),
    ``max_new_tokens``, ``batch_size``. ``progress(done, total)`` is called as examples finish (it may
    raise to abort). ``should_stop()`` ends the run early; the result then covers the finished
    examples and has ``stopped=True``. ``dtype`` bf16/fp16 runs the model under autocast (default: as
    it is). ``engine="generate"`` uses ``model.generate`` instead of our decoding loop.
    """
    if not isinstance(benchmark, Benchmark):
        benchmark = load_benchmark(benchmark)
    settings = settings or EvalSettings()
    start = time.perf_counter()
    chosen = select_examples(len(benchmark.examples), int(settings.limit or 0), int(settings.sample_seed))
    examples = [benchmark.examples[i] for i in chosen]
    total = len(examples)
    if progress is not None:
        progress(0, total)

    saved_side = getattr(tokenizer, "padding_side", None)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos_ids(model, tokenizer)
    rule = _StopRule(tokenizer, benchmark.answer_type, eos, int(settings.max_new_tokens))
    prompts_text = [render_prompt(ex["instruction"], ex.get("input", ""), template, tokenizer) for ex in examples]
    prompts = [list(ids) for ids in tokenizer(prompts_text)["input_ids"]]

    samples: dict[int, dict[str, Any]] = {}
    n_tokens = 0

    def on_done(i: int, tokens: list[int], reason: str) -> None:
        nonlocal n_tokens
        ex = examples[i]
        response = rule.text(tokens, reason)
        extracted = extract_answer(benchmark.answer_type, response)
        question = ex["instruction"] if not ex.get("input", "").strip() else f"{ex['instruction']}\n\n{ex['input']}"
        samples[i] = {"index": chosen[i], "question": question, "gold": ex["answer"], "response": response,
                      "extracted": _display(extracted),
                      "correct": is_correct(benchmark.answer_type, response, ex["answer"])}
        n_tokens += len(tokens)
        if progress is not None:
            progress(len(samples), total)

    device = _model_device(model)
    was_training = getattr(model, "training", False)
    stopped = False
    try:
        if saved_side is not None:
            tokenizer.padding_side = "left"
        if was_training:
            model.eval()
        with torch.inference_mode(), _autocast(device, dtype):
            if engine == "generate":
                _, stopped = _hf_generate(model, tokenizer, prompts, int(settings.batch_size),
                                          int(settings.max_new_tokens), lambda i, t: rule(t), pad_id, eos,
                                          on_done, should_stop)
            elif engine == "loop":
                _, stopped = _batched_greedy(model, tokenizer, prompts, int(settings.batch_size),
                                             lambda i, t: rule(t), pad_id, on_done, should_stop)
            else:
                raise ValueError(f"unknown engine {engine!r}; use 'loop' or 'generate'")
    finally:
        if saved_side is not None:
            tokenizer.padding_side = saved_side
        if was_training:
            model.train()

    ordered = [samples[i] for i in sorted(samples)]
    correct = sum(1 for s in ordered if s["correct"])
    done = len(ordered)
    return EvalResult(benchmark=benchmark.name, answer_type=benchmark.answer_type,
                      accuracy=correct / done if done else 0.0, correct=correct, total=done,
                      seconds=time.perf_counter() - start, samples=ordered, stopped=stopped,
                      generated_tokens=n_tokens)


def reference_generate(model: Any, tokenizer: Any, prompt: str, num_beams: int = 4, max_new_tokens: int = 256) -> str:
    """One response by the LLM-Adapters protocol: this prompt alone, beam search (4 beams), no sampling.

    As in LLM-Adapters' ``evaluate.py``, the response is the text after ``### Response:`` up to a
    following ``### Response:``, stripped.
    """
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    device = _model_device(model)
    inputs = tokenizer(prompt, return_tensors="pt")
    ids = inputs["input_ids"].to(device)
    mask = inputs.get("attention_mask")
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=None if mask is None else mask.to(device),
                             num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split("### Response:")[0].strip()
