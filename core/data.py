"""Instruction data: loading (JSON, JSONL, CSV, hub ids, the built-in set), splitting, tokenising, batching.

Records are normalised to ``{instruction, input, output[, answer]}`` (the LLM-Adapters / Alpaca
format). Tokenised examples carry ``labels`` with ``-100`` on the prompt tokens (unless
``train_on_inputs``), so only the response is learned.

Public API: ``load_records``, ``split_records``, ``tokenize_records`` (-> ``TokenizedData`` of
``Example``), ``length_stats``, ``preview_rows``, ``collate``; errors are ``DataError`` (a ``ConfigError``
on ``data.source``) whose message names the file and, for a bad row, its 1-based number.
"""

from __future__ import annotations

import csv
import io
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import BUILTIN_DATASET, ConfigError
from .templates import render_prompt

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_FILES = {BUILTIN_DATASET: ASSETS / "math_train.json"}
FIELDS = ("instruction", "input", "output", "answer")
FILE_TYPES = (".json", ".jsonl", ".csv")


class DataError(ConfigError):
    """A dataset that cannot be used; the message names the file, and the row where one is at fault."""

    def __init__(self, message: str, field: str = "data.source"):
        super().__init__(field, message)


# A raw row and where it is: "row 3", or "row 3 (line 5)" where the file's line number differs.
Located = tuple[str, Any]


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{path.name}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path.name}: cannot be read ({err.strerror or err})") from None


def _read_jsonl(name: str, text: str) -> list[Located]:
    rows: list[Located] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        n = len(rows) + 1
        where = f"row {n}" if n == line_no else f"row {n} (line {line_no})"
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{name}: {where} is not valid JSON ({err.msg})") from None
    return rows


def _read_json(name: str, text: str) -> list[Located]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip()[:1] == "{":  # JSON Lines saved as .json
            return _read_jsonl(name, text)
        raise DataError(f"{name}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(v, dict) for v in lists[0]):  # {"train": [...]} / {"data": [...]}
            data = lists[0]
        else:  # a one-row JSON Lines file
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a list of objects (got a JSON {type(data).__name__})")
    return [(f"row {n}", row) for n, row in enumerate(data, 1)]


def _read_csv(name: str, text: str) -> list[Located]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[Located] = []
    try:
        for n, row in enumerate(reader, 1):
            # reader.line_num is the line the row ends on; a quoted field may span lines.
            rows.append((f"row {n} (line {reader.line_num})", row))
    except csv.Error as err:
        raise DataError(f"{name}: not valid CSV near line {reader.line_num} ({err})") from None
    return rows


def _read_file(path: Path) -> list[Located]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path.name, _read_text(path, "utf-8-sig"))  # utf-8-sig: spreadsheets write a BOM
    if suffix == ".jsonl":
        return _read_jsonl(path.name, _read_text(path))
    if suffix == ".json":
        return _read_json(path.name, _read_text(path))
    raise DataError(f"{path.name}: unsupported file type {suffix or '(none)'!r}; use .json, .jsonl or .csv")


def _read_hub(source: str, limit: int = 0) -> list[Located]:
    """The train split of a hub dataset (or a local dataset directory) through ``datasets``.

    When the hub cannot be reached, ``datasets`` is switched to offline mode for the call, so a cached
    copy still loads and an uncached one fails at once instead of after ~25 s of retries.
    """
    try:
        from .models import hub_reachable
    except ImportError:  # pragma: no cover - models is optional here
        def hub_reachable() -> bool:
            return True

    offline = not Path(source).expanduser().is_dir() and not hub_reachable()
    try:
        import datasets
        import datasets.config
        import huggingface_hub.constants as hub_constants

        saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
        if offline:
            datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
        try:
            ds = datasets.load_dataset(source, split="train")
        finally:
            datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
        if limit and len(ds) > limit:
            ds = ds.select(range(limit))
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        reason = ("the hub could not be reached (offline) and it is not in the local datasets cache" if offline
                  else f"the hub could not provide it ({type(err).__name__}: {first})")
        raise DataError(f"no such file {source!r}, and {reason}. Give a local JSON/JSONL/CSV file, "
                        f"or use the built-in set {BUILTIN_DATASET!r}.") from None
    return [(f"row {n}", dict(row)) for n, row in enumerate(ds, 1)]


class Records(list):
    """Normalised rows; ``skipped`` holds the 1-based numbers of rows left out for an empty response."""

    skipped: list[int]


def _columns_note(row: dict) -> str:
    names = [str(k) for k in row if k is not None]
    shown = ", ".join(repr(k) for k in names[:12]) + (", ..." if len(names) > 12 else "")
    return f"; its columns are {shown}" if names else ""


