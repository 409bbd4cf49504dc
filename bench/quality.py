"""Does fine-tuning help? LoRA (the paper's settings) on math_3k, base vs adapter on three benchmarks.

    .venv/bin/python bench/quality.py [--minutes 30] [--limit 200] [--out bench/out/quality]

Trains the embedded SmolLM2-135M-Instruct with LoRA r=32 on ../shared/datasets/train/math_3k.json for
at most ``--minutes`` (the run stops cleanly at the budget, adapter saved), then evaluates the base
model and the adapter on the first ``--limit`` problems of AddSub, MultiArith and SingleEq.
Last line: ``addsub_gain_points: <adapter - base accuracy, in points>``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN = ROOT.parent / "shared" / "datasets" / "train" / "math_3k.json"
BENCHMARKS = ["AddSub", "MultiArith", "SingleEq"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "quality"))
    parser.add_argument("--skip-train", action="store_true", help="reuse the adapter already in --out")
    args = parser.parse_args()
    if not TRAIN.is_file():
        raise SystemExit(f"needs {TRAIN} (the shared LLM-Adapters data)")

    import copy

    import core
    from core import EvalSettings, JobSpec
    from core.benchmarks import load_benchmark
    from core.evaluate import evaluate
    from core.models import get_model
    from core.callbacks import TrainCallbacks
    from core.train import train

    out = Path(args.out)
    spec = JobSpec(name="quality: LoRA on math_3k")
    spec.data.source = str(TRAIN)
    spec.data.val_size = 0
    spec.train.epochs = args.epochs
    spec.train.eval_every = spec.train.save_every = 0
    spec.train.log_every = 20

    class Budget(TrainCallbacks):
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_step(self, r):
            print(f"step {r.step}/{r.total_steps} loss {r.loss:.4f} {r.tokens_per_s:.0f} tok/s", flush=True)

        def should_stop(self) -> bool:
            return time.perf_counter() - self.start > args.minutes * 60

    if not args.skip_train:
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: no metrics or checkpoints of an older one
        result = train(spec, out, Budget())
        print(f"# training: {result.status} after {result.steps}/{result.total_steps} steps, "
              f"{result.elapsed_s / 60:.1f} min, final loss {result.final_loss:.4f}, "
              f"{result.tokens_per_s:.0f} tokens/s", flush=True)

    loaded = get_model(spec.model)
    adapted = core.load_adapter(copy.deepcopy(loaded.model), out / "adapter")
    settings = EvalSettings(limit=args.limit, max_new_tokens=256, batch_size=32)
    rows = []
    for name in BENCHMARKS:
        bench = load_benchmark(name)
        base = evaluate(loaded.model, loaded.tokenizer, bench, settings, dtype=loaded.compute_dtype)
        tuned = evaluate(adapted, loaded.tokenizer, bench, settings, dtype=loaded.compute_dtype)
        rows.append((name, base, tuned))
        print(f"{name}: base {100 * base.accuracy:.1f}% ({base.seconds:.0f}s), "
              f"LoRA {100 * tuned.accuracy:.1f}% ({tuned.seconds:.0f}s)", flush=True)
    print(f"\n# {time.strftime('%Y-%m-%d')}, first {args.limit} problems, greedy, max 256 new tokens")
    print("| benchmark | base accuracy | LoRA accuracy | gain (points) |")
    print("| --- | ---: | ---: | ---: |")
    for name, base, tuned in rows:
        print(f"| {name} | {100 * base.accuracy:.1f} | {100 * tuned.accuracy:.1f} | "
              f"{100 * (tuned.accuracy - base.accuracy):+.1f} |")
    gain = 100 * (rows[0][2].accuracy - rows[0][1].accuracy)
    print(f"addsub_gain_points: {gain:.1f}")


if __name__ == "__main__":
    main()
