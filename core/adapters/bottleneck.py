"""Bottleneck adapters (Houlsby et al. 2019; He et al. 2021): ``up(act(down(h)))``, ``up`` zero-initialised.

- ``SeriesAdapter`` sits after a block's output ``h``: ``h + up(act(down(h)))``. After the attention
  and the MLP it is AdapterH; after the MLP only, AdapterP.
- ``ParallelAdapter`` sits beside a block: ``block(x) + s * up(act(down(x)))`` where ``x`` is the
  block's input and ``s`` a fixed or learned scale (Scaled Parallel).

Both wrap the module whose output leaves the block (``o`` or ``down``); the parallel adapter reads the
block's input from the module that enters it (``q``/``qkv`` or ``up``) through a forward pre-hook, so
no architecture needs its own block class.

The end of the file declares the two methods: settings, builders, drawings and records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..arch import ArchSpec, in_out_features
from ..config import AdapterConfig
from ..fields import Settings, setting
from ..methods import Box, Drawing, Method, Placements, register
from .base import AdapterModule, block_points, make_dropout, sites

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


# --------------------------------------------------------------------------------------------------
# The methods: settings, builders, drawings, records.

PLACEMENTS = ("attn", "mlp", "both")
BLOCKS = {"attn": ("attn",), "mlp": ("mlp",), "both": ("attn", "mlp")}


@dataclass
class SeriesSettings(Settings):
    """Series (bottleneck) adapter after a block: h + up(act(down(h))), up zero-initialised."""

    bottleneck: int = setting(256, "bottleneck width", min=1, max=65536, integer=True)
    non_linearity: str = setting("tanh", "activation inside the bottleneck", choices=tuple(ACTIVATIONS))
    dropout: float = setting(0.0, "dropout on the adapter input", min=0.0, max=0.99)
    placement: str = setting("mlp", "after attention (attn), after the MLP (mlp) or both (AdapterH)",
                             choices=PLACEMENTS)


@dataclass
class ParallelSettings(Settings):
    """Parallel adapter beside a block: block(x) + s * up(act(down(x))); s fixed or learned."""

    bottleneck: int = setting(256, "bottleneck width", min=1, max=65536, integer=True)
    scale: Any = setting(1.0, "output scale: a number, or 'learned' (Scaled Parallel)",
                         choices=("learned",), number_ok=True, min=-1000.0, max=1000.0)
    non_linearity: str = setting("relu", "activation inside the bottleneck", choices=tuple(ACTIVATIONS))
    dropout: float = setting(0.0, "dropout on the adapter input", min=0.0, max=0.99)
    placement: str = setting("mlp", "beside attention (attn), the MLP (mlp) or both", choices=PLACEMENTS)


def build_series(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
                 tokenizer: Any) -> dict[str, AdapterModule]:
    """A ``SeriesAdapter`` around the module leaving each placed block (``o``, ``down``)."""
    s: SeriesSettings = cfg.settings
    exits = [exit for _, exit in block_points(spec, s.placement)]
    return {site.path: SeriesAdapter(model.get_submodule(site.path), s.bottleneck, s.non_linearity, s.dropout)
            for site in sites(model, spec, exits, layers)}


def build_parallel(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
                   tokenizer: Any) -> dict[str, AdapterModule]:
    """A ``ParallelAdapter`` around each placed block's exit, reading the input of its entry."""
    s: ParallelSettings = cfg.settings
    built = {}
    for entry, exit in block_points(spec, s.placement):
        for e, x in zip(sites(model, spec, [entry], layers), sites(model, spec, [exit], layers)):
            built[x.path] = ParallelAdapter(model.get_submodule(x.path), model.get_submodule(e.path),
                                            s.bottleneck, s.non_linearity, s.dropout, s.scale)
    return built


def _blocks(s: Mapping[str, Any]) -> tuple[str, ...]:
    placement = s.get("placement", "mlp")
    return BLOCKS.get(placement, ()) if isinstance(placement, str) else ()


def draw_series(s: Mapping[str, Any]) -> Drawing:
    where = {"attn": "after attention", "mlp": "after the MLP", "both": "after attention and after the MLP"}
    label = f"series adapter ({s.get('bottleneck', '?')})"
    caption = f"Series adapter (bottleneck {s.get('bottleneck')}) {where.get(str(s.get('placement')), '?')}"
    return Drawing(caption=caption, boxes=tuple(Box(block, "series", label) for block in _blocks(s)))


def draw_parallel(s: Mapping[str, Any]) -> Drawing:
    where = {"attn": "beside attention", "mlp": "beside the MLP", "both": "beside attention and the MLP"}
    label, scale = f"parallel adapter ({s.get('bottleneck', '?')})", str(s.get("scale", 1.0))
    return Drawing(caption=f"Parallel adapter (bottleneck {s.get('bottleneck')}, scale {s.get('scale')}) "
                           f"{where.get(str(s.get('placement')), '?')}",
                   boxes=tuple(Box(block, "parallel", label, scale) for block in _blocks(s)))


def bottleneck_sweep(hidden_size: int) -> list[int]:
    """The paper's bottleneck widths scaled to the model: up to half the hidden size (64..256 on a 7B)."""
    top = max(8, min(256, hidden_size // 2))
    return sorted({max(4, top // 4), max(4, top // 2), top})


_PLACED = Placements({p: {"placement": p} for p in PLACEMENTS}, default="mlp")

SERIES = register(Method(
    name="series", paper=True, label="Series adapter", settings=SeriesSettings, build=build_series, draw=draw_series,
    value_setting="bottleneck", placements=_PLACED, sweep=bottleneck_sweep,
    presets={"AdapterH": {"placement": "both"}, "AdapterP": {"placement": "mlp"}},
))
PARALLEL = register(Method(
    name="parallel", paper=True, label="Parallel adapter", settings=ParallelSettings, build=build_parallel,
    draw=draw_parallel, value_setting="bottleneck", placements=_PLACED,
    presets={"Parallel": {}, "Scaled_Parallel": {"scale": "learned"}},
))
