"""Chat tab: talk to a trained adapter or a base model; side by side, the same prompt to several at once.

Models come from ``core.generate``: the base model is loaded once per process and shared; each adapter
sits on its own copy in a small LRU cache. Conversations are per browser session (``gr.State``).
A model with template ``chat`` (an adapter trained on chat-format data or with the chat template; a base
model with a chat template of its own) is given the conversation so far, rendered with the template it
was trained with; an alpaca-trained adapter answers each question on its own, as it was trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from core.config import DEFAULT_MODEL, ModelSettings
from jobs.compare import BASE_KEY, JOB_KEY, base_key, job_key, parse_model_key
from jobs.merges import ADAPTER_KINDS

from .common import error_text, warn

MAX_SIDE_BY_SIDE = 4
SAMPLES_FILE = Path(__file__).resolve().parents[1] / "assets" / "math_eval.json"
ADAPTER_STATUSES = ("succeeded", "cancelled", "interrupted", "failed")
FAILED = "⚠️ "  # starts an error shown in place of an answer: such a turn is not part of the conversation
PLACEHOLDERS = ("…", "_loading the model…_", "_(empty answer)_")
# Earlier turns a chat-template model is given: at most this many questions' worth of text (the
# deployment's prompt_chars each), most recent first, so one conversation cannot grow without bound.
HISTORY_PROMPTS = 4


def sample_problems(n: int = 6) -> list[str]:
    """A few held-out math problems to click on."""
    try:
        rows = json.loads(SAMPLES_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return ["Tom has 12 apples and buys 7 more. How many apples does he have now?"]
    return [r["instruction"] for r in rows[:n]]


def model_options(service: Any) -> list[tuple[str, str]]:
    """(label, value) for every model one can chat with: base models first, then jobs with an adapter."""
    jobs = [j for j in service.list_jobs() if j["kind"] in ADAPTER_KINDS and j["status"] in ADAPTER_STATUSES]
    with_adapter = [j for j in jobs if j.get("out_dir") and (Path(j["out_dir"]) / "adapter" /
                                                               "adapter_config.json").is_file()]
    bases = [DEFAULT_MODEL]
    for j in with_adapter:
        name = ((j.get("spec") or {}).get("model") or {}).get("name")
        if name and name not in bases:
            bases.append(name)
    options = [(f"base model: {Path(b).name if '/' in b and Path(b).exists() else b}", base_key(b)) for b in bases]
    for j in with_adapter:
        method = ((j.get("spec") or {}).get("adapter") or {}).get("method", "")
        note = "" if j["status"] == "succeeded" else f", {j['status']}"
        options.append((f"#{j['id']} {j.get('name') or ''} ({method}{note})", job_key(j["id"])))
    return options


def selected_models(primary: str | None, side_by_side: bool, others: list[str] | None) -> list[str]:
    """The models answering, in column order: the primary one, then (side by side) the others."""
    picked = [primary] if primary else []
    if side_by_side:
        picked += [o for o in (others or []) if o]
    return list(dict.fromkeys(picked))[:MAX_SIDE_BY_SIDE]


def label_of(value: str, options: list[tuple[str, str]]) -> str:
    return next((label for label, v in options if v == value), value)


def load_chat_model(service: Any, value: str, template: str | None = None) -> Any:
    """The ``ChatModel`` of an option value (loaded once per process, then cached by core.generate)."""
    from core.generate import adapter_chat_model, base_chat_model

    if not isinstance(value, str):
        raise ValueError("pick a model from the list")
    kind, ref = parse_model_key(value)
    if kind == "job":
        adapter = service.files(ref)["adapter"]  # the service checks the caller may see the job
        if not adapter:
            raise ValueError(f"job {ref} has no saved adapter yet")
        job = service.get(ref)
        return adapter_chat_model(adapter, name=f"#{ref} {job.get('name') or ''}")
    name = service.resolve_model(ref)  # the deployment's allowlist and data roots
    chat = base_chat_model(ModelSettings(name=name), template=template or "alpaca")
    if template is None and getattr(chat.tokenizer, "chat_template", None):
        chat.template = "chat"
    return chat


def _adapter_template(service: Any, values: list[str]) -> str | None:
    """The prompt template of the first adapter in the comparison (base models then get the same prompt)."""
    for v in values:
        if v.startswith(JOB_KEY):
            try:
                spec = service.get(parse_model_key(v)[1]).get("spec") or {}
            except (KeyError, ValueError):  # a deleted job or a bad key: its column says so when it is asked
                continue
            return (spec.get("data") or {}).get("template", "alpaca")
    return None


def conversation(messages: list[dict], max_chars: int = 0) -> list[dict[str, str]]:
    """The earlier turns of a column as a model's history: its user/assistant pairs that got an answer
    (not an error or a placeholder), the most recent ones whose text fits ``max_chars`` (0 = all)."""
    pairs = []
    for user, reply in zip(messages[::2], messages[1::2]):
        text = reply.get("content") if isinstance(reply, dict) else None
        if (isinstance(text, str) and reply.get("role") == "assistant" and text not in PLACEHOLDERS
                and not text.startswith(FAILED) and isinstance(user, dict) and user.get("role") == "user"
                and isinstance(user.get("content"), str)):
            pairs.append([{"role": "user", "content": user["content"]}, {"role": "assistant", "content": text}])
    kept, used = [], 0
    for pair in reversed(pairs):
        used += sum(len(t["content"]) for t in pair)
        if max_chars and used > max_chars:
            break
        kept = pair + kept
    return kept


def respond(service: Any, question: str, models: list[str], histories: list[list[dict]] | None,
            max_new_tokens: int, temperature: float, top_p: float,
            options: list[tuple[str, str]] | None = None) -> Iterator[list[list[dict]]]:
    """Answer ``question`` with each model in turn, streaming; yields every column's messages each time."""
    models = [m for m in (models or []) if isinstance(m, str)][:MAX_SIDE_BY_SIDE]
    histories = [list(h) for h in (histories or []) if isinstance(h, list)][:MAX_SIDE_BY_SIDE]
    while len(histories) < len(models):
        histories.append([])
    question = (question if isinstance(question, str) else "").strip()
    if not question:
        warn("Type a question first (or click a sample problem).")
        yield histories
        return
    most = service.deployment.limits.prompt_chars
    if len(question) > most:
        warn(f"The question is {len(question):,} characters long; ask in at most {most:,}.")
        yield histories
        return
    if not models:
        warn("Pick a model to chat with.")
        yield histories
        return
    try:
        settings = generation_settings(max_new_tokens, temperature, top_p)
        with service.generation_slot():  # public mode: one answer at a time per visitor
            yield from _answer_all(service, question, models, histories, settings, options)
    except Exception as err:  # bad settings, or an answer already being generated for this visitor
        warn(error_text(err))
        yield histories


