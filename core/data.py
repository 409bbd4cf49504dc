"""Instruction data: loading (JSON, JSONL, CSV, hub ids, the built-in set), splitting, tokenising, batching.

Records are normalised to ``{instruction, input, output[, answer]}`` (the LLM-Adapters / Alpaca
format), or, for chat-format data (a ``messages`` or ``conversations`` column), to ``{messages}``
(``core.chat_data``: checked, rendered with the chat template, loss on every assistant turn). Tokenised
examples carry ``labels`` with ``-100`` on the prompt tokens (unless ``train_on_inputs``), so only the
response is learned.

Public API: ``load_records``, ``check_template``, ``split_records``, ``tokenize_records`` (->
``TokenizedData`` of ``Example``), ``length_stats``, ``preview_rows``, ``collate``, ``prompt_lengths``,
``shard``; errors are ``DataError`` (a ``ConfigError`` on ``data.source``, or on ``data.template`` from
``check_template``) whose message names the file and, for a bad row, its 1-based number.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import stat
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import BUILTIN_DATASET
from .fields import ConfigError
from .deployment import Deployment, current
from .hub import HubUnavailable, read_hub_dataset
from .sources import BUILTIN_DATA, DATA_FILE_TYPES, DataSource, SourceError, builtin_rows, resolve_data
from .templates import render_prompt

BUILTIN_FILES = BUILTIN_DATA  # builtin:* name -> file (defined in core.sources, the one place for sources)
FIELDS = ("instruction", "input", "output", "answer")
FILE_TYPES = DATA_FILE_TYPES
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


class DataError(ConfigError):
    """A dataset that cannot be used; the message names the file, and the row where one is at fault."""

    def __init__(self, message: str, field: str = "data.source"):
        super().__init__(field, message)


# A raw row and where it is: "row 3", or "row 3 (line 5)" where the file's line number differs.
Located = tuple[str, Any]


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _megabytes(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MB"
    return f"{n / 1024:.0f} KB" if n >= 1024 else f"{n} bytes"


def _read_text(path: Path, name: str, max_bytes: int = 0) -> str:
    """The file as text: its size checked before it is read, binary files refused, a UTF-8 BOM dropped."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{name}: not a regular file")
            if max_bytes and st.st_size > max_bytes:
                raise DataError(f"{name} is {_megabytes(st.st_size)}; one data file may be at most "
                                f"{_megabytes(max_bytes)} here")
            raw = f.read(max_bytes + 1 if max_bytes else -1)
    except OSError as err:
        raise DataError(f"{name}: cannot be read ({err.strerror or err})") from None
    if max_bytes and len(raw) > max_bytes:  # it grew while we looked
        raise DataError(f"{name} is larger than {_megabytes(max_bytes)}, the limit for one data file here")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name}: UTF-16 text; save it as UTF-8")
    if b"\x00" in raw:
        raise DataError(f"{name}: a binary file, not JSON, JSON Lines or CSV text")
    try:
        return raw.decode("utf-8-sig")  # -sig: editors and spreadsheets often write a BOM
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None


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
        except RecursionError:
            raise DataError(f"{name}: {where} is nested too deeply") from None
    return rows


