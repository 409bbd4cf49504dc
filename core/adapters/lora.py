"""LoRA (Hu et al., 2021): ``y = W x + (alpha / r) * B A x`` with ``A`` random, ``B`` zero at start.

One class wraps ``nn.Linear`` and GPT-2's ``Conv1D`` alike, and fused projections: on a fused ``qkv``
layer each adapted role (q, k, v) gets its own ``A_i`` (r x in) and ``B_i`` (|slice_i| x r) writing
only into that role's slice of the output, so the parameter count and the maths equal those of LoRA
on separate q, k, v layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import in_out_features, is_conv1d
from .base import AdapterModule, FastDropout


class LoraLinear(AdapterModule):
    """LoRA around a linear layer.

    Args:
        base: the frozen ``nn.Linear`` or ``Conv1D``.
        r, alpha, dropout: rank, scaling numerator, input dropout.
        slices: ``None`` to adapt the whole output, or ``{role: output indices}`` for a fused layer.
        dropout_share: a dict shared by the LoRA modules of one model, so that those reading the same
            input tensor share one dropout mask (see ``FastDropout``).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float,
                 slices: dict[str, torch.Tensor] | None = None, dropout_share: dict | None = None):
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = alpha / r
        self.dropout = FastDropout(dropout, dropout_share, rescale=False) if dropout > 0 else nn.Identity()
        self.p = dropout
        self.transposed = is_conv1d(base)  # Conv1D stores its weight as (in, out)
        fan_in, fan_out = in_out_features(base)
        self.roles = list(slices) if slices else []
        parts = [slices[k] for k in self.roles] if slices else [None]
        self.lora_A = nn.Parameter(torch.empty(r * len(parts), fan_in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(fan_out if idx is None else len(idx), r)) for idx in parts)
        if slices:
            self.register_buffer("out_index", torch.cat(parts), persistent=False)
        else:
            self.out_index = None
        self.merged = False
        self._saved_weight: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B A`` as a full (out x in) matrix, in fp32."""
        fan_in, fan_out = in_out_features(self.base)
        if self.out_index is None:
            return (self.lora_B[0] @ self.lora_A) * self.scaling
        delta = self.lora_A.new_zeros(fan_out, fan_in)
        rows = torch.cat([B @ A for B, A in zip(self.lora_B, self.lora_A.split(self.r))])
        return delta.index_copy(0, self.out_index, rows) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.lora_A.dtype
        # Scalars (dropout's 1 / (1 - p), alpha / r) are folded into the small A and B, not the activations.
        a = self.lora_A * (1.0 / (1.0 - self.p)) if self.training and self.p > 0 else self.lora_A
        h = F.linear(self.dropout(x).to(dtype), a.to(dtype))
        if self.out_index is None:
            return y + F.linear(h, (self.lora_B[0] * self.scaling).to(dtype)).to(y.dtype)
        outs = [F.linear(part, (B * self.scaling).to(dtype)) for part, B in zip(h.split(self.r, -1), self.lora_B)]
        return y.index_add(-1, self.out_index, torch.cat(outs, -1).to(y.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight. Repeat-safe; ``unmerge`` restores the exact weight."""
        if self.merged:
            return
        weight = self.base.weight
        self._saved_weight = weight.detach().clone()
        delta = self.delta_weight()
        weight.add_((delta.T if self.transposed else delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self._saved_weight)
        self._saved_weight = None
        self.merged = False

    def detach(self) -> nn.Module:
        self.unmerge()
        return self.base

    def extra_repr(self) -> str:
        roles = f", roles={self.roles}" if self.roles else ""
        return f"r={self.r}, scaling={self.scaling:g}{roles}"
