"""Attach adapters to a model, and everything done to an adapted model: report, save, load, merge, export.

``attach(model, cfg)`` freezes the base, builds the method's adapter modules through the registry
(``BUILDERS``) and puts them in place: wrappers replace the module they adapt on its parent, virtual
token methods hook the backbone. The model keeps its class and call signature.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.base import AdapterModule, MaskShare
from .adapters.bottleneck import ParallelAdapter, SeriesAdapter
from .adapters.lora import LoraLinear
from .adapters.prompt import PrefixTuning, PromptTuning, PTuning, VirtualTokens
from .arch import ArchSpec, arch_for, attention_shape, fused_indices, get_backbone, get_layers, in_out_features
from .config import AdapterConfig, ConfigError, LoraSettings, parse_layers

FORMAT = "adapter-workbench"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


@dataclass
class Site:
    """One place to adapt: ``path`` (from the model root) of a module, in decoder layer ``layer``."""

    layer: int
    role: str
    path: str


# --------------------------------------------------------------------------------------------------
# Builders: one per method, each returns {module path: adapter module} (a path of "" = the model).

def _sites(model: nn.Module, spec: ArchSpec, roles: list[str], layers: list[int] | None) -> list[Site]:
    n = len(get_layers(model, spec))
    picked = range(n) if layers is None else layers
    return [Site(i, role, f"{spec.layers}.{i}.{spec.roles[role]}") for i in picked for role in roles]


def _build_lora(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None, tokenizer: Any):
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
                                         f"{', '.join(_available_roles(spec))}")
    built: dict[str, AdapterModule] = {}
    share = MaskShare()
    for site in _sites(model, spec, plain, layers):
        built[site.path] = LoraLinear(model.get_submodule(site.path), s.r, s.alpha, s.dropout, dropout_share=share)
    if fused:
        heads = model.config.num_attention_heads
        for site in _sites(model, spec, ["qkv"], layers):
            base = model.get_submodule(site.path)
            index = fused_indices(spec.fused_layout, in_out_features(base)[1], heads)
            built[site.path] = LoraLinear(base, s.r, s.alpha, s.dropout, {r: index[r] for r in fused},
                                          dropout_share=share)
    return built


def _block_points(spec: ArchSpec, placement: str) -> list[tuple[str, str]]:
    """(entry role, exit role) of the blocks a placement names."""
    entry_attn = "q" if "q" in spec.roles else "qkv"
    points = {"attn": [(entry_attn, "o")], "mlp": [("up", "down")]}
    points["both"] = points["attn"] + points["mlp"]
    return points[placement]


def _build_series(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None, tokenizer: Any):
    s = cfg.settings
    exits = [exit for _, exit in _block_points(spec, s.placement)]
    return {site.path: SeriesAdapter(model.get_submodule(site.path), s.bottleneck, s.non_linearity, s.dropout)
            for site in _sites(model, spec, exits, layers)}


def _build_parallel(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None, tokenizer: Any):
    s = cfg.settings
    built = {}
    for entry, exit in _block_points(spec, s.placement):
        for e, x in zip(_sites(model, spec, [entry], layers), _sites(model, spec, [exit], layers)):
            built[x.path] = ParallelAdapter(model.get_submodule(x.path), model.get_submodule(e.path),
                                            s.bottleneck, s.non_linearity, s.dropout, s.scale)
    return built


def _require_all_layers(cfg: AdapterConfig, layers: list[int] | None) -> None:
    if layers is not None:
        raise ConfigError("layers", f"{cfg.method} acts on every attention layer through the shared "
                                    "attention mask; use 'all'")


def _build_prefix(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None, tokenizer: Any):
    _require_all_layers(cfg, layers)
    n_layers, kv_heads, head_dim = attention_shape(model)
    s = cfg.settings
    return {"": PrefixTuning(s.num_virtual_tokens, model.config.hidden_size, n_layers, kv_heads, head_dim,
                             s.reparam_hidden)}


def _build_prompt(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None, tokenizer: Any):
    _require_all_layers(cfg, layers)
    s = cfg.settings
    init = None
    if s.init == "text":
        if tokenizer is None:
            raise ConfigError("init", "initialising from text needs the tokenizer; pass tokenizer= or use 'random'")
        ids = tokenizer(s.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("init_text", "the text has no tokens")
        ids = (ids * (s.num_virtual_tokens // len(ids) + 1))[: s.num_virtual_tokens]
        with torch.no_grad():
            init = model.get_input_embeddings().weight[torch.tensor(ids)].float()
    return {"": PromptTuning(s.num_virtual_tokens, model.config.hidden_size, init)}


def _build_ptuning(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None, tokenizer: Any):
    _require_all_layers(cfg, layers)
    s = cfg.settings
    return {"": PTuning(s.num_virtual_tokens, model.config.hidden_size, s.encoder, s.encoder_hidden)}


Builder = Callable[[nn.Module, AdapterConfig, ArchSpec, "list[int] | None", Any], dict[str, AdapterModule]]
BUILDERS: dict[str, Builder] = {
    "lora": _build_lora,
    "series": _build_series,
    "parallel": _build_parallel,
    "prefix": _build_prefix,
    "prompt": _build_prompt,
    "ptuning": _build_ptuning,
}

VIRTUAL_SLOT = "workbench_virtual_tokens"


def _available_roles(spec: ArchSpec) -> list[str]:
    roles = [r for r in spec.roles if r != "qkv"]
    return (["q", "k", "v"] if spec.fused else []) + roles


# --------------------------------------------------------------------------------------------------
# Public API

def attach(model: nn.Module, cfg: AdapterConfig, tokenizer: Any = None) -> nn.Module:
    """Freeze ``model`` and put the adapters ``cfg`` describes in place. Returns the same model.

    Raises ``ConfigError`` naming the field for invalid settings, a role the architecture lacks or a
    layer out of range. ``tokenizer`` is needed only for prompt tuning initialised from text.
    """
    if adapters_of(model):
        raise ConfigError("method", "the model already has adapters; detach() them first")
    spec = arch_for(model, getattr(cfg, "arch", None))
    n_layers = len(get_layers(model, spec))
    cfg.validate(num_layers=n_layers)
    layers = parse_layers(cfg.layers, n_layers)
    built = BUILDERS[cfg.method](model, cfg, spec, layers, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    for path, adapter in built.items():
        adapter.to(device).train(model.training)
        if isinstance(adapter, VirtualTokens):
            model.add_module(VIRTUAL_SLOT, adapter)
            adapter.install(get_backbone(model, spec))
        else:
            _replace(model, path, adapter)
        for p in adapter.adapter_params():
            p.requires_grad_(True)
    model.adapter_config = cfg
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove every adapter, restoring the base modules (LoRA unmerged first)."""
    for path, adapter in list(_adapter_items(model)):
        original = adapter.detach()
        if original is not None:
            _replace(model, path, original)
        else:
            delattr(model, path)
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def adapters_of(model: nn.Module) -> list[AdapterModule]:
    return [m for _, m in _adapter_items(model)]


