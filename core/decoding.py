"""Decoding for evaluation: when a row is done, and batched greedy decoding with a key/value cache.

``batched_greedy`` decodes many prompts at once: prompts sorted by length (longest first), left
padded; a row stops when ``stop(row, tokens)`` says so (``StopRule``: at EOS, at the template's next
``###`` marker, or once its answer is final: number / letter, a completed sentence "The answer is
..."; choice types, the first match, which the extraction rule can no longer change); finished rows
leave the batch at once and, when the cache allows it, new prompts take their places.

The cache is transformers' ``DynamicCache`` with its plain layers swapped for ``core.decode_cache``'s
``SlotLayer`` (preallocated buffers written in place: finished rows are replaced by others, unused
columns dropped by moving a view, new prompts joined right-aligned), so prompts are prefilled in
chunks of similar length and joined into one batch. Caches with other layers (sliding window,
quantised) shrink with ``batch_select_indices`` and are not refilled. ``hf_generate`` is the same
contract through ``model.generate`` (the plain Hugging Face path, ``evaluate(engine="generate")``, and
for models our loop cannot drive); ``reference_generate`` is the LLM-Adapters protocol (one prompt at a
time, beam search with 4 beams) for speed and agreement comparisons.

Public API: ``StopRule``, ``eos_ids``, ``model_device``, ``batched_greedy``, ``hf_generate``,
``reference_generate``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import decode_cache
from .benchmarks import CHOICE_PATTERNS

# --------------------------------------------------------------------------------------------------
# When a row is done.

STOP_MARKERS = ("###", "Below is an instruction", "<|im_end|>")  # the last: ChatML where it is not a special token
_SENTENCE_END = r"(?:[.!?](?=\s)|\n)"
# The answer is final: a completed sentence "The answer is ... <number>" / "... <letter A-E>".
_FINAL = {
    "number": re.compile(r"[Tt]he answer is[^\n]*?\d[^\n]*?" + _SENTENCE_END),
    "letter": re.compile(r"[Tt]he answer is[^\n]*?[A-E][^\n]*?" + _SENTENCE_END),
}
_WINDOW = 48  # tokens decoded from the end of a row to check its stop rules


class StopRule:
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


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
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


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):  # pragma: no cover
        return torch.device("cpu")


# Padded prompt tokens per prefill. Prompts of a batch are prefilled in chunks of similar length (they
# are sorted), each padded only to its own longest, then joined into one decoding batch: on AddSub's
# 64 prompts (53-134 tokens) 5,080 padded tokens instead of 8,576. On a CPU a matmul over ~1,000
# rows runs at full speed already; an accelerator gets larger chunks.
_PREFILL_TOKENS: dict[str | None, int] = {"cpu": 1024, None: 8192}

# Prompt lookup decoding (speculative decoding whose drafts come from the row's own tokens, no draft
# model): a row's next tokens are guessed as those that followed the latest earlier occurrence of its
# last 3 (else 2) tokens in its prompt or its answer so far; one pass feeds the row's token and its
# draft, and keeps the draft up to the first token greedy decoding would not have chosen, plus
# greedy's own next token. The answers are greedy's: only the number of passes changes. It pays where
# a pass costs about the same for a few tokens as for one: on a CPU, at most ``_DRAFT_TOKENS`` tokens
# a pass (measured on the embedded model, 200 cached columns: 1 row x 8 tokens 45 ms against 41 ms
# for 1 token, 4 rows x 8 tokens 72 ms against 48 ms; 32 rows x 2 tokens already 0.9-1.2x), so it
# drafts for the long-running rows at the end of a batch, where decoding is slowest per token.
_DRAFT_TOKENS: dict[str | None, int] = {"cpu": 32, None: 512}
_MAX_DRAFT = 4
_NGRAMS = (3, 2)


class _Lookup:
    """Drafts for prompt lookup decoding, with an index per row of where each of its 2- and 3-grams
    last ended (kept up to date as the row grows)."""

    def __init__(self) -> None:
        self.index: dict[int, tuple[list[int], dict[tuple[int, ...], int]]] = {}

    def draft(self, row: int, tokens: list[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the end of ``tokens``."""
        done, index = self.index.setdefault(row, ([0], {}))
        for p in range(done[0], len(tokens) - 1):  # n-grams ending before the last token
            for n in _NGRAMS:
                if p + 1 >= n:
                    index[tuple(tokens[p + 1 - n:p + 1])] = p
        done[0] = max(done[0], len(tokens) - 1)
        for n in _NGRAMS:
            p = index.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if p is not None:
                return tokens[p + 1:p + 1 + limit]
        return []


@dataclass
class _Group:
    """Rows decoding together: their cache, attention mask and per-row bookkeeping."""

    cache: Any
    mask: torch.Tensor  # (rows, columns): 1 for real tokens; the cache has ``extra`` columns more in front
    lengths: torch.Tensor  # real tokens per row in the cache (the next position id)
    last: torch.Tensor  # the token each row feeds next
    rows: list[int]  # example numbers
    extra: int  # virtual-token columns the cache holds before the mask's columns (prefix / prompt tuning)
    plain: bool  # the cache is made of ``SlotLayer``s: compacted, trimmed and joined in place


