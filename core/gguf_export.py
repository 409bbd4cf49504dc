"""GGUF files for llama.cpp and Ollama: a merged model (F16 or Q8_0) and a LoRA adapter.

Written with the ``gguf`` package's ``GGUFWriter`` following llama.cpp's conventions
(``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``), for LLaMA-family models only (``llama``,
``mistral`` without sliding-window attention in play: GGUF architecture ``llama``):

- tensor names ``token_embd``, ``blk.<i>.attn_q`` ..., ``output_norm``, ``output`` (absent when the
  embeddings are tied);
- the rows of ``attn_q``/``attn_k`` permuted per head from Hugging Face's rotate-half layout to the
  interleaved pairs llama.cpp's RoPE expects (``_permute``);
- F16: every matrix in float16, norms in float32. Q8_0: matrices whose rows are a multiple of 32 in
  blocks of 32 int8 values and one float16 scale ``d = max|x| / 127`` per block (each value off by at
  most ``d / 2``, plus the scale's float16 rounding); others in float16, norms in float32;
- the tokenizer as ``core.gguf_vocab`` writes it (byte-level or SentencePiece-style BPE), the model's
  hyper-parameters as ``llama.*`` keys.

A LoRA adapter is written from its PEFT layout (``core.inject.export_peft``), as llama.cpp's own
converter reads a PEFT directory: ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, tensors ``<base tensor>.lora_a`` (r x in) and ``.lora_b`` (out x r), B's rows
permuted like the base tensor's. llama.cpp scales each pair by ``alpha / rank``; a layer whose PEFT
scale differs from that has the difference folded into its B.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from .fields import ConfigError
from .gguf_vocab import vocab_metadata

QUANTS = ("f16", "q8_0")
MODEL_TYPES = ("llama", "mistral")  # HF model types written as GGUF architecture "llama"
ARCH = "llama"
Q8_BLOCK = 32

# HF parameter name (after ``model.``) -> GGUF tensor name; {i} is the layer index.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_name(module_path: str) -> str | None:
    """The GGUF tensor base name of a HF LLaMA module path (``model.layers.3.self_attn.q_proj`` ->
    ``blk.3.attn_q``); None for a path llama.cpp has no tensor for."""
    if module_path in _TOP_NAMES:
        return _TOP_NAMES[module_path]
    match = _LAYER.fullmatch(module_path)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters llama.cpp needs, read (and checked) from a HF config."""

    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float
    vocab: int
    tied: bool


def llama_shape(config: Any) -> LlamaShape:
    """``LlamaShape`` of ``config``; ``ConfigError`` naming what llama.cpp's ``llama`` graph would get
    wrong (another architecture, biases, RoPE scaling, an active sliding window)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ConfigError("model", f"GGUF export covers LLaMA-family models ({', '.join(MODEL_TYPES)}); "
                                   f"this one is {model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("model", "GGUF export: attention/MLP biases are not written for a llama graph")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError("model", f"GGUF export: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                                   "supported (plain RoPE only)")
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        raise ConfigError("model", f"GGUF export: a sliding window of {window} tokens is not part of llama.cpp's "
                                   "llama graph")
    n_head = config.num_attention_heads
    return LlamaShape(
        n_layers=config.num_hidden_layers, hidden=config.hidden_size, ffn=config.intermediate_size,
        n_head=n_head, n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_head,
        context=config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        rms_eps=float(config.rms_norm_eps), vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)))


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or of a LoRA B) from HF's rotate-half order to llama.cpp's interleaved
    pairs: within each head, rows ``[0..d/2) , [d/2..d)`` become ``0, d/2, 1, d/2+1, ...``."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _row_permuter(name: str, shape: LlamaShape) -> Callable[[torch.Tensor], torch.Tensor]:
    if name.endswith(".attn_q"):
        return lambda w: _permute(w, shape.n_head)
    if name.endswith(".attn_k"):
        return lambda w: _permute(w, shape.n_head_kv)
    return lambda w: w


def _encode(w: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw GGML type or None to infer from the array's dtype)."""
    from gguf import GGMLQuantizationType, quants

    arr = w.detach().float().cpu().numpy()
    if arr.ndim == 1:
        return arr.astype(np.float32), None
    if quant == "q8_0" and arr.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(arr, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return arr.astype(np.float16), None


def _writer(path: Path, name: str, general_type: str) -> Any:
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_type(general_type)
    writer.add_name(name)
    return writer


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_vocab(writer: Any, meta: dict[str, Any]) -> None:
    methods = {"model": writer.add_tokenizer_model, "pre": writer.add_tokenizer_pre,
               "tokens": writer.add_token_list, "token_type": writer.add_token_types,
               "merges": writer.add_token_merges, "add_bos_token": writer.add_add_bos_token,
               "add_eos_token": writer.add_add_eos_token, "bos_token_id": writer.add_bos_token_id,
               "eos_token_id": writer.add_eos_token_id, "unknown_token_id": writer.add_unk_token_id,
               "padding_token_id": writer.add_pad_token_id, "scores": writer.add_token_scores,
               "add_space_prefix": writer.add_add_space_prefix}
    for key, value in meta.items():
        if key == "tokenizer.chat_template":
            writer.add_chat_template(value)
        else:
            methods[key.removeprefix("tokenizer.ggml.")](value)


def write_model_gguf(model: torch.nn.Module, tokenizer: Any, path: str | Path, quant: str = "f16",
                     name: str | None = None) -> Path:
    """Write a plain HF LLaMA-family ``model`` (no adapter attached: see ``export_merged_gguf``) and its
    ``tokenizer`` as one GGUF file at ``path`` in ``quant`` (``f16`` or ``q8_0``). Returns ``path``."""
    import gguf

    if quant not in QUANTS:
        raise ConfigError("quant", f"unknown GGUF type {str(quant)[:20]!r}; use {', '.join(QUANTS)}")
    if getattr(model, "adapter_config", None) is not None:
        raise ConfigError("adapter", "the model has an adapter attached; export_merged_gguf folds it in first")
    shape = llama_shape(model.config)
    vocab = vocab_metadata(tokenizer, shape.vocab)
    path = Path(path)
    writer = _writer(path, name or getattr(model.config, "_name_or_path", "") or "model", "model")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim * shape.n_head != shape.hidden:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, vocab)
    for key, tensor in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        target = gguf_name(module)
        if target is None or leaf != "weight":
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise ConfigError("model", f"GGUF export: no llama.cpp tensor for {key!r}")
        if target == "output" and shape.tied:
            continue
        data, raw = _encode(_row_permuter(target, shape)(tensor), quant)
        writer.add_tensor(f"{target}.weight", data, raw_dtype=raw)
    _finish(writer)
    return path


