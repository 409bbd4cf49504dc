"""LoRA (Hu et al., 2021): ``y = W x + (alpha / r) * B A x`` with ``A`` random, ``B`` zero at start.

One class wraps ``nn.Linear`` and GPT-2's ``Conv1D`` alike, and fused projections: on a fused ``qkv``
layer each adapted role (q, k, v) gets its own ``A_i`` (r x in) and ``B_i`` (|slice_i| x r) writing
only into that role's slice of the output, so the parameter count and the maths equal those of LoRA
on separate q, k, v layers.

The end of the file declares the method: its settings, builder, PEFT layout, drawing and record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchSpec, fused_indices, in_out_features, is_conv1d
from ..config import ROLES, AdapterConfig, ConfigError, Settings, parse_layers, setting
from ..methods import Drawing, Method, Placements, register
from .base import AdapterModule, FastDropout, MaskShare, available_roles, sites


class _LoraTrainFn(torch.autograd.Function):
    """``y = x W^T + b + (xd (sa A)^T) (sb B)^T`` for a frozen low-precision ``W``, forward and backward.

    ``xd`` is the dropped-out ``x`` (or ``x`` itself). Written out, each product is one GEMM, the LoRA
    update is accumulated into the base output in place (no pass to add the branch), ``A`` and ``B``
    are scaled and cast once per call, and the backward pass saves nothing it does not use; the
    autograd graph of the same expression records every cast and scaling, forward and backward. Part
    of a 10% faster LoRA training step on SmolLM2 (with the cheaper dropout draws, measured together).
    The gradients for ``A`` and ``B`` come back in their own dtype (fp32).
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_a, lora_b, a_scale: float, b_scale: float):
        dtype = weight.dtype
        a = (lora_a * a_scale).to(dtype)
        b = (lora_b * b_scale).to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if xd is x else xd.reshape(-1, xd.shape[-1])
        h = xd2 @ a.t()
        y = F.linear(x2, weight, bias)
        y.addmm_(h, b.t())
        ctx.save_for_backward(xd2, h, a, b, weight)
        ctx.shared_input = xd is x
        ctx.scales = (a_scale, b_scale)
        ctx.param_dtype = lora_a.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xd2, h, a, b, weight = ctx.saved_tensors
        a_scale, b_scale = ctx.scales
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        dh = g @ b
        grad_b = (g.t() @ h).to(ctx.param_dtype).mul_(b_scale)
        grad_a = (dh.t() @ xd2).to(ctx.param_dtype).mul_(a_scale)
        shape = (*grad.shape[:-1], weight.shape[1])
        grad_x = grad_xd = None
        if ctx.shared_input:  # no dropout: both paths flow into x, one GEMM accumulates them
            if ctx.needs_input_grad[0]:
                grad_x = torch.addmm(dh @ a, g, weight).view(shape)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight).view(shape)
            if ctx.needs_input_grad[1]:
                grad_xd = (dh @ a).view(shape)
        return grad_x, grad_xd, None, None, grad_a, grad_b, None, None


