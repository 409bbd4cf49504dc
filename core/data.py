"""Instruction data: loading (JSON, JSONL, CSV, hub ids, the built-in set), splitting, tokenising, batching.

Records are normalised to ``{instruction, input, output[, answer]}`` (the LLM-Adapters / Alpaca
format). Tokenised examples carry ``labels`` with ``-100`` on the prompt tokens (unless
``train_on_inputs``), so only the response is learned.
"""

from __future__ import annotations

import csv
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


class DataError(ConfigError):
    """A dataset that cannot be used; the message names the file, and the row where one is at fault."""

    def __init__(self, message: str, field: str = "data.source"):
        super().__init__(field, message)


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl" or (suffix == ".json" and text.lstrip()[:1] == "{"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path.name}: line {n} is not valid JSON ({err.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path.name}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            raise DataError(f"{path.name}: expected a list of objects")
        return data
    raise DataError(f"{path.name}: unsupported file type {suffix!r}; use .json, .jsonl or .csv")


def _read_hub(source: str) -> list[Any]:
    try:
        import datasets

        ds = datasets.load_dataset(source, split="train")
    except Exception as err:
        raise DataError(f"no file {source!r} here, and it could not be loaded as a hub dataset "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Offline, give a local "
                        "JSON/JSONL/CSV file or use the built-in set 'builtin:math'.") from None
    return [dict(row) for row in ds]


class Records(list):
    """Normalised rows; ``skipped`` holds the 1-based numbers of rows left out for an empty response."""

    skipped: list[int]


def load_records(source: str, columns: dict[str, str] | None = None, limit: int = 0) -> Records:
    """Load and normalise instruction data; raise ``DataError`` naming the file and row at fault.

    A row whose instruction or output is missing or not text is an error; a row whose output is an
    empty string (some public sets have a few) is skipped and its number kept in ``.skipped``.
    """
    columns = columns or {}
    if source in BUILTIN_FILES:
        path = BUILTIN_FILES[source]
        raw = _read_file(path)
        name = source
    else:
        path = Path(source).expanduser()
        looks_local = path.suffix.lower() in (".json", ".jsonl", ".csv") or source.startswith((".", "/", "~"))
        if path.is_file():
            raw, name = _read_file(path), path.name
        elif looks_local:
            raise DataError(f"no such file: {source}")
        else:
            raw, name = _read_hub(source), source
    records = Records()
    records.skipped = []
    for n, row in enumerate(raw, 1):
        if limit and len(records) >= limit:
            break
        if not isinstance(row, dict):
            raise DataError(f"{name}: row {n} is not an object")
        rec = {}
        output_key = columns.get("output", "output")
        if row.get(output_key) == "" and isinstance(row.get(columns.get("instruction", "instruction")), str):
            records.skipped.append(n)
            continue
        for field in FIELDS:
            key = columns.get(field, field)
            value = row.get(key)
            if value is None or value == "":
                if field in ("instruction", "output"):
                    raise DataError(f"{name}: row {n} has no {field!r}"
                                    + (f" (column {key!r})" if key != field else ""))
                value = ""
            if isinstance(value, (int, float)) and not isinstance(value, bool) and field in ("input", "answer"):
                value = str(value)
            if not isinstance(value, str):
                raise DataError(f"{name}: row {n}: {field!r} is a {type(value).__name__}, not text")
            rec[field] = value
        if not rec["answer"]:
            del rec["answer"]
        records.append(rec)
    if not records:
        raise DataError(f"{name}: the dataset is empty")
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
    input_ids: list[int]
    labels: list[int]
    num_prompt_tokens: int


@dataclass
class TokenizedData:
    examples: list[Example]
    num_truncated: int
    num_dropped: int = 0


def tokenize_records(records: list[dict], tokenizer: Any, template: str = "alpaca", cutoff_len: int = 256,
                     train_on_inputs: bool = False) -> TokenizedData:
    """Prompt + response + EOS, cut to ``cutoff_len``; prompt tokens labelled -100 unless ``train_on_inputs``."""
    prompts = [render_prompt(r["instruction"], r.get("input", ""), template, tokenizer) for r in records]
    fulls = [p + r["output"] + (tokenizer.eos_token or "") for p, r in zip(prompts, records)]
    add_special = template != "chat"  # a chat template already holds its special tokens
    prompt_ids = tokenizer(prompts, add_special_tokens=add_special)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=add_special)["input_ids"]
    examples, truncated, dropped = [], 0, 0
    for p_ids, ids in zip(prompt_ids, full_ids):
        n_prompt = min(len(p_ids), len(ids))
        if len(ids) > cutoff_len:
            ids = ids[:cutoff_len]
            truncated += 1
        labels = list(ids) if train_on_inputs else [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if all(x == -100 for x in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(input_ids=list(ids), labels=labels, num_prompt_tokens=min(n_prompt, len(ids))))
    return TokenizedData(examples=examples, num_truncated=truncated, num_dropped=dropped)


def length_stats(data: TokenizedData) -> dict[str, Any]:
    """Token-length statistics for a preview."""
    lengths = sorted(len(e.input_ids) for e in data.examples)
    if not lengths:
        return {"count": 0, "num_truncated": data.num_truncated, "num_dropped": data.num_dropped}
    return {"count": len(lengths), "min": lengths[0], "mean": round(statistics.fmean(lengths), 1),
            "median": statistics.median(lengths), "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
            "max": lengths[-1], "num_truncated": data.num_truncated, "num_dropped": data.num_dropped,
            "label_tokens": sum(sum(1 for x in e.labels if x != -100) for e in data.examples)}


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
