"""Adapter Workbench engine: adapters, training, evaluation and generation. No UI, no database.

The public API used by the UI, the jobs and the tests is what this module exports.
"""

from .arch import ARCHITECTURES, UnsupportedArchitecture
from .config import (METHOD_SETTINGS, PRESETS, AdapterConfig, ConfigError, DataSettings, EvalSettings,
                     JobSpec, ModelSettings, TrainSettings, fields_of)
from .inject import (adapter_params, adapter_state_dict, attach, detach, disable_adapters, export_merged,
                     export_peft,
                     load_adapter, merge_adapter, read_adapter_config, save_adapter, trainable_report,
                     unmerge_adapter)

__all__ = [
    "ARCHITECTURES", "UnsupportedArchitecture", "METHOD_SETTINGS", "PRESETS", "AdapterConfig", "ConfigError",
    "DataSettings", "EvalSettings", "JobSpec", "ModelSettings", "TrainSettings", "fields_of",
    "adapter_params", "adapter_state_dict", "attach", "detach", "disable_adapters", "export_merged", "export_peft",
    "load_adapter", "merge_adapter", "read_adapter_config", "save_adapter", "trainable_report",
    "unmerge_adapter",
]
