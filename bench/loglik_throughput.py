"""Benchmark the loglikelihood protocol against generating the answer, on the same questions.

    .venv/bin/python bench/loglik_throughput.py [--n 64] [--benchmark boolq] [--batch-size 32] [--reference]

Both protocols run ``core.evaluate`` on the embedded model (bf16 where the CPU supports it) over the
first N questions of a multiple-choice benchmark: ``generate`` (the paper's: batched greedy decoding,
up to 256 new tokens, the answer extracted by its rules) and ``loglikelihood`` (each option's text
scored as a continuation, contexts shared through the key/value cache). ``--reference`` also times
the plain log-likelihood reference (one full forward pass per option, ``core.loglik`` ``shared=False``)
and says how far the two agree. Last line: ``loglikelihood_speedup_vs_generate: <x>`` (seconds per
question of generation over those of log-likelihood scoring).

``compare_protocols`` is the measurement, for other benches to call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compare_protocols(model: Any, tokenizer: Any, benchmark: str, n: int, batch_size: int,
                      dtype: Any = None) -> dict[str, Any]:
    """Both protocols on the first ``n`` questions of ``benchmark``: each one's seconds and accuracy,
    and ``speedup`` (generation's seconds per question over log-likelihood scoring's)."""
    from core import EvalSettings
    from core.benchmarks import load_benchmark
    from core.evaluate import evaluate

    bench = load_benchmark(benchmark)
    runs = {}
    for protocol in ("generate", "loglikelihood"):  # untimed warm-up: the first forward passes are slower
        evaluate(model, tokenizer, bench, EvalSettings(limit=2, batch_size=2, max_new_tokens=16, protocol=protocol),
                 dtype=dtype)
    for protocol in ("generate", "loglikelihood"):
        settings = EvalSettings(limit=n, batch_size=batch_size, max_new_tokens=256, protocol=protocol)
        runs[protocol] = evaluate(model, tokenizer, bench, settings, dtype=dtype)
    gen, ll = runs["generate"], runs["loglikelihood"]
    return {"benchmark": bench.name, "questions": ll.total,
            "generate_seconds": gen.seconds, "generate_accuracy": gen.accuracy,
            "loglikelihood_seconds": ll.seconds, "loglikelihood_accuracy": ll.accuracy,
            "loglikelihood_accuracy_norm": ll.accuracy_norm,
            "speedup": (gen.seconds / gen.total) / (ll.seconds / ll.total)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--benchmark", default="boolq")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reference", action="store_true", help="also time the plain one-pass-per-option reference")
    args = parser.parse_args()

    import torch

    from core import ModelSettings
    from core.benchmarks import load_benchmark
    from core.choices import benchmark_choices
    from core.devices import resolve_device, resolve_dtype
    from core.evaluate import _autocast
    from core.loglik import score_choices
    from core.models import load_model
    from core.templates import render_prompt

    settings = ModelSettings()
    dtype = resolve_dtype(settings.precision, resolve_device(settings.device))
    loaded = load_model(settings, dtype=dtype if dtype != torch.float32 else None)
    model, tok = loaded.model, loaded.tokenizer
    r = compare_protocols(model, tok, args.benchmark, args.n, args.batch_size, dtype)
    q = r["questions"]
    print(f"\n# {time.strftime('%Y-%m-%d')}, {r['benchmark']}, first {q} questions, batch {args.batch_size}, {dtype}")
    print("| protocol | seconds | s / question | acc | acc_norm |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| generate (batched greedy, up to 256 tokens) | {r['generate_seconds']:.1f} | "
          f"{r['generate_seconds'] / q:.3f} | {100 * r['generate_accuracy']:.1f} | |")
    print(f"| loglikelihood (shared contexts, KV cache) | {r['loglikelihood_seconds']:.1f} | "
          f"{r['loglikelihood_seconds'] / q:.3f} | {100 * r['loglikelihood_accuracy']:.1f} | "
          f"{100 * r['loglikelihood_accuracy_norm']:.1f} |")
    if args.reference:
        bench = load_benchmark(args.benchmark)
        questions = benchmark_choices(bench, list(range(min(args.n, len(bench.examples)))))
        pairs = [(render_prompt(mc.question, "", "alpaca", tok), list(mc.choices)) for mc in questions]
        timed = {}
        for shared in (True, False):
            start = time.perf_counter()
            with _autocast(next(model.parameters()).device, dtype):
                scored, _ = score_choices(model, tok, pairs, args.batch_size, shared=shared)
            timed[shared] = (time.perf_counter() - start, scored)
        same = sum(timed[True][1][i].acc == timed[False][1][i].acc for i in range(len(pairs)))
        print(f"| loglikelihood reference (one forward pass per option) | {timed[False][0]:.1f} | "
              f"{timed[False][0] / q:.3f} | | |")
        print(f"\nshared-context scoring: {timed[False][0] / timed[True][0]:.1f}x the reference's speed; "
              f"same choice on {same}/{len(pairs)} questions")
    print(f"loglikelihood_speedup_vs_generate: {r['speedup']:.1f}")


if __name__ == "__main__":
    main()
