"""Where evaluation answers move: the decoder's speed tricks against precision.

    .venv/bin/python bench/decode_fidelity.py [--n 64] [--benchmark AddSub] [--adapter DIR]

Runs ``core.evaluate`` on the embedded model (with ``--adapter``, a saved adapter on it) three ways
over the first N problems, with the same stop rules throughout: our batched greedy decoder in bf16
(the default), the same decoder in fp32, and Hugging Face ``generate`` in fp32 one problem at a time
(``engine="generate"``, batch 1: greedy with none of our tricks). Pairs that differ only by the tricks
(batching, the in-place cache, chunked prefill, prompt lookup) should agree on every problem; bf16
against fp32 shows what precision alone moves. Last line: ``fp32_same_text_as_generate: <percent>``.
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
    parser.add_argument("--adapter", help="a saved adapter directory to evaluate instead of the bare model")
    args = parser.parse_args()

    import torch

    from core import EvalSettings, ModelSettings
    from core.benchmarks import load_benchmark
    from core.evaluate import evaluate
    from core.inject import load_adapter
    from core.models import load_model

    bench = load_benchmark(args.benchmark)
    runs = {}
    for name, precision, engine, batch in (("ours, bf16", "bf16", "loop", args.n), ("ours, fp32", "fp32", "loop", args.n),
                                           ("generate, fp32, 1 at a time", "fp32", "generate", 1)):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        loaded = load_model(ModelSettings(precision=precision), dtype=dtype)
        if args.adapter:
            load_adapter(loaded.model, args.adapter, tokenizer=loaded.tokenizer)
        loaded.model.eval()
        settings = EvalSettings(limit=args.n, max_new_tokens=256, batch_size=batch)
        runs[name] = evaluate(loaded.model, loaded.tokenizer, bench, settings, dtype=dtype, engine=engine)
        r = runs[name]
        print(f"{name}: {r.seconds:.1f}s ({r.seconds / r.total:.2f} s/problem), accuracy {100 * r.accuracy:.1f}%",
              flush=True)

    def same(a: str, b: str, key: str) -> int:
        return sum(x[key] == y[key] for x, y in zip(runs[a].samples, runs[b].samples))

    n = runs["ours, bf16"].total
    print(f"\n# {time.strftime('%Y-%m-%d')}, {bench.name}, first {n} problems, "
          f"{'adapter ' + args.adapter if args.adapter else 'bare model'}")
    print("| pair | same extracted answer | same text |")
    print("| --- | ---: | ---: |")
    pairs = [("ours, fp32", "generate, fp32, 1 at a time"), ("ours, bf16", "ours, fp32"),
             ("ours, bf16", "generate, fp32, 1 at a time")]
    for a, b in pairs:
        print(f"| {a} vs {b} | {same(a, b, 'extracted')}/{n} | {same(a, b, 'response')}/{n} |")
    exact = same(*pairs[0], "response")
    print(f"fp32_same_text_as_generate: {100 * exact / n:.1f}")


if __name__ == "__main__":
    main()
