"""A Hugging Face tokenizer as GGUF metadata, the way llama.cpp reads it (``tokenizer.ggml.*``).

llama.cpp keeps no ``tokenizer.json``: a GGUF holds the token list, each token's type, the BPE
merges, the special token ids, whether BOS/EOS are added, the chat template, and the *name* of the
pre-tokenizer (``tokenizer.ggml.pre``): the text-splitting regex is compiled into llama.cpp and chosen
by that name, so a pre-tokenizer we cannot name exactly is refused rather than guessed.

Supported: byte-level BPE (``tokenizer.ggml.model = gpt2``: GPT-2, SmolLM, LLaMA-3 tokenizers).
SentencePiece vocabularies (LLaMA-1/2, Mistral v0.1) are refused with a clear error.
"""

from __future__ import annotations

import json
from typing import Any

from .fields import ConfigError

# The LLaMA-3 split regex, as its tokenizer.json spells it (llama.cpp's pre-tokenizer "llama-bpe").
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF token types (gguf.TokenType): kept as numbers so this module imports without gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
            and bool(step.get("use_regex", True)) == use_regex)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a ``tokenizer.json`` pre-tokenizer, recognised by
    its structure; ``ConfigError`` for one llama.cpp has no exact counterpart for."""
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _byte_level(steps[0], use_regex=True):
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and _byte_level(steps[1], use_regex=True)):
        return "smollm"
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT and _byte_level(steps[1], use_regex=False)):
        return "llama-bpe"
    kinds = "+".join(str(s.get("type")) for s in steps) or "none"
    raise ConfigError("tokenizer", f"its pre-tokenizer ({kinds}) is none llama.cpp knows by name (known here: "
                                   "GPT-2 byte-level, SmolLM digits + byte-level, LLaMA-3 split); the GGUF "
                                   "would tokenize differently, so it is not written")


def vocab_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values (and ``tokenizer.chat_template``) of a fast HF tokenizer, the
    token list padded with unused ``[PAD<i>]`` entries up to the model's ``vocab_size``.

    Keys are GGUF's names; values are plain Python (lists of str/int, bools, ints, str)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("tokenizer", f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else model.get("type")
        raise ConfigError("tokenizer", f"a {kind} vocabulary is not supported for GGUF export; only byte-level "
                                       "BPE (GPT-2, SmolLM, LLaMA-3 tokenizers) is")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(tokens, NORMAL)
    for added in data.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ConfigError("tokenizer", f"token id {max(tokens)} is beyond the model's vocabulary ({vocab_size})")
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    probe = tokenizer("a")["input_ids"]
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": token_list, "tokenizer.ggml.token_type": type_list,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "tokenizer.ggml.add_eos_token": bool(probe) and probe[-1] == tokenizer.eos_token_id,
    }
    for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("unknown_token_id", tokenizer.unk_token_id), ("padding_token_id", tokenizer.pad_token_id)):
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = int(value)
    template = chat_template(tokenizer)
    if template:
        out["tokenizer.chat_template"] = template
    return out


def chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (the default one where it has several), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None
