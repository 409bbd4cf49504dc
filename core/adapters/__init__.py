"""Adapter modules, one file per family; each file also declares and registers its methods.

``core.methods`` imports this package on first use, so the order of the imports below is the order of
the methods in the registry (and in the UI): LoRA; series, parallel; prefix, prompt, P-tuning; (IA)³;
VeRA; DoRA; LoReFT.
"""

from .base import AdapterModule
from .lora import LoraLinear
from .bottleneck import ParallelAdapter, SeriesAdapter
from .prompt import PrefixTuning, PromptTuning, PTuning, VirtualTokens
from .ia3 import Ia3Linear
from .vera import VeraLinear
from .dora import DoraLinear
from .reft import Loreft

__all__ = ["AdapterModule", "LoraLinear", "DoraLinear", "SeriesAdapter", "ParallelAdapter", "VirtualTokens",
           "PrefixTuning", "PromptTuning", "PTuning", "Ia3Linear", "VeraLinear", "Loreft"]
