"""Adapter Workbench engine: adapters, training, evaluation and generation. No UI, no database.

The public API used by the UI, the jobs and the tests is what this module exports. The names are
resolved lazily (PEP 562): ``import core.config`` or ``core.deployment`` loads the standard library
only, so ``jobs`` and the CLI list jobs without paying for torch; the first use of, say,
``core.attach`` imports the module that holds it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "arch": ("ARCHITECTURES", "UnsupportedArchitecture"),
    "config": ("METHOD_SETTINGS", "PRESETS", "AdapterConfig", "ConfigError", "DataSettings", "EvalSettings",
               "JobSpec", "ModelSettings", "TrainSettings", "fields_of"),
    "inject": ("adapter_params", "adapter_state_dict", "attach", "detach", "disable_adapters", "export_merged",
               "export_peft", "load_adapter", "merge_adapter", "read_adapter_config", "save_adapter",
               "trainable_report", "unmerge_adapter"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
