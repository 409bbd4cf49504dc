"""DoRA (Liu et al., 2024): LoRA's update, then each output feature's weight row rescaled to a trained length.

``W' = m ⊙ V / ||V||_c`` with ``V = W + s B A`` (LoRA's update, ``lora.py``) and ``||V||_c`` the norm of
each output feature's row over the input dimension; the magnitude ``m`` (one value per output
feature) starts at ``||W||_c``, so a fresh adapter is the identity, and trains with ``A`` and ``B``.
As the paper proposes (section 4.3) the norm is treated as a constant in the backward pass: ``m``
gets its gradient through ``g = m / ||V||_c``, ``A`` and ``B`` only through ``V x``.

With ``g`` the layer computes ``y = g ⊙ (W x + s B A x) + b`` (the bias is not rescaled). With dropout
in training it follows the authors' code and PEFT: the update ``W' - W`` reads the dropped-out input,
as LoRA's does, ``y = W x + b + (g - 1) ⊙ W xd + g ⊙ s B A xd`` — written here as
``W (x - xd) + g ⊙ (W xd + s B A xd) + b``, two products with ``W`` where LoRA has one.

The norm needs ``V`` (out x in) per call. The fast route never forms it: with ``W`` fixed,
``||V_i||^2 = ||W_i||^2 + 2 s B_i · (A W^T)_i + s^2 B_i (A A^T) B_i^T``, one (r x in) x (in x out)
product and r x r ones (``||W_i||^2`` is kept from the start); the reference route forms ``V`` (in
fp32), as PEFT does (in the compute dtype). Either is cached while ``A``, ``B`` and ``W`` are unchanged:
generation computes it once, not once per token. Training a frozen bf16 ``nn.Linear`` (the fast
kernels), ``V xd`` is LoRA's written-out function (``_LoraTrainFn``) applied to ``xd`` alone (with
``fast_weight``); ``g`` and dropout's ``W (x - xd)`` stay plain autograd.

Everything else is LoRA's: rsLoRA, LoRA+ (``m`` at the base learning rate), PiSSA/OLoRA starts (``V``
is then ``W + s (B A - B0 A0)``), fused q/k/v slices (one magnitude per role, rows outside the
targeted slices untouched), ``Conv1D``, a 4-bit base (QLoRA: ``W`` dequantised for the norms, ``W z``
through the 4-bit layer). The merge is exact: ``W' = g ⊙ V``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..arch import ArchSpec, in_out_features
from ..config import AdapterConfig
from ..methods import Drawing, Method, register
from . import lora
from .base import AdapterModule


class DoraLinear(lora.LoraLinear):
    """DoRA around a linear layer: ``LoraLinear``'s arguments; adds ``lora_magnitude`` (one vector per role).

    ``lora_factors()`` and ``lora_delta()`` stay LoRA's part of ``V`` (what the PEFT layout stores);
    the layer's own update of the weight is ``delta_weight()``, dense.
    """

    fold_dropout_scale = False  # W xd needs the true dropped-out input, not one rescaled inside A

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float,
                 slices: dict[str, torch.Tensor] | None = None, dropout_share: dict | None = None, **options: Any):
        super().__init__(base, r, alpha, dropout, slices, dropout_share, **options)
        with torch.no_grad():
            squares = self.weight_out_in().float().pow(2).sum(1)
        self.register_buffer("weight_sq", squares, persistent=False)  # ||W_i||^2, the fixed part of the norm
        rows = squares.sqrt() if self.out_index is None else squares.sqrt()[self.out_index]
        self.lora_magnitude = nn.ParameterList(
            nn.Parameter(m.clone()) for m in rows.split([B.shape[0] for B in self.lora_B]))
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------------- the norm
    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per role, the factors of the update ``s B_i' A_i'``: ``(A_i, B_i)``, or ``([A_i; A0_i], [B_i, -B0_i])``."""
        pairs = list(zip(self.lora_A.split(self.r), self.lora_B))
        if self.lora_A0 is None:
            return pairs
        return [(torch.cat([a, a0]), torch.cat([b, -b0], 1))
                for (a, b), a0, b0 in zip(pairs, self.lora_A0.split(self.r), self.frozen_Bs())]

    @torch.no_grad()
    def row_norms(self) -> torch.Tensor:
        """``||W + ΔW||_c`` of the adapted rows (fp32, ``out_index`` order), constant for autograd."""
        tensors = [self.lora_A, *self.lora_B, self.base.weight] + ([self.lora_A0] if self.lora_A0 is not None else [])
        key = (self.fast_function, *((t.data_ptr(), t._version) for t in tensors))
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        with torch.autocast(self.lora_A.device.type, enabled=False):
            norms = self._factored_norms() if self.fast_function else self._direct_norms()
        self._norm_cache = (key, norms)
        return norms

    def _direct_norms(self) -> torch.Tensor:
        norms = (self.weight_out_in().float() + self.lora_delta()).norm(dim=1)
        return norms if self.out_index is None else norms[self.out_index]

    def _factored_norms(self) -> torch.Tensor:
        w = self.weight_out_in()
        pairs = self._pairs()
        products = F.linear(torch.cat([a for a, _ in pairs]).to(w.dtype), w).float()  # (A W^T): (ranks x out)
        indices = [None] if self.out_index is None else self.out_index.split([b.shape[0] for _, b in pairs])
        s, norms, start = self.scaling, [], 0
        for (a, b), idx in zip(pairs, indices):
            p = products[start:start + a.shape[0]]
            start += a.shape[0]
            p = p if idx is None else p[:, idx]
            cross = (b * p.T).sum(1)
            quad = ((b @ (a @ a.T)) * b).sum(1)
            squares = self.weight_sq if idx is None else self.weight_sq[idx]
            norms.append((squares + 2 * s * cross + s * s * quad).clamp_min(0).sqrt())
        return torch.cat(norms)

    def scale(self) -> torch.Tensor:
        """``g = m / ||V||_c`` over every output feature (fp32; 1 outside a fused layer's slices)."""
        g = torch.cat(list(self.lora_magnitude)) / self.row_norms()
        if self.out_index is None:
            return g
        return g.new_ones(in_out_features(self.base)[1]).index_copy(0, self.out_index, g)

    def magnitude_vector(self) -> torch.Tensor:
        """``m`` over every output feature: ``||W||_c`` (so ``g = 1``) outside a fused layer's slices."""
        m = torch.cat(list(self.lora_magnitude))
        if self.out_index is None:
            return m
        return self.weight_sq.sqrt().index_copy(0, self.out_index, m)

    # ------------------------------------------------------------------------------------ forward, merge
    def _linear(self, z: torch.Tensor) -> torch.Tensor:
        """``W z`` without the bias (a 4-bit base computes it as its own forward does)."""
        if self.quantized:
            return quant.linear(self.base, z)
        weight = self.base.weight
        return z @ weight if self.transposed else F.linear(z, weight)

    def _frozen_part(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(W - s B0 A0) z``: the frozen part of the layer (``W z`` from a kaiming start)."""
        if self.lora_A0 is None:
            return self._linear(z)
        return self.add_rows(self._linear(z), self.low_rank(z, self.lora_A0, self.frozen_Bs(), -self.scaling, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base(x)
        dtype = self.compute_dtype(x)
        xd = self.dropout(x)
        fast = self._fused_path(x)
        if fast:  # V xd by LoRA's written-out function, its input xd only
            v = lora._LoraTrainFn.apply(xd, xd, self.fast_weight(), None, self.lora_A, self.lora_B[0], 1.0,
                                        self.scaling)
        else:
            v = self.add_rows(self._linear(xd), self.update(xd, xd, dtype))
        # g ⊙ v as v + (g - 1) ⊙ v, in v's dtype: g - 1 is small and keeps its digits in bf16, where g itself
        # would round to a step of 1/128; no fp32 copy of the activations (a third of a DoRA step in fp32).
        gm1 = (self.scale() - 1).to(v.dtype)
        bias = self.base.bias
        if xd is x:
            y = torch.addcmul(v, v, gm1)
            return y if bias is None else y.add_(bias.to(y.dtype))
        rest = x - xd
        if fast:
            y = F.linear(rest, self.fast_weight(), bias)
        else:
            y = self._frozen_part(rest, dtype)
            y = y if bias is None else y + bias.to(y.dtype)
        return y.add_(v).addcmul_(v, gm1)

    def delta_weight(self) -> torch.Tensor:
        """``W' - W = g ⊙ V - W`` (out x in, fp32)."""
        w = self.weight_out_in().float()
        return self.scale().detach()[:, None] * (w + self.lora_delta()) - w

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """``W' = g ⊙ (W + ΔW)``, written whole (not added as a delta); the bias stays."""
        merged = self.scale()[:, None] * (self.weight_out_in().float() + self.lora_delta())
        weight.copy_((merged.T if self.transposed else merged).to(weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"


# --------------------------------------------------------------------------------------------------
# The method: settings, builder, PEFT layout, drawing, record.

@dataclass
class DoraSettings(lora.LoraSettings):
    """DoRA: m ⊙ (W + (alpha / r) B A) / ||W + (alpha / r) B A||_c, m starting at ||W||_c; LoRA's settings."""


def build(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
          tokenizer: Any) -> dict[str, AdapterModule]:
    """A ``DoraLinear`` wherever LoRA would put a ``LoraLinear``."""
    return lora.build(model, cfg, spec, layers, tokenizer, module=DoraLinear)


def peft_layout(items: list[tuple[str, DoraLinear]], cfg: AdapterConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's LoRA layout with ``use_dora``: LoRA's tensors plus each layer's ``lora_magnitude_vector``
    over all its output features."""
    tensors, config = lora.peft_layout(items, cfg)
    for path, a in items:
        tensors[f"base_model.model.{path}.lora_magnitude_vector"] = a.magnitude_vector().detach().float().cpu()
    return tensors, {**config, "use_dora": True}


def draw(s: Mapping[str, Any]) -> Drawing:
    targets = [t for t in (s.get("targets") or []) if isinstance(t, str)]
    return Drawing(caption=f"{lora.variant_label(s, 'DoRA')} (r={s.get('r')}, alpha={s.get('alpha')}, "
                           f"trained magnitudes) on {', '.join(targets) or 'nothing'}",
                   marks={t: "m·(W+BA)/‖·‖" for t in targets})


# The DoRA paper's LLaMA commonsense setting (q, k, v, up, down; r 32, alpha 64, dropout 0.05) is
# LoRA's default, so the preset is the defaults. Not in the LLM-Adapters hyperparameter sweep.
DORA = register(Method(
    name="dora", label="DoRA", settings=DoraSettings, build=build, draw=draw, value_setting="r",
    placements=lora.LORA.placements, presets={"DoRA": {}}, merges=True, peft=peft_layout, quantized_base=True,
    merge_family="dora",
))
