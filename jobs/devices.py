"""What a worker offers and what a job needs of it: the CPU, or CUDA GPUs (how many, how much memory).

A worker says what it offers with ``--devices``: ``auto`` (every GPU this machine has, else the CPU),
``cpu``, ``cuda`` (every GPU) or ``cuda:0,1`` (those GPUs, numbered as ``nvidia-smi``/torch number
them in the worker's environment). A job needs what its spec says: ``model.device`` (``auto``,
``cpu``, ``cuda``), ``train.devices`` processes, and optionally the memory each of its GPUs must have
(``submit(..., gpu_memory=...)``). The rules (``assign``):

- a ``cpu`` job runs on any worker, on the CPU (N processes talk over gloo);
- a ``cuda`` job needs N free GPUs of a worker, one per process, each with the memory asked;
- an ``auto`` job takes N free GPUs of a CUDA worker, or the CPU of a CPU worker.

A child sees only the GPUs it was given (``CUDA_VISIBLE_DEVICES``); one given none sees no GPU, so
``auto`` cannot wander onto a GPU another job holds. torch is imported only where a GPU driver is
present, so CPU machines (and the CLI) never pay for it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

GiB = 2**30
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


class DevicesError(ValueError):
    """A ``--devices`` value that is malformed or names GPUs this machine does not have."""


@dataclass(frozen=True)
class Gpu:
    index: int    # as torch numbers it in the worker's environment
    name: str
    memory: int   # bytes

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "memory": self.memory}


@dataclass(frozen=True)
class Devices:
    """What one worker offers: its GPUs (none: a CPU worker) and its CPU cores."""

    gpus: tuple[Gpu, ...] = ()
    cpus: int = 1

    @property
    def kind(self) -> str:
        return "cuda" if self.gpus else "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "cpus": self.cpus, "gpus": [g.to_dict() for g in self.gpus]}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Devices":
        data = data or {}
        return cls(gpus=tuple(Gpu(int(g["index"]), str(g.get("name", "")), int(g.get("memory", 0)))
                              for g in data.get("gpus") or ()), cpus=int(data.get("cpus") or 1))


def summary(devices: dict[str, Any] | Devices | None) -> str:
    """``cpu (16 cores)`` or ``cuda ×2 (NVIDIA H200, 139 GiB each)``, for tables and logs."""
    d = devices if isinstance(devices, Devices) else Devices.from_dict(devices)
    if not d.gpus:
        return f"cpu ({d.cpus} cores)"
    names = sorted({g.name for g in d.gpus if g.name})
    memory = min(g.memory for g in d.gpus)
    return f"cuda ×{len(d.gpus)} ({', '.join(names) or 'GPU'}, {memory / GiB:.0f} GiB each)"


def detect_gpus() -> list[Gpu]:
    """The GPUs torch sees here; [] without importing torch where no NVIDIA driver is installed or
    ``CUDA_VISIBLE_DEVICES`` hides every GPU."""
    visible = os.environ.get(VISIBLE_ENV)
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    if not Path("/proc/driver/nvidia").exists() and shutil.which("nvidia-smi") is None:
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(i, props.name, int(props.total_memory)))
    return gpus


def parse_devices(text: str = "auto", found: list[Gpu] | None = None) -> Devices:
    """The devices a ``--devices`` value offers (``found``: the GPUs here, default ``detect_gpus()``)."""
    value = (text or "auto").strip().lower()
    cpus = os.cpu_count() or 1
    if value == "cpu":
        return Devices(cpus=cpus)
    if value != "auto" and value != "cuda" and not value.startswith("cuda:"):
        raise DevicesError(f"--devices {text!r}: write auto, cpu, cuda (every GPU) or cuda:0,1 (those GPUs)")
    gpus = detect_gpus() if found is None else found
    if value == "auto":
        return Devices(gpus=tuple(gpus), cpus=cpus)
    if not gpus:
        raise DevicesError(f"--devices {text}: no CUDA GPU is visible on this machine (torch sees none); "
                           "use --devices cpu")
    if value == "cuda":
        return Devices(gpus=tuple(gpus), cpus=cpus)
    by_index = {g.index: g for g in gpus}
    chosen = []
    for part in value.removeprefix("cuda:").split(","):
        if not part.strip().isdigit():
            raise DevicesError(f"--devices {text!r}: {part.strip()!r} is not a GPU number (write cuda:0,1)")
        index = int(part)
        if index not in by_index:
            raise DevicesError(f"--devices {text}: there is no GPU {index} here (this machine has "
                               f"{', '.join(map(str, sorted(by_index)))})")
        if by_index[index] not in chosen:
            chosen.append(by_index[index])
    return Devices(gpus=tuple(chosen), cpus=cpus)


def assign(devices: Devices, busy: Iterable[int], device: str, processes: int,
           gpu_memory: int | None) -> tuple[int, ...] | None:
    """The GPUs a job gets on this worker now: () to run on the CPU, None when it cannot run here now
    (a ``cuda`` job on a CPU worker, or not enough free GPUs with the memory asked). The smallest GPUs
    that fit are given, keeping the large ones free for jobs that need them."""
    if device == "cpu" or (device == "auto" and not devices.gpus):
        return ()
    if not devices.gpus:
        return None
    taken = set(busy)
    fit = sorted((g for g in devices.gpus if g.index not in taken and (gpu_memory is None or g.memory >= gpu_memory)),
                 key=lambda g: (g.memory, g.index))
    if len(fit) < max(1, processes):
        return None
    return tuple(sorted(g.index for g in fit[:max(1, processes)]))


def visible_devices(indices: tuple[int, ...], parent: str | None = None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a child given GPUs ``indices`` (numbered in the worker's
    environment, whose own ``parent`` list, when set, maps them to the machine's); "" hides every GPU."""
    names = [p.strip() for p in parent.split(",")] if parent and parent.strip() else None
    return ",".join(names[i] if names and i < len(names) else str(i) for i in indices)
