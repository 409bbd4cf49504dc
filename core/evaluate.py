"""Evaluation: the accuracy of a model on a benchmark, by one of two protocols (``EvalSettings.protocol``).

``generate`` (the paper's): ``evaluate`` renders each example with the prompt template, decodes
greedily in shrinking and refilled batches (``core.decoding``), cuts each response by the stop rules,
and scores it by the LLM-Adapters answer rules (``core.benchmarks``).

``loglikelihood`` (lm-evaluation-harness's multiple choice; benchmarks with choices only): the
question (``core.choices``) is rendered with the template and each option's text is scored as its
continuation (``core.loglik``); ``accuracy`` is lm-eval's ``acc`` (the highest summed log-probability),
``accuracy_norm`` its ``acc_norm`` (per character of the option).

``select_examples`` says which examples a limited run uses (the first N, or a seeded sample), so
every run of the same settings, under either protocol, sees the same ones.

Public API: ``EvalResult``, ``select_examples``, ``evaluate``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .benchmarks import Benchmark, BenchmarkError, answer_text, extract_answer, is_correct, load_benchmark
from .choices import benchmark_choices
from .config import PROTOCOLS, EvalSettings
from .decoding import StopRule, batched_greedy, eos_ids, hf_generate, model_device
from .loglik import score_choices
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
    # index, question, gold, response, extracted, correct; loglikelihood adds scores (each option's summed logprob)
    samples: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False  # should_stop cut the run short: the numbers cover the finished examples
    generated_tokens: int = 0
    protocol: str = "generate"
    accuracy_norm: float | None = None  # loglikelihood's acc_norm; None for generate

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
    """Accuracy of ``model`` on ``benchmark`` by ``settings.protocol`` (see the module docstring).

    ``settings``: ``limit`` (0 = all; first N, or a seeded sample when ``sample_seed >= 0``),
    ``max_new_tokens``, ``batch_size`` (prompts generated together; options scored together), ``protocol``.
    ``progress(done, total)`` is called as examples finish (it may raise to abort). ``should_stop()``
    ends the run early; the result then covers the finished examples and has ``stopped=True``. ``dtype``
    bf16/fp16 runs the model under autocast (default: as it is). ``engine="generate"`` uses
    ``model.generate`` instead of our decoding loop. ``BenchmarkError`` for ``loglikelihood`` on a
    benchmark without choices, or a row whose options cannot be read.
    """
    if not isinstance(benchmark, Benchmark):
        benchmark = load_benchmark(benchmark)
    settings = settings or EvalSettings()
    if settings.protocol not in PROTOCOLS:
        raise BenchmarkError(f"unknown protocol {settings.protocol!r}; use one of {', '.join(PROTOCOLS)}")
    start = time.perf_counter()
    chosen = select_examples(len(benchmark.examples), int(settings.limit or 0), int(settings.sample_seed))
    if settings.protocol == "loglikelihood":
        return _evaluate_loglikelihood(model, tokenizer, benchmark, chosen, settings, progress, should_stop,
                                       dtype, template, start)
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
    prompts = [list(ids) for ids in tokenizer(prompts_text, add_special_tokens=template != "chat")["input_ids"]]

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


def _evaluate_loglikelihood(model: Any, tokenizer: Any, benchmark: Benchmark, chosen: list[int],
                            settings: EvalSettings, progress: Callable[[int, int], None] | None,
                            should_stop: Callable[[], bool] | None, dtype: torch.dtype | None, template: str,
                            start: float) -> EvalResult:
    """The ``loglikelihood`` protocol: each chosen example's options scored as continuations of its prompt."""
    questions = benchmark_choices(benchmark, chosen)
    inputs = [benchmark.examples[i].get("input", "") for i in chosen]
    contexts = [render_prompt(q.question, inp, template, tokenizer) for q, inp in zip(questions, inputs)]
    with _autocast(model_device(model), dtype):
        scored, stopped = score_choices(model, tokenizer, [(c, list(q.choices)) for c, q in zip(contexts, questions)],
                                        int(settings.batch_size), add_special_tokens=template != "chat",
                                        progress=progress, should_stop=should_stop)
    samples = []
    norm_correct = 0
    for n in sorted(scored):
        q, s = questions[n], scored[n]
        ex = benchmark.examples[chosen[n]]
        question = q.question if not inputs[n].strip() else f"{q.question}\n\n{inputs[n]}"
        samples.append({"index": chosen[n], "question": question, "gold": ex["answer"],
                        "response": q.choices[s.acc], "extracted": q.labels[s.acc], "correct": s.acc == q.gold,
                        "scores": s.scores})
        norm_correct += s.acc_norm == q.gold
    correct = sum(1 for s in samples if s["correct"])
    done = len(samples)
    return EvalResult(benchmark=benchmark.name, answer_type=benchmark.answer_type,
                      accuracy=correct / done if done else 0.0, correct=correct, total=done,
                      seconds=time.perf_counter() - start, samples=samples, stopped=stopped,
                      protocol="loglikelihood", accuracy_norm=norm_correct / done if done else 0.0)
