"""Attach adapters to a model, and everything done to an adapted model: report, save, load, merge, export.

``attach(model, cfg)`` freezes the base, has the method's builder (from the registry, ``core.methods``)
make the adapter modules and puts them in place: wrappers replace the module they adapt on its parent,
model-level adapters (virtual tokens) hook the backbone. The model keeps its class and call signature.
Merging and exports ask the method's record whether they are defined and the modules' merge protocol
(``AdapterModule``) how; nothing here knows a method by name.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import methods, quant
from .adapters.base import AdapterModule
from .arch import arch_for, get_backbone, get_layers
from .config import AdapterConfig, parse_layers
from .fields import ConfigError

FORMAT = "adapter-workbench"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
VIRTUAL_SLOT = "workbench_virtual_tokens"  # where a model-level adapter lives on the model (its weights' prefix)


# --------------------------------------------------------------------------------------------------
# Public API

def attach(model: nn.Module, cfg: AdapterConfig, tokenizer: Any = None) -> nn.Module:
    """Freeze ``model`` and put the adapters ``cfg`` describes in place. Returns the same model.

    Raises ``ConfigError`` naming the field for invalid settings, a role the architecture lacks or a
    layer out of range. ``tokenizer`` is needed only by builders that read text (prompt tuning
    initialised from text).
    """
    if adapters_of(model):
        raise ConfigError("method", "the model already has adapters; detach() them first")
    spec = arch_for(model, getattr(cfg, "arch", None))
    n_layers = len(get_layers(model, spec))
    cfg.validate(num_layers=n_layers)
    layers = parse_layers(cfg.layers, n_layers)
    built = methods.get(cfg.method).build(model, cfg, spec, layers, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    for path, adapter in built.items():
        adapter.to(device).train(model.training)
        if path == "":  # a model-level adapter
            model.add_module(VIRTUAL_SLOT, adapter)
            adapter.install(get_backbone(model, spec))
        else:
            _replace(model, path, adapter)
        for p in adapter.adapter_params():
            p.requires_grad_(True)
    model.adapter_config = cfg
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove every adapter, restoring the base modules (merged ones unmerged first)."""
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
    base = sum(quant.weight_count(p) for p in model.parameters() if id(p) not in adapter_ids)
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
    attach(model, cfg, tokenizer=tokenizer)
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
    """Within the block the model behaves exactly as the base (merged adapters are unmerged meanwhile)."""
    adapters = adapters_of(model)
    merged = [a for a in adapters if a.merged]
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


@contextlib.contextmanager
def prompt_lengths(model: nn.Module, lengths: torch.Tensor | None) -> Iterator[nn.Module]:
    """Within the block (in this thread), row ``i`` of each forward pass of ``model`` has a prompt of
    ``lengths[i]`` tokens, counted from its first attended token: a training batch's tokens before
    the response. Adapters that act on prompt positions (LoReFT) read it; without it the prompt of a
    forward pass is all its attended tokens, as in generation. None: nothing changes."""
    readers = [a for a in adapters_of(model) if hasattr(a, "use_prompt_lengths")] if lengths is not None else []
    for a in readers:
        a.use_prompt_lengths(lengths)
    try:
        yield model
    finally:
        for a in readers:
            a.use_prompt_lengths(None)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter's update into the base weights (repeat-safe). ``ConfigError`` naming the method
    when it cannot merge (only methods whose update is a weight delta can)."""
    for _, a in _mergeable_items(model):
        a.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    for _, a in _mergeable_items(model):
        a.unmerge()
    return model


def export_merged(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Save the model with its adapter folded in as a standard Hugging Face checkpoint (no adapter code needed).

    Works on a copy: ``model`` keeps its adapters, unmerged. A model on a 4-bit base (QLoRA) is not
    copied: its original weights are read again (``core.models.load_unquantized``) and the adapter,
    moved over through its saved form, is folded into those, not into their 4-bit rounding.
    """
    import copy

    _mergeable_items(model)  # refuses a method that cannot merge, before the copy
    if quant.has_quantized(model):
        import tempfile

        from .models import load_unquantized

        clone = load_unquantized(model)
        with tempfile.TemporaryDirectory() as tmp:
            load_adapter(clone, save_adapter(model, tmp))
    else:
        clone = copy.deepcopy(model)
    for path, adapter in list(_mergeable_items(clone)):
        _replace(clone, path, adapter.fold())
    if hasattr(clone, "adapter_config"):
        del clone.adapter_config
    directory = Path(directory)
    clone.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def export_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter in the Hugging Face PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``),
    through the method's PEFT mapping; ``ConfigError`` naming the method when it has none."""
    cfg = _config_of(model)
    method = methods.get(cfg.method)
    if method.peft is None:
        raise ConfigError("method", f"{method.label} has no PEFT layout; methods that have one: "
                                    f"{_labels(lambda m: m.peft is not None)}")
    tensors, peft_cfg = method.peft(list(_adapter_items(model)), cfg)
    peft_cfg = {**peft_cfg, "base_model_name_or_path": getattr(model.config, "_name_or_path", "") or None}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    return directory


# --------------------------------------------------------------------------------------------------

def _labels(keep: Any) -> str:
    return ", ".join(m.label for m in methods.all() if keep(m)) or "none"


def _mergeable_items(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    """The adapters of a method that merges (``ConfigError`` naming the method otherwise)."""
    method = methods.get(_config_of(model).method)
    items = list(_adapter_items(model))
    if not method.merges or not all(a.mergeable for _, a in items):
        raise ConfigError("method", f"{method.label} cannot merge into the base weights; methods that can: "
                                    f"{_labels(lambda m: m.merges)}")
    return items


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


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
