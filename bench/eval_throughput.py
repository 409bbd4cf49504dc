"""Benchmark evaluation speed: our batched greedy evaluation against the LLM-Adapters protocol, and
log-likelihood scoring against generation.

    .venv/bin/python bench/eval_throughput.py [--n 64] [--benchmark AddSub] [--mc-benchmark piqa]

Reference = LLM-Adapters' evaluate.py: one example at a time, beam search with 4 beams, up to 256 new
tokens, fp32. Ours = ``core.evaluate``: batched greedy generation with a KV cache, bf16
where the CPU supports it, rows sorted by length, prompt lookup drafts for the last rows, each row
stopped at its answer. Same model, same problems, same answer extraction, in one run. Agreement:
the share of problems where two sides extract the same answer (no answer on both sides counts as the
same), against the reference and against exact greedy decoding (one example at a time, fp32, Hugging
Face ``generate`` with one beam: the rule ours computes faster). Then both protocols on the first N
questions of ``--mc-benchmark`` (``bench/loglik_throughput.py``; skipped where the set is missing).
Last lines: ``loglikelihood_speedup_vs_generate: <x>``, ``eval_speedup_vs_reference: <x>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--benchmark", default="AddSub")
    parser.add_argument("--mc-benchmark", default="piqa", help="a multiple-choice set for the log-likelihood figure")
    args = parser.parse_args()

    from core import EvalSettings, ModelSettings
    from bench.loglik_throughput import compare_protocols
    from core.benchmarks import BenchmarkError, answer_text, extract_answer, is_correct, load_benchmark
    from core.decoding import reference_generate
    from core.devices import resolve_device, resolve_dtype
    from core.evaluate import evaluate
    from core.models import load_model
    from core.templates import render_prompt

    bench = load_benchmark(args.benchmark)
    examples = bench.examples[:args.n]
    settings = ModelSettings()
    dtype = resolve_dtype(settings.precision, resolve_device(settings.device))
    fast_model = load_model(settings, dtype=dtype if dtype != __import__("torch").float32 else None)
    evaluate(fast_model.model, fast_model.tokenizer, bench, EvalSettings(limit=2, max_new_tokens=16, batch_size=2),
             dtype=dtype)  # untimed warm-up: the first forward passes are slower
    ours = evaluate(fast_model.model, fast_model.tokenizer, bench,
                    EvalSettings(limit=args.n, max_new_tokens=256, batch_size=args.n), dtype=dtype)
    print(f"ours: {ours.seconds:.1f}s for {ours.total} problems ({ours.seconds / ours.total:.2f} s/problem), "
          f"accuracy {100 * ours.accuracy:.1f}%", flush=True)

    try:
        mc = compare_protocols(fast_model.model, fast_model.tokenizer, args.mc_benchmark, args.n, 32, dtype)
    except BenchmarkError as err:
        mc = None
        print(f"log-likelihood figure skipped: {err}", flush=True)

    ref_model = load_model(ModelSettings(precision="fp32"))
    timed = {}
    for beams in (1, 4):  # exact greedy, then the LLM-Adapters protocol
        start = time.perf_counter()
        correct = agree = 0
        for ex, sample in zip(examples, ours.samples):
            prompt = render_prompt(ex["instruction"], ex.get("input", ""), "alpaca")
            response = reference_generate(ref_model.model, ref_model.tokenizer, prompt, num_beams=beams,
                                          max_new_tokens=256)
            correct += is_correct(bench, response, ex["answer"])
            agree += answer_text(extract_answer(bench, response)) == sample["extracted"]
        timed[beams] = (time.perf_counter() - start, correct, agree)
        print(f"{beams} beam(s), fp32, 1 at a time: {timed[beams][0]:.1f}s, accuracy {100 * correct / len(examples):.1f}%, "
              f"same answer as ours on {agree}/{len(examples)}", flush=True)
    ref_seconds, correct, agree = timed[4]
    n = len(examples)
    print(f"\n# {time.strftime('%Y-%m-%d')}, {args.benchmark}, first {n} problems")
    print("| protocol | seconds | s / problem | accuracy | same answer as ours |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| LLM-Adapters (1 at a time, beam 4, fp32) | {ref_seconds:.1f} | {ref_seconds / n:.2f} | "
          f"{100 * correct / n:.1f} | {agree}/{n} |")
    print(f"| exact greedy (1 at a time, fp32) | {timed[1][0]:.1f} | {timed[1][0] / n:.2f} | "
          f"{100 * timed[1][1] / n:.1f} | {timed[1][2]}/{n} |")
    print(f"| ours (batched greedy, {dtype}) | {ours.seconds:.1f} | {ours.seconds / ours.total:.2f} | "
          f"{100 * ours.accuracy:.1f} | |")
    if mc is not None:
        q = mc["questions"]
        print(f"\n# {mc['benchmark']}, first {q} questions, batch 32")
        print("| protocol | s / question | acc | acc_norm |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| generate (batched greedy, up to 256 tokens) | {mc['generate_seconds'] / q:.3f} | "
              f"{100 * mc['generate_accuracy']:.1f} | |")
        print(f"| loglikelihood (shared contexts) | {mc['loglikelihood_seconds'] / q:.3f} | "
              f"{100 * mc['loglikelihood_accuracy']:.1f} | {100 * mc['loglikelihood_accuracy_norm']:.1f} |")
    print(f"answers_agree_with_exact_greedy: {timed[1][2]}/{n} ({100 * timed[1][2] / n:.1f}%)")
    print(f"answers_agree_with_reference: {agree}/{n} ({100 * agree / n:.1f}%)")
    if mc is not None:
        print(f"loglikelihood_speedup_vs_generate: {mc['speedup']:.1f}")
    print(f"eval_speedup_vs_reference: {ref_seconds / ours.seconds:.1f}")

if __name__ == "__main__":
    main()
