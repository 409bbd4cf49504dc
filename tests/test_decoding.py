"""The slot key/value cache, the chunked prefill and prompt lookup of ``core.decoding``: same tokens as greedy
``generate``."""

from __future__ import annotations

import pytest
import torch

from core import decode_cache, decoding
from core.templates import render_prompt
from tests.test_evaluate import MATH, assert_greedy_like_generate, tiny_llama, tok, with_random_adapter  # noqa: F401  (tok: the module's tokenizer fixture)


def filled(rows: int, heads: int, columns: int, seed: int) -> tuple[list[decode_cache.SlotLayer], list[torch.Tensor]]:
    """Two slot layers holding random keys/values; the plain tensors they must show."""
    torch.manual_seed(seed)
    layers, plain = [], []
    for _ in range(2):
        layer = decode_cache.SlotLayer()
        k, v = torch.randn(rows, heads, columns, 4), torch.randn(rows, heads, columns, 4)
        layer.update(k, v)
        layers.append(layer)
        plain.append(torch.stack([k, v]))
    return layers, plain


def shown(layer: decode_cache.SlotLayer) -> torch.Tensor:
    return torch.stack([layer.keys, layer.values])


def test_slot_layer_appends_in_place_and_grows_past_its_room():
    layer = decode_cache.SlotLayer()
    k = torch.randn(3, 2, 5, 4)
    layer.update(k, -k)
    buffer = layer.kbuf
    steps = [torch.randn(3, 2, 1, 4) for _ in range(decode_cache._ROOM + 3)]
    layer.update(steps[0], -steps[0])
    assert layer.kbuf is buffer  # written in place
    for s in steps[1:]:
        layer.update(s, -s)
    assert layer.kbuf is not buffer and layer.get_seq_length() == 5 + len(steps)
    assert torch.equal(layer.keys, torch.cat([k, *steps], dim=2)) and torch.equal(layer.values, -layer.keys)
    with pytest.raises(ValueError, match="2 rows for a cache of 3"):
        layer.update(k[:2], k[:2])


def test_compact_moves_only_rows_from_the_end_into_finished_slots():
    layers, plain = filled(6, 2, 7, seed=0)
    keep = [0, 2, 4, 5]
    order = decode_cache.compact(layers, keep)
    assert sorted(order) == keep and order[0] == 0 and order[2] == 2  # rows already in place stay
    for layer, want in zip(layers, plain):
        assert torch.equal(shown(layer), want[:, order])


def test_trim_drops_columns_without_a_copy_but_keeps_virtual_ones():
    layers, plain = filled(2, 2, 9, seed=1)
    buffer = layers[0].kbuf
    assert decode_cache.trim(layers, 3, extra=0) == 3
    assert layers[0].kbuf is buffer and torch.equal(shown(layers[0]), plain[0][:, :, :, 3:])
    assert decode_cache.trim(layers, 2, extra=1) == 0 and layers[0].get_seq_length() == 6