def generation_settings(max_new_tokens: Any, temperature: Any, top_p: Any) -> Any:
    """``GenerationSettings`` from widget values, checked (an API call may send anything)."""
    from core.generate import GenerationSettings

    values = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a number (got {str(value)[:40]!r})")
    if not 1 <= max_new_tokens <= 100_000 or not 0 <= temperature <= 5 or not 0 < top_p <= 1:
        raise ValueError("max_new_tokens must be >= 1, temperature within 0-5 and top_p within (0, 1]")
    return GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                              top_p=float(top_p))


def _answer_all(service: Any, question: str, models: list[str], histories: list[list[dict]], settings: Any,
                options: list[tuple[str, str]] | None) -> Iterator[list[list[dict]]]:
    from core.generate import stream_answer

    template = _adapter_template(service, models)
    budget = service.deployment.limits.prompt_chars * HISTORY_PROMPTS
    past = [conversation(h, budget) for h in histories]
    for i in range(len(models)):
        histories[i] = histories[i] + [{"role": "user", "content": question},
                                       {"role": "assistant", "content": "…"}]
    yield histories
    for i, value in enumerate(models):
        try:
            histories[i][-1] = {"role": "assistant", "content": "_loading the model…_"}
            yield histories
            chat = load_chat_model(service, value, template if value.startswith(BASE_KEY) else None)
            answer = ""
            for answer in stream_answer(chat, question, settings, history=past[i]):
                histories[i][-1] = {"role": "assistant", "content": answer or "…"}
                yield histories
            histories[i][-1] = {"role": "assistant", "content": answer or "_(empty answer)_"}
        except Exception as err:  # one model failing must not stop the others
            text = error_text(err)
            warn(f"{label_of(value, options or [])}: {text}")
            histories[i][-1] = {"role": "assistant", "content": FAILED + text}
        yield histories


def chatbot_updates(models: list[str], histories: list[list[dict]], options: list[tuple[str, str]]) -> list[dict]:
    """One update per chat column: visible with its model's label and messages, or hidden."""
    out = []
    for i in range(MAX_SIDE_BY_SIDE):
        if i < len(models):
            out.append(gr.update(visible=True, label=label_of(models[i], options),
                                 value=histories[i] if i < len(histories) else []))
        else:
            out.append(gr.update(visible=False, value=[]))
    return out


# --------------------------------------------------------------------------------------------------
# Layout.

