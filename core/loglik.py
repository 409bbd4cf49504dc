"""Log-likelihood scoring: how probable a continuation is after a context, and multiple choice by it.

``loglikelihood`` is lm-evaluation-harness's contract: for each ``(context, continuation)`` the summed
log-probability of the continuation's tokens given the context, and whether greedy decoding would
have produced exactly those tokens. Tokenisation is lm-eval's HF model's (``encode_pair``): trailing
whitespace of the context moves to the continuation, context + continuation is encoded whole and
split where the context's own encoding ends; an empty context becomes the BOS (else EOS) token.

Requests that share a context (a question's choices) share its computation: the contexts of a batch
run once, left padded, filling a key/value cache; the cache rows are then repeated, one per
continuation, and the continuations (right padded) run on it. The other way to compute a context
once, packing a question's context and all its choices into one sequence with a block attention
mask, does the same per-token work but needs a custom 4D mask, which not every architecture takes
(BLOOM's ALiBi and the virtual-token and LoReFT adapters read a 2D mask); the cache works wherever
generation does. A token prefix every context of a batch starts with (the prompt template's
preamble) runs once for the whole batch, where no adapter of the model's own reads the first pass as
the prompt. The plain reference, one full forward pass per request, stays beside it behind
``shared=False`` (tests and the bench compare with it).

Adapters that act on prompt positions (LoReFT) see the context as the prompt: the context pass runs in
``core.inject.prompt_lengths`` with each row's context length, and the continuation pass reads the
cache, as a decoding step does, so the continuation is never intervened on, as in generation.

``score_choices`` scores each question's options as continuations: ``acc`` picks the highest summed
log-probability, ``acc_norm`` the highest divided by the option's length in characters (without the
leading delimiter), as lm-eval defines them.

Public API: ``encode_pair``, ``loglikelihood``, ``iter_loglikelihood``, ``ChoiceScores``, ``score_choices``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .decoding import _accepts, model_device
from .inject import VIRTUAL_SLOT, prompt_lengths

PAD_WASTE, PAD_SLACK = 1.25, 64  # continuation passes: see ``_length_chunks``
MIN_SHARED_PREFIX = 8  # tokens every context of a batch starts with, worth a pass of their own


@dataclass
class _Request:
    index: int
    context: tuple[int, ...]
    continuation: list[int]


def _prefix_token(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("an empty context needs a BOS or EOS token to condition on; the tokenizer has neither")


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval's HF model makes them (see the module docstring)."""
    if context == "":
        return [_prefix_token(tokenizer)], list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [_prefix_token(tokenizer)], list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    return list(ctx), list(whole[len(ctx):])


def _max_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encode(model: Any, tokenizer: Any, requests: list[tuple[str, str]], add_special_tokens: bool) -> list[_Request]:
    limit = _max_length(model)
    out = []
    for i, pair in enumerate(requests):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ValueError(f"request {i}: expected a (context, continuation) pair of texts")
        ctx, cont = encode_pair(tokenizer, pair[0], pair[1], add_special_tokens)
        if not cont:
            raise ValueError(f"request {i}: the continuation {pair[1]!r} has no tokens to score")
        if limit is not None and len(ctx) + len(cont) - 1 > limit:  # as lm-eval: keep the end, cut the start
            keep = limit - len(cont) + 1
            if keep < 1:
                raise ValueError(f"request {i}: the continuation has {len(cont)} tokens; the model reads at most "
                                 f"{limit}")
            ctx = ctx[-keep:]
        out.append(_Request(i, tuple(ctx), cont))
    return out


def _batches(requests: list[_Request], batch_size: int) -> Iterator[list[list[_Request]]]:
    """Requests grouped by context, longest first, as batches of whole groups of about ``batch_size``
    continuations (a group larger than that is a batch of its own)."""
    groups: dict[tuple[int, ...], list[_Request]] = {}
    for r in requests:
        groups.setdefault(r.context, []).append(r)
    ordered = sorted(groups.values(), key=lambda g: -(len(g[0].context) + max(len(r.continuation) for r in g)))
    batch: list[list[_Request]] = []
    rows = 0
    for group in ordered:
        if batch and rows + len(group) > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(group)
        rows += len(group)
    if batch:
        yield batch


def _length_chunks(lengths: list[int]) -> list[tuple[int, int]]:
    """Cut ``lengths`` (sorted ascending) into runs ``[start, end)`` that are padded to their longest
    without much waste: a run grows while its padded tokens stay within ``PAD_WASTE`` times its real
    ones (or ``PAD_SLACK`` tokens over them: tiny runs cost a pass's fixed overhead).

    Counted on PIQA (64 questions, batch 32, embedded model's tokenizer): the options run from 2 to 111
    tokens, so one right-padded pass per batch fed 4.0x the real tokens; these runs feed 1.2x.
    """
    chunks: list[tuple[int, int]] = []
    start, real = 0, 0
    for i, n in enumerate(lengths):
        padded, grown = n * (i - start + 1), real + n
        if i > start and padded > max(PAD_WASTE * grown, grown + PAD_SLACK):
            chunks.append((start, i))
            start, grown = i, n
        real = grown
    if lengths:
        chunks.append((start, len(lengths)))
    return chunks


