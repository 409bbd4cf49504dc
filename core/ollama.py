"""An Ollama ``Modelfile`` for an exported GGUF: the prompt format in Ollama's Go-template syntax.

Ollama cannot run a Jinja chat template, so the format is recognised, not translated token by
token: the alpaca prompt our adapters are trained with (``data.template = alpaca``: built from
``core.templates`` itself, so the two cannot drift), or the chat template's family, known by its
markers: ChatML (``<|im_start|>``, SmolLM2, Qwen), LLaMA-3 (``<|start_header_id|>``) and LLaMA-2
(``[INST]``). Anything else is refused by name. A ChatML template that writes a default system turn
(SmolLM2's "You are a helpful AI assistant named SmolLM...") gets it as the Modelfile's ``SYSTEM``,
which Ollama puts first when a conversation has no system message of its own.

BOS is not in the templates: llama.cpp adds it where the GGUF says so (``add_bos_token``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .fields import ConfigError
from .gguf_vocab import chat_template
from .templates import render_prompt

_MARK = "\x00"


@dataclass(frozen=True)
class OllamaFormat:
    """A prompt format for Ollama: its family, Go template, default system prompt and stop strings."""

    family: str
    template: str
    system: str | None = None
    stops: list[str] = field(default_factory=list)


_CHATML = ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n")
_LLAMA3 = ("{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
_LLAMA2 = ("[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]"
           "{{ if .Response }} {{ .Response }}{{ end }}")
# A literal system turn inside a ChatML Jinja template (its newline escaped or not): the default system prompt.
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"<\\{}]+)<\|im_end\|>")


def alpaca_format(eos: str | None) -> OllamaFormat:
    """The LLM-Adapters (alpaca) prompt without an input field, from ``core.templates.render_prompt``."""
    before, after = render_prompt(_MARK).split(_MARK)
    return OllamaFormat("alpaca", f"{before}{{{{ .Prompt }}}}{after}{{{{ .Response }}}}",
                        stops=[s for s in (eos, "### Instruction:") if s])


def chat_format(template: str | None, eos: str | None) -> OllamaFormat:
    """The Ollama form of a Jinja chat ``template``, recognised by family; ``ConfigError`` otherwise."""
    if not template:
        raise ConfigError("template", "the model has no chat template to translate for Ollama; train with "
                                      "template alpaca, or use the GGUF without a Modelfile")
    extra = [eos] if eos else []
    if "<|im_start|>" in template:
        found = _CHATML_SYSTEM.search(template)
        return OllamaFormat("ChatML", _CHATML, found.group(1) if found else None,
                            _unique(["<|im_end|>", "<|im_start|>", *extra]))
    if "<|start_header_id|>" in template:
        return OllamaFormat("LLaMA-3", _LLAMA3, None,
                            _unique(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", *extra]))
    if "[INST]" in template:
        return OllamaFormat("LLaMA-2", _LLAMA2, None, _unique(["[INST]", "[/INST]", *extra]))
    raise ConfigError("template", "the chat template is none Ollama's Modelfile can be written for here "
                                  "(known: ChatML, LLaMA-3, LLaMA-2); train with template alpaca, or write the "
                                  "TEMPLATE by hand")


def ollama_format(tokenizer: Any, prompt_template: str) -> OllamaFormat:
    """The format a model trained with ``prompt_template`` (``alpaca`` or ``chat``) is asked in."""
    eos = getattr(tokenizer, "eos_token", None)
    if prompt_template == "alpaca":
        return alpaca_format(eos)
    if prompt_template == "chat":
        return chat_format(chat_template(tokenizer), eos)
    raise ConfigError("template", f"unknown prompt template {prompt_template!r}")


def modelfile(fmt: OllamaFormat, gguf_name: str = "model.gguf") -> str:
    """The text of a ``Modelfile`` next to ``gguf_name``."""
    for what, text in (("template", fmt.template), ("system prompt", fmt.system or "")):
        if '"""' in text:
            raise ConfigError("template", f'the {what} contains """, which a Modelfile cannot quote')
    lines = [f"# Adapter Workbench export; prompt format: {fmt.family}", f"FROM ./{gguf_name}",
             f'TEMPLATE """{fmt.template}"""']
    if fmt.system:
        lines.append(f'SYSTEM """{fmt.system}"""')
    lines += [f'PARAMETER stop "{_quoted(s)}"' for s in fmt.stops]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