def load_records(source: str, columns: dict[str, str] | None = None, limit: int = 0) -> Records:
    """Load and normalise instruction data; raise ``DataError`` naming the file and row at fault.

    ``source``: ``builtin:math``, a ``.json`` (a list of objects, or JSON Lines), ``.jsonl`` or ``.csv``
    file, or a hub dataset id (its train split). ``columns`` maps our names (instruction, input, output,
    answer) to the file's. ``limit`` keeps the first N usable rows (0 = all).

    A row whose instruction or output is missing or not text is an error; a row whose output is an
    empty string (some public sets have a few) is skipped and its number kept in ``.skipped``.
    """
    columns = dict(columns or {})
    source = str(source).strip()
    if source in BUILTIN_FILES:
        raw, name = _read_file(BUILTIN_FILES[source]), source
    else:
        path = Path(source).expanduser()
        looks_local = (path.suffix.lower() in FILE_TYPES or source.startswith((".", "/", "~", "\\"))
                       or source.count("/") > 1)
        if path.is_file():
            raw, name = _read_file(path), path.name
        elif looks_local and not path.is_dir():
            raise DataError(f"no such file: {source}")
        else:
            raw, name = _read_hub(source, limit), source
    records = Records()
    records.skipped = []
    for n, (where, row) in enumerate(raw, 1):
        if limit and len(records) >= limit:
            break
        if not isinstance(row, dict):
            raise DataError(f"{name}: {where} is not an object (got {type(row).__name__})")
        output_key = columns.get("output", "output")
        if row.get(output_key) == "" and isinstance(row.get(columns.get("instruction", "instruction")), str):
            records.skipped.append(n)
            continue
        rec = {}
        for field in FIELDS:
            key = columns.get(field, field)
            value = row.get(key)
            if value is None or value == "":
                if field in ("instruction", "output"):
                    column = f" (column {key!r})" if key != field else ""
                    raise DataError(f"{name}: {where} has no {field!r}{column}"
                                    + (_columns_note(row) if key not in row else ""))
                value = ""
            if isinstance(value, (int, float)) and not isinstance(value, bool) and field in ("input", "answer"):
                value = str(value)
            if not isinstance(value, str):
                raise DataError(f"{name}: {where}: {field!r} is a {type(value).__name__}, not text")
            rec[field] = value
        if not rec["answer"]:
            del rec["answer"]
        records.append(rec)
    if not records:
        what = "has no usable rows (every response is empty)" if records.skipped else "is empty"
        raise DataError(f"{name}: the dataset {what}")
    return records


def split_records(records: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split: ``val_size`` >= 1 is a count, 0 < x < 1 a fraction, 0 none."""
    if val_size <= 0:
        return list(records), []
    count = int(val_size) if val_size >= 1 else max(1, round(val_size * len(records)))
    if count >= len(records):
        raise DataError(f"validation size {val_size} leaves nothing to train on ({len(records)} rows)",
                        field="data.val_size")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:count])
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])


@dataclass
class Example:
    """One tokenised row: ``labels`` is ``input_ids`` with -100 where no loss is taken (the prompt)."""

    input_ids: list[int]
    labels: list[int]
    num_prompt_tokens: int


@dataclass
class TokenizedData:
    examples: list[Example]
    num_truncated: int  # rows cut at cutoff_len (kept, or dropped when no response token was left)
    num_dropped: int = 0  # rows with no response token left after truncation


def tokenize_records(records: list[dict], tokenizer: Any, template: str = "alpaca", cutoff_len: int = 256,
                     train_on_inputs: bool = False) -> TokenizedData:
    """Prompt + response + EOS, cut to ``cutoff_len``; prompt tokens labelled -100 unless ``train_on_inputs``.

    As in LLM-Adapters, the prompt's length is that of the prompt tokenised alone, and a row cut at
    ``cutoff_len`` keeps its start (and so loses its EOS). Special tokens are added the tokenizer's
    default way (LLaMA adds BOS, SmolLM2 adds nothing), except with the chat template, whose text already
    holds them. Rows are tokenised in one batch call each for prompts and full texts.
    """
    if not records:
        return TokenizedData(examples=[], num_truncated=0, num_dropped=0)
    prompts = [render_prompt(r["instruction"], r.get("input", ""), template, tokenizer) for r in records]
    fulls = [p + r["output"] for p, r in zip(prompts, records)]
    add_special = template != "chat"  # a chat template already holds its special tokens
    prompt_ids = tokenizer(prompts, add_special_tokens=add_special)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=add_special)["input_ids"]
    eos = tokenizer.eos_token_id
    examples, truncated, dropped = [], 0, 0
    for p_ids, ids in zip(prompt_ids, full_ids):
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if len(ids) > cutoff_len:
            ids = ids[:cutoff_len]
            truncated += 1
        n_prompt = min(len(p_ids), len(ids))
        labels = list(ids) if train_on_inputs else [-100] * n_prompt + ids[n_prompt:]
        if all(x == -100 for x in labels[1:]):  # the first label never counts (no token before it)
            dropped += 1
            continue
        examples.append(Example(input_ids=ids, labels=labels, num_prompt_tokens=n_prompt))
    return TokenizedData(examples=examples, num_truncated=truncated, num_dropped=dropped)


def length_stats(data: TokenizedData) -> dict[str, Any]:
    """Token-length statistics for a preview: count, min, mean, median, p95, max, truncated, dropped, label tokens."""
    lengths = sorted(len(e.input_ids) for e in data.examples)
    out: dict[str, Any] = {"count": len(lengths), "min": None, "mean": None, "median": None, "p95": None,
                           "max": None, "num_truncated": data.num_truncated, "num_dropped": data.num_dropped,
                           "label_tokens": sum(sum(1 for x in e.labels if x != -100) for e in data.examples)}
    if lengths:
        out.update(min=lengths[0], mean=round(statistics.fmean(lengths), 1), median=statistics.median(lengths),
                   p95=lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], max=lengths[-1])
    return out


def preview_rows(records: list[dict], tokenizer: Any, template: str = "alpaca", n: int = 5) -> list[dict[str, str]]:
    """The first rows as the model will see them: rendered prompt and response."""
    return [{"prompt": render_prompt(r["instruction"], r.get("input", ""), template, tokenizer),
             "response": r["output"]} for r in records[:n]]


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row; padding has attention 0 and label -100."""
    width = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
