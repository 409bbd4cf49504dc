"""Our training against Hugging Face ``transformers.Trainer`` + PEFT on one GPU: LoRA, DoRA and QLoRA.

    python bench/gpu_vs_peft.py [--models smollm2-135m,llama-1b] [--methods lora,dora,qlora] [--steps 5]
    python bench/gpu_vs_peft.py --device cpu --models tiny --steps 1     # a smoke test of the same code

Nothing is downloaded, so it runs on a GPU machine without a network: each model is built from its
config with random weights (``MODELS``: the embedded model's, SmolLM2-135M, and a LLaMA of 1.1B
parameters shaped as TinyLlama) and saved once in bf16 with the tests' small byte-level tokenizer
(its ids are a few hundred of the model's vocabulary: what a step costs does not depend on which ids
it reads). Both sides train it on the built-in math data (alpaca template, cut-off 256), batch 16 =
micro-batch 4 x 4 accumulation, the same learning rate, clipping, linear schedule without warm-up and
the same adapter settings (LoRA's defaults: r 32, alpha 64, dropout 0.05 on q, k, v, up, down):

- ours: ``core.train`` as a job runs it (``bench/train_throughput.py``'s ``run_ours``): bf16 weights,
  ``kernels="fast"``; ``qlora`` is LoRA with ``model.quantization = "nf4"`` (``core.quant``).
- PEFT: what a user writes: the model loaded in bf16, ``bf16=True``, length-grouped batches,
  ``DataCollatorForSeq2Seq``; for QLoRA ``BitsAndBytesConfig`` (NF4, double quantisation, bf16
  compute) and ``peft.prepare_model_for_kbit_training``. Neither side checkpoints activations. The
  PEFT configuration is our own export's ``adapter_config.json`` (as ``bench/vs_peft.py`` makes it),
  so the settings agree by construction.

Each run is a process of its own: one warm-up step, then ``--steps`` timed steps; tokens/s counts
non-padding tokens over the timed steps, peak memory is ``torch.cuda.max_memory_allocated`` (on a CPU
the peak RSS), as ``core.train`` reports it. A row whose package is missing (``bitsandbytes`` for
QLoRA) is reported as skipped. Without a GPU (and without ``--device cpu``) it says so and stops.
Last line: ``gpu_min_speedup_vs_peft: <x>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_throughput import run_child, run_ours, spec_for  # noqa: E402
from bench.vs_peft import trainer_rows  # noqa: E402

# LLaMA-shaped configs (``transformers.LlamaConfig`` keyword arguments).
MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=512),
}
METHODS = ("lora", "dora", "qlora")


def bench_spec(model_dir: Path, method: str, device: str, steps: int):
    """``bench/train_throughput.py``'s job (built-in data, batch 16 = 4 x 4) on ``model_dir`` in bf16 on
    ``device``, with row ``method``'s adapter."""
    from core import AdapterConfig
    from core.config import BUILTIN_DATASET

    spec = spec_for("lora", BUILTIN_DATASET, steps)
    spec.name = f"gpu-bench-{method}"
    spec.model.name, spec.model.device, spec.model.precision = str(model_dir), device, "bf16"
    spec.model.quantization = "nf4" if method == "qlora" else "none"
    spec.adapter = AdapterConfig.for_method("dora" if method == "dora" else "lora")
    return spec


