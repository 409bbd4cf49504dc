"""Base models: loading (the embedded GGUF, hub ids, local directories) and a per-process model cache.

A name is a catalogue name, a hub id or a local checkpoint directory, as far as ``core.sources``
allows in this deployment (it checks every name before anything is read). The catalogue's embedded
model is converted once to a standard checkpoint when its weights are first needed
(``core.embedded``); its config and tokenizer are read without converting. Device and precision come
from ``core.devices``.

Every failure to find or read a model is a ``ModelLoadError`` (a ``ConfigError`` on ``model.name``)
whose message says what was tried and what to do; a model that needs its own Python code where that
may not run (the web process, or a job without the switches) is a ``core.sources.RemoteCodeError``.
``trust_remote_code`` is never passed to transformers as True unless ``core.sources.trust_remote_code``
says so.

With ``quantization = "nf4"`` (QLoRA) the loaded model's linear layers become 4-bit (``core.quant``);
the model remembers where it was read from, so that ``load_unquantized`` can read the original weights
again for a merged export.

Public API: ``LoadedModel``, ``ModelLoadError``, ``catalogue``, ``load_model``, ``load_tokenizer``,
``load_config``, ``get_model``, ``clear_model_cache``, ``load_unquantized``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import embedded, hub, quant, sources
from .config import ModelSettings
from .deployment import Deployment, current
from .devices import ModelLoadError, error_line, resolve_device, resolve_dtype
from .paths import models_dir
from .sources import CATALOGUE, INSTALL_HINT, ModelSource, SourceError

__all__ = ["LoadedModel", "ModelLoadError", "catalogue", "clear_model_cache", "get_model", "load_config",
           "load_model", "load_tokenizer", "load_unquantized"]


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


@dataclass(frozen=True)
class Origin:
    """Where a quantised model was read from (``model.quantized_from``): what ``load_unquantized`` reads."""

    name: str
    source: str
    trust_remote_code: bool


def catalogue() -> list[dict[str, Any]]:
    """The known models for the UI: name, description, hub id, and whether they load offline."""
    out = []
    for e in CATALOGUE.values():
        converted = embedded.is_converted(embedded.converted_dir(e))
        packaged = embedded.gguf_file(e) is not None
        out.append({"name": e.name, "description": e.description, "hub_id": e.hub_id,
                    "embedded": packaged, "converted": converted, "offline": packaged or converted})
    return out


# --------------------------------------------------------------------------------------------------
# Where a name is read from.

def _prepare(settings: ModelSettings, deployment: Deployment | None) -> tuple[ModelSource, bool]:
    """The checked source of ``settings.name`` and the ``trust_remote_code`` to pass for it.

    A name ``core.sources`` refuses is a ``ModelLoadError``; a model that needs code that may not run
    in this process is a ``RemoteCodeError``.
    """
    d = deployment or current()
    try:
        found = sources.resolve_model(settings.name, d)
    except SourceError as err:
        raise ModelLoadError(err.message, err.field) from None
    return found, sources.trust_remote_code(found, settings, d)


def _location(found: ModelSource, weights: bool) -> str:
    """Where transformers reads ``found`` from: a folder or a hub id; for the embedded model the
    converted checkpoint (converting it first when ``weights`` are needed), else its GGUF file."""
    if found.kind != "catalogue":
        return found.location
    entry = CATALOGUE[found.location]
    target = embedded.converted_dir(entry)
    if embedded.is_converted(target):
        return str(target)
    gguf = embedded.gguf_file(entry)
    if gguf is None:
        return entry.hub_id
    return str(embedded.convert(entry, gguf)) if weights else str(gguf)


def _gguf(source: str) -> Path | None:
    path = Path(source)
    return path if path.is_file() and path.suffix == ".gguf" else None


def _hub_kwargs(source: str) -> dict[str, Any]:
    """``local_files_only`` when the hub cannot be reached, so transformers uses its cache and fails fast."""
    if Path(source).exists():
        return {}
    return {} if hub.hub_reachable() else {"local_files_only": True}


def _load_error(name: str, source: str, err: BaseException, what: str = "model") -> ModelLoadError:
    if Path(source).exists():
        return ModelLoadError(
            f"could not load the {what} of {name!r} from {source!r}: {error_line(err)}. Check that the "
            "directory is a complete Hugging Face checkpoint (config.json, *.safetensors or *.bin weights, "
            "tokenizer files) of a causal language model.")
    if name in CATALOGUE:
        tried = f"the embedded GGUF is not installed and the hub id {source!r}"
    else:
        tried = f"{name!r} is not a catalogue name nor a local directory, so it was tried as a hub id, and"
    reason = ("the hub is unreachable (offline) and the model is not in the local Hugging Face cache"
              if not hub.hub_reachable() else f"the hub could not provide it ({error_line(err)})")
    return ModelLoadError(
        f"could not load the {what} of {name!r}: {tried} failed: {reason}. Download the model to a directory "
        f"and give its path, check the hub id's spelling, or {INSTALL_HINT}.")


# --------------------------------------------------------------------------------------------------
# Loading.

def _fix_pad(tok: Any) -> Any:
    if getattr(tok, "pad_token", None) is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is not None:
            tok.pad_token = fallback
    return tok


def _auto_tokenizer(name: str, source: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    gguf = _gguf(source)
    try:
        if gguf is not None:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        else:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **_hub_kwargs(source))
    except Exception as err:  # transformers raises many kinds; one clear message for all
        raise _load_error(name, source, err, "tokenizer") from None
    return _fix_pad(tok)


def load_tokenizer(settings: ModelSettings, deployment: Deployment | None = None) -> Any:
    """The model's tokenizer (pad token set), without loading weights or converting the embedded model."""
    found, trust = _prepare(settings, deployment)
    return _auto_tokenizer(settings.name, _location(found, weights=False), trust)