@pytest.mark.parametrize("extra", [0, 2])
@pytest.mark.parametrize("wider", [False, True])
def test_join_right_aligns_new_rows_after_virtual_columns(extra, wider):
    """Old rows keep their columns; new rows: their virtual columns first, real ones ending at the end."""
    old_width, new_width = (4, 6) if wider else (6, 4)
    layers, plain = filled(3, 2, extra + old_width, seed=2)
    decode_cache.trim(layers, 0, extra)
    new, new_plain = filled(2, 2, extra + new_width, seed=3)
    grow = decode_cache.join(layers, new, extra, old_width, new_width)
    width = max(old_width, new_width)
    assert grow == width - old_width
    for layer, old, fresh in zip(layers, plain, new_plain):
        got = shown(layer)
        assert got.shape[1:3] == (5, 2) and got.shape[3] == extra + width
        assert torch.equal(got[:, :3, :, :extra], old[:, :, :, :extra])
        assert torch.equal(got[:, :3, :, extra + grow:], old[:, :, :, extra:])
        assert torch.equal(got[:, 3:, :, :extra], fresh[:, :, :, :extra])
        assert torch.equal(got[:, 3:, :, extra + width - new_width:], fresh[:, :, :, extra:])
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("method", [None, "prefix", "prompt", "lora"])
@pytest.mark.parametrize("budget", [30, 100])
def test_chunked_prefill_refill_and_joins_match_generate(tok, monkeypatch, method, budget):
    """Prompts prefilled a few at a time, joined, trimmed and refilled: each row equals greedy ``generate``."""
    monkeypatch.setattr(decoding, "_PREFILL_TOKENS", {"cpu": budget, None: budget})
    model = with_random_adapter(tiny_llama(tok, seed=4), tok, method)
    questions = [q for q, _ in MATH] + ["Why?", "What is the sum of all the numbers from one to ten, step by step?",
                                        "Name three colours.", "Add 2 and 2, then double it, then add 7 to that."]
    prompts = [tok(render_prompt(q))["input_ids"] for q in questions]
    budget_tokens = [2 + (7 * i) % 13 for i in range(len(prompts))]
    sizes = []
    prefill = decoding._Decoder.prefill

    def counting(self, rows, all_prompts):
        sizes.append(len(rows))
        return prefill(self, rows, all_prompts)

    monkeypatch.setattr(decoding._Decoder, "prefill", counting)

    assert_greedy_like_generate(model, tok, prompts, budget_tokens, batch_size=5)
    assert sum(sizes) == len(prompts)
    assert max(sizes) <= max(1, budget // min(len(p) for p in prompts))  # chunks of about ``budget`` padded tokens


def test_a_chatml_end_of_turn_in_plain_text_ends_the_row():
    """A base model evaluated with the ChatML default has no <|im_end|> token: the text marker stops it."""
    from core.decoding import StopRule
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tok("The answer is 4<|im_end|>\n<|im_start|>user", add_special_tokens=False)["input_ids"]
    rule = StopRule(tok, None, set(), 256)
    assert rule(ids) == "marker"
    assert rule.text(ids, "marker") == "The answer is 4"


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = decoding._Lookup()
    assert lookup.draft(0, [5], 4) == []  # nothing seen before
    assert lookup.draft(0, [1, 2, 3, 4, 1, 2], 4) == [3, 4, 1, 2]  # (1, 2) ended at position 1
    assert lookup.draft(0, [1, 2, 3, 4, 1, 2], 2) == [3, 4]
    assert lookup.draft(0, [1, 2, 3, 4, 1, 2, 9, 1, 2], 4) == [9, 1, 2]  # the latest (1, 2), incrementally indexed
    assert lookup.draft(1, [7, 8, 9, 1, 8, 9, 2, 7, 8, 9], 3) == [1, 8, 9]  # (7, 8, 9) beats the later (8, 9)


@pytest.mark.parametrize("method", [None, "prefix"])
def test_prompt_lookup_gives_greedys_tokens_in_fewer_passes(monkeypatch, method):
    """Long answers of a rambling random model (it repeats itself: drafts are accepted), rows stopping
    within an accepted draft, rows of one batch accepting different lengths: greedy's tokens, exactly."""
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()  # a small vocabulary: the random model repeats itself
    model = with_random_adapter(tiny_llama(tok, seed=7), tok, method)
    prompts = [tok(render_prompt(q))["input_ids"] for q, _ in MATH] + [tok(render_prompt("Why?"))["input_ids"]]
    budget = [40 + 7 * i for i in range(len(prompts))]
    eos = tok.eos_token_id

    def stop(i, seq):
        return "eos" if seq[-1] == eos else ("length" if len(seq) >= budget[i] else None)

    passes = {True: [], False: []}
    step = decoding._Decoder.step
    for lookup in (True, False):
        def counting(self, g, drafts=None, lookup=lookup):
            passes[lookup].append(sum(map(len, drafts)) if drafts else 0)
            return step(self, g, drafts)

        monkeypatch.setattr(decoding._Decoder, "step", counting)
        with torch.inference_mode():
            got, _ = decoding.batched_greedy(model, tok, prompts, 3, stop, tok.pad_token_id, lookup=lookup)
        passes[lookup].append(got)
    with_lookup, without = passes[True].pop(), passes[False].pop()
    assert with_lookup == without
    assert any(passes[True]) and not any(passes[False])
    assert len(passes[True]) < 0.8 * len(passes[False])  # drafts were accepted
    assert_greedy_like_generate(model, tok, prompts, budget, batch_size=3)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox", "gptj", "bloom"])
def test_prompt_lookup_keeps_greedy_on_every_architecture(arch):
    from tests.test_loglik import tiny_lm
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_lm(arch, tok, seed=3)
    prompts = [tok(render_prompt(q))["input_ids"] for q, _ in MATH]
    eos = tok.eos_token_id

    def stop(i, seq):
        return "eos" if seq[-1] == eos else ("length" if len(seq) >= 30 + 5 * i else None)

    with torch.inference_mode():
        runs = [decoding.batched_greedy(model, tok, prompts, 2, stop, tok.pad_token_id, lookup=lookup)[0]
                for lookup in (True, False)]
    assert runs[0] == runs[1]