class _Scorer:
    """The forward passes: shared contexts through a key/value cache, or one full pass per request."""

    def __init__(self, model: Any, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = model_device(model)
        self.pass_positions = _accepts(model, "position_ids")
        self.keep_logits = _accepts(model, "logits_to_keep")
        self.share_prefix = not hasattr(model, VIRTUAL_SLOT)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any = None,
                 last_only: bool = False) -> Any:
        kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        if self.pass_positions:
            kwargs["position_ids"] = positions
        if last_only and self.keep_logits:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)

    @staticmethod
    def _token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of ``targets`` under ``logits`` (..., vocab), and whether each is the argmax."""
        logits = logits.float()
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - logits.logsumexp(-1), logits.argmax(-1) == targets

    def _contexts(self, contexts: list[tuple[int, ...]]) -> tuple[Any, torch.Tensor]:
        """The contexts' forward pass: its output and the attention mask of the cache's columns.

        Without adapters of their own on the model (virtual tokens, LoReFT: they read the first pass of
        a sequence as its prompt), a token prefix every context starts with (the prompt template's
        preamble) runs once and its cache rows are repeated; the rest of each context follows, left
        padded after the prefix."""
        dev = self.device
        shared = 0
        if self.share_prefix and len(contexts) > 1:
            first, shortest = contexts[0], min(len(c) for c in contexts)
            while shared < shortest - 1 and all(c[shared] == first[shared] for c in contexts):
                shared += 1
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        width = max(len(c) for c in contexts) - shared
        ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, width - len(c) + shared:] = torch.tensor(c[shared:], dtype=torch.long)
            mask[i, width - len(c) + shared:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        cache = None
        if shared:
            prefix = torch.tensor([contexts[0][:shared]], dtype=torch.long, device=dev)
            cache = self._forward(prefix, torch.ones_like(prefix), torch.arange(shared, device=dev).unsqueeze(0),
                                  last_only=True).past_key_values
            cache.batch_select_indices(torch.zeros(len(contexts), dtype=torch.long, device=dev))
            positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([mask.new_ones(len(contexts), shared), mask], dim=1)
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with prompt_lengths(self.model, mask.sum(-1)):
            out = self._forward(ids, mask, positions, cache, last_only=True)
        return out, mask

    def shared(self, groups: list[list[_Request]]) -> list[tuple[int, float, bool]]:
        dev = self.device
        out, mask = self._contexts([g[0].context for g in groups])
        lengths = mask.sum(-1)
        rows = [(gi, r) for gi, g in enumerate(groups) for r in g]
        group_of = torch.tensor([gi for gi, _ in rows], device=dev)
        first = torch.tensor([r.continuation[0] for _, r in rows], device=dev)
        logp, greedy = self._token_scores(out.logits[:, -1, :][group_of], first)
        longer = sorted((k for k, (_, r) in enumerate(rows) if len(r.continuation) > 1),
                        key=lambda k: len(rows[k][1].continuation))
        chunks = _length_chunks([len(rows[k][1].continuation) - 1 for k in longer])
        for n, (start, end) in enumerate(chunks):
            part = longer[start:end]
            # the last chunk takes the contexts' cache itself, the others a copy
            cache = out.past_key_values if n == len(chunks) - 1 else copy.deepcopy(out.past_key_values)
            sel = group_of[part]
            cache.batch_select_indices(sel)  # one cache row per continuation
            span = len(rows[part[-1]][1].continuation) - 1
            feed = torch.full((len(part), span), self.pad_id, dtype=torch.long)
            target = torch.zeros((len(part), span), dtype=torch.long)
            valid = torch.zeros((len(part), span), dtype=torch.bool)
            for j, k in enumerate(part):
                cont = rows[k][1].continuation
                feed[j, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                target[j, :len(cont) - 1] = torch.tensor(cont[1:], dtype=torch.long)
                valid[j, :len(cont) - 1] = True
            feed, target, valid = feed.to(dev), target.to(dev), valid.to(dev)
            full_mask = torch.cat([mask[sel], valid.long()], dim=1)
            positions = lengths[sel].unsqueeze(1) + torch.arange(span, device=dev)
            tok_logp, tok_greedy = self._token_scores(self._forward(feed, full_mask, positions, cache).logits, target)
            at = torch.tensor(part, device=dev)
            logp = logp.index_add(0, at, (tok_logp * valid).sum(-1))
            greedy = greedy.index_put((at,), greedy[at] & (tok_greedy | ~valid).all(-1))
        return [(r.index, float(lp), bool(g)) for (_, r), lp, g in zip(rows, logp.tolist(), greedy.tolist())]

    def reference(self, groups: list[list[_Request]]) -> list[tuple[int, float, bool]]:
        results = []
        for r in (r for g in groups for r in g):
            seq = list(r.context) + r.continuation[:-1]
            ids = torch.tensor([seq], dtype=torch.long, device=self.device)
            mask = torch.ones_like(ids)
            with prompt_lengths(self.model, torch.tensor([len(r.context)], device=self.device)):
                out = self._forward(ids, mask, torch.arange(len(seq), device=self.device).unsqueeze(0))
            target = torch.tensor(r.continuation, device=self.device)
            logp, greedy = self._token_scores(out.logits[0, len(r.context) - 1:], target)
            results.append((r.index, float(logp.sum()), bool(greedy.all())))
        return results


@contextlib.contextmanager
def _scoring(model: Any) -> Iterator[None]:
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def iter_loglikelihood(model: Any, tokenizer: Any, requests: list[tuple[str, str]], batch_size: int, *,
                       add_special_tokens: bool = False, shared: bool = True
                       ) -> Iterator[list[tuple[int, float, bool]]]:
    """``loglikelihood``'s results batch by batch, as ``(request index, logprob, is greedy)`` lists (longest
    contexts first), so a caller can report progress and stop between batches."""
    encoded = _encode(model, tokenizer, requests, add_special_tokens)
    scorer = _Scorer(model, _pad_id(tokenizer))
    run = scorer.shared if shared else scorer.reference
    for batch in _batches(encoded, max(1, int(batch_size))):
        with _scoring(model):  # not across the yield: inference mode is the caller's thread's state
            scored = run(batch)
        yield scored


def loglikelihood(model: Any, tokenizer: Any, requests: list[tuple[str, str]], batch_size: int, *,
                  add_special_tokens: bool = False, shared: bool = True) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)``: the continuation's summed log-probability given the context,
    and whether it is the greedy continuation (lm-evaluation-harness's ``loglikelihood``).

    ``batch_size``: continuations scored together (a context's continuations always go together).
    ``add_special_tokens``: as lm-eval's ``add_bos_token`` (off by default, as there). ``shared=False``:
    the plain reference, one full forward pass per request. Run it under ``torch.autocast`` for bf16.
    """
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for batch in iter_loglikelihood(model, tokenizer, requests, batch_size,
                                    add_special_tokens=add_special_tokens, shared=shared):
        for index, logp, greedy in batch:
            results[index] = (logp, greedy)
    return results  # type: ignore[return-value]  # every request is in some batch


