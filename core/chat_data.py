"""Chat-format training data: conversations read, checked, rendered with the chat template, and masked.

Two layouts are read, from JSON, JSON Lines or a hub dataset:

- OpenAI-style ``messages``: ``[{"role": "system" | "user" | "assistant", "content": "..."}]``;
- LLaMA-Factory's ``sharegpt``: ``conversations``: ``[{"from": "system" | "human" | "gpt", "value": "..."}]``
  (a row-level ``system`` text is taken as a first system turn).

A dataset is chat-format when ``data.columns`` maps ``messages`` to one of its columns, or when its first
row has a ``messages`` or ``conversations`` column. Rows are normalised to ``{"messages": [{role,
content}]}`` with the roles system/user/assistant: an optional system turn first, then user and assistant
turns alternating, beginning with the user, with at least one assistant turn.

Rendering is the model's chat template, or ChatML where it has none (``core.templates.render_chat``).
The loss is taken on every assistant turn: each turn's span is found by rendering the conversation up to
it (the prefix, ending in the generation prompt) and through it, and the text is tokenised segment by
segment at those boundaries, so an assistant span's tokens are exactly the ones generated after that
prefix in chat (a tokeniser cannot merge across the boundary). A span runs to the end of its rendered
turn, so the end-of-turn marker is learned too. Rows longer than ``cutoff_len`` lose whole trailing turns;
a row whose first assistant turn does not fit is dropped and counted. Rendering stops at the cut-off, so
the work per row is bounded by ``cutoff_len`` whatever the row holds (an upload is untrusted input).
"""

from __future__ import annotations

from typing import Any

from .data import DataError, Example, Located, Records, TokenizedData, _a, _json_type
from .templates import render_chat

CHAT_COLUMNS = ("messages", "conversations")  # looked for in the first row, in this order
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
TRAIN_OPEN, TRAIN_CLOSE = "⟦", "⟧"  # the preview's marks around the tokens the loss is taken on


def chat_column(columns: dict[str, str], raw: list[Located]) -> str | None:
    """The column holding conversations, or None for instruction data.

    ``columns["messages"]`` names it; else the first row's ``messages`` or ``conversations`` column.
    Mapping ``messages`` together with instruction/output is refused (one dataset, one format).
    """
    mapped = columns.get("messages")
    if mapped:
        both = [f for f in ("instruction", "input", "output") if columns.get(f)]
        if both:
            raise DataError(f"data.columns maps 'messages' (conversations) and {both[0]!r} (instructions); "
                            "a dataset is one or the other", field="data.columns")
        return mapped
    first = next((row for _, row in raw if isinstance(row, dict)), None)
    if first is None or any(columns.get(f) for f in ("instruction", "output")):
        return None
    return next((c for c in CHAT_COLUMNS if c in first), None)


def conversation_records(name: str, raw: list[Located], column: str, limit: int = 0) -> Records:
    """Rows as ``{"messages": [{role, content}]}``, checked; ``DataError`` naming the file, row and turn."""
    records = Records()
    records.skipped, records.notes = [], []
    for where, row in raw:
        if limit and len(records) >= limit:
            break
        if not isinstance(row, dict):
            raise DataError(f"{name}: {where} is not an object (got {_a('JSON ' + _json_type(row))})")
        records.append({"messages": _conversation(name, where, row, column)})
    if not records:
        raise DataError(f"{name}: the dataset is empty")
    return records


def _conversation(name: str, where: str, row: dict, column: str) -> list[dict[str, str]]:
    turns = row.get(column)
    at = f"{name}: {where}"
    if column not in row:
        raise DataError(f"{at} has no {column!r} column (the dataset is chat-format: each row holds a "
                        "conversation)")
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else _a(_json_type(turns))
        raise DataError(f"{at}: {column!r} must be a non-empty list of turns (got {got})")
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():  # sharegpt's row-level system prompt
        messages.append({"role": "system", "content": system})
    for k, turn in enumerate(turns, 1):
        messages.append(_turn(f"{at}, turn {k}", turn))
    _check_order(at, messages, offset=len(messages) - len(turns))
    return messages


def _turn(at: str, turn: Any) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise DataError(f"{at} is {_a(_json_type(turn))}, not an object with a role and its text")
    role_key = "role" if "role" in turn else "from"
    text_key = "content" if "content" in turn else "value"
    role, text = turn.get(role_key), turn.get(text_key)
    if not isinstance(role, str) or role not in ROLES:
        shown = repr(role)[:40] if role is not None else "no role ('role' or 'from')"
        raise DataError(f"{at} has the role {shown}; a role is one of system, user, assistant (messages) or "
                        "system, human, gpt (sharegpt)")
    if text is None or (isinstance(text, str) and not text.strip()):
        raise DataError(f"{at} ({role}) is empty")
    if not isinstance(text, str):
        raise DataError(f"{at} ({role}): {text_key!r} is {_a(_json_type(text))}, not text")
    return {"role": ROLES[role], "content": text}