class _Decoder:
    """Greedy decoding of many prompts with a shared, shrinking and refilled batch."""

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, device: torch.device, batch_size: int,
                 refill_fraction: float = 0.25, slots: bool = True):
        self.model, self.tokenizer, self.pad_id, self.device = model, tokenizer, pad_id, device
        self.batch_size = max(1, int(batch_size))
        self.refill_at = max(1, int(round(self.batch_size * refill_fraction)))
        self.pass_positions = _accepts(model, "position_ids")
        self.keep_logits = _accepts(model, "logits_to_keep")
        self.config = getattr(model, "config", None)
        self.slots = slots
        self.joinable = slots and decode_cache.slot_layers(self._new_cache(), filled=False) is not None
        self.draft_tokens = _DRAFT_TOKENS.get(device.type, _DRAFT_TOKENS[None]) if self.pass_positions else 0

    def draft_room(self, g: _Group) -> int:
        """How many draft tokens a row of ``g`` may feed in its next pass (0: no drafting). Slot caches
        only: rejected drafts are dropped by moving the cache's end."""
        if not g.plain or decode_cache.slot_layers(g.cache) is None:
            return 0
        return min(_MAX_DRAFT, self.draft_tokens // len(g.rows) - 1)

    def chunk_rows(self, longest: list[int]) -> int:
        """How many prompts one prefill takes, the longest of them ``longest``: about ``_PREFILL_TOKENS``
        padded tokens when the cache can take more rows later (slot caches), else no limit."""
        if not self.joinable:
            return self.batch_size
        return max(1, _PREFILL_TOKENS.get(self.device.type, _PREFILL_TOKENS[None]) // max(1, len(longest)))

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.config) if self.config is not None else DynamicCache()
        except Exception:  # pragma: no cover - exotic configs
            cache = DynamicCache()
        return decode_cache.use_slot_layers(cache) if self.slots else cache

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any):
        kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        if self.pass_positions:
            kwargs["position_ids"] = positions
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return out.logits[:, -1, :].argmax(-1), out.past_key_values

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> tuple[_Group, list[list[int]]]:
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
                       extra=max(0, extra), plain=decode_cache.slot_layers(cache) is not None and extra >= 0)
        return group, [[t] for t in nxt.tolist()]

    def step(self, g: _Group, drafts: list[list[int]] | None = None) -> list[list[int]]:
        """One pass: each row's next token, or with ``drafts`` (one list per row, possibly empty) its
        accepted draft tokens and the token greedy decoding takes after them."""
        if not drafts or not any(drafts):
            g.mask = torch.cat([g.mask, g.mask.new_ones(g.mask.shape[0], 1)], dim=1)
            nxt, g.cache = self._forward(g.last.unsqueeze(1), g.mask, g.lengths.unsqueeze(1), g.cache)
            g.lengths = g.lengths + 1
            g.last = nxt
            return [[t] for t in nxt.tolist()]
        rows, width = len(drafts), 1 + max(len(d) for d in drafts)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        fed = torch.zeros((rows, width), dtype=g.mask.dtype)
        ids[:, 0], fed[:, 0] = g.last.cpu(), 1
        for i, d in enumerate(drafts):
            ids[i, 1:1 + len(d)] = torch.tensor(d, dtype=torch.long)
            fed[i, 1:1 + len(d)] = 1
        start = g.mask.shape[1]
        g.mask = torch.cat([g.mask, fed.to(g.mask.device)], dim=1)
        kwargs: dict[str, Any] = dict(input_ids=ids.to(self.device), attention_mask=g.mask, past_key_values=g.cache,
                                      use_cache=True, position_ids=g.lengths.unsqueeze(1) + torch.arange(
                                          width, device=g.lengths.device))
        if self.keep_logits:
            kwargs["logits_to_keep"] = width
        out = self.model(**kwargs)
        g.cache = out.past_key_values
        chosen = out.logits[:, -width:, :].argmax(-1).tolist()
        emitted, accepted = [], []
        for d, greedy in zip(drafts, chosen):
            a = 0
            while a < len(d) and d[a] == greedy[a]:
                a += 1
            emitted.append(d[:a] + [greedy[a]])
            accepted.append(a)
        # columns past every row's accepted tokens go; a row's own rejected ones are masked
        drop = width - 1 - max(accepted)
        for layer in decode_cache.slot_layers(g.cache) or []:
            layer.end -= drop
            layer.view()
        g.mask = g.mask[:, :g.mask.shape[1] - drop].clone()
        for i, a in enumerate(accepted):
            g.mask[i, start + 1 + a:] = 0
        g.lengths = g.lengths + torch.tensor(accepted, device=g.lengths.device) + 1
        g.last = torch.tensor([e[-1] for e in emitted], dtype=torch.long, device=g.last.device)
        return emitted

    def keep(self, g: _Group, keep: list[int]) -> None:
        """Keep only rows ``keep`` (positions in the group); drop time columns no row needs any more.

        A slot cache moves rows from the end into the finished rows' slots, so the group's rows are
        reordered the same way; other caches keep ``keep``'s order.
        """
        layers = decode_cache.slot_layers(g.cache) if g.plain else None
        if layers is None:
            idx = torch.tensor(keep, dtype=torch.long, device=g.mask.device)
            g.cache.batch_select_indices(idx)
            order = keep
        else:
            order = decode_cache.compact(layers, keep)
        idx = torch.tensor(order, dtype=torch.long, device=g.mask.device)
        g.mask, g.lengths, g.last = g.mask[idx], g.lengths[idx], g.last[idx]
        g.rows = [g.rows[i] for i in order]
        if layers is not None:
            used = g.mask.any(0).nonzero()
            unused = min(int(used[0]) if used.numel() else 0, g.mask.shape[1] - 1)
            g.mask = g.mask[:, decode_cache.trim(layers, unused, g.extra):]

    @staticmethod
    def can_merge(a: _Group, b: _Group) -> bool:
        if not (a.plain and b.plain and a.extra == b.extra):
            return False
        la, lb = decode_cache.slot_layers(a.cache), decode_cache.slot_layers(b.cache)
        return la is not None and lb is not None and len(la) == len(lb)

    @staticmethod
    def merge(a: _Group, b: _Group) -> _Group:
        """``b``'s rows join ``a``'s cache, right-aligned: the narrower left-padded in its mask."""
        ta, tb = a.mask.shape[1], b.mask.shape[1]
        grow = decode_cache.join(decode_cache.slot_layers(a.cache), decode_cache.slot_layers(b.cache),
                                 a.extra, ta, tb)
        width = ta + grow
        a.mask = torch.cat([torch.nn.functional.pad(a.mask, (width - ta, 0)),
                            torch.nn.functional.pad(b.mask, (width - tb, 0))])
        a.lengths = torch.cat([a.lengths, b.lengths])
        a.last = torch.cat([a.last, b.last])
        a.rows = a.rows + b.rows
        return a