@dataclass
class ChoiceScores:
    """One question's options: each one's summed log-probability and length in characters."""

    scores: list[float]
    lengths: list[int]  # characters of each option, without the leading delimiter (acc_norm's divisor)
    greedy: list[bool] = field(default_factory=list)

    @property
    def acc(self) -> int:
        """The option with the highest summed log-probability (the first of equals, as numpy's argmax)."""
        return max(range(len(self.scores)), key=lambda i: (self.scores[i], -i))

    @property
    def acc_norm(self) -> int:
        """The option with the highest log-probability per character (lm-eval's ``acc_norm``)."""
        normed = [s / n for s, n in zip(self.scores, self.lengths)]
        return max(range(len(normed)), key=lambda i: (normed[i], -i))


def score_choices(model: Any, tokenizer: Any, questions: list[tuple[str, list[str]]], batch_size: int, *,
                  delimiter: str | None = None, add_special_tokens: bool = True, shared: bool = True,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> tuple[dict[int, ChoiceScores], bool]:
    """Each question's ``(context, options)`` scored: {question number: ChoiceScores}, and whether
    ``should_stop`` cut the run short (the dict then holds the questions finished).

    An option is scored as the continuation ``delimiter + option``; ``delimiter=None`` is lm-eval's
    ``" "`` after a context that does not end in whitespace and nothing after one that does (the
    prompt templates end in a newline). ``add_special_tokens``: as the prompt is tokenised for
    generation and training (False for a chat template, whose text holds them). ``progress(done,
    total)`` is called after each batch.
    """
    requests: list[tuple[str, str]] = []
    owner: list[tuple[int, int]] = []
    for q, (context, options) in enumerate(questions):
        if not options or any(not o for o in options):
            raise ValueError(f"question {q}: every option needs some text (got {options!r})")
        sep = delimiter if delimiter is not None else ("" if context[-1:].isspace() else " ")
        for k, option in enumerate(options):
            requests.append((context, sep + option))
            owner.append((q, k))
    sums: dict[int, list[float | None]] = {q: [None] * len(o) for q, (_, o) in enumerate(questions)}
    greedy: dict[int, list[bool]] = {q: [False] * len(o) for q, (_, o) in enumerate(questions)}
    left = {q: len(o) for q, (_, o) in enumerate(questions)}
    done: dict[int, ChoiceScores] = {}
    total = len(questions)
    if progress is not None:
        progress(0, total)
    for batch in iter_loglikelihood(model, tokenizer, requests, batch_size,
                                    add_special_tokens=add_special_tokens, shared=shared):
        for index, logp, is_greedy in batch:
            q, k = owner[index]
            sums[q][k], greedy[q][k] = logp, is_greedy
            left[q] -= 1
            if left[q] == 0:
                done[q] = ChoiceScores([float(s) for s in sums[q]], [len(o) for o in questions[q][1]], greedy[q])
        if progress is not None:
            progress(len(done), total)
        if should_stop is not None and should_stop() and len(done) < total:
            return done, True
    return done, False
