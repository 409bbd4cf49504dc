"""What every adapter module shares: an on/off switch, the parameters it owns, the merge protocol; and
the helpers builders use to find the modules they adapt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from torch import nn

from ..arch import ArchSpec, fused_indices, get_layers, in_out_features
from ..fields import ConfigError


class AdapterModule(nn.Module):
    """Base of every adapter. Subclasses keep the frozen module they wrap (if any) in ``self.base``.

    ``adapter_params()`` yields the trainable parameters this adapter owns: everything but ``base``.
    Setting ``enabled = False`` makes the module behave exactly like what it wraps.

    Merge protocol, for adapters whose update is a weight delta (``mergeable = True``; the method's
    record says ``merges=True``): ``merge()`` folds the update into the base weight and ``unmerge()``
    restores the exact weight (both repeat-safe, ``merged`` tells which state it is in);
    ``fold()`` merges for good and returns the base module to put back (the adapter is spent);
    ``delta_weight()`` is the dense update. Model-level adapters (built at path ``""``) implement
    ``install(backbone)`` instead of wrapping a module.
    """

    enabled: bool = True
    mergeable: bool = False
    merged: bool = False

    def merge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot merge into the base weights")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot merge into the base weights")

    def fold(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} cannot merge into the base weights")

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no dense weight update")

    def install(self, backbone: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} wraps a module; it is not installed on the model")

    def adapter_params(self) -> Iterator[nn.Parameter]:
        base = getattr(self, "base", None)
        skip = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) else set()
        for p in self.parameters():
            if id(p) not in skip:
                yield p

    def adapter_named_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        ids = {id(p) for p in self.adapter_params()}
        for name, p in self.named_parameters():
            if id(p) in ids:
                yield name, p

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (as ``adapter_named_params`` names them); the
        trainer puts each into an optimiser group of its own (LoRA+: B at a multiple of A). Default: none."""
        return {}

    def detach(self) -> nn.Module | None:
        """Remove hooks this adapter installed; return the module to put back in its place (or None)."""
        return getattr(self, "base", None)