class LoraLinear(AdapterModule):
    """LoRA around a linear layer.

    Args:
        base: the frozen ``nn.Linear`` or ``Conv1D``.
        r, alpha, dropout: rank, scaling numerator, input dropout.
        slices: ``None`` to adapt the whole output, or ``{role: output indices}`` for a fused layer.
        dropout_share: a dict shared by the LoRA modules of one model, so that those reading the same
            input tensor share one dropout mask (see ``FastDropout``).

    A new module takes the fast training route; ``use_training_kernels`` (called by the trainer for
    ``TrainSettings.kernels``) chooses between it and the plain one.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float,
                 slices: dict[str, torch.Tensor] | None = None, dropout_share: dict | None = None):
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = alpha / r
        self.p = dropout
        self.use_training_kernels(fast_function=True, fast_dropout=True, dropout_share=dropout_share)
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
        if not self.enabled or self.merged:
            return self.base(x)
        # Scalars (FastDropout's 1 / (1 - p), alpha / r) are folded into the small A and B, not the activations.
        folds = self.training and self.p > 0 and not getattr(self.dropout, "rescale", True)
        a_scale = 1.0 / (1.0 - self.p) if folds else 1.0
        if self._fused_path(x):
            return _LoraTrainFn.apply(x, self.dropout(x), self.base.weight, self.base.bias,
                                      self.lora_A, self.lora_B[0], a_scale, self.scaling)
        y = self.base(x)
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.lora_A.dtype
        a = self.lora_A * a_scale if a_scale != 1.0 else self.lora_A
        h = F.linear(self.dropout(x).to(dtype), a.to(dtype))
        if self.out_index is None:
            return y + F.linear(h, (self.lora_B[0] * self.scaling).to(dtype)).to(y.dtype)
        outs = [F.linear(part, (B * self.scaling).to(dtype)) for part, B in zip(h.split(self.r, -1), self.lora_B)]
        return y.index_add(-1, self.out_index, torch.cat(outs, -1).to(y.dtype))

    def use_training_kernels(self, fast_function: bool, fast_dropout: bool,
                             dropout_share: dict | None = None) -> None:
        """Choose how this module trains (inference is the same either way).

        Args:
            fast_function: train a frozen bf16/fp16 ``nn.Linear`` through ``_LoraTrainFn``; False: the
                autograd graph of ``base(x) + (dropout(x) A^T) (scaling B)^T``, as PEFT computes it.
            fast_dropout: ``FastDropout`` (a quarter of the random numbers, ``1 / (1 - p)`` folded into
                ``A``); False: an independent ``nn.Dropout`` of this module's own.
            dropout_share: with ``fast_dropout``, a dict shared with the other LoRA modules of the model:
                those reading the very same input tensor (q, k and v) then drop the same input features,
                where independent dropouts would drop different ones.
        """
        self.fast_function = fast_function
        if self.p <= 0:
            self.dropout = nn.Identity()
        elif fast_dropout:
            self.dropout = FastDropout(self.p, dropout_share, rescale=False)
        else:
            self.dropout = nn.Dropout(self.p)

    def _fused_path(self, x: torch.Tensor) -> bool:
        """Training a plain frozen ``nn.Linear`` in bf16/fp16: the one-function route (``_LoraTrainFn``)."""
        weight = self.base.weight
        return (self.fast_function and self.training and torch.is_grad_enabled() and self.out_index is None
                and type(self.base) is nn.Linear and x.dtype in (torch.bfloat16, torch.float16)
                and weight.dtype == x.dtype and not weight.requires_grad
                and (self.base.bias is None or not self.base.bias.requires_grad))

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``delta_weight() == scaling * B @ A``, as one LoRA of rank ``A.shape[0]``.

        On a fused layer ``A`` stacks the roles' ``A_i`` ((r * roles) x in) and ``B`` is block-structured
        (out x (r * roles)): role ``i``'s ``B_i`` in its own rows and columns, zero elsewhere.
        """
        if self.out_index is None:
            return self.lora_A, self.lora_B[0]
        B = self.lora_A.new_zeros(in_out_features(self.base)[1], self.lora_A.shape[0])
        rows = self.out_index.split([Bi.shape[0] for Bi in self.lora_B])
        for i, (Bi, idx) in enumerate(zip(self.lora_B, rows)):
            B[idx, i * self.r:(i + 1) * self.r] = Bi
        return self.lora_A, B

    mergeable = True  # the merge protocol of AdapterModule: merge, unmerge, fold, delta_weight

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
        return f"r={self.r}, scaling={self.scaling:g}{roles}"


# --------------------------------------------------------------------------------------------------
# The method: settings, builder, PEFT layout, drawing, record.

