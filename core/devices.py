"""Where a model runs and in what precision: ``resolve_device``, ``cpu_has_bf16``, ``resolve_dtype``.

Also home of ``ModelLoadError``, the one error of the model modules (``devices`` -> ``embedded`` ->
``models``), defined in the lowest of them so that all three raise the same class, and of
``error_line``, how their messages quote the exception underneath.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .fields import ConfigError


class ModelLoadError(ConfigError):
    """A model that cannot be loaded; the message says what was tried and what to do.

    A ``ConfigError`` on ``model.name`` (or ``model.device`` / ``model.precision``), so every caller
    that shows settings errors shows it; ``str()`` is the message alone.
    """

    def __init__(self, message: str, field: str = "model.name"):
        super().__init__(field, message)

    def __str__(self) -> str:
        return self.message


def error_line(err: BaseException) -> str:
    """An exception as one short line for a message: its class and the first line of its text."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` = cuda when a GPU is available, else cpu; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        device = device.type
    device = str(device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available to this process "
                                 f"(torch {torch.__version__}); choose device 'auto' or 'cpu'", "model.device")
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise ModelLoadError(f"unknown device {device!r}; choose auto, cpu or cuda", "model.device")


_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX-512-bf16, from ``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(f in flags for f in _CPU_BF16_FLAGS)
    return False


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str, device: str | torch.device = "auto") -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``.

    ``auto`` = bf16 on a CUDA GPU that supports it, or on a CPU with AMX / AVX-512-bf16; else fp32.
    """
    device = resolve_device(device)
    precision = str(precision or "auto").strip().lower()
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16", "model.precision")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"precision 'bf16' was asked for but this GPU ({torch.cuda.get_device_name()}) "
                             "does not support it; choose fp16, fp32 or auto", "model.precision")
    return _PRECISIONS[precision]
