"""Prompt templates: the LLM-Adapters (Alpaca) template and the model's own chat template.

Training and evaluation render prompts through this one module, so a model is asked questions in
exactly the form it was trained on.
"""

from __future__ import annotations

from typing import Any

TEMPLATES = ("alpaca", "chat")

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(instruction: str, input: str = "", template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text up to where the response begins.

    ``chat`` uses ``tokenizer.apply_chat_template`` with one user turn (instruction, then input) and
    the generation prompt; it needs a tokenizer that has a chat template.
    """
    if template == "alpaca":
        if input and input.strip():
            return _WITH_INPUT.format(instruction=instruction, input=input)
        return _WITHOUT_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template; this model has none "
                             "(use template 'alpaca')")
        content = instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