def adapter_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for a in adapters_of(model) for p in a.adapter_params()]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' own parameters (and learned scalars), keyed by their path in ``model``."""
    out = {}
    for path, adapter in _adapter_items(model):
        for name, p in adapter.adapter_named_params():
            out[f"{path}.{name}"] = p.detach()
    return out


def trainable_report(model: nn.Module) -> dict[str, Any]:
    """Trainable parameter count, its share of the base model, and counts per adapter module kind."""
    adapter_ids = {id(p) for p in adapter_params(model)}
    base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    per_kind: dict[str, int] = {}
    for adapter in adapters_of(model):
        kind = type(adapter).__name__
        per_kind[kind] = per_kind.get(kind, 0) + sum(p.numel() for p in adapter.adapter_params())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "base": base, "percent": 100.0 * trainable / max(base, 1),
            "per_kind": per_kind, "modules": len(adapters_of(model))}


def save_adapter(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` (method, settings, base model, versions)."""
    cfg: AdapterConfig = _config_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    import transformers
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "adapter": cfg.to_dict(),
        "base_model": getattr(model.config, "_name_or_path", "") or "",
        "model_type": getattr(model.config, "model_type", None),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **(extra or {}),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter at {directory}: {CONFIG_FILE} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError("adapter", f"{path} is not an Adapter Workbench adapter (format {meta.get('format')!r})")
    return meta


def load_adapter(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> nn.Module:
    """Attach the saved adapter to a fresh base ``model`` and load its weights (strictly)."""
    meta = read_adapter_config(directory)
    cfg = AdapterConfig.from_dict(meta["adapter"])
    attach(model, cfg, tokenizer=None if cfg.method != "prompt" else tokenizer)
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    own = {f"{path}.{name}": p for path, a in _adapter_items(model) for name, p in a.adapter_named_params()}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        detach(model)
        raise ConfigError("adapter", f"weights do not match this model: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, p in own.items():
            if p.shape != tensors[key].shape:
                detach(model)
                raise ConfigError("adapter", f"{key}: saved shape {tuple(tensors[key].shape)} "
                                             f"!= model's {tuple(p.shape)}")
            p.copy_(tensors[key].to(p.dtype))
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model behaves exactly as the base (merged LoRA is unmerged meanwhile)."""
    adapters = adapters_of(model)
    merged = [a for a in adapters if getattr(a, "merged", False)]
    states = [a.enabled for a in adapters]
    for a in merged:
        a.unmerge()
    for a in adapters:
        a.enabled = False
    try:
        yield model
    finally:
        for a, state in zip(adapters, states):
            a.enabled = state
        for a in merged:
            a.merge()


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA updates into the base weights (repeat-safe). Only LoRA can merge."""
    for a in _lora_modules(model):
        a.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    for a in _lora_modules(model):
        a.unmerge()
    return model


def export_merged(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Save the model with its LoRA folded in as a standard Hugging Face checkpoint (no adapter code needed).

    Works on a copy: ``model`` keeps its adapters, unmerged.
    """
    import copy

    _lora_modules(model)  # refuses non-LoRA adapters with a clear error
    clone = copy.deepcopy(model)
    merge_adapter(clone)
    for path, adapter in list(_adapter_items(clone)):
        adapter._saved_weight = None
        adapter.merged = False  # the base weight keeps the merged values
        _replace(clone, path, adapter.base)
    if hasattr(clone, "adapter_config"):
        del clone.adapter_config
    directory = Path(directory)
    clone.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def export_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write LoRA in the Hugging Face PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``).

    Fused q/k/v LoRA is written exactly as one LoRA of rank ``r * roles`` on the fused layer
    (``A`` stacked, ``B`` block-structured), with ``rank_pattern``/``alpha_pattern`` keeping the scale.
    """
    loras = list(_lora_items(model))
    cfg: AdapterConfig = _config_of(model)
    s: LoraSettings = cfg.settings
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, a in loras:
        prefix = f"base_model.model.{path}"
        if a.out_index is None:
            A, B = a.lora_A, a.lora_B[0]
        else:
            A = a.lora_A
            B = A.new_zeros(in_out_features(a.base)[1], A.shape[0])
            for i, (Bi, idx) in enumerate(zip(a.lora_B, _split_index(a))):
                B[idx, i * a.r:(i + 1) * a.r] = Bi
            rank_pattern[path] = A.shape[0]
            alpha_pattern[path] = s.alpha * len(a.lora_B)
        tensors[f"{prefix}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().float().contiguous().cpu()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    names = sorted({path.rsplit(".", 1)[-1] for path, _ in loras})
    layers = parse_layers(cfg.layers)
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout,
        "target_modules": names, "bias": "none", "fan_in_fan_out": any(a.transposed for _, a in loras),
        "base_model_name_or_path": getattr(model.config, "_name_or_path", "") or None,
        "inference_mode": True, "modules_to_save": None, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "layers_to_transform": layers, "layers_pattern": None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    return directory


# --------------------------------------------------------------------------------------------------

def _split_index(a: LoraLinear) -> list[torch.Tensor]:
    sizes = [B.shape[0] for B in a.lora_B]
    return list(a.out_index.split(sizes))


def _config_of(model: nn.Module) -> AdapterConfig:
    cfg = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ConfigError("adapter", "the model has no adapter attached")
    return cfg


def _adapter_items(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Top-level adapters (not adapters nested inside another adapter's base)."""
    seen: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule) and not any(name.startswith(s + ".") for s in seen):
            seen.append(name)
            yield name, module


def _lora_items(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    items = [(p, a) for p, a in _adapter_items(model) if isinstance(a, LoraLinear)]
    if not items:
        method = getattr(getattr(model, "adapter_config", None), "method", None)
        raise ConfigError("method", f"merging and PEFT export are defined for LoRA only (this adapter: {method})")
    return iter(items)


def _lora_modules(model: nn.Module) -> list[LoraLinear]:
    return [a for _, a in _lora_items(model)]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
