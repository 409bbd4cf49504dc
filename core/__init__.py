"""Adapter Workbench engine: adapters, training, evaluation and generation. No UI, no database.

The public API used by the UI, the jobs and the tests is what this module exports. The names are
resolved lazily (PEP 562): ``import core.config`` or ``core.deployment`` loads the standard library
only, so ``jobs`` and the CLI list jobs without paying for torch; the first use of, say,
``core.attach`` imports the module that holds it.

``core.evaluate`` is the function, although a module of that name exists: importing the module
(``from core.evaluate import ...``) does not replace the function here. ``import core.evaluate as m``
therefore binds the function too; import names from the module instead.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "arch": ("ARCHITECTURES", "UnsupportedArchitecture"),
    "benchmarks": ("BENCHMARKS", "Benchmark", "BenchmarkError", "benchmark_info", "extract_answer",
                   "infer_answer_type", "is_correct", "list_benchmarks", "load_benchmark"),
    "config": ("METHOD_SETTINGS", "PRESETS", "AdapterConfig", "ConfigError", "DataSettings", "EvalSettings",
               "JobSpec", "ModelSettings", "TrainSettings", "fields_of"),
    "devices": ("ModelLoadError", "resolve_device", "resolve_dtype"),
    "evaluate": ("EvalResult", "evaluate"),
    "inject": ("adapter_params", "adapter_state_dict", "attach", "detach", "disable_adapters", "export_merged",
               "export_peft", "load_adapter", "merge_adapter", "read_adapter_config", "save_adapter",
               "trainable_report", "unmerge_adapter"),
    "models": ("LoadedModel", "get_model", "load_model", "load_tokenizer"),
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


class _Package(types.ModuleType):
    """The import system sets a loaded submodule as an attribute of its package; where an export has
    the submodule's name (``evaluate``), the export is kept instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
