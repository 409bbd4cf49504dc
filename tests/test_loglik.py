"""Log-likelihood scoring (core.loglik), multiple-choice extraction (core.choices) and the loglikelihood
protocol of evaluate().

Scores are checked against a direct forward pass over each request's whole sequence, written here
independently of core.loglik's batching (left-padded shared contexts, a key/value cache repeated per
continuation, right-padded continuations), on tiny random models with the tiny BPE tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

import core
from core import AdapterConfig, EvalSettings
from core.benchmarks import BENCHMARKS, BenchmarkError, load_benchmark
from core.choices import benchmark_choices, parse_choices
from core.evaluate import evaluate
from core.inject import prompt_lengths
from core.loglik import PAD_SLACK, PAD_WASTE, ChoiceScores, _length_chunks, encode_pair, loglikelihood, score_choices
from core.templates import render_prompt
from tests.tiny import CONFIGS, tiny_tokenizer

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "eval"

# Shared contexts of different lengths (left padding), one- and many-token continuations, a context
# ending in whitespace (moved into the continuation), an empty context (the prefix token).
REQUESTS = [
    ("how many apples does Tom have?", " 4"),
    ("how many apples does Tom have?", " He buys more and gives some away"),
    ("how many apples does Tom have?", " 12 apples"),
    ("The answer is", " 7"),
    ("Below is an instruction that describes a task.\n", "The answer is 3"),
    ("Below is an instruction that describes a task.\n", "plus minus times"),
    ("Tom", " gives 5"),
    ("", "The answer is 0"),
]

# Contexts that all start with the prompt template's preamble (run once for the whole batch).
TEMPLATED = [(render_prompt(q), c) for q, c in [("how many apples does Tom have?", "The answer is 4"),
                                                ("how many apples does Tom have?", "He buys more"),
                                                ("Tom buys 3 apples", "total 7"),
                                                ("plus", "minus"),
                                                ("The answer is", " 0 1 2")]]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_lm(arch: str, tok, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch`` over the tiny tokenizer's vocabulary, fp32, eval mode."""
    cfg = CONFIGS[arch]()
    cfg.vocab_size = len(tok)
    cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    for name in ("max_position_embeddings", "n_positions"):
        if hasattr(cfg, name):
            setattr(cfg, name, 512)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def direct(model, tok, requests, add_special_tokens=False) -> list[tuple[float, bool]]:
    """Each request alone: one forward pass over context + continuation, the continuation's log-probs summed."""
    out = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tok, context, continuation, add_special_tokens)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad(), prompt_lengths(model, torch.tensor([len(ctx)])):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        logp = logits.log_softmax(-1)[len(ctx) - 1:-1]
        target = torch.tensor(cont)
        out.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
    return out


def assert_close(got, want, atol):
    assert len(got) == len(want)
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=atol)
        if abs(g - w) < atol / 10:  # a greedy flag may flip only where rounding moved the scores
            assert g_greedy == w_greedy


# --------------------------------------------------------------------------------------------------
# Tokenisation and scores.

