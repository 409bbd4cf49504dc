"""Answers from a base model or an adapted one: streaming chat and side-by-side comparison.

Models are loaded once per process: the base through ``models.get_model``; each adapter on its own
copy of the base (a 135M model in bf16 is ~270 MB), kept in a small LRU so switching back and forth
between a few adapters costs nothing. Both caches hold at most the deployment's
``limits.chat_models_resident`` models (least recently used evicted), and an answer is at most
``limits.chat_new_tokens`` tokens long: a longer ``max_new_tokens`` is clamped silently, so a form
with a generous default works in every mode. Base models go through ``core.sources`` like every other
load: a model whose own code would have to run is refused here (``RemoteCodeError``).

With template ``chat`` (adapters trained on chat data or with the chat template, and base models that
have one) the earlier turns of the conversation are rendered before the question with the same template
as in training (``core.templates.render_chat``), oldest turns dropped first when the prompt would not
fit the model's context; with ``alpaca`` each question is answered on its own, as it was trained.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .config import JobSpec, ModelSettings
from .decoding import model_device
from .deployment import Deployment, current
from .inject import load_adapter, read_adapter_config
from .models import get_model
from .templates import CHATML_STOPS, render_chat, render_prompt

STOP_MARKERS = ("\n### Instruction", "\n### Input", "\n### Response", "\nBelow is an instruction", *CHATML_STOPS)
ROLES = ("system", "user", "assistant")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


@dataclass
class ChatModel:
    """A model ready to answer: the model, its tokenizer and the prompt template it was trained with."""

    name: str
    model: Any
    tokenizer: Any
    template: str = "alpaca"
    dtype: torch.dtype = torch.float32


_lock = threading.Lock()
_adapted: "OrderedDict[str, ChatModel]" = OrderedDict()


def base_chat_model(settings: ModelSettings | None = None, template: str = "alpaca",
                    deployment: Deployment | None = None) -> ChatModel:
    loaded = get_model(settings or ModelSettings(), deployment)
    return ChatModel(name=f"base: {loaded.name}", model=loaded.model, tokenizer=loaded.tokenizer,
                     template=template, dtype=loaded.compute_dtype)


def adapter_chat_model(adapter_dir: str | Path, name: str | None = None,
                       deployment: Deployment | None = None) -> ChatModel:
    """The base model of the adapter with the adapter loaded (cached per process)."""
    d = deployment or current()
    key = str(Path(adapter_dir).resolve())
    with _lock:
        if key in _adapted:
            _adapted.move_to_end(key)
            return _adapted[key]
    meta = read_adapter_config(adapter_dir)
    training = meta.get("training", {})
    spec = JobSpec.from_dict(training["spec"]) if "spec" in training else None
    settings = spec.model if spec else ModelSettings(name=meta.get("base_model") or ModelSettings().name)
    loaded = get_model(settings, d)
    model = copy.deepcopy(loaded.model)
    load_adapter(model, adapter_dir, tokenizer=loaded.tokenizer)
    model.eval()
    chat = ChatModel(name=name or Path(adapter_dir).parent.name, model=model, tokenizer=loaded.tokenizer,
                     template=spec.data.template if spec else "alpaca", dtype=loaded.compute_dtype)
    with _lock:
        _adapted[key] = chat
        while len(_adapted) > max(1, int(d.limits.chat_models_resident or 1)):
            _adapted.popitem(last=False)
    return chat


class _StopOnMarkers(StoppingCriteria):
    def __init__(self, tokenizer: Any, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> bool:
        text = self.tokenizer.decode(input_ids[0, self.start:][-24:], skip_special_tokens=True)
        return any(m in text for m in STOP_MARKERS)


def _cut(text: str) -> str:
    for marker in STOP_MARKERS:
        text = text.split(marker)[0]
    return text


def new_tokens(settings: GenerationSettings, deployment: Deployment | None = None) -> int:
    """``settings.max_new_tokens`` clamped to [1, the deployment's ``chat_new_tokens``]."""
    cap = int((deployment or current()).limits.chat_new_tokens or 0)
    wanted = max(1, int(settings.max_new_tokens))
    return min(wanted, cap) if cap > 0 else wanted


def prompt_inputs(chat: ChatModel, question: str, history: list[dict[str, str]] | None = None,
                  max_new_tokens: int = 0) -> dict[str, torch.Tensor]:
    """The tokenised prompt: ``question`` after ``history`` (``{role, content}`` turns) with template
    ``chat``, the question alone with ``alpaca``.

    Chat text is tokenised without added special tokens, as in training (the template holds them).
    The oldest user/assistant pairs are dropped (a system turn first is kept) until the prompt and
    ``max_new_tokens`` fit the model's ``max_position_embeddings`` where it has one.
    """
    tok = chat.tokenizer
    if chat.template != "chat":
        return tok(render_prompt(question, "", chat.template, tok), return_tensors="pt")
    turns = list(history or [])
    for k, turn in enumerate(turns, 1):
        if not (isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)):
            raise ValueError(f"history turn {k}: expected {{role: system|user|assistant, content: text}}")
    system = turns[:1] if turns and turns[0]["role"] == "system" else []
    turns = turns[len(system):]
    limit = getattr(getattr(chat.model, "config", None), "max_position_embeddings", None)
    while True:
        text = render_chat([*system, *turns, {"role": "user", "content": question}], tok, add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False)
        if not limit or not turns or inputs["input_ids"].shape[1] + max_new_tokens <= limit:
            return inputs
        turns = turns[2:]


def stream_answer(chat: ChatModel, question: str, settings: GenerationSettings | None = None,
                  deployment: Deployment | None = None, history: list[dict[str, str]] | None = None) -> Iterator[str]:
    """Yield the answer as it grows (each item is the whole answer so far); at most the deployment's
    ``chat_new_tokens`` new tokens (a larger ``max_new_tokens`` is clamped). ``history``: the earlier
    turns, used with template ``chat`` (see ``prompt_inputs``)."""
    settings = settings or GenerationSettings()
    tok = chat.tokenizer
    limit = new_tokens(settings, deployment)
    inputs = prompt_inputs(chat, question, history, limit)
    device = model_device(chat.model)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sample = settings.temperature > 0
    kwargs = dict(**inputs, max_new_tokens=limit, do_sample=sample, streamer=streamer,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                  stopping_criteria=StoppingCriteriaList([_StopOnMarkers(tok, inputs["input_ids"].shape[1])]))
    if sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            enabled = chat.dtype in (torch.bfloat16, torch.float16)
            with torch.inference_mode(), torch.autocast(device.type, dtype=chat.dtype, enabled=enabled):
                chat.model.generate(**kwargs)
        except BaseException as err:  # surfaced to the caller below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield _cut(text).strip()
    thread.join()
    if errors:
        raise errors[0]


def answer(chat: ChatModel, question: str, settings: GenerationSettings | None = None,
           deployment: Deployment | None = None, history: list[dict[str, str]] | None = None) -> str:
    result = ""
    for result in stream_answer(chat, question, settings, deployment, history):
        pass
    return result