@dataclass
class LoraSettings(Settings):
    """LoRA: W x + (alpha / r) * B A x, with A (r x in) random and B (out x r) zero at start."""

    r: int = setting(32, "rank of the low-rank update", min=1, max=4096, integer=True)
    alpha: float = setting(64.0, "scaling numerator: the update is multiplied by alpha / r",
                           min=1e-6, max=65536.0)
    dropout: float = setting(0.05, "dropout on the LoRA input", min=0.0, max=0.99)
    targets: list[str] = setting(["q", "k", "v", "up", "down"], "roles of the linear layers to adapt",
                                 choices=ROLES)

    def check(self) -> None:
        if not self.targets:
            raise ConfigError("targets", "name at least one role")


def build(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
          tokenizer: Any) -> dict[str, AdapterModule]:
    """A ``LoraLinear`` on every targeted role; on a fused qkv layer one module adapts the targeted parts.

    Roles the architecture lacks are skipped when the targets are the defaults (GPT-2 has no gate) and
    refused when the user named them.
    """
    s: LoraSettings = cfg.settings
    from_default = list(s.targets) == list(LoraSettings().targets)
    plain, fused = [], []
    for role in dict.fromkeys(s.targets):
        if role in spec.roles:
            plain.append(role)
        elif role in ("q", "k", "v") and spec.fused:
            fused.append(role)
        elif not from_default:
            raise ConfigError("targets", f"this architecture has no {role!r} role; it has "
                                         f"{', '.join(available_roles(spec))}")
    built: dict[str, AdapterModule] = {}
    share = MaskShare()
    for site in sites(model, spec, plain, layers):
        built[site.path] = LoraLinear(model.get_submodule(site.path), s.r, s.alpha, s.dropout, dropout_share=share)
    if fused:
        heads = model.config.num_attention_heads
        for site in sites(model, spec, ["qkv"], layers):
            base = model.get_submodule(site.path)
            index = fused_indices(spec.fused_layout, in_out_features(base)[1], heads)
            built[site.path] = LoraLinear(base, s.r, s.alpha, s.dropout, {r: index[r] for r in fused},
                                          dropout_share=share)
    return built


def peft_layout(items: list[tuple[str, LoraLinear]], cfg: AdapterConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and ``adapter_config.json`` of Hugging Face PEFT's LoRA layout.

    A fused q/k/v LoRA is written exactly as one LoRA of rank ``r * roles`` on the fused layer
    (``lora_factors``), with ``rank_pattern``/``alpha_pattern`` keeping its scale.
    """
    s: LoraSettings = cfg.settings
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, a in items:
        A, B = a.lora_factors()
        if A.shape[0] != a.r:
            rank_pattern[path] = A.shape[0]
            alpha_pattern[path] = s.alpha * (A.shape[0] // a.r)
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().float().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout,
        "target_modules": sorted({path.rsplit(".", 1)[-1] for path, _ in items}), "bias": "none",
        "fan_in_fan_out": any(a.transposed for _, a in items), "inference_mode": True, "modules_to_save": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "layers_to_transform": parse_layers(cfg.layers), "layers_pattern": None,
    }
    return tensors, config


def draw(s: Mapping[str, Any]) -> Drawing:
    targets = [t for t in (s.get("targets") or []) if isinstance(t, str)]
    return Drawing(caption=f"LoRA (r={s.get('r')}, alpha={s.get('alpha')}) on {', '.join(targets) or 'nothing'}",
                   marks={t: "+BA" for t in targets})


LORA = register(Method(
    name="lora", label="LoRA", settings=LoraSettings, build=build, draw=draw, value_setting="r",
    placements=Placements({"attn": {"targets": ["q", "k", "v", "o"]}, "mlp": {"targets": ["up", "down"]},
                           "both": {"targets": ["q", "k", "v", "o", "up", "down"]}}, default="both"),
    sweep=lambda hidden: [4, 8, 16, 32], presets={"LoRA": {}}, merges=True, peft=peft_layout,
))
