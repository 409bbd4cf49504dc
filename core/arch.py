"""Architectures as data: where each model type keeps its decoder layers and which module plays each role.

Adapters ask for *roles*, never for module names, so supporting a new architecture is one row here.
Roles inside a decoder layer:

- ``q k v o``: attention projections; a fused model has ``qkv`` instead of ``q k v``
  (``fused_layout`` says how its output is laid out: ``concat`` = [q | k | v], ``per_head`` =
  [q0 k0 v0 | q1 k1 v1 | ...] per attention head);
- ``gate up down``: the MLP projections (``gate`` only on gated MLPs).

The attention block is entered through ``q`` (or ``qkv``) and left through ``o``; the MLP block is
entered through ``up`` and left through ``down``. Series and parallel adapters use those four points,
which is why no architecture needs a module of its own for "the attention block" or "the MLP".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .fields import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: the path of its layer list and the role -> sub-path map inside a layer."""

    layers: str
    roles: dict[str, str]
    fused_layout: str | None = None  # "concat" or "per_head" when the model has a fused "qkv"
    backbone: str | None = None  # the module the LM head's input comes from; None = model.base_model

    @property
    def fused(self) -> bool:
        return "qkv" in self.roles

    def role_path(self, role: str) -> str | None:
        return self.roles.get(role)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchSpec":
        try:
            spec = cls(layers=str(data["layers"]), roles={str(k): str(v) for k, v in dict(data["roles"]).items()},
                       fused_layout=data.get("fused_layout"), backbone=data.get("backbone"))
        except (KeyError, TypeError, ValueError):
            raise ConfigError("arch", 'expected {"layers": "path.to.layers", "roles": {"q": "...", ...}}') from None
        unknown = sorted(set(spec.roles) - {"q", "k", "v", "o", "qkv", "gate", "up", "down"})
        if unknown:
            raise ConfigError("arch", f"unknown role {unknown[0]!r}; roles are q k v o qkv gate up down")
        if spec.fused and spec.fused_layout not in ("concat", "per_head"):
            raise ConfigError("arch", "a fused qkv needs fused_layout 'concat' or 'per_head'")
        return spec


_LLAMA = ArchSpec("model.layers", {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"})

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "bloom": ArchSpec("transformer.h", {
        "qkv": "self_attention.query_key_value", "o": "self_attention.dense",
        "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}, fused_layout="per_head"),
    "gptj": ArchSpec("transformer.h", {
        "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj",
        "up": "mlp.fc_in", "down": "mlp.fc_out"}),
    "opt": ArchSpec("model.decoder.layers", {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
        "up": "fc1", "down": "fc2"}, backbone="model.decoder"),
    "gpt2": ArchSpec("transformer.h", {
        "qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}, fused_layout="concat"),
    "gpt_neo": ArchSpec("transformer.h", {
        "q": "attn.attention.q_proj", "k": "attn.attention.k_proj", "v": "attn.attention.v_proj",
        "o": "attn.attention.out_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}),
    "gpt_neox": ArchSpec("gpt_neox.layers", {
        "qkv": "attention.query_key_value", "o": "attention.dense",
        "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}, fused_layout="per_head"),
}


def is_llama_family(model: nn.Module) -> bool:
    """Whether ``model``'s type shares LLaMA's row of the table (LLaMA, Mistral, Qwen2, Qwen3)."""
    return ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None)) is _LLAMA


class UnsupportedArchitecture(ConfigError):
    """The model type is not in the table; the message lists the linear layers to name by hand."""


def arch_for(model: nn.Module, override: dict[str, Any] | None = None) -> ArchSpec:
    """The table row of ``model`` (or the user's own row, ``override``)."""
    if override:
        spec = ArchSpec.from_dict(override)
        get_layers(model, spec)
        return spec
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture("arch", _unknown_message(model, model_type))
    return spec


def get_backbone(model: nn.Module, spec: ArchSpec) -> nn.Module:
    """The decoder stack returning ``last_hidden_state`` (what the LM head reads)."""
    return model.get_submodule(spec.backbone) if spec.backbone else model.base_model


def get_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    try:
        layers = model.get_submodule(spec.layers)
    except AttributeError:
        raise ConfigError("arch", f"the model has no module {spec.layers!r} holding its layers") from None
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("arch", f"{spec.layers!r} is a {type(layers).__name__}, not a list of layers")
    return layers


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(number of layers, key/value heads, head dimension) from the model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a GPT-2 style Conv1D (weight stored as in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise ConfigError("targets", f"cannot adapt a {type(module).__name__}: only linear layers")


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def fused_indices(layout: str, width: int, heads: int) -> dict[str, torch.Tensor]:
    """Output indices of q, k and v inside a fused projection of total ``width``."""
    if layout == "concat":
        third = width // 3
        return {r: torch.arange(i * third, (i + 1) * third) for i, r in enumerate("qkv")}
    head_dim = width // (3 * heads)
    base = torch.arange(heads) * 3 * head_dim
    return {r: (base[:, None] + i * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
            for i, r in enumerate("qkv")}


def _unknown_message(model: nn.Module, model_type: str | None) -> str:
    linear = _layer_linear_names(model)
    known = ", ".join(sorted(ARCHITECTURES))
    lines = [f"architecture {model_type!r} is not in the table (known: {known})."]
    if linear:
        layers_path, names = linear
        lines.append(f"Its decoder layers are at {layers_path!r}; linear layers in each: {', '.join(names)}.")
        lines.append('Name them by hand with the adapter setting "arch": {"layers": "%s", "roles": '
                     '{"q": "...", "k": "...", "v": "...", "o": "...", "up": "...", "down": "..."}}' % layers_path)
    return " ".join(lines)


def _layer_linear_names(model: nn.Module) -> tuple[str, list[str]] | None:
    """The longest ModuleList in the model and the linear layers inside its first element."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        return None
    names = [n for n, m in best[1][0].named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    return best[0], names
