"""Forward + backward throughput of our training step alone, with where its time goes.

    .venv/bin/python bench/train_step.py [--method lora] [--steps 6] [--data PATH] [--profile]

The tool for working on ``core.train``'s speed: it sets a ``Trainer`` up as a job would, then times
``batch_loss`` + ``backward`` over the micro-batches of optimiser steps 1..N of the first epoch (step 0
is a warm-up), without the optimiser, the callbacks or checkpoints. Besides tokens/s it reports the
process's page faults and system time per step (the cost of memory handed back to the OS and faulted
in again). ``--profile`` adds the torch profiler's table of one more step, by operator and by
operator and shape. Last line: ``train_step_tokens_per_s: <x>``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "train" / "math_3k.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", default=str(SHARED_TRAIN) if SHARED_TRAIN.is_file() else "builtin:math")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    from bench.train_throughput import spec_for
    from core import data as data_mod
    from core.train import Trainer, pack_micro_batches, plan_epoch

    spec = spec_for(args.method, args.data, args.steps + 2)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec, tmp)
        trainer.setup()
    trainer.model.train()
    examples = trainer.train_data.examples
    plan = plan_epoch(trainer.lengths, spec.train.batch_size, spec.train.seed, 0)
    budget = spec.train.micro_batch_size * spec.data.cutoff_len

    def step(index: int) -> int:
        batch = sorted((examples[i] for i in plan[index]), key=lambda e: len(e.input_ids))
        tokens = 0
        for part in pack_micro_batches(batch, budget):
            micro = data_mod.collate(part, trainer.pad_id)
            loss, _ = trainer.batch_loss(micro)
            loss.backward()
            tokens += int(micro["attention_mask"].sum())
        return tokens

    step(0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    tokens = sum(step(i) for i in range(1, args.steps + 1))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = args.steps
    print(f"# {args.method} on {args.data}: {n} steps, {tokens} tokens, {seconds / n:.2f} s per step, "
          f"{(after.ru_minflt - before.ru_minflt) / n:,.0f} page faults and "
          f"{(after.ru_stime - before.ru_stime) / n:.2f} s system time per step, "
          f"peak RSS {after.ru_maxrss / 1024:,.0f} MB")
    if args.profile:
        from torch.profiler import profile

        with profile(record_shapes=True) as prof:
            step(args.steps + 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))
    print(f"train_step_tokens_per_s: {tokens / seconds:.0f}")


if __name__ == "__main__":
    main()
