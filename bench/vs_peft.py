"""Our training against Hugging Face ``transformers.Trainer`` + PEFT: tokens/s and peak memory, per method.

    .venv/bin/python bench/vs_peft.py [--steps 6] [--methods lora,dora,...] [--data PATH]

Both sides train the embedded model (SmolLM2-135M-Instruct, its converted checkpoint) on the same
tokenised examples (math_3k when ``../shared`` has it, else the built-in data; alpaca template,
cut-off 256), batch 16 = micro-batch 4 x 4 accumulation, the same learning rate, clipping and linear
schedule without warm-up, and the same adapter settings:

- ours: ``core.train`` with its defaults (bf16 frozen weights, ``kernels="fast"``), as
  ``bench/train_throughput.py`` runs it;
- PEFT: what a user would write instead: fp32 weights, ``bf16=True`` (autocast), length-grouped
  batches (``train_sampling_strategy="group_by_length"``, transformers 5's name for
  ``group_by_length=True``), ``DataCollatorForSeq2Seq`` padding each micro-batch to its longest row.
  Its adapter configuration is the ``adapter_config.json`` of our own PEFT export of the same settings
  (``core.export_peft``), so the settings agree by construction; PiSSA/OLoRA train from PEFT's own
  initialisation at rank r (our export holds the converted LoRA of rank 2r); prefix and prompt
  tuning, which we export in our own format only, are translated in ``VIRTUAL_TOKENS``.

Each side runs in its own process: one warm-up step, then ``--steps`` timed steps. tokens/s counts
non-padding tokens over the timed steps; peak memory is the process's peak RSS (``ru_maxrss``, as
``core.train`` reports it) at the end of training. A line under the table gives the speed-ups in
tokens per second of each process's CPU time, which other work on a shared machine leaves alone
(with ``--threads 1`` it is the speed of each side on a core of its own). A method of the list that
our registry does not have (yet) is reported as not available. Last line: ``min_speedup_vs_peft: <x>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_throughput import SHARED_TRAIN, run_child, run_ours, spec_for  # noqa: E402

# The table's rows: how we configure each method (a preset named as its authors name it, or a method's
# defaults where there is no preset).
METHODS: dict[str, tuple[str, str]] = {
    "lora": ("preset", "LoRA"), "dora": ("preset", "DoRA"), "rslora": ("preset", "rsLoRA"),
    "pissa": ("preset", "PiSSA"), "ia3": ("preset", "IA3"), "vera": ("preset", "VeRA"),
    "prefix": ("preset", "Prefix"), "prompt": ("method", "prompt"),
}
# Our LoRA ``init`` settings that mutate the base weights, and PEFT's ``init_lora_weights`` for them.
PEFT_INITS = {"pissa": "pissa", "pissa_fast": "pissa_niter_4", "olora": "olora"}
# Virtual-token methods PEFT has but our registry exports in our own format only: settings -> PEFT config.
VIRTUAL_TOKENS: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "prefix": lambda s, model_dir: {
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": s.num_virtual_tokens,
        "prefix_projection": s.reparam_hidden > 0, "encoder_hidden_size": s.reparam_hidden or None},
    "prompt": lambda s, model_dir: {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": s.num_virtual_tokens,
        "prompt_tuning_init": "TEXT" if s.init == "text" else "RANDOM", "prompt_tuning_init_text": s.init_text,
        "tokenizer_name_or_path": model_dir},
}


def adapter_for(name: str):
    """Our ``AdapterConfig`` of bench row ``name``; ``ConfigError`` when the registry lacks it."""
    from core import AdapterConfig

    kind, value = METHODS[name]
    return AdapterConfig.preset(value) if kind == "preset" else AdapterConfig.for_method(value)


def bench_spec(name: str, data: str, steps: int):
    """The job both sides train: ``bench/train_throughput.py``'s spec (model, data, batch, schedule) with
    row ``name``'s adapter."""
    spec = spec_for("lora", data, steps)
    spec.name, spec.adapter = f"bench-{name}", adapter_for(name)
    return spec


