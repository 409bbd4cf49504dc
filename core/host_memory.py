"""A training process's memory: freed blocks kept for reuse, oneDNN's kernel cache kept small.

glibc gives blocks above its (adaptive) mmap threshold straight back to the kernel when they are
freed, and trims the heap top past 128 KiB. A training step allocates and frees the same
multi-megabyte activations every micro-batch, so each one is faulted in again, page by page, and
zeroed by the kernel: ~120,000 page faults per LoRA step on SmolLM2 here (``getrusage``); keeping
them halved the faults and made the step 5-8% faster. Pinning the mmap threshold at its maximum (32 MiB) and never trimming makes those
blocks reusable from the heap; the process keeps its peak footprint until it exits, which for a job
process (one per training run) is when the memory is needed back anyway.

oneDNN (PyTorch's CPU matmul library) caches the last 1,024 matmul primitives it built, each with its
JIT-compiled code and buffers. Training meets new matmul shapes with every new micro-batch length, so
that cache only grows: +1.3 GB of resident memory after 40 LoRA steps on SmolLM2, and page faults
with it. One micro-batch uses ~30 shapes; a 64-entry cache keeps those and was both smaller and
faster here (10 steps: 2.7 GB and 626 tokens/s against 3.7 GB and 587; 16 entries thrash: 363).

Which setting applies it: ``TrainSettings.kernels = "fast"`` (its ``memory`` part, ``core.train.KERNELS``),
when a ``Trainer`` sets up on a CPU, before the model loads; ``"reference"`` leaves the allocator and
oneDNN at their defaults. Both are process-level and not undone: a reference run later in the same
process inherits them, so benches measure each setting in a process of its own (a job already runs in one).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses larger values on 64-bit
ONEDNN_CACHE_ENTRIES = 64


def retain_freed_memory() -> bool:
    """Tune glibc's allocator as above; False where there is no glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20)))


def limit_onednn_cache(entries: int = ONEDNN_CACHE_ENTRIES) -> None:
    """Ask oneDNN for a small primitive cache, unless the user set one.

    oneDNN reads ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` when the process first builds a primitive, so this
    counts in a process that has not run a CPU matmul yet (a job's process, ``python -m core train``).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(entries))
