"""Forward-pass cost of each adapter method relative to the bare base model, on the embedded model.

    .venv/bin/python bench/adapter_overhead.py [--batch 8] [--length 128] [--reps 7]

Every configuration is timed in the same run, alternating with the base, best of ``reps``.
Last line: ``lora_unmerged_overhead: <ratio>``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core  # noqa: E402
from core import AdapterConfig, ModelSettings  # noqa: E402
from core.models import load_model, resolve_device, resolve_dtype  # noqa: E402

CONFIGS = {
    "lora r=32 (unmerged)": AdapterConfig.preset("LoRA"),
    "lora r=32 (merged)": AdapterConfig.preset("LoRA"),
    "series AdapterP": AdapterConfig.preset("AdapterP"),
    "series AdapterH": AdapterConfig.preset("AdapterH"),
    "parallel": AdapterConfig.preset("Parallel"),
    "scaled parallel": AdapterConfig.preset("Scaled_Parallel"),
    "prefix (10)": AdapterConfig.preset("Prefix"),
    "prompt (10)": AdapterConfig.for_method("prompt", init="random"),
    "ptuning (10)": AdapterConfig.for_method("ptuning"),
}


def time_pair(base, model, ids, mask, dtype, reps: int) -> tuple[float, float]:
    """Best-of-``reps`` forward times of base and adapted model, measured alternately (noise-robust)."""
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for m in (base, model):
            m(input_ids=ids, attention_mask=mask)  # warm-up
        for _ in range(reps):
            for i, m in enumerate((base, model)):
                start = time.perf_counter()
                m(input_ids=ids, attention_mask=mask)
                times[i].append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    settings = ModelSettings()
    dtype = resolve_dtype(settings.precision, resolve_device("cpu"))
    base = load_model(settings, dtype=dtype if dtype != torch.float32 else None).model.eval()
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (args.batch, args.length))
    mask = torch.ones_like(ids)
    print(f"# SmolLM2-135M-Instruct, batch {args.batch} x {args.length} tokens, {dtype}, "
          f"{torch.get_num_threads()} threads, best of {args.reps}, alternating with the base")
    print("| adapter | trainable params | forward ms | base ms | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ratios = {}
    for name, cfg in CONFIGS.items():
        model = core.attach(copy.deepcopy(base), cfg)
        with torch.no_grad():  # non-zero adapters, as after training
            for p in core.adapter_params(model):
                p.add_(torch.randn_like(p) * 0.01)
        if "merged" in name and "unmerged" not in name:
            core.merge_adapter(model)
        model.eval()
        t_base, t = time_pair(base, model, ids, mask, dtype, args.reps)
        ratios[name] = t / t_base
        print(f"| {name} | {core.trainable_report(model)['trainable']:,} | {t * 1e3:.1f} | "
              f"{t_base * 1e3:.1f} | {t / t_base:.3f} |")
        del model
    print(f"lora_merged_overhead: {ratios['lora r=32 (merged)']:.3f}")
    print(f"lora_unmerged_overhead: {ratios['lora r=32 (unmerged)']:.3f}")


if __name__ == "__main__":
    main()
