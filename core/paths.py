"""Where the workbench keeps its files: ``$WORKBENCH_HOME`` (default ``./workbench_data``)."""

from __future__ import annotations

import os
from pathlib import Path


def workbench_home() -> Path:
    """The data directory (database, runs, converted models), created on first use."""
    home = Path(os.environ.get("WORKBENCH_HOME") or "workbench_data").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def models_dir() -> Path:
    path = workbench_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    path = workbench_home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path