def peft_config_for(spec, model_dir: Path) -> dict[str, Any]:
    """The PEFT side's configuration of ``spec.adapter`` (see the module docstring), trainable."""
    import core
    from core import methods
    from core.models import load_model

    adapter = spec.adapter
    if methods.get(adapter.method).peft is None:
        config = VIRTUAL_TOKENS[adapter.method](adapter.settings, str(model_dir))
    else:
        loaded = load_model(spec.model)
        core.attach(loaded.model, adapter, tokenizer=loaded.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            config = json.loads((core.export_peft(loaded.model, tmp) / "adapter_config.json").read_text())
        init = getattr(adapter.settings, "init", None)
        if init in PEFT_INITS:
            config.update(r=adapter.settings.r, lora_alpha=adapter.settings.alpha, rank_pattern={},
                          alpha_pattern={}, init_lora_weights=PEFT_INITS[init])
    return {**config, "task_type": "CAUSAL_LM", "inference_mode": False}


def trainer_rows(spec, tok) -> list[dict[str, list[int]]]:
    """The training rows of ``spec`` as ``transformers.Trainer`` takes them: our tokenisation (template,
    cut-off, label masking), so both sides of a bench train on the same tokens."""
    from core import data as data_mod

    t, d = spec.train, spec.data
    records = data_mod.load_records(d.source, d.columns, d.limit)
    rows, _ = data_mod.split_records(records, d.val_size, t.seed)
    examples = data_mod.tokenize_records(rows, tok, template=d.template, cutoff_len=d.cutoff_len,
                                         train_on_inputs=d.train_on_inputs).examples
    return [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in examples]


def run_peft(spec, peft_config: dict[str, Any], out: Path) -> dict:
    """Train ``spec``'s data with ``transformers.Trainer`` + PEFT: tokens/s over steps 2..N, peak RSS, and
    tokens per second of the process's CPU time (as ``run_ours``)."""
    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from core.models import load_model
    from core.train import peak_memory_mb

    class Clock(TrainerCallback):
        """Non-padding tokens fed to the model (a forward pre-hook) and the time, at each step's end."""

        def __init__(self):
            self.tokens = 0
            self.marks: list[tuple[float, float, int]] = []

        def count(self, module, args, kwargs) -> None:
            self.tokens += int(kwargs["attention_mask"].sum())

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.marks.append((time.perf_counter(), time.process_time(), self.tokens))

    t = spec.train
    loaded = load_model(spec.model)  # fp32 weights, as a PEFT user loads them; bf16 autocast below
    tok = loaded.tokenizer
    dataset = trainer_rows(spec, tok)
    torch.manual_seed(t.seed)
    model = peft.get_peft_model(loaded.model, peft.PeftConfig.from_peft_type(**peft_config))
    clock = Clock()
    model.register_forward_pre_hook(clock.count, with_kwargs=True)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // t.micro_batch_size, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, bf16=True, use_cpu=True, train_sampling_strategy="group_by_length",
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=t.seed)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock]).train()
    (t0, c0, n0), (t1, c1, n1) = clock.marks[0], clock.marks[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "peak_mb": peak_memory_mb(torch.device("cpu")),
            "cpu_tokens_per_s": (n1 - n0) / (c1 - c0)}


def child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = bench_spec(args.method, args.data, args.steps + 1)
    out = Path(args.out)
    if args.side == "ours":
        result = run_ours(spec, out / "ours")
    else:
        result = run_peft(spec, json.loads((out / "peft_config.json").read_text()), out / "peft")
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6, help="timed steps, after one warm-up step")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data", default=str(SHARED_TRAIN) if SHARED_TRAIN.is_file() else "builtin:math")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads on both sides (0: torch's default); 1 keeps a machine shared with "
                             "other work from oversubscribing its cores")
    parser.add_argument("--side", choices=("ours", "peft"))
    parser.add_argument("--method", choices=list(METHODS))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    from core.config import ConfigError
    from core.embedded import ensure_converted

    names = args.methods.split(",")
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    # A fresh home converts the embedded model here, not in a measured process (its heap would keep it).
    model_dir = ensure_converted(spec_for("lora", args.data, 1).model.name)
    print(f"# data {args.data}, batch 16 (micro 4 x 4 accumulation, cut-off 256), {args.steps} timed steps "
          f"after one warm-up step; PEFT = transformers.Trainer + peft, bf16 autocast, length-grouped; torch "
          f"threads {args.threads or 'default'}")
    print("| method | PEFT tokens/s | ours tokens/s | speed-up | PEFT peak MB | ours peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    speedups, cpu_speedups, heavier = {}, {}, []
    for name in names:
        try:
            spec = bench_spec(name, args.data, args.steps + 1)
        except ConfigError:
            print(f"| {name} | not available | | | | |", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "peft_config.json").write_text(json.dumps(peft_config_for(spec, model_dir)))
            cmd = [sys.executable, __file__, "--method", name, "--steps", str(args.steps), "--data", args.data,
                   "--threads", str(args.threads), "--out", tmp]
            results = {side: run_child([*cmd, "--side", side], f"{side} {name}") for side in ("peft", "ours")}
        p, o = results["peft"], results["ours"]
        speedups[name] = o["tokens_per_s"] / p["tokens_per_s"]
        cpu_speedups[name] = o["cpu_tokens_per_s"] / p["cpu_tokens_per_s"]
        if o["peak_mb"] > p["peak_mb"]:
            heavier.append(name)
        print(f"| {name} | {p['tokens_per_s']:.0f} | {o['tokens_per_s']:.0f} | {speedups[name]:.2f}x | "
              f"{p['peak_mb']:.0f} | {o['peak_mb']:.0f} |", flush=True)
    print("# speed-up in tokens per CPU-second of each process (what other load on the machine leaves alone): "
          + ", ".join(f"{name} {x:.2f}x" for name, x in cpu_speedups.items()))
    if heavier:
        print(f"# ours holds more peak memory than PEFT for: {', '.join(heavier)}")
    print(f"min_speedup_vs_peft: {min(speedups.values(), default=float('nan')):.2f}")


if __name__ == "__main__":
    main()