def export_merged_gguf(model: torch.nn.Module, tokenizer: Any, path: str | Path, quant: str = "f16") -> Path:
    """The adapted ``model`` with its adapter folded in (``core.inject.export_merged``, which works on a
    copy and refuses a method that cannot merge) as a GGUF file at ``path``."""
    from transformers import AutoModelForCausalLM

    from .inject import export_merged

    vocab_metadata(tokenizer, llama_shape(model.config).vocab)  # refuse before the merge, not minutes after
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # beside the output: /tmp may be too small
        export_merged(model, tmp)
        merged = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return write_model_gguf(merged, tokenizer, path, quant, name=getattr(model.config, "_name_or_path", None))


def export_lora_gguf(model: torch.nn.Module, path: str | Path) -> Path:
    """The LoRA adapter attached to ``model`` as a llama.cpp LoRA adapter GGUF at ``path`` (float32
    tensors); ``ConfigError`` for a method whose PEFT layout is not a plain LoRA (DoRA, VeRA, (IA)³, ...)."""
    from .inject import export_peft

    shape = llama_shape(model.config)
    with tempfile.TemporaryDirectory() as tmp:
        export_peft(model, tmp)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        tensors = load_file(str(Path(tmp) / "adapter_model.safetensors"))
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise ConfigError("method", f"llama.cpp's LoRA adapters hold a plain LoRA; this adapter is {kind}")
    pairs = []
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        target = gguf_name(module)
        if target is None or target in ("token_embd", "output_norm", "output"):
            raise ConfigError("adapter", f"GGUF LoRA: no llama.cpp LoRA target for {module!r}")
        A, B = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = A.shape[0]
        alpha = float(config.get("alpha_pattern", {}).get(module, config["lora_alpha"]))
        scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        pairs.append((target, A, B, rank, scale))
    if not pairs:
        raise ConfigError("adapter", "GGUF LoRA: the adapter has no LoRA tensors")
    gguf_alpha = pairs[0][4] * pairs[0][3]  # llama.cpp's scale alpha / rank, exact for the first pair
    writer = _writer(Path(path), f"{getattr(model.config, '_name_or_path', '') or 'model'} LoRA", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", gguf_alpha)
    for target, A, B, rank, scale in pairs:
        fold = scale * rank / gguf_alpha  # 1 unless this layer's scale differs from the first's
        B = _row_permuter(target, shape)(B.float() * fold if fold != 1 else B.float())
        writer.add_tensor(f"{target}.weight.lora_a", A.float().contiguous().numpy())
        writer.add_tensor(f"{target}.weight.lora_b", B.contiguous().numpy())
    _finish(writer)
    return Path(path)
