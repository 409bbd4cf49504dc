"""Cheap estimates for a planned run: trainable parameters, adapter file size, training memory.

Nothing is loaded: the base model is built from its config on the ``meta`` device (shapes without
storage, a few milliseconds for a 135M model) and the adapter is attached to it exactly as training
would, so the count *is* ``trainable_report`` of the real run, not a formula that could drift from the
adapters. Only the model config is read from disk (or the hub), once per model per process.

The memory figure is rough (stated as such in the UI) and counts what the trainer allocates, for the
resident memory of the training process (``bench/estimate_memory.py`` checks it against the peak
resident memory of real runs): frozen weights in the compute dtype (on a 4-bit base, QLoRA, the
quantised layers at ``core.quant.nf4_bytes`` each: 4 bits a weight and the block scales), adapter weights + gradients +
AdamW moments in fp32, the activations kept for the backward pass, the logits, and the process
itself. With ``T = micro_batch * seq`` tokens (``seq`` the cut-off length plus any virtual tokens: the
trainer packs a micro-batch up to that many padded tokens), ``h`` the hidden size, ``kv`` the key/value
width, ``i`` the MLP width and ``b`` the bytes of the compute dtype::

    saved       = T * b * (layers * per_layer + adapter)
    per_layer   = 3 h + 2 kv + 3 i + heads * seq   (fast: two norm inputs, rotated q, k, v, gated MLP,
                                                    attention probabilities)
                  8 h + 3 i                        (reference: fp32 norm inputs, SDPA's q, k, v, output)
    adapter     = the input width of every trainable adapter matrix (its weight's gradient needs it)
    activations = ACTIVATION_RSS_FACTOR * saved    (freed forward temporaries and backward gradients
                                                    stay in the heap: see ``ACTIVATION_RSS_FACTOR``)
    logits      = fast: one chunk of ``head_loss`` (min(T, 2^23 / vocab) tokens x vocab, in b + fp32 + b)
                  reference: T x vocab in b, its fp32 copy, fp32 log-probabilities and their gradient
    runtime     = RUNTIME_BYTES                    (Python, torch, transformers, tokenizer and data)

an upper bound where rows are shorter than the cut-off (attention probabilities grow with the row).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from typing import Any

import torch

from . import quant
from .config import AdapterConfig, DataSettings, ModelSettings, TrainSettings, check_quantization
from .fields import ConfigError
from .deployment import Deployment, current
from .head_loss import CHUNK_ELEMENTS
from .inject import adapter_state_dict, adapters_of, attach, trainable_report

_configs: dict[tuple[str, str, bool], Any] = {}
_configs_lock = threading.Lock()

ADAM_BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + two fp32 AdamW moments
# Resident memory of a training process after setup, less its model weights: 480-500 MB for SmolLM2 on
# a CPU (340 MB of it Python, torch and transformers imported), measured by bench/estimate_memory.py.
RUNTIME_BYTES = 480 * 2**20
# Resident memory grows by about twice the activations autograd saves: the forward's freed temporaries
# and the backward's gradients stay in the process's heap (``host_memory`` keeps it for speed) and
# micro-batches of other lengths fragment it. Measured 1.9-2.3 for LoRA, series and prefix on SmolLM2
# (bench/RESULTS.md, "Memory estimate").
ACTIVATION_RSS_FACTOR = 2.1


def model_config(settings: ModelSettings, deployment: Deployment | None = None) -> Any:
    """The ``transformers`` config of ``settings.name``, read once per process.

    The name is checked by ``core.sources`` on every call (cached or not). Raises
    ``ConfigError('model.name', ...)`` with the loader's explanation when it cannot be read, and
    ``core.sources.RemoteCodeError`` (a ``ConfigError``: "<model> needs remote code; runs inside the
    job") for a model whose config names its own code: nothing of it runs here.
    """
    from .models import _prepare, load_config

    d = deployment or current()
    if not str(settings.name).strip():
        raise ConfigError("model.name", "name a model")
    found, trust = _prepare(settings, d)  # ModelLoadError / RemoteCodeError: both ConfigErrors
    key = (found.kind, found.location, trust)
    with _configs_lock:
        if key in _configs:
            return _configs[key]
    cfg = load_config(settings, deployment=d)  # the embedded model is converted once here (app warm-up)
    with _configs_lock:
        _configs[key] = cfg
    return cfg


def meta_model(settings: ModelSettings, deployment: Deployment | None = None) -> torch.nn.Module:
    """The base model's modules with shapes but no storage (``meta`` device)."""
    from transformers import AutoModelForCausalLM

    from .models import _prepare

    d = deployment or current()
    cfg = model_config(settings, d)
    _, trust = _prepare(settings, d)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust)
    except Exception as err:
        raise ConfigError("model.name", f"{settings.name!r} is not a causal language model this workbench can "
                                        f"build ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def safetensors_size(shapes: dict[str, tuple[int, ...]], bytes_per_value: int = 4) -> int:
    """The size in bytes of a safetensors file holding tensors of these shapes (no metadata).

    The format is an 8-byte header length, a JSON header (padded with spaces to 8 bytes) and the raw
    data; tensors are laid out in name order, as ``safetensors.torch.save_file`` writes them.
    """
    header, offset = {}, 0
    for name in sorted(shapes):
        n = math.prod(shapes[name]) * bytes_per_value
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    padded = -(-len(text.encode()) // 8) * 8
    return 8 + padded + offset


def _dtype_bytes(settings: ModelSettings) -> tuple[str, int]:
    from .models import ModelLoadError, resolve_device, resolve_dtype

    try:
        dtype = resolve_dtype(settings.precision, resolve_device(settings.device))
    except ModelLoadError as err:
        raise ConfigError("model.device", str(err)) from None
    return str(dtype).replace("torch.", ""), torch.empty((), dtype=dtype).element_size()


def estimate(model_settings: ModelSettings, adapter_cfg: AdapterConfig,
             data: DataSettings | None = None, train: TrainSettings | None = None,
             deployment: Deployment | None = None) -> dict[str, Any]:
    """What training ``adapter_cfg`` on ``model_settings`` would cost, without loading any weights.

    Returns ``trainable``, ``base``, ``percent``, ``per_kind``, ``modules`` (exactly
    ``trainable_report`` of the attached model), ``adapter_bytes`` (the fp32 ``adapter.safetensors``),
    ``quantized_layers`` (how many linear layers a 4-bit base holds in NF4; 0 without quantisation),
    ``adapter_frozen`` (values that file holds besides the trained ones: PiSSA/OLoRA's initial
    ``A0``, ``B0``, which make it, like their PEFT export, the size of a rank-2r LoRA; VeRA's projections),
    ``memory_bytes`` and its parts (``memory_parts``: ``weights``, ``adapter_and_optimizer``,
    ``activations``, ``logits``, ``runtime``; see the module docstring), and the model's ``model_type``, ``layers``,
    ``hidden_size`` and ``dtype``. Raises ``ConfigError`` naming the field for invalid settings (and
    ``core.sources.RemoteCodeError``, a ``ConfigError``, for a model whose own code would have to run:
    the UI shows its message in place of the estimate).
    """
    data = data or DataSettings()
    train = train or TrainSettings()
    try:
        model_settings.validate()
    except ConfigError as err:
        raise err.within("model") from None
    try:
        adapter_cfg.validate()
    except ConfigError as err:
        raise err.within("adapter") from None
    check_quantization(model_settings, adapter_cfg)
    cfg = model_config(model_settings, deployment)
    if adapter_cfg.method == "prompt":  # the count does not depend on how the prompt is initialised
        adapter_cfg = dataclasses.replace(adapter_cfg, settings=dataclasses.replace(adapter_cfg.settings,
                                                                                   init="random"))
    model = meta_model(model_settings, deployment)
    nf4 = model_settings.quantization == "nf4"
    quantized = [m.weight.numel() for _, m in quant.layers_to_quantize(model)] if nf4 else []
    try:
        with torch.device("meta"):
            attach(model, adapter_cfg)
    except ConfigError as err:
        raise (err if err.field.startswith(("adapter.", "model.")) else err.within("adapter")) from None
    report = trainable_report(model)
    shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}

    dtype_name, nbytes = _dtype_bytes(model_settings)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
    inner = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "ffn_dim", 0)
                or getattr(cfg, "n_inner", 0) or 4 * hidden)
    kv = int(getattr(cfg, "num_key_value_heads", 0) or heads) * (hidden // heads)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    seq = int(data.cutoff_len) + _virtual_tokens(adapter_cfg)
    micro = int(train.micro_batch_size)
    tokens = micro * seq
    if train.kernels == "fast":
        per_layer = 3 * hidden + 2 * kv + 3 * inner + heads * seq
        chunk = min(tokens, max(1, CHUNK_ELEMENTS // max(vocab, 1)))
        logits = chunk * vocab * (2 * nbytes + 4)
    else:
        per_layer = 8 * hidden + 3 * inner
        logits = tokens * vocab * (nbytes + 12)
    saved = tokens * nbytes * (layers * per_layer + _adapter_inputs(model))
    parts = {
        "weights": (report["base"] - sum(quantized)) * nbytes + sum(quant.nf4_bytes(n) for n in quantized),
        "adapter_and_optimizer": report["trainable"] * ADAM_BYTES_PER_PARAM,
        "activations": int(ACTIVATION_RSS_FACTOR * saved),
        "logits": logits,
        "runtime": RUNTIME_BYTES,
    }
    frozen = sum(math.prod(shape) for shape in shapes.values()) - report["trainable"]
    return {**report, "adapter_bytes": safetensors_size(shapes), "adapter_frozen": frozen,
            "quantized_layers": len(quantized),
            "memory_bytes": sum(parts.values()),
            "memory_parts": parts, "model_type": cfg.model_type, "layers": layers, "hidden_size": hidden,
            "dtype": dtype_name, "seq_len": seq, "micro_batch_size": micro}


def _adapter_inputs(model: torch.nn.Module) -> int:
    """Per token, the input width of every trainable adapter matrix: what its weight's gradient keeps."""
    return sum(p.shape[-1] for adapter in adapters_of(model) for p in adapter.adapter_params() if p.dim() >= 2)


def _virtual_tokens(cfg: AdapterConfig) -> int:
    return int(getattr(cfg.settings, "num_virtual_tokens", 0) or 0)


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    """``1234567`` -> ``'1.23M'``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))