def _check_order(at: str, messages: list[dict[str, str]], offset: int) -> None:
    """An optional system turn first, then user and assistant alternating from the user; an assistant turn.
    ``offset``: the turns added before the row's own (its row-level system prompt), left out of turn numbers."""
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"{at}: the turns do not alternate (turn {i + 1 - offset} is {m['role']}; expected "
                            f"{expected}): after an optional system turn, user and assistant turns take turns, "
                            "starting with the user")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{at} has no assistant turn, so nothing to learn from")


def _parts(messages: list[dict[str, str]], tokenizer: Any, cutoff_len: int) -> list[tuple[list[int], bool, str]]:
    """The rendered conversation as (token ids, trained, text) pieces, cut at each assistant span.

    Each assistant turn's span starts where the conversation before it, rendered with the generation
    prompt, ends, and ends where the conversation through it does; each render must extend the one
    before (checked). Rendering stops after the first piece that passes ``cutoff_len`` (later turns
    would be cut off anyway, so a huge conversation costs no more than its first ``cutoff_len``
    tokens), and after the last assistant turn (later turns carry no loss).
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    pieces: list[tuple[list[int], bool, str]] = []
    done, size = "", 0  # the text rendered so far; its tokens
    for i in range(1, last + 1):
        if messages[i]["role"] != "assistant":
            continue
        start = render_chat(messages[:i], tokenizer, add_generation_prompt=True)
        end = render_chat(messages[:i + 1], tokenizer)
        if not (start.startswith(done) and end.startswith(start)):
            raise ValueError("the model's chat template renders earlier turns differently once later ones "
                             "follow, so the assistant spans cannot be found; use another model or template")
        for text, trained in ((start[len(done):], False), (end[len(start):], True)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            pieces.append((list(ids), trained, text))
            size += len(ids)
            if size > cutoff_len:
                return pieces
        done = end
    return pieces


def tokenize_conversations(records: list[dict], tokenizer: Any, cutoff_len: int = 256,
                           train_on_inputs: bool = False) -> TokenizedData:
    """Conversations rendered and tokenised; labels -100 outside the assistant spans (unless
    ``train_on_inputs``). A row longer than ``cutoff_len`` keeps the turns through its last assistant
    turn that fits (counted in ``num_truncated``); one whose first assistant turn does not fit is
    dropped (counted in both). ``ValueError`` when the chat template cannot render a row."""
    examples, truncated, dropped = [], 0, 0
    for rec in records:
        example, cut, _ = _example(_parts(rec["messages"], tokenizer, cutoff_len), cutoff_len, train_on_inputs)
        truncated += cut
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return TokenizedData(examples=examples, num_truncated=truncated, num_dropped=dropped)


def _example(parts: list[tuple[list[int], bool, str]], cutoff_len: int,
             train_on_inputs: bool) -> tuple[Example | None, bool, int]:
    """(the example, or None when no assistant turn fits; whether it was cut; assistant turns kept)."""
    ids: list[int] = []
    labels: list[int] = []
    kept, turns, n_prompt = 0, 0, None  # tokens and assistant turns through the last span that fits
    for part, trained, _ in parts:
        if trained and n_prompt is None:
            n_prompt = len(ids)
        ids += part
        labels += part if trained or train_on_inputs else [-100] * len(part)
        if trained and len(ids) <= cutoff_len:
            kept, turns = len(ids), turns + 1
    cut = len(ids) > cutoff_len
    if not kept:
        return None, cut, 0
    return Example(input_ids=ids[:kept], labels=labels[:kept], num_prompt_tokens=n_prompt or 0), cut, turns


def preview_conversations(records: list[dict], tokenizer: Any, cutoff_len: int = 0,
                          train_on_inputs: bool = False) -> list[dict[str, str]]:
    """Each conversation as the model sees it, the trained tokens between ⟦ and ⟧ (decoded from the
    tokenised example, so a cut at ``cutoff_len`` shows); ``response`` says how much is trained."""
    out = []
    for rec in records:
        limit = cutoff_len or 10**9
        parts = _parts(rec["messages"], tokenizer, limit)
        ex, cut, kept = _example(parts, limit, train_on_inputs)
        turns = sum(1 for m in rec["messages"] if m["role"] == "assistant")
        if ex is None:
            out.append({"prompt": "".join(text for _, _, text in parts) + "…",
                        "response": f"dropped: its first assistant turn does not fit in {cutoff_len} tokens"})
            continue
        text, run, trained = [], [], False
        for token, label in zip(ex.input_ids, ex.labels):
            if (label != -100) != trained and run:
                text.append(_marked(tokenizer.decode(run), trained))
                run = []
            trained = label != -100
            run.append(token)
        text.append(_marked(tokenizer.decode(run), trained))
        count = f"{kept} of {turns}" if kept < turns else f"{turns}"
        out.append({"prompt": "".join(text),
                    "response": f"{count} assistant turn{'s' if turns > 1 else ''} trained, "
                                f"{sum(x != -100 for x in ex.labels)} tokens"
                                + (" (cut at a turn boundary)" if cut else "")})
    return out


def _marked(text: str, trained: bool) -> str:
    return f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained else text