def batched_greedy(model: Any, tokenizer: Any, prompts: list[list[int]], batch_size: int,
                   stop: Callable[[int, list[int]], str | None], pad_id: int,
                   on_done: Callable[[int, list[int], str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, refill: bool = True,
                   refill_fraction: float = 0.25, lookup: bool = True) -> tuple[dict[int, tuple[list[int], str]], bool]:
    """Greedy continuations of ``prompts`` (token ids): {prompt number: (generated ids, stop reason)}.

    ``stop(i, tokens)`` says when row ``i`` is done. Prompts run longest first; a finished row leaves
    the batch at once; with ``refill``, pending prompts join when a quarter of the batch is free;
    with ``lookup``, rows of a small batch feed prompt lookup drafts (the same tokens in fewer passes).
    Returns the results and whether ``should_stop`` cut the run short.
    """
    dec = _Decoder(model, tokenizer, pad_id, model_device(model), batch_size, refill_fraction)
    drafter = _Lookup() if lookup else None
    pending = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    pending.reverse()  # pop() from the end takes the longest first
    generated: dict[int, list[int]] = {}
    results: dict[int, tuple[list[int], str]] = {}
    group: _Group | None = None

    def advance(g: _Group, tokens: list[list[int]]) -> _Group | None:
        keep = []
        for pos, (row, new) in enumerate(zip(g.rows, tokens)):
            seq = generated.setdefault(row, [])
            reason = None
            for tok in new:  # a row may stop within its accepted draft: greedy would have stopped there
                seq.append(tok)
                reason = stop(row, seq)
                if reason is not None:
                    break
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
            take = [pending.pop() for _ in range(min(free, len(pending), dec.chunk_rows(prompts[pending[-1]])))]
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
        room = dec.draft_room(group) if drafter is not None else 0
        drafts = [drafter.draft(r, prompts[r] + generated[r], room) for r in group.rows] if room > 0 else None
        group = advance(group, dec.step(group, drafts))
    return results, False


def hf_generate(model: Any, tokenizer: Any, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                stop: Callable[[int, list[int]], str | None], pad_id: int, eos_ids: set[int],
                on_done: Callable[[int, list[int], str], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> tuple[dict[int, tuple[list[int], str]], bool]:
    """The same contract as ``batched_greedy`` through ``model.generate`` (for models our loop cannot drive)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = model_device(model)
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
# The LLM-Adapters protocol.

def reference_generate(model: Any, tokenizer: Any, prompt: str, num_beams: int = 4, max_new_tokens: int = 256) -> str:
    """One response by the LLM-Adapters protocol: this prompt alone, beam search (4 beams), no sampling.

    As in LLM-Adapters' ``evaluate.py``, the response is the text after ``### Response:`` up to a
    following ``### Response:``, stripped.
    """
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    device = model_device(model)
    inputs = tokenizer(prompt, return_tensors="pt")
    ids = inputs["input_ids"].to(device)
    mask = inputs.get("attention_mask")
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=None if mask is None else mask.to(device),
                             num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split("### Response:")[0].strip()
