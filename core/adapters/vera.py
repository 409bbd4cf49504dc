"""VeRA (Kopiczko et al., 2024): ``y = W x + Λ_b B Λ_d A x`` with ``A``, ``B`` frozen, random and shared.

``A`` (r x in) and ``B`` (out x r) are drawn once per model from a stored seed (Kaiming-uniform, as
the paper and PEFT do) and shared by every adapted layer; each layer trains only two vectors,
``d`` (r, a small constant at start) and ``b`` (out, zero at start, so a fresh adapter is the
identity). As in PEFT, one pair is sized to the largest input and output among the adapted layers
and each layer reads its leading slice: ``A[:, :in]``, ``B[:out, :]``.

The first adapted layer also saves the pair in the adapter file (``vera_A``, ``vera_B``), so a loaded
adapter uses the very projections it was trained with, whatever the random number generator draws.

On a fused qkv layer each targeted role (q, k, v) has its own ``d_i`` and ``b_i`` and writes only its
slice of the output, as VeRA on separate q, k, v layers would.

The end of the file declares the method: its settings, builder, drawing and record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchSpec, fused_indices, in_out_features, is_conv1d
from ..config import ROLES, AdapterConfig, ConfigError, Settings, setting
from ..methods import Drawing, Method, register
from .base import AdapterModule, available_roles, make_dropout, sites


def projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair ``A`` (r x max_in), ``B`` (max_out x r), Kaiming-uniform from ``seed``.

    Drawn as PEFT draws them (``A`` first, then ``B``, from one CPU generator; bound ``sqrt(6 / fan_in)``).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(6.0 / shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return out[0], out[1]


class VeraLinear(AdapterModule):
    """VeRA around a linear layer: ``base(x) + b ⊙ (B[:out] (d ⊙ (A[:, :in] dropout(x))))``.

    Args:
        base: the frozen ``nn.Linear`` or ``Conv1D``.
        vera_A, vera_B: the model's shared frozen projections (the same tensors in every module).
        d_initial: the starting value of every entry of ``d``.
        dropout: dropout on the VeRA input.
        slices: ``None`` to adapt the whole output, or ``{role: output indices}`` for a fused layer.
        owns_projections: this module saves and loads the shared pair (one module per model does).
    """

    mergeable = True  # the merge protocol of AdapterModule: merge, unmerge, fold, delta_weight

    def __init__(self, base: nn.Module, vera_A: torch.Tensor, vera_B: torch.Tensor, d_initial: float,
                 dropout: float, slices: dict[str, torch.Tensor] | None = None, owns_projections: bool = False):
        super().__init__()
        self.base = base
        self.transposed = is_conv1d(base)  # Conv1D stores its weight as (in, out)
        self.fan_in, fan_out = in_out_features(base)
        self.r = vera_A.shape[0]
        # Buffers, not parameters: frozen, and outside adapter_params(), so never trained.
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.owns_projections = owns_projections
        self.dropout = make_dropout(dropout)
        self.roles = list(slices) if slices else []
        parts = [slices[k] for k in self.roles] if slices else [None]
        self.vera_d = nn.ParameterList(nn.Parameter(torch.full((self.r,), float(d_initial))) for _ in parts)
        self.vera_b = nn.ParameterList(nn.Parameter(torch.zeros(fan_out if idx is None else len(idx)))
                                       for idx in parts)
        if slices:
            self.register_buffer("out_index", torch.cat(parts), persistent=False)
        else:
            self.out_index = None
        self._saved_weight: torch.Tensor | None = None

    def adapter_named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The trained vectors, and on the owning module the frozen pair too: what the adapter file holds."""
        yield from super().adapter_named_params()
        if self.owns_projections:
            yield "vera_A", self.vera_A
            yield "vera_B", self.vera_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.vera_A.dtype
        h = F.linear(self.dropout(x).to(dtype), self.vera_A[:, :self.fan_in].to(dtype))
        outs = [F.linear(h * d.to(dtype), self.vera_B[:b.shape[0]].to(dtype)) * b.to(dtype)
                for d, b in zip(self.vera_d, self.vera_b)]
        if self.out_index is None:
            return y + outs[0].to(y.dtype)
        return y.index_add(-1, self.out_index, torch.cat(outs, -1).to(y.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The update ``Λ_b B Λ_d A`` as a full (out x in) matrix, in fp32."""
        A = self.vera_A[:, :self.fan_in].float()
        rows = [(b.float()[:, None] * self.vera_B[:b.shape[0]].float()) @ (d.float()[:, None] * A)
                for d, b in zip(self.vera_d, self.vera_b)]
        if self.out_index is None:
            return rows[0]
        delta = A.new_zeros(in_out_features(self.base)[1], self.fan_in)
        return delta.index_copy(0, self.out_index, torch.cat(rows))

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

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Merge for good: the base module, its weight holding the update (this adapter is spent)."""
        self.merge()
        self._saved_weight = None
        self.merged = False
        return self.base

    def detach(self) -> nn.Module:
        self.unmerge()
        return self.base

    def extra_repr(self) -> str:
        roles = f", roles={self.roles}" if self.roles else ""
        return f"r={self.r}{roles}{', owns projections' if self.owns_projections else ''}"


# --------------------------------------------------------------------------------------------------
# The method: settings, builder, drawing, record.

@dataclass
class VeraSettings(Settings):
    """VeRA: W x + b ⊙ B (d ⊙ A x), A and B frozen random and shared, d a small constant and b zero at start."""

    r: int = setting(256, "rank of the shared random projections", min=1, max=65536, integer=True)
    d_initial: float = setting(0.1, "starting value of the trained vector d", min=-100.0, max=100.0)
    dropout: float = setting(0.0, "dropout on the VeRA input", min=0.0, max=0.99)
    seed: int = setting(0, "seed of the shared random projections (also saved with the adapter)",
                        min=0, max=2**31 - 1, integer=True)
    targets: list[str] = setting(["q", "v"], "roles of the linear layers to adapt", choices=ROLES)

    def check(self) -> None:
        if not self.targets:
            raise ConfigError("targets", "name at least one role")


def build(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
          tokenizer: Any) -> dict[str, AdapterModule]:
    """A ``VeraLinear`` on every targeted role (fused q/k/v: one module per fused layer), all sharing one
    projection pair sized to the largest input and output among them; the first one owns the pair.

    Roles the architecture lacks are skipped when the targets are the defaults and refused when the
    user named them.
    """
    s: VeraSettings = cfg.settings
    from_default = list(s.targets) == list(VeraSettings().targets)
    plain, fused = [], []
    for role in dict.fromkeys(s.targets):
        if role in spec.roles:
            plain.append(role)
        elif role in ("q", "k", "v") and spec.fused:
            fused.append(role)
        elif not from_default:
            raise ConfigError("targets", f"this architecture has no {role!r} role; it has "
                                         f"{', '.join(available_roles(spec))}")
    found: list[tuple[str, nn.Module, dict[str, torch.Tensor] | None]] = []
    for site in sites(model, spec, plain, layers):
        found.append((site.path, model.get_submodule(site.path), None))
    if fused:
        heads = model.config.num_attention_heads
        for site in sites(model, spec, ["qkv"], layers):
            base = model.get_submodule(site.path)
            index = fused_indices(spec.fused_layout, in_out_features(base)[1], heads)
            found.append((site.path, base, {r: index[r] for r in fused}))
    if not found:
        return {}
    max_in = max(in_out_features(base)[0] for _, base, _ in found)
    max_out = max(max(len(i) for i in sl.values()) if sl else in_out_features(base)[1] for _, base, sl in found)
    device = next(model.parameters()).device
    A, B = (t.to(device) for t in projections(s.r, max_in, max_out, s.seed))
    return {path: VeraLinear(base, A, B, s.d_initial, s.dropout, slices, owns_projections=i == 0)
            for i, (path, base, slices) in enumerate(found)}


def draw(s: Mapping[str, Any]) -> Drawing:
    targets = [t for t in (s.get("targets") or []) if isinstance(t, str)]
    return Drawing(caption=f"VeRA (r={s.get('r')}, shared random A, B) on {', '.join(targets) or 'nothing'}",
                   marks={t: "+b·B·d·A" for t in targets})


# No placement axis: the paper's placement grid (every method with placements) is LoRA's and the
# bottleneck adapters'. Not in the paper's hyperparameter sweep either; r is its value axis.
VERA = register(Method(
    name="vera", label="VeRA", settings=VeraSettings, build=build, draw=draw, value_setting="r",
    presets={"VeRA": {}}, merges=True,
))