def _read_json(name: str, text: str) -> list[Located]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip()[:1] == "{":  # JSON Lines saved as .json
            return _read_jsonl(name, text)
        raise DataError(f"{name}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise DataError(f"{name}: the JSON is nested too deeply") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(v, dict) for v in lists[0]):  # {"train": [...]} / {"data": [...]}
            data = lists[0]
        else:  # a one-row JSON Lines file
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a list of objects (got a JSON {_json_type(data)})")
    return [(f"row {n}", row) for n, row in enumerate(data, 1)]


def _read_csv(name: str, text: str, max_rows: int = 0) -> list[Located]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[Located] = []
    try:
        for n, row in enumerate(reader, 1):
            # reader.line_num is the line the row ends on; a quoted field may span lines.
            rows.append((f"row {n} (line {reader.line_num})", row))
            if max_rows and n >= max_rows:
                break
    except csv.Error as err:
        raise DataError(f"{name}: not valid CSV near line {reader.line_num} ({err})") from None
    return rows


def read_rows(path: str | Path, name: str | None = None, fmt: str | None = None, max_bytes: int = 0,
              max_rows: int = 0) -> list[Located]:
    """The raw rows of a JSON / JSON Lines / CSV file, each with where it is ("row 3 (line 5)").

    ``name`` is what messages call the file (default: its name); ``fmt`` its type (default: its
    suffix); ``max_bytes`` > 0 refuses a larger file before reading it. ``max_rows`` > 0 stops after
    that many rows (JSON is parsed whole; the byte limit bounds it). Errors: ``DataError``.
    """
    path = Path(path)
    name = name or path.name
    fmt = (fmt or path.suffix).lower()
    if fmt not in FILE_TYPES:
        raise DataError(f"{name}: unsupported file type {fmt or '(none)'!r}; use .json, .jsonl or .csv")
    text = _read_text(path, name, max_bytes)
    if not text.strip():
        raise DataError(f"{name}: the dataset is empty (the file holds no text)")
    if fmt == ".csv":
        return _read_csv(name, text, max_rows)
    rows = _read_jsonl(name, text) if fmt == ".jsonl" else _read_json(name, text)
    return rows[:max_rows] if max_rows else rows


_read_file = read_rows  # the former private name


class Records(list):
    """Normalised rows. ``skipped``: 1-based numbers of rows left out for an empty response;
    ``notes``: what else the reader did that the user should know (rows cut at the server's limit)."""

    skipped: list[int]
    notes: list[str]


def _columns_note(row: dict) -> str:
    names = [str(k) for k in row if k is not None]
    shown = ", ".join(repr(k) for k in names[:12]) + (", ..." if len(names) > 12 else "")
    return f"; its columns are {shown}" if names else ""


def _raw_rows(found: DataSource, max_bytes: int, max_rows: int) -> list[Located]:
    if found.kind != "hub":
        return read_rows(found.location, found.display_name, found.format, max_bytes, max_rows)
    try:
        _, rows = read_hub_dataset(found.location, ("train",), max_rows)
    except HubUnavailable as err:
        raise DataError(f"no such file {found.name!r}, and as a hub dataset: {err.reason}. Give a local "
                        f"JSON/JSONL/CSV file, or use the built-in set {BUILTIN_DATASET!r}.") from None
    return [(f"row {n}", row) for n, row in enumerate(rows, 1)]


def load_records(source: str, columns: dict[str, str] | None = None, limit: int = 0, *,
                 deployment: Deployment | None = None, display_name: str | None = None,
                 uploads_dir: str | Path | None = None) -> Records:
    """Load and normalise instruction data; raise ``DataError`` naming the file and row at fault.

    Rows with conversations (see ``core.chat_data``) become ``{"messages": [{role, content}]}``.

    ``source``: ``builtin:math`` (or a part of it by operations, ``builtin:math?ops=add,sub``), a ``.json`` (a list of objects, or JSON Lines), ``.jsonl`` or ``.csv``
    file, an upload, or a hub dataset id (its train split), as ``core.sources.resolve_data`` allows in
    this deployment. ``columns`` maps our names (instruction, input, output, answer) to the file's.
    ``limit`` keeps the first N usable rows (0 = all). ``display_name`` is what messages call the file
    (default: the file's name; an upload's original name when stored beside it). ``uploads_dir``:
    where uploads are kept, when not ``$WORKBENCH_HOME/uploads``.

    Rules, the same for every format:

    - a file larger than the deployment's ``upload_file_bytes`` is refused before it is read; binary,
      UTF-16 and empty files are refused; a UTF-8 BOM is accepted;
    - a row that is not an object, or whose instruction or output is absent or null (a mapped column
      missing from the row, or a null value) is an error naming the row, the column, and the row's
      columns; a row whose output is an empty string (some public sets have a few) is skipped and its
      number kept in ``.skipped``;
    - at most ``dataset_rows`` rows (the deployment's limit) are read: the rest are left out and
      ``.notes`` says so (truncated, not refused: a preview of a large file still works).
    """
    d = deployment or current()
    columns = dict(columns or {})
    try:
        found = resolve_data(source, d, uploads_dir=uploads_dir)
    except SourceError as err:
        raise DataError(err.message, err.field) from None
    name = display_name or found.display_name
    found = DataSource(found.kind, found.name, found.location, name, found.format)
    cap = int(d.limits.dataset_rows or 0)
    wanted = [n for n in (cap + 1 if cap else 0, limit) if n]  # rows worth reading (cap + 1: to know it cut)
    if found.kind == "builtin":  # read whole (a shipped file), then its ops filter (SourceError on data.source)
        try:
            raw = builtin_rows(found.name, _raw_rows(found, 0, 0))
        except SourceError as err:
            raise DataError(err.message, err.field) from None
    else:
        raw = _raw_rows(found, int(d.limits.upload_file_bytes or 0), min(wanted) if wanted else 0)
    records = Records()
    records.skipped, records.notes = [], []
    if cap and len(raw) > cap:
        raw = raw[:cap]
        records.notes.append(f"only the first {cap:,} rows of {name} were read (the server's limit per dataset)")
    _check_mapping(name, columns, raw)
    from .chat_data import chat_column, conversation_records  # it imports this module

    column = chat_column(columns, raw)
    if column is not None:
        chats = conversation_records(name, raw, column, limit)
        chats.notes = records.notes
        return chats
    for n, (where, row) in enumerate(raw, 1):
        if limit and len(records) >= limit:
            break
        if not isinstance(row, dict):
            raise DataError(f"{name}: {where} is not an object (got {_a('JSON ' + _json_type(row))})")
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
                    if key in row and value is None:
                        raise DataError(f"{name}: {where} has no {field!r}{_column(key, field)}: "
                                        "its value is null")
                    raise DataError(f"{name}: {where} has no {field!r}{_column(key, field)}"
                                    + (_columns_note(row) if key not in row else ""))
                value = ""
            if isinstance(value, (int, float)) and not isinstance(value, bool) and field in ("input", "answer"):
                value = str(value)
            if not isinstance(value, str):
                raise DataError(f"{name}: {where}: {field!r}{_column(key, field)} is {_a(_json_type(value))}, "
                                "not text")
            rec[field] = value
        if not rec["answer"]:
            del rec["answer"]
        records.append(rec)
    if not records:
        what = "has no usable rows (every response is empty)" if records.skipped else "is empty"
        raise DataError(f"{name}: the dataset {what}")
    return records


def _check_mapping(name: str, columns: dict[str, str], raw: list[Located]) -> None:
    """A column the mapping names must be in the file (in at least one row: JSON rows may differ)."""
    wanted = {key: field for field, key in columns.items() if key and key != field}
    if not wanted:
        return
    seen: dict[str, None] = {}
    for _, row in raw:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(str(k) for k in row if k is not None))
    for key, field in wanted.items():
        if key not in seen:
            shown = ", ".join(repr(k) for k in list(seen)[:12]) + (", ..." if len(seen) > 12 else "")
            raise DataError(f"{name}: the column {key!r} (mapped to {field!r}) is not in the file; "
                            f"its columns are {shown or 'none'}")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _column(key: str, field: str) -> str:
    return f" (column {key!r})" if key != field else ""


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
    if "messages" in records[0]:
        from .chat_data import tokenize_conversations

        check_template(records, template)
        try:
            return tokenize_conversations(records, tokenizer, cutoff_len, train_on_inputs)
        except ValueError as err:  # the template refuses a conversation
            raise DataError(str(err), field="data.template") from None
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


