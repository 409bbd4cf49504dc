"""(IA)³ (Liu et al., 2022): learned vectors rescaling the keys, the values and the MLP's inner activation.

On an attention projection (k, v) the vector ``l`` rescales the output features,
``y = l ⊙ (W x + b)``, which merges exactly as ``W' = diag(l) W``, ``b' = l ⊙ b``. On the MLP's
exit (``down``) it rescales the input features, i.e. the inner activation,
``y = W (l ⊙ x) + b``, which merges as ``W' = W diag(l)``. Every vector starts at ones, so a fresh
adapter is the identity.

On a fused qkv layer (GPT-2's ``Conv1D``, BLOOM and GPT-NeoX) only the targeted roles' output slices
are rescaled: one vector per role, as on separate k and v layers.

The end of the file declares the method: its settings, builder, PEFT layout, drawing and record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..arch import ArchSpec, in_out_features, is_conv1d
from ..config import ROLES, AdapterConfig
from ..fields import ConfigError, Settings, setting
from ..methods import Drawing, Method, register
from .base import AdapterModule, WeightMerging, target_layers

INPUT_ROLES = ("down",)  # roles whose input (the MLP's inner activation) is rescaled; others: their output


class Ia3Linear(WeightMerging):
    """(IA)³ around a linear layer: ``l ⊙ base(x)`` or ``base(l ⊙ x)``.

    Args:
        base: the frozen ``nn.Linear`` or ``Conv1D``.
        scales_input: rescale the input features (``down``) instead of the output features.
        slices: ``None`` to rescale every feature, or ``{role: output indices}`` on a fused layer
            (output side only): one vector per role, features outside the slices keep scale 1.
    """

    def __init__(self, base: nn.Module, scales_input: bool = False,
                 slices: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if slices and scales_input:
            raise ValueError("a fused layer's slices are output features")
        self.base = base
        self.scales_input = scales_input
        self.transposed = is_conv1d(base)  # Conv1D stores its weight as (in, out)
        fan_in, fan_out = in_out_features(base)
        self.roles = list(slices) if slices else []
        parts = [slices[k] for k in self.roles] if slices else [None]
        width = fan_in if scales_input else fan_out
        self.ia3_l = nn.ParameterList(nn.Parameter(torch.ones(width if idx is None else len(idx))) for idx in parts)
        if slices:
            self.register_buffer("out_index", torch.cat(parts), persistent=False)
        else:
            self.out_index = None

    def scale(self) -> torch.Tensor:
        """The full scaling vector (in or out features, fp32): ones outside a fused layer's slices."""
        if self.out_index is None:
            return self.ia3_l[0]
        full = self.ia3_l[0].new_ones(in_out_features(self.base)[1])
        return full.index_copy(0, self.out_index, torch.cat(list(self.ia3_l)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base(x)
        if self.scales_input:
            return self.base(x * self.scale().to(x.dtype))
        y = self.base(x)
        return y * self.scale().to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``W' - W`` as an (out x in) matrix in fp32; a bias on the output side is rescaled too (see ``merge``)."""
        w = self.base.weight.detach().float()
        w = w.T if self.transposed else w
        s = self.scale().float() - 1.0
        return w * s[None, :] if self.scales_input else w * s[:, None]

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """``W' = diag(l) W, b' = l ⊙ b`` (output side) or ``W' = W diag(l)`` (input side)."""
        s = self.scale().to(weight.dtype)
        # Linear: weight (out, in); Conv1D: weight (in, out). Scale the input or output axis of either.
        out_axis = 1 if self.transposed else 0
        axis = 1 - out_axis if self.scales_input else out_axis
        weight.mul_(s[:, None] if axis == 0 else s[None, :])
        if bias is not None and not self.scales_input:
            bias.mul_(s.to(bias.dtype))

    def extra_repr(self) -> str:
        roles = f", roles={self.roles}" if self.roles else ""
        return f"side={'input' if self.scales_input else 'output'}{roles}"


# --------------------------------------------------------------------------------------------------
# The method: settings, builder, PEFT layout, drawing, record.

@dataclass
class Ia3Settings(Settings):
    """(IA)³: learned vectors, ones at start, rescaling the outputs of the targeted projections and the
    input of ``down`` (the MLP's inner activation)."""

    targets: list[str] = setting(["k", "v", "down"], "roles rescaled: the output of each, the input of down",
                                 choices=ROLES)

    def check(self) -> None:
        if not self.targets:
            raise ConfigError("targets", "name at least one role")


def build(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
          tokenizer: Any) -> dict[str, AdapterModule]:
    """An ``Ia3Linear`` on every targeted role (see ``target_layers``); on a fused qkv layer one module
    rescales the targeted parts."""
    s: Ia3Settings = cfg.settings
    return {t.path: Ia3Linear(t.module, scales_input=t.role in INPUT_ROLES, slices=t.slices)
            for t in target_layers(model, spec, s.targets, Ia3Settings().targets, layers)}


def peft_layout(items: list[tuple[str, Ia3Linear]], cfg: AdapterConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and ``adapter_config.json`` of Hugging Face PEFT's IA3 layout.

    PEFT keeps ``ia3_l`` as (out, 1) on an output-side layer and (1, in) on a ``feedforward_modules``
    one. A fused layer is written with its full output vector (ones outside the targeted slices), which
    is exactly what the module computes. Layers are named by full path: PEFT's ``IA3Config`` has no
    layer selection, and a bare name can stand for two layers (GPT-2's ``c_proj`` is both attention's
    output and the MLP's ``down``).
    """
    tensors: dict[str, torch.Tensor] = {}
    for path, a in items:
        s = a.scale().detach().float().contiguous().cpu()
        tensors[f"base_model.model.{path}.ia3_l"] = s[None, :] if a.scales_input else s[:, None].contiguous()
    config = {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": [path for path, _ in items],
        "feedforward_modules": [path for path, a in items if a.scales_input],
        "fan_in_fan_out": any(a.transposed for _, a in items), "init_ia3_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    return tensors, config


def draw(s: Mapping[str, Any]) -> Drawing:
    targets = [t for t in (s.get("targets") or []) if isinstance(t, str)]
    return Drawing(caption=f"(IA)³ rescaling {', '.join(targets) or 'nothing'}",
                   marks={t: "x·l" if t in INPUT_ROLES else "⊙l" for t in targets})


IA3 = register(Method(
    # (IA)³ has no numeric hyperparameter to vary, but the registry requires a value_setting: the
    # targets, which a study leaves at their default. No placement axis: the paper's placement grid
    # (every method with placements) is LoRA's and the bottleneck adapters'.
    name="ia3", label="(IA)³", settings=Ia3Settings, build=build, draw=draw, value_setting=None,
    presets={"IA3": {}}, merges=True, peft=peft_layout,
))
