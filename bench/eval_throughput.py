"""Benchmark evaluation speed: our batched greedy evaluation against the LLM-Adapters protocol.

    .venv/bin/python bench/eval_throughput.py [--n 64] [--benchmark AddSub]

Reference = LLM-Adapters' evaluate.py: one example at a time, beam search with 4 beams, up to 256 new
tokens, fp32. Ours = ``core.evaluate``: batched greedy generation with a KV cache, bf16
where the CPU supports it, rows sorted by length and stopped at their answer. Same model, same
problems, same answer extraction, in one run. Agreement: the share of problems where both sides
extract the same answer (no answer on both sides counts as the same). Last line:
``eval_speedup_vs_reference: <x>``.
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
    args = parser.parse_args()

    from core import EvalSettings, ModelSettings
    from core.benchmarks import answer_text, extract_answer, is_correct, load_benchmark
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
    ours = evaluate(fast_model.model, fast_model.tokenizer, bench,
                    EvalSettings(limit=args.n, max_new_tokens=256, batch_size=args.n), dtype=dtype)
    print(f"ours: {ours.seconds:.1f}s for {ours.total} problems ({ours.seconds / ours.total:.2f} s/problem), "
          f"accuracy {100 * ours.accuracy:.1f}%", flush=True)

    ref_model = load_model(ModelSettings(precision="fp32"))
    start = time.perf_counter()
    correct = agree = 0
    for ex, sample in zip(examples, ours.samples):
        prompt = render_prompt(ex["instruction"], ex.get("input", ""), "alpaca")
        response = reference_generate(ref_model.model, ref_model.tokenizer, prompt, num_beams=4, max_new_tokens=256)
        correct += is_correct(bench, response, ex["answer"])
        agree += answer_text(extract_answer(bench, response)) == sample["extracted"]
    ref_seconds = time.perf_counter() - start
    print(f"reference: {ref_seconds:.1f}s for {len(examples)} problems ({ref_seconds / len(examples):.2f} s/problem), "
          f"accuracy {100 * correct / len(examples):.1f}%", flush=True)
    print(f"\n# {time.strftime('%Y-%m-%d')}, {args.benchmark}, first {len(examples)} problems")
    print("| protocol | seconds | s / problem | accuracy |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| LLM-Adapters (1 at a time, beam 4, fp32) | {ref_seconds:.1f} | {ref_seconds / len(examples):.2f} | "
          f"{100 * correct / len(examples):.1f} |")
    print(f"| ours (batched greedy, {dtype}) | {ours.seconds:.1f} | {ours.seconds / ours.total:.2f} | "
          f"{100 * ours.accuracy:.1f} |")
    print(f"answers_agree_with_reference: {agree}/{len(examples)} ({100 * agree / len(examples):.1f}%)")
    print(f"eval_speedup_vs_reference: {ref_seconds / ours.seconds:.1f}")


if __name__ == "__main__":
    main()
