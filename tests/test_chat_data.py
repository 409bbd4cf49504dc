"""Chat-format data (issue 18): messages and sharegpt layouts, checks naming the row, every assistant turn
trained and nothing else, cuts at turn boundaries, the preview's marks, ChatML for models without a
template, and the chat keeping the conversation for chat-template models."""

from __future__ import annotations

import json
import re

import pytest
import torch

import core.data
from core import ConfigError
from core.chat_data import TRAIN_CLOSE, TRAIN_OPEN
from core.data import DataError, load_records, preview_rows, tokenize_records
from core.templates import CHATML_TEMPLATE, render_chat, template_note
from tests.tiny import tiny_tokenizer

# Three conversations: multi-turn, with a system turn, single-turn.
CONVERSATIONS = [
    [("user", "What is 2 plus 3?"), ("assistant", "The answer is 5."),
     ("user", "And times 4?"), ("assistant", "5 times 4 is 20."),
     ("user", "Minus 7?"), ("assistant", "20 minus 7 is 13.")],
    [("system", "Answer with the number."), ("user", "How many apples: 3 plus 4?"), ("assistant", "7")],
    [("user", "Tom has 9 apples and gives 2 away. How many are left?"), ("assistant", "9 - 2 = 7 apples left.")],
]
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def messages_row(turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def sharegpt_row(turns):
    return {"conversations": [{"from": SHAREGPT_ROLES[r], "value": c} for r, c in turns]}


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(json.dumps(rows))
    return path


def expected_messages():
    return [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in CONVERSATIONS]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chatml_tok():
    """A tokenizer without a chat template of its own (a base model's)."""
    t = tiny_tokenizer()
    t.chat_template = None
    return t


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("layout", [messages_row, sharegpt_row])
def test_both_layouts_from_json_and_jsonl_read_alike(tmp_path, layout, suffix):
    path = write(tmp_path / f"chats{suffix}", [layout(t) for t in CONVERSATIONS])
    assert load_records(str(path)) == expected_messages()


def test_columns_map_the_conversation_column_and_sharegpt_row_system(tmp_path):
    rows = [{"dialog": messages_row(t)["messages"]} for t in CONVERSATIONS]
    assert load_records(str(write(tmp_path / "d.json", rows)), {"messages": "dialog"}) == expected_messages()
    with pytest.raises(DataError, match="'nope' \\(mapped to 'messages'\\) is not in the file"):
        load_records(str(tmp_path / "d.json"), {"messages": "nope"})
    row = {"system": "Be brief.", **sharegpt_row(CONVERSATIONS[2])}
    got = load_records(str(write(tmp_path / "s.json", [row])))
    assert got[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert got[0]["messages"][1:] == expected_messages()[2]["messages"]


def test_a_hub_dataset_of_conversations_is_read_the_same_way(monkeypatch):
    monkeypatch.setattr(core.data, "read_hub_dataset",
                        lambda hub_id, splits, limit: ("train", [sharegpt_row(t) for t in CONVERSATIONS]))
    assert load_records("someone/chats") == expected_messages()


@pytest.mark.parametrize("turns, message", [
    ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}],
     r"row 2, turn 1 has the role 'bot'; a role is one of system, user, assistant"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}], r"row 2, turn 2 \(gpt\) is empty"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}], r"row 2, turn 1 \(user\) is empty"),
    ([{"role": "user", "content": "hi"}], r"row 2 has no assistant turn"),
    ([{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}],
     r"row 2, turn 1 has the role \['user'\]"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     r"row 2: the turns do not alternate \(turn 2 is user; expected assistant\)"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     r"row 2: the turns do not alternate \(turn 3 is system; expected user\)"),
    ([{"role": "assistant", "content": "a"}], r"row 2: the turns do not alternate \(turn 1 is assistant; expected user"),
    ([{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}],
     r"row 2, turn 1 \(user\): 'content' is an array, not text"),
    ([], r"row 2: 'messages' must be a non-empty list of turns \(got an empty list\)"),
    ("hello", r"row 2: 'messages' must be a non-empty list of turns \(got a string\)"),
])
def test_a_bad_conversation_is_an_error_naming_file_and_row(tmp_path, turns, message):
    rows = [messages_row(CONVERSATIONS[2]), {"messages": turns}]
    with pytest.raises(DataError) as err:
        load_records(str(write(tmp_path / "bad.json", rows)))
    assert err.value.field == "data.source" and re.match(r"bad\.json: " + message, err.value.message)