@dataclass
class ChatTab:
    primary: Any
    side_by_side: Any
    others: Any
    refresh_button: Any
    chatbots: list[Any]
    question: Any
    send_button: Any
    clear_button: Any
    samples: Any
    max_new_tokens: Any
    temperature: Any
    top_p: Any
    histories: Any  # gr.State: one message list per column
    options: Any  # gr.State: (label, value) of the models listed

    @property
    def option_outputs(self) -> list[Any]:
        return [self.primary, self.others, self.options]


def refresh_options(service: Any, primary: str | None, others: list[str] | None) -> tuple:
    """(primary dropdown, others dropdown, options state), keeping the current choices where still listed."""
    options = model_options(service)
    values = [v for _, v in options]
    primary = primary if primary in values else (values[0] if values else None)
    others = [o for o in (others or []) if o in values]
    return gr.update(choices=options, value=primary), gr.update(choices=options, value=others), options


def build_chat_tab(service: Any) -> ChatTab:
    with gr.Row(equal_height=True):
        primary = gr.Dropdown(choices=[], value=None, label="chat with", info="a trained adapter or a base model",
                              scale=3)
        side_by_side = gr.Checkbox(value=False, label="side by side", info="ask several models at once", scale=1)
        others = gr.Dropdown(choices=[], value=[], multiselect=True, label="also answer with",
                             info=f"up to {MAX_SIDE_BY_SIDE - 1} more", visible=False, scale=3,
                             max_choices=MAX_SIDE_BY_SIDE - 1)
        refresh_button = gr.Button("↻", size="sm", scale=0, min_width=50)
    with gr.Row(equal_height=True):
        chatbots = [gr.Chatbot(value=[], label="answers", height=420, visible=(i == 0),
                               buttons=["copy"], feedback_options=None, min_width=240)
                    for i in range(MAX_SIDE_BY_SIDE)]
    with gr.Row(equal_height=True):
        question = gr.Textbox(placeholder="Ask a question, e.g. a math word problem…", show_label=False, scale=6,
                              lines=1, max_lines=6, submit_btn=False)
        send_button = gr.Button("Send", variant="primary", scale=1, min_width=100)
        clear_button = gr.Button("Clear", scale=0, min_width=80)
    samples = gr.Examples(examples=[[q] for q in sample_problems()], inputs=[question],
                          label="sample math problems (click to use)")
    with gr.Accordion("generation settings", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(8, 1024, value=192, step=8, label="max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature", info="0 = greedy")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p", info="used when temperature > 0")
    tab = ChatTab(primary=primary, side_by_side=side_by_side, others=others, refresh_button=refresh_button,
                  chatbots=chatbots, question=question, send_button=send_button, clear_button=clear_button,
                  samples=samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  histories=gr.State([]), options=gr.State([]))
    _wire(tab, service)
    return tab


def _wire(tab: ChatTab, service: Any) -> None:
    def refresh(primary, others):
        try:
            return refresh_options(service, primary, others)
        except Exception as err:
            warn(error_text(err))
            return gr.skip(), gr.skip(), gr.skip()

    tab.refresh_button.click(refresh, [tab.primary, tab.others], tab.option_outputs)

    def layout(primary, side, others, options):
        models = selected_models(primary, side, others)
        return (gr.update(visible=bool(side)), [[] for _ in models], *chatbot_updates(models, [], options))

    for widget in (tab.primary, tab.side_by_side, tab.others):
        widget.change(layout, [tab.primary, tab.side_by_side, tab.others, tab.options],
                      [tab.others, tab.histories, *tab.chatbots], show_progress="hidden")

    def send(question, primary, side, others, histories, max_new_tokens, temperature, top_p, options):
        models = selected_models(primary, side, others)
        final = histories
        for final in respond(service, question, models, histories, max_new_tokens, temperature, top_p, options):
            yield ("", final, *chatbot_updates(models, final, options))
        yield ("", final, *chatbot_updates(models, final, options))

    inputs = [tab.question, tab.primary, tab.side_by_side, tab.others, tab.histories, tab.max_new_tokens,
              tab.temperature, tab.top_p, tab.options]
    outputs = [tab.question, tab.histories, *tab.chatbots]
    tab.send_button.click(send, inputs, outputs, concurrency_limit=2)
    tab.question.submit(send, inputs, outputs, concurrency_limit=2)

    def clear(primary, side, others, options):
        models = selected_models(primary, side, others)
        return ([[] for _ in models], *chatbot_updates(models, [], options))

    tab.clear_button.click(clear, [tab.primary, tab.side_by_side, tab.others, tab.options],
                           [tab.histories, *tab.chatbots])