def load_config(settings: ModelSettings, deployment: Deployment | None = None) -> Any:
    """The transformers config of ``settings.name`` (checked by ``core.sources``; no weights).

    Never converts the embedded model: its config comes from the converted checkpoint when there is
    one, else from the GGUF metadata (``core.embedded.config``), in well under a second.
    """
    from transformers import AutoConfig

    found, trust = _prepare(settings, deployment)
    source = _location(found, weights=False)
    gguf = _gguf(source)
    if gguf is not None:
        return embedded.config(CATALOGUE[found.location], gguf)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust, **_hub_kwargs(source))
    except Exception as err:
        raise _load_error(settings.name, source, err, "config") from None


def load_model(settings: ModelSettings, dtype: torch.dtype | None = None,
               deployment: Deployment | None = None) -> LoadedModel:
    """Load ``settings.name`` in eval mode on its device; weights in ``dtype`` (default fp32).

    The name is checked by ``core.sources`` first; a model that needs its own code loads only where
    ``core.sources.remote_code_enabled`` (a job), else ``RemoteCodeError``. The embedded model is
    converted on first use (``core.embedded.convert``). With ``settings.quantization = "nf4"`` the
    linear layers but the head are quantised to 4 bits from the ``dtype`` weights, computing in the
    precision's dtype (``core.quant``); ``bitsandbytes`` missing is a ``ConfigError`` naming the fix,
    raised before any weight is read.
    """
    from transformers import AutoModelForCausalLM

    found, trust = _prepare(settings, deployment)
    device = resolve_device(settings.device)
    compute = resolve_dtype(settings.precision, device)
    if settings.quantization == "nf4":
        quant.require_bitsandbytes()
    source = _location(found, weights=True)
    tokenizer = _auto_tokenizer(settings.name, source, trust)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32,
                                                     trust_remote_code=trust, **_hub_kwargs(source))
    except Exception as err:
        raise _load_error(settings.name, source, err) from None
    num_params = sum(p.numel() for p in model.parameters())  # before quantisation packs two values a byte
    if settings.quantization == "nf4":
        quant.quantize_model(model, compute, device)
        model.quantized_from = Origin(settings.name, source, trust)
    model.to(device).eval()
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=settings.name, source=source,
                       model_type=model.config.model_type, num_params=num_params,
                       device=device, compute_dtype=compute)


def load_unquantized(model: Any) -> Any:
    """The model a 4-bit ``model`` of ``load_model`` was quantised from, read again with its original
    weights, on the CPU, in the dtype of ``model``'s unquantised weights (its embeddings): what a merged
    export of a QLoRA run folds the update into, rather than the 4-bit rounding of those weights."""
    from transformers import AutoModelForCausalLM

    origin: Origin | None = getattr(model, "quantized_from", None)
    if origin is None:
        raise ModelLoadError("this 4-bit model was not loaded by core.models.load_model, so where its original "
                             "weights are is unknown; load it with load_model(settings) to export it merged",
                             "model.quantization")
    try:
        original = AutoModelForCausalLM.from_pretrained(
            origin.source, dtype=model.get_input_embeddings().weight.dtype,
            trust_remote_code=origin.trust_remote_code, **_hub_kwargs(origin.source))
    except Exception as err:
        raise _load_error(origin.name, origin.source, err) from None
    original.config.pad_token_id = model.config.pad_token_id  # as load_model set it
    return original.eval()


# --------------------------------------------------------------------------------------------------
# A few models per process (the web process's chat), least recently used evicted.

_cache: "OrderedDict[tuple, LoadedModel]" = OrderedDict()
_key_locks: dict[tuple, threading.Lock] = {}
_cache_lock = threading.Lock()


def _cache_key(settings: ModelSettings, found: ModelSource, trust: bool) -> tuple:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.precision, device)
    return (found.kind, found.location, str(models_dir()), str(device), dtype, trust, settings.quantization)


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


def clear_model_cache() -> None:
    """Forget the per-process models (frees their memory once no caller holds them)."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()