def build(name: str, out: Path, device: str) -> dict[str, Any]:
    """Save model ``name`` with random weights (bf16, drawn on ``device``: seconds for 1B parameters on a
    GPU) and the small tokenizer to ``out / name``, and each method's PEFT configuration beside it: our
    export's ``adapter_config.json`` of the same adapter, as ``bench/vs_peft.py``'s ``peft_config_for``
    makes it, here from the model already in memory. Returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import core
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(**MODELS[name], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out / name)
    tok.save_pretrained(out / name)
    configs = {}
    for method in ("lora", "dora"):
        core.attach(model, bench_spec(out / name, method, device, 1).adapter)
        with tempfile.TemporaryDirectory() as tmp:
            configs[method] = json.loads((core.export_peft(model, tmp) / "adapter_config.json").read_text())
        core.detach(model)
    configs["qlora"] = configs["lora"]  # QLoRA's adapter is LoRA's; PEFT's 4-bit base comes from BitsAndBytesConfig
    for method, config in configs.items():
        config.update(task_type="CAUSAL_LM", inference_mode=False)
        (out / f"{name}-{method}.json").write_text(json.dumps(config))
    return {"params": sum(p.numel() for p in model.parameters())}


def run_peft(spec, peft_config: dict[str, Any]) -> dict[str, float]:
    """Train ``spec``'s data with ``transformers.Trainer`` + PEFT: tokens/s over steps 2..N and peak memory."""
    import peft
    import torch
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from core.models import load_tokenizer
    from core.train import peak_memory_mb

    device = torch.device(spec.model.device)

    class Clock(TrainerCallback):
        """Non-padding tokens fed to the model (kept on the device: no sync per micro-batch) and the
        time at each step's end, after the device has finished the step."""

        def __init__(self):
            self.counts: list[torch.Tensor] = []
            self.marks: list[tuple[float, int]] = []

        def count(self, module, args, kwargs) -> None:
            self.counts.append(kwargs["attention_mask"].sum())

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), len(self.counts)))

    t = spec.train
    tok = load_tokenizer(spec.model)
    dataset = trainer_rows(spec, tok)
    quantized = spec.model.quantization == "nf4"
    options: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": {"": str(device)}}
    if quantized:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec.model.name, **options)
    if quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(t.seed)
    model = peft.get_peft_model(model, peft.PeftConfig.from_peft_type(**peft_config))
    clock = Clock()
    model.register_forward_pre_hook(clock.count, with_kwargs=True)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // t.micro_batch_size, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, bf16=True, use_cpu=device.type == "cpu",
        train_sampling_strategy="group_by_length", logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, seed=t.seed)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock]).train()
    (t0, i0), (t1, i1) = clock.marks[0], clock.marks[-1]
    tokens = int(sum(c.item() for c in clock.counts[i0:i1]))
    return {"tokens_per_s": tokens / (t1 - t0), "peak_mb": peak_memory_mb(device)}


def child(args) -> None:
    out = Path(args.out)
    if args.side == "build":
        print("RESULT " + json.dumps(build(args.model, out, args.device)))
        return
    spec = bench_spec(out / args.model, args.method, args.device, args.steps + 1)
    if args.side == "ours":
        result = run_ours(spec, out / f"ours-{args.model}-{args.method}")
    else:
        result = run_peft(spec, json.loads((out / f"{args.model}-{args.method}.json").read_text()))
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    parser.add_argument("--models", default="smollm2-135m,llama-1b", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--side", choices=("build", "ours", "peft"))
    parser.add_argument("--model", choices=list(MODELS))
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    models, methods = args.models.split(","), args.methods.split(",")
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown models or methods {unknown}; models: {', '.join(MODELS)}; "
                         f"methods: {', '.join(METHODS)}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("# no CUDA GPU here: nothing measured (bench/gpu_check.sh runs this on one; --device cpu is a "
              "smoke test)")
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {where}, torch {torch.__version__}; random-weight models, built-in math data, batch 16 (micro 4 x 4, "
          f"cut-off 256), {args.steps} timed steps after one warm-up; PEFT = transformers.Trainer + peft, bf16")
    print("| model | method | PEFT tokens/s | ours tokens/s | speed-up | PEFT peak MB | ours peak MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    speedups: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, __file__, "--steps", str(args.steps), "--device", args.device, "--out", tmp]
        for model in models:
            params = run_child([*base, "--side", "build", "--model", model], f"build {model}")["params"]
            for method in methods:
                row = f"| {model} ({params / 1e9:.2f}B) | {method} |"
                if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
                    print(f"{row} skipped: bitsandbytes is not installed | | | | |", flush=True)
                    continue
                cmd = [*base, "--model", model, "--method", method]
                p, o = (run_child([*cmd, "--side", side], f"{side} {model} {method}") for side in ("peft", "ours"))
                speedup = speedups[f"{model} {method}"] = o["tokens_per_s"] / p["tokens_per_s"]
                print(f"{row} {p['tokens_per_s']:.0f} | {o['tokens_per_s']:.0f} | {speedup:.2f}x | "
                      f"{p['peak_mb']:.0f} | {o['peak_mb']:.0f} |", flush=True)
    print(f"gpu_min_speedup_vs_peft: {min(speedups.values(), default=float('nan')):.2f}")


if __name__ == "__main__":
    main()
