"""Adapter modules, one file per family."""

from .base import AdapterModule
from .bottleneck import ParallelAdapter, SeriesAdapter
from .lora import LoraLinear
from .prompt import PrefixTuning, PromptTuning, PTuning, VirtualTokens

__all__ = ["AdapterModule", "LoraLinear", "SeriesAdapter", "ParallelAdapter", "VirtualTokens",
           "PrefixTuning", "PromptTuning", "PTuning"]
