"""Evaluation: the accuracy of a model on a benchmark, by batched greedy decoding.

``evaluate`` renders each example with the prompt template, decodes greedily in shrinking and
refilled batches (``core.decoding``), cuts each response by the stop rules, and scores it by the
LLM-Adapters answer rules (``core.benchmarks``). ``select_examples`` says which examples a limited
run uses (the first N, or a seeded sample), so every run of the same settings sees the same ones.

Public API: ``EvalResult``, ``select_examples``, ``evaluate``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .benchmarks import Benchmark, answer_text, extract_answer, is_correct, load_benchmark
from .config import EvalSettings
from .decoding import StopRule, batched_greedy, eos_ids, hf_generate, model_device
from .templates import render_prompt


@dataclass
class EvalResult:
    """One benchmark's score: accuracy over the finished examples, and each example's response."""

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
    eos = eos_ids(model, tokenizer)
    rule = StopRule(tokenizer, benchmark.answer_type, eos, int(settings.max_new_tokens))
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
                      "extracted": answer_text(extracted),
                      "correct": is_correct(benchmark.answer_type, response, ex["answer"])}
        n_tokens += len(tokens)
        if progress is not None:
            progress(len(samples), total)

    device = model_device(model)
    was_training = getattr(model, "training", False)
    stopped = False
    try:
        if saved_side is not None:
            tokenizer.padding_side = "left"
        if was_training:
            model.eval()
        with torch.inference_mode(), _autocast(device, dtype):
            if engine == "generate":
                _, stopped = hf_generate(model, tokenizer, prompts, int(settings.batch_size),
                                         int(settings.max_new_tokens), lambda i, t: rule(t), pad_id, eos,
                                         on_done, should_stop)
            elif engine == "loop":
                _, stopped = batched_greedy(model, tokenizer, prompts, int(settings.batch_size),
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
