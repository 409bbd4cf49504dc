"""Training throughput of our loop against a naive loop, same model, adapter, data and steps.

    .venv/bin/python bench/train_throughput.py [--steps 6] [--methods lora,series,...] [--data PATH]

Naive = the plain Hugging Face recipe: fp32 weights, every row padded to the cut-off, the model's own
forward with ``labels`` (logits over the whole vocabulary at every position), and the adapters with
``kernels="reference"`` (for LoRA the PEFT formulation: autograd, ``nn.Dropout`` per module). Ours =
``core.train`` with its defaults: bf16 frozen weights under autocast where the CPU supports it,
length-grouped batches padded to their longest row, and ``kernels="fast"`` (logits only at labelled
positions, a chunk at a time, and the other CPU speed paths of ``core.train.KERNELS``). Each side runs
in its own process (so peak memory is its own); the figure is non-padding tokens per second over the
timed steps (the first step is a warm-up and not counted). Last line: ``lora_speedup_vs_naive: <x>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "train" / "math_3k.json"


def spec_for(method: str, data: str, steps: int):
    from core import AdapterConfig, JobSpec

    spec = JobSpec(name=f"bench-{method}")
    spec.adapter = AdapterConfig.for_method(method)
    spec.data.source = data
    spec.data.val_size = 0
    spec.train.max_steps = steps
    spec.train.batch_size, spec.train.micro_batch_size = 16, 4
    spec.train.warmup_steps, spec.train.eval_every, spec.train.save_every = 0, 0, 0
    return spec


def run_ours(spec, out: Path) -> dict:
    """Train ``spec`` with ``core.train``: tokens/s over steps 2..N (step 1 is a warm-up), peak RSS, last loss,
    and tokens per second of the process's CPU time (``cpu_tokens_per_s``: what other load on the machine
    does not change)."""
    from core.callbacks import TrainCallbacks
    from core.train import train

    class Timer(TrainCallbacks):
        def __init__(self):
            self.marks = []

        def on_step(self, r):
            self.marks.append((time.perf_counter(), r.tokens_per_s, r.loss, time.process_time()))

    timer = Timer()
    result = train(spec, out, timer)
    # tokens/s over steps 2..N: each report's tokens_per_s covers exactly its own step (log_every = 1)
    rates = [m[1] for m in timer.marks[1:]]
    times = [b[0] - a[0] for a, b in zip(timer.marks, timer.marks[1:])]
    tokens = sum(r * t for r, t in zip(rates, times))
    return {"tokens_per_s": tokens / sum(times), "peak_mb": result.peak_memory_mb, "loss": timer.marks[-1][2],
            "cpu_tokens_per_s": tokens / (timer.marks[-1][3] - timer.marks[0][3])}


def run_naive(method: str, data: str, steps: int) -> dict:
    import torch

    import core
    from core import data as data_mod
    from core.models import load_model
    from core.train import KERNELS, install_kernels, plan_epoch

    spec = spec_for(method, data, steps + 1)
    torch.manual_seed(0)
    loaded = load_model(spec.model)  # fp32
    model, tok = loaded.model, loaded.tokenizer
    core.attach(model, spec.adapter, tokenizer=tok)
    install_kernels(model, KERNELS["reference"], torch.device("cpu"))
    rows = data_mod.load_records(spec.data.source)
    examples = data_mod.tokenize_records(rows, tok, template="alpaca", cutoff_len=spec.data.cutoff_len).examples
    plan = plan_epoch([len(e.input_ids) for e in examples], 16, seed=42, epoch=0)
    opt = torch.optim.AdamW(core.adapter_params(model), lr=3e-4)
    model.train()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    marks, tokens = [], []
    for step in range(steps + 1):
        batch_examples = [examples[i] for i in plan[step]]
        n_tokens = 0
        for i in range(0, 16, 4):
            part = batch_examples[i:i + 4]
            batch = data_mod.collate(part, pad)
            width = spec.data.cutoff_len
            ids = torch.full((len(part), width), pad)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            labels = torch.full((len(part), width), -100)
            L = batch["input_ids"].shape[1]
            ids[:, :L], mask[:, :L], labels[:, :L] = batch["input_ids"], batch["attention_mask"], batch["labels"]
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / 4
            loss.backward()
            n_tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(core.adapter_params(model), 1.0)
        opt.step()
        opt.zero_grad()
        marks.append(time.perf_counter())
        tokens.append(n_tokens)
    timed = marks[-1] - marks[0]
    return {"tokens_per_s": sum(tokens[1:]) / timed,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": loss.item() * 4}


def run_child(cmd: list[str], what: str) -> dict:
    """Run a bench's child process; the dict on its ``RESULT {json}`` line (its stderr and an exit if it failed)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{what} failed")
    return json.loads(line[-1][7:])


def child(args) -> None:
    if args.mode == "ours":
        out = Path(args.out)
        res = run_ours(spec_for(args.method, args.data, args.steps + 1), out)
    else:
        res = run_naive(args.method, args.data, args.steps)
    print("RESULT " + json.dumps(res))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--methods", default="lora,series,parallel,prefix,prompt,ptuning")
    parser.add_argument("--data", default=str(SHARED_TRAIN) if SHARED_TRAIN.is_file() else "builtin:math")
    parser.add_argument("--mode")
    parser.add_argument("--method")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    import tempfile

    print(f"# data {args.data}, batch 16 (micro 4), {args.steps} timed steps after one warm-up step")
    print("| method | naive tokens/s | ours tokens/s | speed-up | naive peak MB | ours peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    speedups = {}
    for method in args.methods.split(","):
        results = {}
        for mode in ("naive", "ours"):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--mode", mode, "--method", method, "--steps", str(args.steps),
                       "--data", args.data, "--out", tmp]
                results[mode] = run_child(cmd, f"{mode} {method}")
        n, o = results["naive"], results["ours"]
        speedups[method] = o["tokens_per_s"] / n["tokens_per_s"]
        print(f"| {method} | {n['tokens_per_s']:.0f} | {o['tokens_per_s']:.0f} | {speedups[method]:.2f}x | "
              f"{n['peak_mb']:.0f} | {o['peak_mb']:.0f} |", flush=True)
    print(f"min_speedup_any_method: {min(speedups.values()):.2f}")
    print(f"lora_speedup_vs_naive: {speedups.get('lora', float('nan')):.2f}")


if __name__ == "__main__":
    main()
