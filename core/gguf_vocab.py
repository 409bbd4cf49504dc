"""A Hugging Face tokenizer as GGUF metadata, the way llama.cpp reads it (``tokenizer.ggml.*``).

llama.cpp keeps no ``tokenizer.json``: a GGUF holds the token list, each token's type, the BPE
merges, the special token ids, whether BOS/EOS are added, the chat template, and the *name* of the
pre-tokenizer (``tokenizer.ggml.pre``): the text-splitting regex is compiled into llama.cpp and chosen
by that name, so a pre-tokenizer we cannot name exactly is refused rather than guessed.

Supported: byte-level BPE (``tokenizer.ggml.model = gpt2``: GPT-2, SmolLM, LLaMA-3 tokenizers) and
SentencePiece-style BPE with byte fallback (``llama``: LLaMA-1/2, Mistral v0.1, TinyLlama), whose HF
``tokenizer.json`` keeps merges but no scores: llama.cpp's SentencePiece tokenizer merges the pair
whose result scores highest, so a token made by merge ``i`` scores ``-i`` (the merges' own order), and
the merges are written too (llama.cpp ignores them there; transformers rebuilds the same BPE from them).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .fields import ConfigError

# The LLaMA-3 split regex, as its tokenizer.json spells it (llama.cpp's pre-tokenizer "llama-bpe").
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF token types (gguf.TokenType): kept as numbers so this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


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
    if model.get("type") != "BPE":
        raise ConfigError("tokenizer", f"a {model.get('type')} vocabulary is not supported for GGUF export; "
                                       "BPE is (byte-level, or SentencePiece-style with byte fallback)")
    spm = bool(model.get("byte_fallback"))
    prefix = _space_prefix(data) if spm else False
    pre = "default" if spm else pre_tokenizer_name(data.get("pre_tokenizer"))
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(tokens, NORMAL)
    if spm:
        types.update({i: BYTE for i, t in tokens.items() if _BYTE_TOKEN.fullmatch(t)})
    for added in data.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if spm and tokenizer.unk_token_id is not None:  # llama.cpp's SentencePiece marks it unknown, not control
        types[tokenizer.unk_token_id] = UNKNOWN
    if max(tokens) >= vocab_size:
        raise ConfigError("tokenizer", f"token id {max(tokens)} is beyond the model's vocabulary ({vocab_size})")
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    probe = tokenizer("a")["input_ids"]
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "llama" if spm else "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": token_list, "tokenizer.ggml.token_type": type_list,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "tokenizer.ggml.add_eos_token": bool(probe) and probe[-1] == tokenizer.eos_token_id,
    }
    if spm:
        rank = {}
        for i, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), -float(i))
        out["tokenizer.ggml.scores"] = [rank.get(t, 0.0) for t in token_list]
        out["tokenizer.ggml.add_space_prefix"] = prefix
    for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("unknown_token_id", tokenizer.unk_token_id), ("padding_token_id", tokenizer.pad_token_id)):
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = int(value)
    template = chat_template(tokenizer)
    if template:
        out["tokenizer.chat_template"] = template
    return out


def _space_prefix(data: dict) -> bool:
    """Whether a SentencePiece-style ``tokenizer.json`` puts "▁" before the text (a ``Metaspace``
    pre-tokenizer that prepends, or the older ``Prepend`` normalizer); ``ConfigError`` for other shapes."""
    pre, norm = data.get("pre_tokenizer") or {}, data.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "▁":
        return pre.get("prepend_scheme", "always") != "never"
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if not pre and any(s.get("type") == "Replace" for s in steps):
        return any(s.get("type") == "Prepend" for s in steps)
    raise ConfigError("tokenizer", f"a SentencePiece-style tokenizer with pre-tokenizer {pre.get('type')!r} and "
                                   f"normalizer {norm.get('type')!r} is not one llama.cpp's 'llama' vocabulary matches")


def chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (the default one where it has several), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None
