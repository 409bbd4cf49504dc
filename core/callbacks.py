"""What a training run reports, and to whom: the step and validation reports, the callback protocol
``core.train`` calls, a list of callbacks acting as one, and ``MetricsFile``, the callback that writes
a run's ``metrics.jsonl`` in the one metric vocabulary (``core.metrics``). No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import eval_record, step_record


@dataclass
class StepReport:
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass
class EvalReport:
    step: int
    epoch: float
    val_loss: float


class TrainCallbacks:
    """What a training run tells the outside world. Override what you need; all are no-ops here."""

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_step(self, report: StepReport) -> None:
        pass

    def on_eval(self, report: EvalReport) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        """Polled every step; True ends the run cleanly with the adapter saved."""
        return False


class CallbackList(TrainCallbacks):
    """Several callbacks as one: each event goes to every one in order; any of them can stop the run."""

    def __init__(self, callbacks: list[TrainCallbacks]):
        self.callbacks = callbacks

    def on_start(self, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_start(info)

    def on_step(self, report: StepReport) -> None:
        for cb in self.callbacks:
            cb.on_step(report)

    def on_eval(self, report: EvalReport) -> None:
        for cb in self.callbacks:
            cb.on_eval(report)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(step, path)

    def should_stop(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)


class MetricsFile(TrainCallbacks):
    """Appends each step's and validation's metric record (``core.metrics``) to ``metrics.jsonl``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step(self, report: StepReport) -> None:
        self._write(step_record(report))

    def on_eval(self, report: EvalReport) -> None:
        self._write(eval_record(report))