def test_encode_pair_follows_lm_eval(tok):
    ctx, cont = encode_pair(tok, "The answer is \n", "4")
    assert ctx == tok("The answer is", add_special_tokens=False)["input_ids"]
    whole = tok("The answer is \n4", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole  # split where the context's own encoding ends
    assert encode_pair(tok, "", "4") == ([tok.eos_token_id], tok("4", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom", "gpt_neox", "opt"])
def test_scores_equal_a_direct_forward_fp32(tok, arch):
    model = tiny_lm(arch, tok)
    for requests in (REQUESTS, TEMPLATED):
        want = direct(model, tok, requests)
        for batch_size in (1, 3, 64):
            assert_close(loglikelihood(model, tok, requests, batch_size), want, atol=1e-4)
        assert_close(loglikelihood(model, tok, requests, 4, shared=False), want, atol=1e-4)


def test_length_chunks_bound_the_padding():
    assert _length_chunks([]) == []
    assert _length_chunks([1, 2, 3]) == [(0, 3)]  # within the slack: one pass
    lengths = [1, 2, 2, 3, 40, 41, 44, 110]
    chunks = _length_chunks(lengths)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for start, end in chunks:
        real = sum(lengths[start:end])
        assert end - start == 1 or lengths[end - 1] * (end - start) <= max(PAD_WASTE * real, real + PAD_SLACK)
    assert len(chunks) == 3  # the short ones, the ~40s, the 110


@pytest.mark.parametrize("arch", ["llama", "bloom", "gpt2"])
def test_continuations_of_very_different_lengths_run_in_several_passes(tok, arch):
    model = tiny_lm(arch, tok)
    long = " " + " ".join(["apples and pears"] * 30)
    requests = REQUESTS + [("how many apples does Tom have?", long), ("Tom", long + " and plums")]
    passes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: passes.append(kw["input_ids"].shape), with_kwargs=True)
    got = loglikelihood(model, tok, requests, 64)
    hook.remove()
    assert len(passes) >= 3  # the contexts, then short and long continuations apart
    assert_close(got, direct(model, tok, requests), atol=2e-3)  # sums of ~100 fp32 log-probs near -1400


def test_a_prefix_common_to_the_batch_runs_once(tok):
    model = tiny_lm("llama", tok)
    batches = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: batches.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    got = loglikelihood(model, tok, TEMPLATED, 64)
    hook.remove()
    contexts = [encode_pair(tok, c, x)[0] for c, x in TEMPLATED]
    common = next(i for i in range(len(contexts[0])) if len({tuple(c[:i + 1]) for c in contexts}) > 1)
    assert common >= 20 and batches[0] == (1, common)  # the template's preamble, alone
    assert batches[1][0] == 4  # then the four distinct contexts' rest, together
    assert_close(got, direct(model, tok, TEMPLATED), atol=1e-4)


def test_scores_equal_a_direct_forward_bf16(tok):
    model = tiny_lm("llama", tok)
    want = direct(model, tok, REQUESTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loglikelihood(model, tok, REQUESTS, 5)
    for (g, _), (w, _) in zip(got, want):
        assert g == pytest.approx(w, rel=2e-2, abs=0.15)


def test_greedy_continuation_is_flagged(tok):
    model = tiny_lm("llama", tok, seed=3)

    def greedy_text(context: str) -> str | None:
        """The model's greedy next token after ``context`` as text, where that text encodes back to it."""
        ids = tok(context, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            step = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
        return tok.decode([step]) if encode_pair(tok, context, tok.decode([step]))[1] == [step] else None

    found = [(c, t) for c in [r[0] for r in REQUESTS if r[0]] + ["Tom buys", "The answer is 1", "plus"]
             if (t := greedy_text(c)) is not None]
    assert found  # some greedy token re-encodes as itself (byte fragments do not)
    context, continuation = found[0]
    other = next(t for t in (" apples", " 5", " Tom", " the") if t != continuation)
    (_, greedy), (_, not_greedy) = loglikelihood(model, tok, [(context, continuation), (context, other)], 8)
    assert greedy and not not_greedy


@pytest.mark.parametrize("method,settings", [("loreft", {"r": 4, "first_positions": 2, "last_positions": 3}),
                                             ("prefix", {"num_virtual_tokens": 3, "reparam_hidden": 16})])
def test_adapters_see_the_context_as_the_prompt(tok, method, settings):
    base = direct(tiny_lm("llama", tok), tok, REQUESTS)
    model = core.attach(tiny_lm("llama", tok), AdapterConfig.for_method(method, **settings))
    want = direct(model, tok, REQUESTS)
    assert any(abs(w - b) > 1e-3 for (w, _), (b, _) in zip(want, base))  # the adapter changes the scores
    assert_close(loglikelihood(model, tok, REQUESTS, 3), want, atol=1e-4)


def test_acc_norm_is_lm_evals(tok):
    s = ChoiceScores(scores=[-10.0, -12.0, -12.0], lengths=[5, 20, 20])
    assert (s.acc, s.acc_norm) == (0, 1)  # ties go to the first, as numpy's argmax
    model = tiny_lm("llama", tok)
    options = ["4", "12 apples", "he buys more"]
    scored, stopped = score_choices(model, tok, [("how many apples does Tom have?", options)], 8)
    assert not stopped
    lls = np.array([ll for ll, _ in loglikelihood(model, tok, [("how many apples does Tom have?", " " + o)
                                                                for o in options], 8)])
    assert scored[0].scores == pytest.approx(lls.tolist(), abs=1e-5)
    assert scored[0].acc == int(np.argmax(lls))
    assert scored[0].acc_norm == int(np.argmax(lls / np.array([len(o) for o in options], dtype=float)))


# --------------------------------------------------------------------------------------------------
# Choices in every LLM-Adapters commonsense layout.

LAYOUTS = [
    ("boolean", "Please answer the following question with true or false, question: is the sky blue?\n\n"
                "Answer format: true/false", "true",
     "Please answer the following question with true or false, question: is the sky blue?", ["true", "false"], 0),
    ("solution", "Please choose the correct solution to the question: open a jar\n\nSolution1: twist the lid\n\n"
                 "Solution2: hit it with a hammer\n\nAnswer format: solution1/solution2", "solution1",
     "Please choose the correct solution to the question: open a jar", ["twist the lid", "hit it with a hammer"], 0),
    ("answer", "Please choose the correct answer to the question: Carson relocated. How would you describe Carson?"
               "\n\nAnswer1: mobile Answer2: anxious Answer3: lonely\n\nAnswer format: answer1/answer2/answer3",
     "answer3", "Please choose the correct answer to the question: Carson relocated. How would you describe Carson?",
     ["mobile", "anxious", "lonely"], 2),
    ("ending", "Please choose the correct ending to complete the given sentence: Playing drums: People stand "
               "behind drums. A man\n\nEnding1: is playing a bag pipe. Ending2: starts to play around the drums. "
               "Ending3: begins playing a drum set. Ending4: begins playing the drums.\n\n"
               "Answer format: ending1/ending2/ending3/ending4", "ending4",
     "Please choose the correct ending to complete the given sentence: Playing drums: People stand behind drums. A man",
     ["is playing a bag pipe.", "starts to play around the drums.", "begins playing a drum set.",
      "begins playing the drums."], 3),
    ("option", "Please choose the correct answer to fill in the blank to complete the given sentence: The jeans fit "
               "worse than the shirt because I had tried the _ on.\n\nOption1: jeans Option2: shirt "
               "Answer format: option1/option2", "option2",
     "Please choose the correct answer to fill in the blank to complete the given sentence: The jeans fit worse "
     "than the shirt because I had tried the _ on.", ["jeans", "shirt"], 1),
    ("answer", "Please choose the correct answer to the question: The sun is responsible for\n\nAnswer1: puppies "
               "learning new tricks Answer2: children growing up Answer3: flowers wilting Answer4: plants sprouting"
               "\n\nAnswer format: answer1/answer2/answer3/answer4", "answer4",
     "Please choose the correct answer to the question: The sun is responsible for",
     ["puppies learning new tricks", "children growing up", "flowers wilting", "plants sprouting"], 3),
    ("letter", "What is 2 + 3? Answer Choices: (A) 4 (B) 5 (C) 6 (D) 7 (E) 8", "B", "What is 2 + 3?",
     ["4", "5", "6", "7", "8"], 1),
]


@pytest.mark.parametrize("kind,instruction,answer,question,choices,gold", LAYOUTS,
                         ids=["boolq", "piqa", "siqa", "hellaswag", "winogrande", "obqa-arc", "aqua"])
def test_choices_of_each_layout(kind, instruction, answer, question, choices, gold):
    mc = parse_choices(kind, instruction, answer, "f.json: row 1")
    assert (mc.question, list(mc.choices), mc.gold) == (question, choices, gold)
    assert mc.labels[mc.gold].lower() == answer.lower()


@pytest.mark.parametrize("kind,instruction,answer,message", [
    ("answer", "Please choose: Q\n\nAnswer1: a\n\nAnswer format: answer1/answer2", "answer1", "expected 'Answer1"),
    ("answer", "Q\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2", "answer1", "answer format"),
    ("solution", "Q\n\nSolution1: a\n\nSolution2: b\n\nAnswer format: solution1/solution2", "solution3", "gold"),
    ("ending", "Q\n\nEnding1: a Ending2:  Ending3: c\n\nAnswer format: ending1/ending2/ending3", "ending1", "empty"),
    ("option", "Option1: a Option2: b", "option1", "no question"),
])
def test_unreadable_options_name_the_row(kind, instruction, answer, message):
    with pytest.raises(BenchmarkError, match=message) as err:
        parse_choices(kind, instruction, answer, "piqa.json: row 7")
    assert "piqa.json: row 7" in str(err.value)


def test_a_bad_row_in_a_file_is_named(tmp_path):
    rows = [{"instruction": LAYOUTS[1][1], "input": "", "output": "", "answer": "solution1"},
            {"instruction": "Please choose the correct solution to the question: x\n\nSolution1: only one\n\n"
                            "Answer format: solution1/solution2", "input": "", "output": "", "answer": "solution1"}]
    path = tmp_path / "piqa.json"
    path.write_text(json.dumps(rows))
    bench = load_benchmark(str(path))
    assert len(benchmark_choices(bench, [0])) == 1
    with pytest.raises(BenchmarkError, match=r"piqa\.json: row 2: cannot find the options"):
        benchmark_choices(bench)


COMMONSENSE = [name for name, info in BENCHMARKS.items() if info.answer_type != "number"] + ["AQuA"]


@pytest.mark.parametrize("name", COMMONSENSE)
def test_local_files_parse_whole(name):
    """Every row of the real LLM-Adapters files that are present here (skipped where absent)."""
    info = BENCHMARKS[name]
    if not any((SHARED_EVAL / f).is_file() for f in info.files):
        pytest.skip(f"{name} is not in {SHARED_EVAL}")
    bench = load_benchmark(name, data_dir=SHARED_EVAL)
    parsed = benchmark_choices(bench)
    assert len(parsed) == len(bench.examples)
    assert all(len(mc.choices) >= 2 and 0 <= mc.gold < len(mc.choices) for mc in parsed)
    assert all(mc.question and mc.labels[mc.gold] in (ex["answer"], ex["answer"].lower())
               for mc, ex in zip(parsed, bench.examples))


# --------------------------------------------------------------------------------------------------
# User files with a choices column, and the protocol in evaluate().

USER_ROWS = [
    {"instruction": "Which is a fruit?", "choices": ["apple", "hammer", "cloud"], "answer": 0},
    {"instruction": "How many legs has a cat?", "choices": ["two", "four"], "answer": "four"},
    {"instruction": "Which is the largest?", "choices": ["mouse", "whale", "dog", "ant"], "answer": "1"},
    {"instruction": "What colour is snow?", "choices": ["white", "green"], "answer": 0},
    {"instruction": "Which one swims?", "choices": ["fish", "stone", "tree"], "answer": "fish"},
]


def write(tmp_path, rows, name="quiz.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


def test_a_choices_column_is_read(tmp_path):
    bench = load_benchmark(write(tmp_path, USER_ROWS))
    assert bench.answer_type == "answer"
    assert [ex["answer"] for ex in bench.examples] == ["answer1", "answer2", "answer2", "answer1", "answer1"]
    assert "Answer1: apple Answer2: hammer Answer3: cloud" in bench.examples[0]["instruction"]  # for generation
    parsed = benchmark_choices(bench)
    assert parsed[2].question == "Which is the largest?" and parsed[2].choices[parsed[2].gold] == "whale"


@pytest.mark.parametrize("row,message", [
    ({"instruction": "Q", "choices": "apple", "answer": 0}, "JSON list"),
    ({"instruction": "Q", "choices": ["a", "b"], "answer": 2}, "not an option's index"),
    ({"instruction": "Q", "choices": ["a", "b"], "answer": "c"}, "neither one of the choices"),
    ({"instruction": "Q", "choices": ["a"], "answer": 0}, "2 to 5"),
    ({"instruction": "Q", "answer": "answer1"}, "has no 'choices'"),
])
def test_a_bad_choices_row_is_named(tmp_path, row, message):
    with pytest.raises(BenchmarkError, match=message) as err:
        load_benchmark(write(tmp_path, [USER_ROWS[0], row]))
    assert "row 2" in str(err.value)


def test_evaluate_by_loglikelihood(tmp_path, tok):
    model = tiny_lm("llama", tok)
    bench = load_benchmark(write(tmp_path, USER_ROWS))
    seen = []
    result = evaluate(model, tok, bench, EvalSettings(protocol="loglikelihood", batch_size=4),
                      progress=lambda d, t: seen.append((d, t)))
    assert (result.protocol, result.total, result.stopped, seen[-1]) == ("loglikelihood", 5, False, (5, 5))
    parsed = benchmark_choices(bench)
    for sample, mc in zip(result.samples, parsed):
        assert set(sample) == {"index", "question", "gold", "response", "extracted", "correct", "scores"}
        context = render_prompt(mc.question, "", "alpaca", tok)
        want = [ll for ll, _ in loglikelihood(model, tok, [(context, c) for c in mc.choices], 8,
                                              add_special_tokens=True)]
        assert sample["scores"] == pytest.approx(want, abs=1e-4)
        pick = int(np.argmax(want))
        assert (sample["response"], sample["extracted"]) == (mc.choices[pick], mc.labels[pick])
        assert sample["correct"] == (sample["extracted"] == sample["gold"])
    assert result.accuracy == pytest.approx(sum(s["correct"] for s in result.samples) / 5)
    norm = [int(np.argmax(np.array(s["scores"]) / [len(c) for c in mc.choices])) == mc.gold
            for s, mc in zip(result.samples, parsed)]
    assert result.accuracy_norm == pytest.approx(sum(norm) / 5)


def test_should_stop_ends_between_batches(tmp_path, tok):
    model = tiny_lm("llama", tok)
    result = evaluate(model, tok, write(tmp_path, USER_ROWS), EvalSettings(protocol="loglikelihood", batch_size=3),
                      should_stop=lambda: True)
    assert result.stopped and 0 < result.total < 5


def test_a_benchmark_without_choices_is_refused(tok):
    model = tiny_lm("llama", tok)
    with pytest.raises(BenchmarkError, match=r"'builtin:math' has no choices.*protocol 'generate'"):
        evaluate(model, tok, "builtin:math", EvalSettings(protocol="loglikelihood", limit=2))