class WeightMerging(AdapterModule):
    """The merge protocol for an adapter whose update lives in its base layer's weight (and bias).

    ``merge`` keeps a copy of the weight and bias, then calls ``merge_into``, which by default adds
    ``delta_weight()`` (out x in; transposed for a ``Conv1D``, whose weight is (in, out)); ``unmerge``
    restores the copies exactly. Subclasses set ``transposed`` and override ``merge_into`` where the
    update is not a plain sum ((IA)³ rescales, DoRA renormalises).
    """

    mergeable = True
    transposed: bool = False
    _saved: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        delta = self.delta_weight()
        weight.add_((delta.T if self.transposed else delta).to(weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight. Repeat-safe; ``unmerge`` restores the exact weight."""
        if self.merged:
            return
        weight, bias = self.base.weight, getattr(self.base, "bias", None)
        self._saved = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        self.merge_into(weight, bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, bias = self._saved
        self.base.weight.copy_(weight)
        if bias is not None:
            self.base.bias.copy_(bias)
        self._saved = None
        self.merged = False

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Merge for good: the base module, its weights holding the update (this adapter is spent)."""
        self.merge()
        self._saved = None
        self.merged = False
        return self.base

    def detach(self) -> nn.Module:
        self.unmerge()
        return self.base


@dataclass
class Site:
    """One place to adapt: ``path`` (from the model root) of a module, in decoder layer ``layer``."""

    layer: int
    role: str
    path: str


def sites(model: nn.Module, spec: ArchSpec, roles: list[str], layers: list[int] | None) -> list[Site]:
    """The modules playing ``roles`` in the chosen ``layers`` (None: every layer), layer by layer."""
    n = len(get_layers(model, spec))
    picked = range(n) if layers is None else layers
    return [Site(i, role, f"{spec.layers}.{i}.{spec.roles[role]}") for i in picked for role in roles]


def block_points(spec: ArchSpec, placement: str) -> list[tuple[str, str]]:
    """(entry role, exit role) of the blocks a placement names: ``attn``, ``mlp`` or ``both``."""
    entry_attn = "q" if "q" in spec.roles else "qkv"
    points = {"attn": [(entry_attn, "o")], "mlp": [("up", "down")]}
    points["both"] = points["attn"] + points["mlp"]
    return points[placement]


class Target(NamedTuple):
    """A linear layer a per-projection method adapts: its path, role (``qkv`` for a fused layer),
    the module, and ``{role: output indices}`` of the targeted roles on a fused layer (else None)."""

    path: str
    role: str
    module: nn.Module
    slices: dict[str, torch.Tensor] | None


def target_layers(model: nn.Module, spec: ArchSpec, targets: list[str], defaults: list[str],
                  layers: list[int] | None) -> list[Target]:
    """The layers a per-projection method adapts (see ``Target``), layer by layer; plain roles first.

    On a fused qkv layer the targeted roles among q, k and v share one ``Target``. Roles the
    architecture lacks are skipped when the targets are the method's ``defaults`` (GPT-2 has no gate)
    and refused, naming the roles it has, when the user chose them.
    """
    plain, fused = [], []
    for role in dict.fromkeys(targets):
        if role in spec.roles:
            plain.append(role)
        elif role in ("q", "k", "v") and spec.fused:
            fused.append(role)
        elif list(targets) != list(defaults):
            raise ConfigError("targets", f"this architecture has no {role!r} role; it has "
                                         f"{', '.join(available_roles(spec))}")
    found = [Target(site.path, site.role, model.get_submodule(site.path), None)
                           for site in sites(model, spec, plain, layers)]
    if fused:
        heads = model.config.num_attention_heads
        for site in sites(model, spec, ["qkv"], layers):
            base = model.get_submodule(site.path)
            index = fused_indices(spec.fused_layout, in_out_features(base)[1], heads)
            found.append(Target(site.path, "qkv", base, {r: index[r] for r in fused}))
    return found


def available_roles(spec: ArchSpec) -> list[str]:
    """The roles an adapter can name on this architecture (q, k, v stand for the parts of a fused qkv)."""
    roles = [r for r in spec.roles if r != "qkv"]
    return (["q", "k", "v"] if spec.fused else []) + roles


def make_dropout(p: float) -> nn.Module:
    return FastDropout(p) if p > 0 else nn.Identity()


class MaskShare(dict):
    """The last (input, masked output) of a group of dropouts; copies of a model start with none."""

    def __deepcopy__(self, memo: dict) -> "MaskShare":
        return MaskShare()

    def __reduce__(self):
        return MaskShare, ()


class FastDropout(nn.Module):
    """Inverted dropout whose mask costs a quarter of the random numbers of ``nn.Dropout`` on a CPU.

    On a CPU the random-number generator, not the arithmetic, is the cost of dropout (a third of a
    LoRA training step on SmolLM2, measured). A 64-bit draw costs what a 32-bit one does (3.3 vs 3.6 ns
    here), so each draw here yields four 16-bit uniforms, enough resolution (1/65536) for any dropout
    rate: a quarter of the draws of ``nn.Dropout``. Elsewhere it is plain ``F.dropout``.

    Modules given the same ``share`` dict reuse one mask when called on the very same input tensor
    (LoRA on q, k and v reads one normalised hidden state): one mask instead of three.
    """

    def __init__(self, p: float, share: dict | None = None, rescale: bool = True):
        super().__init__()
        self.p = p
        self.share = share
        self.rescale = rescale  # False: return x * mask and let the caller fold in 1 / (1 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            if self.share:
                self.share.clear()  # release the last training activations
            return x
        if self.share is not None and self.share.get("input") is x:
            return self.share["output"]
        if x.device.type != "cpu":
            out = nn.functional.dropout(x, self.p, True) * (1.0 if self.rescale else 1.0 - self.p)
        else:
            n = x.numel()
            bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
            # The comparison writes its 0/1 mask straight in x's dtype: multiplying by a bool tensor
            # (here and again in the backward pass) is ~9x slower than by a bf16 one on this CPU.
            keep = torch.ge(bits.view(x.shape), int(-32768 + self.p * 65536),
                            out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
            out = x * keep
            if self.rescale:
                out = out * (1.0 / (1.0 - self.p))
        if self.share is not None:
            self.share["input"], self.share["output"] = x, out
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"
