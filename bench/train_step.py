"""Forward + backward throughput of our training step alone, with where its time goes.

    .venv/bin/python bench/train_step.py [--method lora] [--steps 6] [--data PATH] [--profile]
                                         [--kernels fast|reference] [--without PART,...] [--threads N]
    .venv/bin/python bench/train_step.py --parts [--method lora] [--steps 6] [--threads N]

The tool for working on ``core.train``'s speed: it sets a ``Trainer`` up as a job would, then times
``batch_loss`` + ``backward`` over the micro-batches of optimiser steps 1..N of the first epoch (step 0
is a warm-up), without the optimiser, the callbacks or checkpoints. Besides tokens/s it reports the
process's page faults and system time per step (the cost of memory handed back to the OS and faulted
in again). ``--profile`` adds the torch profiler's table of one more step, by operator and by
operator and shape. ``--kernels`` picks the speed paths (``TrainSettings.kernels``), ``--without``
leaves some parts of them out (``core.train.KERNELS``). Last line: ``train_step_tokens_per_s: <x>``.

``--parts`` measures what each part buys: one process sets up a trainer for the whole of ``fast``, one
for the reference and one for ``fast`` without each part in turn, and runs their steps interleaved
(step 1 of every trainer, then step 2, ... in a rotating order), so that a busy spell of a shared
machine slows every row alike. The ``memory`` part is process-wide: this process has it, every row
included (the reference too), so its share is measured apart, by ``--kernels fast --without memory``
against ``--kernels fast`` in processes of their own. Last line: ``fast_speedup_vs_reference: <x>``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "train" / "math_3k.json"


def stepper(args, parts: frozenset[str]):
    """A set-up ``Trainer`` with ``parts`` and a function running the micro-batches of one step."""
    from bench.train_throughput import spec_for
    from core import data as data_mod
    from core.train import Trainer, pack_micro_batches, plan_epoch

    spec = spec_for(args.method, args.data, args.steps + 2)
    spec.train.kernels = "fast" if parts else "reference"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec, tmp, parts=parts)
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
        trainer.optimizer.zero_grad(set_to_none=True)
        return tokens

    return trainer, step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", default=str(SHARED_TRAIN) if SHARED_TRAIN.is_file() else "builtin:math")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--kernels", default="fast", choices=("fast", "reference"))
    parser.add_argument("--without", default="", help="comma-separated parts of core.train.KERNELS to leave out")
    parser.add_argument("--parts", action="store_true", help="measure what each part buys (interleaved)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    from core.train import KERNELS

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parts:
        compare_parts(args)
        return
    parts = KERNELS[args.kernels] - set(filter(None, args.without.split(",")))
    _, step = stepper(args, parts)
    step(0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    tokens = sum(step(i) for i in range(1, args.steps + 1))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = args.steps
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"# {args.method} on {args.data}, parts {','.join(sorted(parts)) or 'none'}: {n} steps, {tokens} tokens, "
          f"{seconds / n:.2f} s per step ({cpu / n:.2f} CPU-s), "
          f"{(after.ru_minflt - before.ru_minflt) / n:,.0f} page faults and "
          f"{(after.ru_stime - before.ru_stime) / n:.2f} s system time per step, "
          f"peak RSS {after.ru_maxrss / 1024:,.0f} MB, load average {os.getloadavg()[0]:.1f}")
    if args.profile:
        from torch.profiler import profile

        with profile(record_shapes=True) as prof:
            step(args.steps + 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))
    print(f"train_step_tokens_per_s: {tokens / seconds:.0f}")


def compare_parts(args) -> None:
    from core.train import KERNELS

    fast = KERNELS["fast"]
    rows = {"fast": fast, "reference": frozenset()}
    rows.update({f"fast without {part}": fast - {part} for part in sorted(fast - {"memory"})})
    steps = {}
    for label, parts in rows.items():
        steps[label] = stepper(args, parts)[1]
        steps[label](0)  # warm-up
    seconds = dict.fromkeys(rows, 0.0)
    tokens = dict.fromkeys(rows, 0)
    labels = list(rows)
    loads = []
    for i in range(1, args.steps + 1):
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:
            start = time.perf_counter()
            tokens[label] += steps[label](i)
            seconds[label] += time.perf_counter() - start
        loads.append(os.getloadavg()[0])
    rate = {label: tokens[label] / seconds[label] for label in rows}
    print(f"# {args.method} on {args.data}: forward + backward of steps 1..{args.steps}, every row interleaved in "
          f"one process ({args.threads or 'default'} threads; load average {min(loads):.1f}-{max(loads):.1f})")
    print("| kernels | tokens/s | fast / this |")
    print("| --- | ---: | ---: |")
    for label in rows:
        print(f"| {label} | {rate[label]:.0f} | {rate['fast'] / rate[label]:.2f}x |")
    print(f"fast_speedup_vs_reference: {rate['fast'] / rate['reference']:.2f}")


if __name__ == "__main__":
    main()
