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

The end of the file declares the method: its settings, builder, PEFT layout, drawing and record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchSpec, in_out_features, is_conv1d
from ..config import ROLES, AdapterConfig
from ..fields import ConfigError, Settings, setting
from ..methods import Drawing, Method, register
from .base import AdapterModule, WeightMerging, make_dropout, target_layers


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


class VeraLinear(WeightMerging):
    """VeRA around a linear layer: ``base(x) + b ⊙ (B[:out] (d ⊙ (A[:, :in] dropout(x))))``.

    Args:
        base: the frozen ``nn.Linear`` or ``Conv1D``.
        vera_A, vera_B: the model's shared frozen projections (the same tensors in every module).
        d_initial: the starting value of every entry of ``d``.
        dropout: dropout on the VeRA input.
        slices: ``None`` to adapt the whole output, or ``{role: output indices}`` for a fused layer.
        owns_projections: this module saves and loads the shared pair (one module per model does).
    """

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

    def extra_repr(self) -> str:
        roles = f", roles={self.roles}" if self.roles else ""
        return f"r={self.r}{roles}{', owns projections' if self.owns_projections else ''}"


# --------------------------------------------------------------------------------------------------
# The method: settings, builder, PEFT layout, drawing, record.

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
    projection pair sized to the largest input and output among them; the first one owns the pair."""
    s: VeraSettings = cfg.settings
    found = target_layers(model, spec, s.targets, VeraSettings().targets, layers)
    if not found:
        return {}
    max_in = max(in_out_features(t.module)[0] for t in found)
    max_out = max(max(len(i) for i in t.slices.values()) if t.slices else in_out_features(t.module)[1]
                  for t in found)
    device = next(model.parameters()).device
    A, B = (p.to(device) for p in projections(s.r, max_in, max_out, s.seed))
    return {t.path: VeraLinear(t.module, A, B, s.d_initial, s.dropout, t.slices, owns_projections=i == 0)
            for i, t in enumerate(found)}


def peft_layout(items: list[tuple[str, VeraLinear]], cfg: AdapterConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and ``adapter_config.json`` of Hugging Face PEFT's VeRA layout, projections included.

    PEFT computes ``λ_b ⊙ B_p[:out] (λ_d ⊙ A_p[:, :in] x)`` with one ``λ_d``, ``λ_b`` per layer and one
    pair ``A_p``, ``B_p`` sized to the largest input and output among the targeted layers; the pair is
    saved (``save_projection``: keys ``base_model.vera_A``/``vera_B``), so PEFT's own draw from
    ``projection_prng_key`` is never used. Targets are named by full path, so PEFT adapts (and sizes
    its pair over) exactly these layers.

    Without fused layers this is our layout as it is. A fused q/k/v layer gives each role its own ``d_i``
    and reads ``B[:|slice|]`` for every slice, which one ``λ_d`` and a row slice of a shared ``B_p``
    cannot express directly; it is written exactly in a rank ``r * blocks`` form instead. Each role
    (and, when there are plain layers, the plain layers) gets a block of ``r`` columns: ``A_p`` is ``A``
    repeated once per block; role ``i``'s block of ``B_p`` holds ``B[:|slice_i|]`` in that role's
    output rows, the plain block holds ``B`` itself; a layer's ``λ_d`` is its ``d`` (or ``d_i``) in its
    own blocks and zero elsewhere, and ``λ_b`` is zero on fused outputs no role targets. Every extra
    term is multiplied by an exact zero, so PEFT computes the same sums (the update equals ours to
    rounding). ``ConfigError`` if two fused layers lay out a role differently (no shared ``B_p`` fits).
    """
    s: VeraSettings = cfg.settings
    r = items[0][1].r
    roles: dict[str, torch.Tensor] = {}  # role -> its output rows, the same on every fused layer
    for path, a in items:
        for role, idx in zip(a.roles, a.out_index.cpu().split([len(b) for b in a.vera_b]) if a.roles else []):
            if role in roles and not torch.equal(roles[role], idx):
                raise ConfigError("targets", f"{path}: the fused layers lay out {role!r} differently, which "
                                             "PEFT's one shared VeRA projection cannot express")
            roles.setdefault(role, idx)
    has_plain = any(not a.roles for _, a in items)
    blocks = [*roles, *([None] if has_plain else [])]  # None: the block of the plain layers
    max_in = max(a.fan_in for _, a in items)
    max_out = max(in_out_features(a.base)[1] for _, a in items)
    A, B = items[0][1].vera_A.detach().float().cpu(), items[0][1].vera_B.detach().float().cpu()
    peft_A = A[:, :max_in].repeat(len(blocks), 1)
    peft_B = B.new_zeros(max_out, r * len(blocks))
    for k, role in enumerate(blocks):
        cols = slice(k * r, (k + 1) * r)
        if role is None:
            plain_out = max(in_out_features(a.base)[1] for _, a in items if not a.roles)
            peft_B[:plain_out, cols] = B[:plain_out]
        else:
            peft_B[roles[role], cols] = B[:len(roles[role])]
    tensors = {"base_model.vera_A": peft_A.contiguous(), "base_model.vera_B": peft_B.contiguous()}
    for path, a in items:
        own = a.roles or [None]
        d = torch.zeros(r * len(blocks))
        for role, d_i in zip(own, a.vera_d):
            k = blocks.index(role)
            d[k * r:(k + 1) * r] = d_i.detach().float().cpu()
        if a.roles:
            b = torch.zeros(in_out_features(a.base)[1])
            b[a.out_index.cpu()] = torch.cat([b_i.detach().float().cpu() for b_i in a.vera_b])
        else:
            b = a.vera_b[0].detach().float().cpu()
        tensors[f"base_model.model.{path}.vera_lambda_d"] = d
        tensors[f"base_model.model.{path}.vera_lambda_b"] = b.contiguous()
    config = {
        "peft_type": "VERA", "task_type": "CAUSAL_LM", "r": r * len(blocks),
        "target_modules": [path for path, _ in items], "projection_prng_key": s.seed, "save_projection": True,
        "vera_dropout": s.dropout, "d_initial": s.d_initial, "fan_in_fan_out": any(a.transposed for _, a in items),
        "bias": "none", "modules_to_save": None, "init_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "inference_mode": True,
    }
    return tensors, config


def draw(s: Mapping[str, Any]) -> Drawing:
    targets = [t for t in (s.get("targets") or []) if isinstance(t, str)]
    return Drawing(caption=f"VeRA (r={s.get('r')}, shared random A, B) on {', '.join(targets) or 'nothing'}",
                   marks={t: "+b·B·d·A" for t in targets})


# No placement axis: the paper's placement grid (every method with placements) is LoRA's and the
# bottleneck adapters'. Not in the paper's hyperparameter sweep either; r is its value axis.
VERA = register(Method(
    name="vera", label="VeRA", settings=VeraSettings, build=build, draw=draw, value_setting="r",
    presets={"VeRA": {}}, merges=True, peft=peft_layout,
))
