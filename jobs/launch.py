"""The command line of a job's process, one place for the worker and for tests.

One process: ``python -m jobs.run <id>``. With ``train.devices = N > 1`` (strategy ``ddp``):
``python -m torch.distributed.run --standalone --nproc-per-node N -m jobs.run <id>``, PyTorch's own
launcher (``torchrun``), which gives each rank its ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and ends the
whole group when one rank fails. ``is_job_process`` in ``jobs.worker`` recognises both forms by their
``jobs.run <id>`` arguments. torchrun starts each rank in a session of its own: a signal for the job
goes to torchrun (the pid the worker started and the job records), which passes SIGTERM/SIGINT on to
every rank; ``jobs.run`` says how the ranks then stop together.
"""

from __future__ import annotations

import sys
from typing import Any


def processes(spec: dict[str, Any] | None, kind: str = "train") -> int:
    """How many processes a job of ``kind`` with this spec (its stored JSON object) runs on: a training
    job's ``train.devices``, at least 1; every other kind (evaluate, export, merge...) copies a training
    spec but runs in one process, and must not hold the training's GPUs."""
    if kind != "train":
        return 1
    train = (spec or {}).get("train") or {}
    devices = train.get("devices", 1)
    return devices if isinstance(devices, int) and not isinstance(devices, bool) and devices > 1 else 1


def child_command(job_id: int, nproc: int = 1) -> list[str]:
    """The argv that runs job ``job_id`` on ``nproc`` processes (the worker's cwd is the repository root)."""
    if nproc <= 1:
        return [sys.executable, "-m", "jobs.run", str(job_id)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "jobs.run", str(job_id)]
