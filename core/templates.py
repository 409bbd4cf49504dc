"""Prompt templates: the LLM-Adapters (Alpaca) template and the model's own chat template.

Training, evaluation and chat render prompts through this one module, so a model is asked questions in
exactly the form it was trained on. Template ``chat`` is the model's own chat template
(``tokenizer.chat_template``), or ChatML (``<|im_start|>role\\n...<|im_end|>``) for the many base models
that ship none: ``chat_template`` says which, and ``template_note`` words it for the UI.
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


# ChatML, the format of Qwen, SmolLM2 and many others: a model without a template of its own learns it
# from the training data. ``{{ bos_token }}`` is prepended where the tokenizer adds BOS to plain text.
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_STOPS = ("<|im_end|>", "<|im_start|>")  # where a ChatML answer ends when the markers are plain text


def chat_template(tokenizer: Any) -> tuple[str, bool]:
    """(the Jinja chat template to render with, whether it is the ChatML default).

    The model's own template when its tokenizer has one; else ChatML, with the BOS token first when
    the tokenizer puts one before plain text (LLaMA does): chat text is tokenised without special
    tokens, as ``apply_chat_template`` does, so the template must hold them.
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates (tokenizer_config.json may hold several): the default one
        own = own.get("default")
    if isinstance(own, str) and own:
        return own, False
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return ("{{ bos_token }}" if adds_bos else "") + CHATML_TEMPLATE, True


def template_note(tokenizer: Any, template: str) -> str | None:
    """What the UI should say about the template: that ChatML stands in for a missing chat template."""
    if template == "chat" and chat_template(tokenizer)[1]:
        return ("this model ships no chat template of its own: conversations are rendered in ChatML "
                "(<|im_start|>role … <|im_end|>), which the adapter learns from the data")
    return None


def render_chat(messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """``messages`` (``{role, content}``) as text through ``chat_template(tokenizer)``.

    ``add_generation_prompt`` appends the start of an assistant turn. A template that refuses the
    conversation (some raise on a system turn) is a ``ValueError`` saying so.
    """
    if tokenizer is None:
        raise ValueError("template 'chat' needs the model's tokenizer")
    template, _ = chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2's TemplateError, or raise_exception() inside the template
        raise ValueError(f"the model's chat template refused the conversation: {err}") from None


def render_prompt(instruction: str, input: str = "", template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text up to where the response begins.

    ``chat`` renders one user turn (instruction, then input) and the generation prompt with
    ``render_chat`` (the model's chat template, or ChatML where it has none).
    """
    if template == "alpaca":
        if input and input.strip():
            return _WITH_INPUT.format(instruction=instruction, input=input)
        return _WITHOUT_INPUT.format(instruction=instruction)
    if template == "chat":
        content = instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
        return render_chat([{"role": "user", "content": content}], tokenizer, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
