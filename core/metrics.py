"""The one vocabulary of training metrics, from the trainer's reports to the database and the charts.

A training step is ``{"type": "step", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s",
"elapsed_s"}`` and a validation ``{"type": "eval", "step", "epoch", "val_loss"}``: the names of
``core.callbacks.StepReport``/``EvalReport``, the lines of a run's ``metrics.jsonl``, the columns of the
jobs database's ``metric_points`` and the keys ``app.charts`` reads. Progress that is not a metric
(``total_steps``, ``eta_s``) stays out. Standard library only: ``jobs`` imports it without torch.
"""

from __future__ import annotations

import math
from typing import Any

STEP_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")
EVAL_FIELDS = ("step", "epoch", "val_loss")


def finite(value: Any) -> float | None:
    """A float, or None for what JSON and the charts cannot hold (None, NaN, infinities)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def step_record(report: Any) -> dict[str, Any]:
    """The metric record of a training step (a ``StepReport`` or anything with its fields)."""
    return {"type": "step", "step": int(report.step),
            **{name: finite(getattr(report, name)) for name in STEP_FIELDS[1:]}}


def eval_record(report: Any) -> dict[str, Any]:
    """The metric record of a validation (an ``EvalReport`` or anything with its fields)."""
    return {"type": "eval", "step": int(report.step), "epoch": finite(report.epoch),
            "val_loss": finite(report.val_loss)}