def check_template(records: list[dict], template: str) -> None:
    """Conversations need template ``chat``: ``DataError`` on ``data.template`` otherwise."""
    if records and "messages" in records[0] and template != "chat":
        raise DataError("the dataset holds conversations, which are rendered with a chat template: set "
                        "data.template to 'chat' (the model's own, or ChatML where it has none)",
                        field="data.template")


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


def preview_rows(records: list[dict], tokenizer: Any, template: str = "alpaca", n: int = 5, cutoff_len: int = 0,
                 train_on_inputs: bool = False) -> list[dict[str, str]]:
    """The first rows as the model will see them: rendered prompt and response.

    A conversation's ``prompt`` is the whole rendered conversation with the trained tokens marked
    (``core.chat_data.preview_conversations``; cut at ``cutoff_len`` > 0), its ``response`` a count."""
    if records and "messages" in records[0]:
        from .chat_data import preview_conversations

        check_template(records, template)
        try:
            return preview_conversations(records[:n], tokenizer, cutoff_len, train_on_inputs)
        except ValueError as err:
            raise DataError(str(err), field="data.template") from None
    return [{"prompt": render_prompt(r["instruction"], r.get("input", ""), template, tokenizer),
             "response": r["output"]} for r in records[:n]]


def prompt_lengths(examples: list[Example]) -> torch.Tensor:
    """Each row's number of prompt tokens (the tokens before the response), for ``core.inject.prompt_lengths``."""
    return torch.tensor([e.num_prompt_tokens for e in examples], dtype=torch.long)


def shard(examples: list[Example], rank: int, world: int) -> list[Example]:
    """Rank ``rank``'s share of a batch split across ``world`` processes: every ``world``-th example.

    Given a batch sorted by length, each rank gets rows of every length, still sorted: the same work
    and little padding on every rank, where cutting the batch into contiguous runs would give the last
    rank all the longest rows. One process: the batch itself.
    """
    return examples if world == 1 else examples[rank::world]


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
