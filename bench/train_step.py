"""Forward + backward throughput of our training step alone, with where its time goes.

    .venv/bin/python bench/train_step.py [--method lora] [--steps 6] [--data PATH] [--profile]
                                         [--kernels fast|reference] [--without PART,...]
                                         [--parts [--repeat N]] [--threads N]

The tool for working on ``core.train``'s speed: it sets a ``Trainer`` up as a job would, then times
``batch_loss`` + ``backward`` over the micro-batches of optimiser steps 1..N of the first epoch (step 0
is a warm-up), without the optimiser, the callbacks or checkpoints. Besides tokens/s it reports the
process's page faults and system time per step (the cost of memory handed back to the OS and faulted
in again). ``--profile`` adds the torch profiler's table of one more step, by operator and by
operator and shape. ``--kernels`` picks the speed paths (``TrainSettings.kernels``), ``--without``
leaves some parts of them out (``core.train.KERNELS``). ``--parts`` measures what each part buys: the
whole of ``fast``, the reference, and ``fast`` without each part in turn, each in its own process (the
``memory`` part is process-wide), as a table of the best of ``--repeat`` rounds, compared by tokens per
CPU-second (on a machine shared with other work, wall time measures the other work too; ``--threads 1``
keeps idle threads from spinning in that CPU time). Last line:
``train_step_tokens_per_s: <x>`` (with ``--parts``: ``fast_speedup_vs_reference: <x>``).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
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
    parser.add_argument("--kernels", default="fast", choices=("fast", "reference"))
    parser.add_argument("--without", default="", help="comma-separated parts of core.train.KERNELS to leave out")
    parser.add_argument("--parts", action="store_true", help="measure each part's share (child processes)")
    parser.add_argument("--repeat", type=int, default=1, help="with --parts: rounds over the rows (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.parts:
        compare_parts(args)
        return

    import torch

    from bench.train_throughput import spec_for
    from core import data as data_mod
    from core.train import KERNELS, Trainer, pack_micro_batches, plan_epoch

    if args.threads:
        torch.set_num_threads(args.threads)

    spec = spec_for(args.method, args.data, args.steps + 2)
    spec.train.kernels = args.kernels
    parts = KERNELS[args.kernels] - set(filter(None, args.without.split(",")))
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
        return tokens

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
          f"peak RSS {after.ru_maxrss / 1024:,.0f} MB")
    if args.profile:
        from torch.profiler import profile

        with profile(record_shapes=True) as prof:
            step(args.steps + 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))
    print(f"train_step_tokens_per_cpu_s: {tokens / cpu:.0f}")  # steadier than wall time on a shared machine
    print(f"train_step_tokens_per_s: {tokens / seconds:.0f}")


def compare_parts(args) -> None:
    from core.train import KERNELS

    runs = [("fast", "fast", ""), ("reference", "reference", "")]
    runs += [(f"fast without {part}", "fast", part) for part in sorted(KERNELS["fast"])]
    wall: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for _ in range(args.repeat):  # rounds over every row, so a busy spell of the machine hits all rows alike
        for label, kernels, without in runs:
            cmd = [sys.executable, __file__, "--method", args.method, "--steps", str(args.steps),
                   "--data", args.data, "--kernels", kernels, "--without", without, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            found = dict(x.split(": ") for x in proc.stdout.splitlines() if x.startswith("train_step_tokens_per"))
            if proc.returncode or len(found) < 2:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{label} failed")
            wall[label].append(float(found["train_step_tokens_per_s"]))
            cpu[label].append(float(found["train_step_tokens_per_cpu_s"]))
            print(f"#   {label}: {wall[label][-1]:.0f} tokens/s, {cpu[label][-1]:.0f} per CPU-second "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"# {args.method} on {args.data}: forward + backward, {args.steps} steps after a warm-up, each row its own "
          f"process, {args.threads or 'default'} threads, best of {args.repeat}")
    print("| kernels | tokens/s | tokens per CPU-second | fast / this (CPU) |")
    print("| --- | ---: | ---: | ---: |")
    best = {label: max(values) for label, values in cpu.items()}
    for label, _, _ in runs:
        print(f"| {label} | {max(wall[label]):.0f} | {best[label]:.0f} | {best['fast'] / best[label]:.2f}x |")
    print(f"fast_speedup_vs_reference: {best['fast'] / best['reference']:.2f}")


if __name__ == "__main__":
    main()
