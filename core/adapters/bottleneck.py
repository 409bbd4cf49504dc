"""Bottleneck adapters (Houlsby et al. 2019; He et al. 2021): ``up(act(down(h)))``, ``up`` zero-initialised.

- ``SeriesAdapter`` sits after a block's output ``h``: ``h + up(act(down(h)))``. After the attention
  and the MLP it is AdapterH; after the MLP only, AdapterP.
- ``ParallelAdapter`` sits beside a block: ``block(x) + s * up(act(down(x)))`` where ``x`` is the
  block's input and ``s`` a fixed or learned scale (Scaled Parallel).

Both wrap the module whose output leaves the block (``o`` or ``down``); the parallel adapter reads the
block's input from the module that enters it (``q``/``qkv`` or ``up``) through a forward pre-hook, so
no architecture needs its own block class.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import in_out_features
from .base import AdapterModule, make_dropout

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """``up(act(down(dropout(x))))`` with ``up`` zero so that the adapter starts as zero."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int, non_linearity: str, dropout: float):
        super().__init__()
        self.dropout = make_dropout(dropout)
        self.down = nn.Linear(d_in, bottleneck)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.down.weight.dtype
        h = nn.functional.linear(self.dropout(x).to(dtype), self.down.weight.to(dtype), self.down.bias.to(dtype))
        return nn.functional.linear(self.act(h), self.up.weight.to(dtype), self.up.bias.to(dtype))


class SeriesAdapter(AdapterModule):
    """Bottleneck after ``base``'s output: ``h + adapter(h)``."""

    def __init__(self, base: nn.Module, bottleneck: int, non_linearity: str, dropout: float):
        super().__init__()
        self.base = base
        _, d = in_out_features(base)
        self.adapter = Bottleneck(d, d, bottleneck, non_linearity, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if not self.enabled:
            return h
        return h + self.adapter(h).to(h.dtype)


class ParallelAdapter(AdapterModule):
    """Bottleneck beside a block: ``base(x') + s * adapter(x)``, ``x`` read at the block's entry.

    Args:
        base: the module whose output leaves the block (wrapped).
        entry: the module the block's input goes into first (observed, not wrapped).
        scale: a number, or ``"learned"`` for a trainable scalar initialised at 1.
    """

    def __init__(self, base: nn.Module, entry: nn.Module, bottleneck: int, non_linearity: str,
                 dropout: float, scale: float | str):
        super().__init__()
        self.base = base
        d_in, _ = in_out_features(entry)
        _, d_out = in_out_features(base)
        self.adapter = Bottleneck(d_in, d_out, bottleneck, non_linearity, dropout)
        if scale == "learned":
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)
        self._block_input: torch.Tensor | None = None
        self._hook = entry.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._block_input = args[0] if self.enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        block_input, self._block_input = self._block_input, None
        if not self.enabled or block_input is None:
            return y
        return y + (self.scale * self.adapter(block_input)).to(y.dtype)

    def detach(self) -> nn.Module:
        self._hook.remove()
        return self.base