def test_jsonl_errors_give_row_and_line_and_a_row_without_the_column_is_named(tmp_path):
    text = json.dumps(messages_row(CONVERSATIONS[0])) + "\n\n" + json.dumps({"messages": [{"role": "gpt?"}]})
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(DataError, match=r"data.source: bad\.jsonl: row 2 \(line 3\), turn 1 has the role 'gpt\?'"):
        load_records(str(tmp_path / "bad.jsonl"))
    rows = [sharegpt_row(CONVERSATIONS[0]), {"instruction": "x", "output": "y"}]
    with pytest.raises(DataError, match=r"data.source: mixed\.json: row 2 has no 'conversations' column"):
        load_records(str(write(tmp_path / "mixed.json", rows)))


def _spans(example):
    """The runs of labelled positions as (start, end) token ranges."""
    runs, start = [], None
    for i, label in enumerate([*example.labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("fixture", ["tok", "chatml_tok"])
def test_labels_are_exactly_the_assistant_turns_every_one_of_them(request, fixture):
    tok = request.getfixturevalue(fixture)
    records = expected_messages()
    data = tokenize_records(records, tok, template="chat", cutoff_len=1024)
    assert data.num_truncated == data.num_dropped == 0 and len(data.examples) == len(records)
    end = "<|im_end|>\n" if fixture == "chatml_tok" else "\n"  # each template's end of turn, trained too
    for ex, rec in zip(data.examples, records):
        assert tok.decode(ex.input_ids) == render_chat(rec["messages"], tok)  # the whole conversation, in order
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        spans = _spans(ex)
        assert [tok.decode(ex.input_ids[a:b]) for a, b in spans] == [a + end for a in answers]
        labelled = {i for a, b in spans for i in range(a, b)}
        assert all(ex.labels[i] == ex.input_ids[i] for i in labelled)
        assert all(ex.labels[i] == -100 for i in range(len(ex.labels)) if i not in labelled)
        assert ex.num_prompt_tokens == spans[0][0]
        # The tokens before each span are the prompt the chat sends for that turn (same tokenisation).
        for k, (a, _) in enumerate(spans):
            upto = rec["messages"][:[i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant"][k]]
            prompt = render_chat(upto, tok, add_generation_prompt=True)
            assert tok.decode(ex.input_ids[:a]) == prompt
    on_inputs = tokenize_records(records, tok, template="chat", cutoff_len=1024, train_on_inputs=True)
    assert all(e.labels == e.input_ids for e in on_inputs.examples)


def test_masked_tokens_carry_no_loss_through_the_training_path(tiny_model_dir, tmp_path):
    """Through ``Trainer.batch_loss`` (the model's own forward): the gradient reaches the logits that
    predict assistant tokens and no others; changing an assistant token's target changes the loss."""
    from core.train import Trainer
    from tests.test_jobs_support import tiny_spec

    spec = tiny_spec(tiny_model_dir, write(tmp_path / "chats.jsonl", [messages_row(t) for t in CONVERSATIONS] * 4))
    spec.data.template, spec.data.cutoff_len, spec.train.kernels = "chat", 512, "reference"
    trainer = Trainer(spec, tmp_path / "out")
    trainer.setup()
    assert "head_loss" not in trainer.parts
    ex = max(trainer.train_data.examples, key=lambda e: len(_spans(e)))
    assert len(_spans(ex)) == 3
    batch = core.data.collate([ex], trainer.pad_id)
    captured = {}

    def keep_logits(module, inputs, out):
        out.retain_grad()
        captured["logits"] = out

    hook = trainer.model.get_output_embeddings().register_forward_hook(keep_logits)
    try:
        loss, count = trainer.batch_loss(batch)
        loss.backward()
    finally:
        hook.remove()
    assert count == sum(1 for x in ex.labels[1:] if x != -100)
    # logits[t] predict token t + 1: they carry loss exactly where token t + 1 is labelled.
    carries = captured["logits"].grad[0].abs().sum(-1)[:-1] > 0
    assert carries.tolist() == [x != -100 for x in ex.labels[1:]]

    with torch.no_grad():
        base, _ = trainer.batch_loss(batch)
        a, b = _spans(ex)[1]
        changed = {k: v.clone() for k, v in batch.items()}
        changed["labels"][0, a + 1] = (changed["labels"][0, a + 1] + 1) % 200
        assert not torch.isclose(trainer.batch_loss(changed)[0], base)
        user = next(i for i in range(1, a) if ex.labels[i] == -100 and i > _spans(ex)[0][1])
        unmasked = {k: v.clone() for k, v in batch.items()}
        unmasked["labels"][0, user] = batch["input_ids"][0, user]  # were it trained, the loss would differ
        assert not torch.isclose(trainer.batch_loss(unmasked)[0], base)


def test_long_rows_are_cut_at_turn_boundaries(tok):
    records = expected_messages()[:1]
    whole = tokenize_records(records, tok, template="chat", cutoff_len=1024).examples[0]
    spans = _spans(whole)
    cut = tokenize_records(records, tok, template="chat", cutoff_len=spans[2][1] - 1)  # the third turn ends past it
    assert cut.num_truncated == 1 and cut.num_dropped == 0
    ex = cut.examples[0]
    assert ex.input_ids == whole.input_ids[:spans[1][1]] and _spans(ex) == spans[:2]
    exact = tokenize_records(records, tok, template="chat", cutoff_len=spans[1][1]).examples[0]
    assert exact.input_ids == ex.input_ids  # a turn that ends exactly at the cut-off is kept
    dropped = tokenize_records(records, tok, template="chat", cutoff_len=spans[0][1] - 1)
    assert dropped.examples == [] and dropped.num_truncated == dropped.num_dropped == 1
    trailing = [{"messages": records[0]["messages"] + [{"role": "user", "content": "Thanks!"}]}]
    assert tokenize_records(trailing, tok, template="chat", cutoff_len=1024).examples[0] == whole


def test_a_huge_conversation_costs_no_more_than_its_cutoff(tok, monkeypatch):
    """Rendering stops once the cut-off is passed: an upload of a million turns is not rendered whole."""
    import core.chat_data

    calls = []
    real = core.chat_data.render_chat
    monkeypatch.setattr(core.chat_data, "render_chat", lambda m, t, **kw: calls.append(len(m)) or real(m, t, **kw))
    turns = [("user", "What is 2 plus 3?"), ("assistant", "The answer is 5.")] * 20_000
    data = tokenize_records([{"messages": [{"role": r, "content": c} for r, c in turns]}], tok, "chat", cutoff_len=128)
    assert data.num_truncated == 1 and len(data.examples[0].input_ids) <= 128 and len(_spans(data.examples[0])) == 3
    assert len(calls) < 20 and max(calls) < 20


def test_the_alpaca_template_is_refused_for_conversations(tok):
    with pytest.raises(ConfigError, match="set data.template to 'chat'") as err:
        tokenize_records(expected_messages(), tok, template="alpaca")
    assert err.value.field == "data.template"
    with pytest.raises(ConfigError, match="set data.template to 'chat'"):  # what a submit-time check calls
        core.data.check_template(expected_messages(), "alpaca")
    core.data.check_template(expected_messages(), "chat")
    core.data.check_template([{"instruction": "a", "output": "b"}], "alpaca")


def test_a_job_of_conversations_with_the_alpaca_template_is_refused_at_submit(service, tiny_model_dir, tmp_path):
    from tests.test_jobs_support import tiny_spec

    spec = tiny_spec(tiny_model_dir, write(tmp_path / "chat.jsonl", expected_messages()))
    with pytest.raises(ConfigError, match="set data.template to 'chat'") as err:
        service.submit(spec)
    assert err.value.field == "data.template" and service.list_jobs() == []
    spec.data.template = "chat"
    service.cancel(service.submit(spec))


def test_preview_marks_the_trained_spans_and_says_when_chatml_is_the_default(tok, chatml_tok):
    rows = preview_rows(expected_messages(), tok, "chat", n=2)
    assert rows[0]["prompt"] == ("<|user|>What is 2 plus 3?\n<|assistant|>⟦The answer is 5.\n⟧<|user|>And times 4?\n"
                                 "<|assistant|>⟦5 times 4 is 20.\n⟧<|user|>Minus 7?\n<|assistant|>⟦20 minus 7 is 13.\n⟧")
    assert rows[0]["response"].startswith("3 assistant turns trained")
    assert rows[1]["prompt"].count(TRAIN_OPEN) == rows[1]["prompt"].count(TRAIN_CLOSE) == 1
    assert template_note(tok, "chat") is None and template_note(chatml_tok, "alpaca") is None
    assert "ChatML" in template_note(chatml_tok, "chat")
    chatml = preview_rows(expected_messages(), chatml_tok, "chat", n=1)[0]["prompt"]
    assert chatml.startswith("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n⟦The answer is 5."
                             "<|im_end|>\n⟧")
    whole = tokenize_records(expected_messages()[:1], tok, template="chat", cutoff_len=1024).examples[0]
    short = preview_rows(expected_messages(), tok, "chat", n=1, cutoff_len=_spans(whole)[1][1])[0]
    assert short["prompt"].count(TRAIN_OPEN) == 2 and "Minus 7" not in short["prompt"]
    assert short["response"].startswith("2 of 3 assistant turns trained") and "cut at a turn boundary" in short["response"]


def test_chatml_default_holds_bos_where_the_tokenizer_adds_one(chatml_tok):
    from core.templates import chat_template

    assert chat_template(chatml_tok) == (CHATML_TEMPLATE, True)  # this tokenizer adds no BOS

    class WithBos:
        chat_template, bos_token_id = None, 7

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([7] if add_special_tokens else []) + [9]}

    assert chat_template(WithBos()) == ("{{ bos_token }}" + CHATML_TEMPLATE, True)


def test_chat_keeps_the_conversation_for_chat_models_only(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from app.chat_tab import FAILED, conversation
    from core.generate import ChatModel, prompt_inputs

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=512))
    history = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"},
               {"role": "user", "content": "hi"}, {"role": "assistant", "content": FAILED + "no job 9"},
               {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "20"}]
    kept = conversation(history)
    assert kept == history[:2] + history[4:]  # the failed answer is no part of the conversation
    assert conversation(history, max_chars=len("And times 4?20")) == history[4:]  # the most recent first

    chat = ChatModel(name="t", model=model, tokenizer=tok, template="chat")
    ids = prompt_inputs(chat, "Minus 7?", kept)["input_ids"][0].tolist()
    expected = render_chat([*kept, {"role": "user", "content": "Minus 7?"}], tok, add_generation_prompt=True)
    assert tok.decode(ids) == expected and ids == tok(expected, add_special_tokens=False)["input_ids"]
    model.config.max_position_embeddings = len(ids) + 3  # 4 new tokens do not fit: the oldest pair goes
    shorter = tok.decode(prompt_inputs(chat, "Minus 7?", kept, max_new_tokens=4)["input_ids"][0])
    assert "2 plus 3" not in shorter and "And times 4?" in shorter
    alpaca = ChatModel(name="t", model=model, tokenizer=tok, template="alpaca")
    assert "And times 4" not in tok.decode(prompt_inputs(alpaca, "Minus 7?", kept)["input_ids"][0])
    with pytest.raises(ValueError, match="history turn 1"):
        prompt_inputs(chat, "x", [{"role": "tool", "content": "x"}])


def test_trains_on_chat_data_and_the_adapter_answers_in_its_template(tiny_model_dir, tmp_path):
    from core.generate import adapter_chat_model, answer
    from core.train import train
    from tests.test_jobs_support import tiny_spec

    spec = tiny_spec(tiny_model_dir, write(tmp_path / "chats.json", [sharegpt_row(t) for t in CONVERSATIONS] * 4),
                     max_steps=2, eval_every=0, save_every=0)
    spec.data.template = "chat"
    result = train(spec, tmp_path / "out")
    assert result.status == "completed"
    chat = adapter_chat_model(tmp_path / "out" / "adapter")
    assert chat.template == "chat"
    from core.generate import GenerationSettings

    history = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    assert isinstance(answer(chat, "And times 4?", GenerationSettings(max_new_tokens=3), history=history), str)


def test_train_tab_preview_shows_marked_conversations_and_the_chatml_note(service, tiny_model_dir, tmp_path,
                                                                         monkeypatch, chatml_tok):
    from app import train_form, train_tab

    path = write(tmp_path / "chats.jsonl", [sharegpt_row(t) for t in CONVERSATIONS])
    stored, status = train_tab.store_upload(service, str(path), "chats.jsonl")
    assert stored and "3 rows read" in status
    form = {**train_form.default_form(), "model.name": str(tiny_model_dir), "data.kind": "upload",
            "data.upload": stored, "data.template": "chat"}
    box, rows, stats = train_tab.preview(service, form)
    assert not box.get("visible") and len(rows) == 3
    assert rows[0][0].count(TRAIN_OPEN) == 3 and rows[0][1].startswith("3 assistant turns trained")
    assert "every assistant turn" in stats and "ChatML" not in stats
    box, rows, _ = train_tab.preview(service, {**form, "data.template": "alpaca"})
    assert box.get("visible") and "data.template" in box["value"] and rows == []
    monkeypatch.setattr(train_tab, "_tokenizer", lambda name, trust_remote_code: chatml_tok)
    box, rows, stats = train_tab.preview(service, form)
    assert "ChatML" in stats and rows[0][0].startswith("<|im_start|>user\n")


def test_the_chat_tab_gives_each_column_its_own_conversation(service, monkeypatch):
    import core.generate
    from app import chat_tab

    seen = []

    def fake_stream(chat, question, settings, deployment=None, history=None):
        seen.append((chat, question, history))
        if chat == "base:b" and question == "first?":
            raise RuntimeError("b broke")
        yield f"{chat} heard {len(history)} turns"

    monkeypatch.setattr(chat_tab, "load_chat_model", lambda service, value, template=None: value)
    monkeypatch.setattr(core.generate, "stream_answer", fake_stream)
    models = ["base:a", "base:b"]
    first = list(chat_tab.respond(service, "first?", models, [], 8, 0.0, 1.0))[-1]
    assert first[1][1]["content"].startswith(chat_tab.FAILED)
    list(chat_tab.respond(service, "second?", models, first, 8, 0.0, 1.0))
    assert seen[2] == ("base:a", "second?", [{"role": "user", "content": "first?"},
                                             {"role": "assistant", "content": "base:a heard 0 turns"}])
    assert seen[3] == ("base:b", "second?", [])  # b's failed answer is not part of its conversation
