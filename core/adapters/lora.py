"""LoRA (Hu et al., 2021): ``y = W x + s * B A x`` with ``A`` random, ``B`` zero at start, ``s = alpha / r``.

One class wraps ``nn.Linear`` and GPT-2's ``Conv1D`` alike, and fused projections: on a fused ``qkv``
layer each adapted role (q, k, v) gets its own ``A_i`` (r x in) and ``B_i`` (|slice_i| x r) writing
only into that role's slice of the output, so the parameter count and the maths equal those of LoRA
on separate q, k, v layers.

Settings of the LoRA family, shared with DoRA (``dora.py``):

- rsLoRA (Kalajdzievski, 2023): ``s = alpha / sqrt(r)``, so the update's scale does not fade as r grows.
- LoRA+ (Hayou et al., 2024): ``B`` trains at ``loraplus_ratio`` times ``A``'s learning rate
  (``lr_scales``, which the trainer turns into optimiser groups).
- PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024) initialisation (``lora_init.py``): ``A`` and
  ``B`` start as ``A0``, ``B0`` taken from ``W`` itself and the layer trains on the residual. Here the
  base weight is never modified: the module computes ``W x + s (B A - B0 A0) x``, with ``A0``, ``B0``
  kept as buffers and saved with the adapter. So "disable" is the original layer bit for bit, save
  and load need no second SVD to agree (randomized SVD draws differently each time), and the update
  over the original base, ``s (B A - B0 A0)``, is a LoRA of rank 2r: ``A' = [A; A0]``,
  ``B' = [B, -B0]`` (``lora_factors``), which is how it merges and exports. The frozen pair reads the
  un-dropped input, as the residual weight would; the fast training route multiplies by the residual
  itself (``fast_weight``).
- QLoRA (Dettmers et al., 2023; ``core.quant``): the base may be a 4-bit ``Linear4bit``. The module
  then calls it as it is (its autograd function keeps only the packed weight for the backward pass),
  reads ``W`` dequantised where it needs it (a PiSSA start, DoRA's norms), does not merge into the
  4-bit weights (the merged export folds into the original ones, ``core.inject``), and trains by the
  plain route: the fast one would keep a dense copy of every adapted weight from the forward to the
  backward pass, the memory a 4-bit base exists to save.

The end of the file declares the method: its settings, builder, PEFT layout, drawing and record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..arch import ArchSpec, in_out_features, is_conv1d
from ..config import ROLES, AdapterConfig, parse_layers
from ..fields import ConfigError, Settings, setting
from ..methods import Drawing, Method, Placements, register
from .base import AdapterModule, FastDropout, MaskShare, WeightMerging, target_layers
from .lora_init import INITS, initial_factors


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


class LoraLinear(WeightMerging):
    """LoRA around a linear layer.

    Args:
        base: the frozen ``nn.Linear`` or ``Conv1D``.
        r, alpha, dropout: rank, scaling numerator, input dropout.
        slices: ``None`` to adapt the whole output, or ``{role: output indices}`` for a fused layer.
        dropout_share: a dict shared by the LoRA modules of one model, so that those reading the same
            input tensor share one dropout mask (see ``FastDropout``).
        rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init: ``kaiming`` (A random, B zero) or a start from ``W`` (see ``lora_init.INITS``).
        b_lr_ratio: LoRA+: ``B``'s learning rate over ``A``'s (1 = plain LoRA).

    A new module takes the fast training route; ``use_training_kernels`` (called by the trainer for
    ``TrainSettings.kernels``) chooses between it and the plain one.
    """

    fold_dropout_scale = True  # FastDropout leaves out 1 / (1 - p), which update() folds into A

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float,
                 slices: dict[str, torch.Tensor] | None = None, dropout_share: dict | None = None, *,
                 rslora: bool = False, init: str = "kaiming", b_lr_ratio: float = 1.0):
        super().__init__()
        self.base = base
        self.quantized = quant.is_quantized(base)  # a 4-bit base (QLoRA): see the module docstring
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.p = dropout
        self.init = init
        self.b_lr_ratio = b_lr_ratio
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
        self.register_buffer("lora_A0", None, persistent=False)  # saved through adapter_named_params
        self.register_buffer("lora_B0", None, persistent=False)
        self._fast_residual: tuple[tuple, torch.Tensor] | None = None  # see fast_weight
        if init != "kaiming":
            self._start_from_weight(parts)

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as (out x in): a view (``Conv1D`` stores it transposed), or a 4-bit base's
        weight dequantised (a new tensor in the dtype it was quantised from)."""
        if self.quantized:
            return quant.dequantize(self.base)
        weight = self.base.weight
        return weight.T if self.transposed else weight

    @torch.no_grad()
    def _start_from_weight(self, parts: list[torch.Tensor | None]) -> None:
        """PiSSA / OLoRA: each part's ``A``, ``B`` from its rows of ``W``; the same values kept as ``A0``, ``B0``.

        A part narrower than r has fewer directions to give: the ``k`` it has fill the first ``k`` rows
        of ``A_i`` and columns of ``B_i``, the rest start as LoRA's (``A`` random, ``B`` zero).
        """
        w = self.weight_out_in()
        for i, (idx, B) in enumerate(zip(parts, self.lora_B)):
            a, b = initial_factors(w if idx is None else w[idx.to(w.device)], self.r, self.scaling, self.init)
            k = a.shape[0]
            self.lora_A[i * self.r:i * self.r + k] = a
            B[:, :k] = b
        self.lora_A0 = self.lora_A.detach().clone()
        self.lora_B0 = torch.cat([B.detach() for B in self.lora_B])

    def adapter_named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The trained ``A``, ``B`` and, from a PiSSA/OLoRA start, the frozen ``A0``, ``B0``: what the file holds."""
        yield from super().adapter_named_params()
        if self.lora_A0 is not None:
            yield "lora_A0", self.lora_A0
            yield "lora_B0", self.lora_B0

    def lr_scales(self) -> dict[str, float]:
        """LoRA+: every ``B`` at ``b_lr_ratio`` times the learning rate (``A`` at 1)."""
        if self.b_lr_ratio == 1.0:
            return {}
        return {f"lora_B.{i}": self.b_lr_ratio for i in range(len(self.lora_B))}

    def frozen_Bs(self) -> list[torch.Tensor]:
        """``B0`` split as ``lora_B`` is, one block per role (empty without a frozen pair)."""
        if self.lora_B0 is None:
            return []
        return list(self.lora_B0.split([B.shape[0] for B in self.lora_B]))

    def _rows(self, A: torch.Tensor, Bs: list[torch.Tensor]) -> torch.Tensor:
        """``B_i A_i`` for each role, stacked: the adapted rows of the update (fp32)."""
        if len(Bs) == 1:
            return Bs[0] @ A
        return torch.cat([B @ Ai for B, Ai in zip(Bs, A.split(self.r))])

    def delta_weight(self) -> torch.Tensor:
        """The update of the base weight, (out x in) in fp32: ``lora_delta()``."""
        return self.lora_delta()

    def lora_delta(self) -> torch.Tensor:
        """``s (B A - B0 A0)`` (no ``B0 A0`` from a kaiming start) as a full (out x in) matrix, in fp32."""
        rows = self._rows(self.lora_A, list(self.lora_B))
        if self.lora_A0 is not None:
            rows = rows - self._rows(self.lora_A0, self.frozen_Bs())
        if self.out_index is not None:
            fan_in, fan_out = in_out_features(self.base)
            rows = rows.new_zeros(fan_out, fan_in).index_copy(0, self.out_index, rows)
        return rows * self.scaling

    def low_rank(self, z: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor], scale: float,
                 dtype: torch.dtype) -> torch.Tensor:
        """``scale * B_i (A_i z)`` for each role, concatenated in ``out_index`` order, computed in ``dtype``."""
        h = F.linear(z.to(dtype), A.to(dtype))
        if len(Bs) == 1:
            return F.linear(h, (Bs[0] * scale).to(dtype))
        return torch.cat([F.linear(part, (B * scale).to(dtype)) for part, B in zip(h.split(self.r, -1), Bs)], -1)

    def add_rows(self, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``y`` plus ``rows`` written into the adapted output features."""
        if self.out_index is None:
            return y + rows.to(y.dtype)
        return y.index_add(-1, self.out_index, rows.to(y.dtype))

    def update(self, x: torch.Tensor, xd: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The adapted rows of ``s B A xd - s B0 A0 x``: the trained pair reads the dropped-out input."""
        folds = self.training and self.p > 0 and not getattr(self.dropout, "rescale", True)
        # FastDropout's 1 / (1 - p) is folded into the small A, not the activations.
        a = self.lora_A * (1.0 / (1.0 - self.p)) if folds else self.lora_A
        out = self.low_rank(xd, a, list(self.lora_B), self.scaling, dtype)
        if self.lora_A0 is not None:
            out = out + self.low_rank(x, self.lora_A0, self.frozen_Bs(), -self.scaling, dtype)
        return out

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.lora_A.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base(x)
        if self._fused_path(x):
            folds = self.p > 0 and not getattr(self.dropout, "rescale", True)
            a_scale = 1.0 / (1.0 - self.p) if folds else 1.0
            return _LoraTrainFn.apply(x, self.dropout(x), self.fast_weight(), self.base.bias,
                                      self.lora_A, self.lora_B[0], a_scale, self.scaling)
        return self.add_rows(self.base(x), self.update(x, self.dropout(x), self.compute_dtype(x)))

    def fast_weight(self) -> torch.Tensor:
        """The weight the fast training route multiplies: ``W``, or from a PiSSA/OLoRA start the residual
        ``W - s B0 A0`` in ``W``'s dtype, formed once and kept until the module leaves training mode.

        The plain route computes ``W x - s B0 (A0 x)``: two more rank-r products per call, which made
        PiSSA train at 0.84x LoRA's tokens/s on SmolLM2 (bf16, dropout 0.05); with the residual it trains
        at 1.01x, for one more bf16 copy of each adapted weight while training (+240 MB peak on SmolLM2,
        bench/RESULTS.md, "LoRA family").
        """
        weight = self.base.weight
        if self.lora_A0 is None:
            return weight
        key = (weight.data_ptr(), weight._version, self.lora_A0._version, self.lora_B0._version)
        if self._fast_residual is None or self._fast_residual[0] != key:
            with torch.no_grad():
                frozen = self._rows(self.lora_A0, self.frozen_Bs()) * self.scaling
                self._fast_residual = (key, (weight.float() - frozen).to(weight.dtype))
        return self._fast_residual[1]

    def merge(self) -> None:
        """``WeightMerging.merge``; refused on a 4-bit base, which would round the merged weight to 4 bits
        again (most of a small update lost): a merged export folds it into the original weights instead."""
        if self.quantized:
            raise ConfigError("model.quantization", "a 4-bit base cannot hold the merged update without rounding "
                                                    "it to 4 bits again; export the merged model instead, which "
                                                    "folds the update into the original weights")
        super().merge()

    def train(self, mode: bool = True) -> "LoraLinear":
        if not mode:
            self._fast_residual = None  # the fast route's copy of the weight is for training only
        return super().train(mode)

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
            self.dropout = FastDropout(self.p, dropout_share, rescale=not self.fold_dropout_scale)
        else:
            self.dropout = nn.Dropout(self.p)

    def _fused_path(self, x: torch.Tensor) -> bool:
        """Training a plain frozen ``nn.Linear`` in bf16/fp16: the one-function route (``_LoraTrainFn``).
        Not a 4-bit ``Linear4bit`` (a subclass): see the module docstring."""
        weight = self.base.weight
        return (self.fast_function and self.training and torch.is_grad_enabled() and self.out_index is None
                and type(self.base) is nn.Linear and x.dtype in (torch.bfloat16, torch.float16)
                and weight.dtype == x.dtype and not weight.requires_grad
                and (self.base.bias is None or not self.base.bias.requires_grad))

    def _block(self, Bs: list[torch.Tensor]) -> torch.Tensor:
        """One (out x r * roles) matrix holding each role's ``B_i`` in its own rows and columns."""
        if self.out_index is None:
            return Bs[0]
        B = Bs[0].new_zeros(in_out_features(self.base)[1], self.r * len(Bs))
        rows = self.out_index.split([Bi.shape[0] for Bi in Bs])
        for i, (Bi, idx) in enumerate(zip(Bs, rows)):
            B[idx, i * self.r:(i + 1) * self.r] = Bi
        return B

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``delta_weight() == scaling * B @ A``, as one LoRA of rank ``A.shape[0]``.

        On a fused layer ``A`` stacks the roles' ``A_i`` ((r * roles) x in) and ``B`` is block-structured
        (out x (r * roles)): role ``i``'s ``B_i`` in its own rows and columns, zero elsewhere. With a
        frozen pair (PiSSA, OLoRA) the rank doubles: ``A' = [A; A0]``, ``B' = [B, -B0]``.
        """
        A, B = self.lora_A, self._block(list(self.lora_B))
        if self.lora_A0 is None:
            return A, B
        return torch.cat([A, self.lora_A0]), torch.cat([B, -self._block(self.frozen_Bs())], 1)

    def extra_repr(self) -> str:
        roles = f", roles={self.roles}" if self.roles else ""
        init = f", init={self.init}" if self.init != "kaiming" else ""
        return f"r={self.r}, scaling={self.scaling:g}{roles}{init}"


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
    rslora: bool = setting(False, "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r")
    loraplus_ratio: float = setting(1.0, "LoRA+: B's learning rate over A's (16 in the paper; 1 = plain LoRA)",
                                    min=1e-3, max=1e4)
    init: str = setting("kaiming", "start of A and B: kaiming (B zero), pissa / pissa_fast (top-r SVD of W, "
                                   "fast = randomized), olora (QR of W); these train on the residual and keep "
                                   "A0, B0, so the file and a PEFT export are those of a rank-2r LoRA",
                        choices=INITS)

    def check(self) -> None:
        if not self.targets:
            raise ConfigError("targets", "name at least one role")


def module_options(s: LoraSettings) -> dict[str, Any]:
    """The keyword arguments of ``LoraLinear`` (and ``DoraLinear``) these settings give."""
    return {"rslora": s.rslora, "init": s.init, "b_lr_ratio": s.loraplus_ratio}


def build(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
          tokenizer: Any, module: type | None = None) -> dict[str, AdapterModule]:
    """A ``LoraLinear`` (or ``module``, DoRA's subclass) on every targeted role (see ``target_layers``);
    on a fused qkv layer one module adapts the targeted parts."""
    s: LoraSettings = cfg.settings
    module = module or LoraLinear
    share = MaskShare()
    return {t.path: module(t.module, s.r, s.alpha, s.dropout, t.slices, dropout_share=share, **module_options(s))
            for t in target_layers(model, spec, s.targets, type(s)().targets, layers)}


def peft_layout(items: list[tuple[str, LoraLinear]], cfg: AdapterConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and ``adapter_config.json`` of Hugging Face PEFT's LoRA layout.

    A fused q/k/v LoRA is written exactly as one LoRA of rank ``r * roles`` on the fused layer, and a
    PiSSA/OLoRA one as the LoRA of rank 2r of its update over the original base (``lora_factors``);
    ``rank_pattern``/``alpha_pattern`` keep each layer's scale (``alpha / r``, or ``alpha / sqrt(r)``
    with ``use_rslora``).
    """
    s: LoraSettings = cfg.settings
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    ratio = lambda rank: rank / s.r if not s.rslora else math.sqrt(rank / s.r)  # noqa: E731
    rank = s.r * (1 if s.init == "kaiming" else 2)
    for path, a in items:
        A, B = a.lora_factors()
        if A.shape[0] != rank:
            rank_pattern[path] = A.shape[0]
            alpha_pattern[path] = s.alpha * ratio(A.shape[0])
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().float().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": s.alpha if rank == s.r else s.alpha * ratio(rank), "lora_dropout": s.dropout,
        "target_modules": [path for path, _ in items], "bias": "none",  # exact paths: GPT-2 has two c_proj
        "fan_in_fan_out": any(a.transposed for _, a in items), "inference_mode": True, "modules_to_save": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": s.rslora, "use_dora": False,
        "init_lora_weights": True, "layers_to_transform": parse_layers(cfg.layers), "layers_pattern": None,
    }
    return tensors, config


def draw(s: Mapping[str, Any]) -> Drawing:
    targets = [t for t in (s.get("targets") or []) if isinstance(t, str)]
    return Drawing(caption=f"{variant_label(s, 'LoRA')} (r={s.get('r')}, alpha={s.get('alpha')}) on "
                           f"{', '.join(targets) or 'nothing'}",
                   marks={t: "+BA" for t in targets})


def variant_label(s: Mapping[str, Any], name: str) -> str:
    """``name`` with the family's options that are on, e.g. ``LoRA (rsLoRA, LoRA+ x16, PiSSA init)``."""
    on = ["rsLoRA"] if s.get("rslora") is True else []
    ratio = s.get("loraplus_ratio")
    if isinstance(ratio, (int, float)) and ratio != 1:
        on.append(f"LoRA+ x{ratio:g}")
    init = s.get("init")
    if isinstance(init, str) and init != "kaiming":
        on.append({"pissa": "PiSSA init", "pissa_fast": "PiSSA init (fast SVD)", "olora": "OLoRA init"}.get(init, init))
    return f"{name} [{', '.join(on)}]" if on else name


ALL_LINEAR = ["q", "k", "v", "o", "gate", "up", "down"]

LORA = register(Method(
    name="lora", paper=True, label="LoRA", settings=LoraSettings, build=build, draw=draw, value_setting="r",
    placements=Placements({"attn": {"targets": ["q", "k", "v", "o"]}, "mlp": {"targets": ["up", "down"]},
                           "both": {"targets": ["q", "k", "v", "o", "up", "down"]}}, default="both"),
    sweep=lambda hidden: [4, 8, 16, 32], merges=True, peft=peft_layout, quantized_base=True,
    merge_family="lora",
    presets={
        "LoRA": {},
        # Kalajdzievski (2023): LoRA's placement, the scale alpha / sqrt(r).
        "rsLoRA": {"rslora": True},
        # Hayou et al. (2024): B at 16 times A's learning rate.
        "LoRA+": {"loraplus_ratio": 16.0},
        # Meng et al. (2024): every linear layer, alpha = r, no dropout, fast SVD (their pissa_niter_4).
        "PiSSA": {"targets": ALL_LINEAR, "alpha": 32.0, "dropout": 0.0, "init": "pissa_fast"},
        # Büyükakyüz (2024), PEFT's OLoRA example: r 32, alpha 16, q and v.
        "OLoRA": {"targets": ["q", "v"], "alpha": 16.0, "init": "olora"},
    },
))
