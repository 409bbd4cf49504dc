"""The protocol as part of a result's identity (issue 17): migration 7 keeps older results as ``generate``;
the same model and benchmark under two protocols are two results, two matrix columns, two study groups;
the disagreement view and McNemar refuse to pair unlike results; acc_norm and per-choice scores are kept."""

from __future__ import annotations

import json
import math

import pytest
import sqlalchemy as sa

from jobs import JobError
from jobs import db as jobs_db
from jobs.schema import Base, Study
from tests.test_jobs_support import make_service, tiny_spec, write_data


def samples(correct: list[bool], scores: bool = False) -> list[dict]:
    """Per-question records as ``core.evaluate`` gives them (with per-choice scores for loglikelihood)."""
    return [{"index": i, "question": f"q{i}", "gold": "A", "response": "", "extracted": "A" if c else "B",
             "correct": c, **({"scores": [-1.5, -2.25] if c else [-3.0, -0.5]} if scores else {})}
            for i, c in enumerate(correct)]


def record(service, correct: list[bool], protocol: str = "generate", benchmark: str = "piqa",
           model: str = "tiny", accuracy_norm: float | None = None) -> int:
    return service.record_evaluation(benchmark=benchmark, base_model=model, protocol=protocol,
                                     accuracy=sum(correct) / len(correct), accuracy_norm=accuracy_norm,
                                     correct=sum(correct), total=len(correct),
                                     samples=samples(correct, scores=protocol != "generate"))


# ------------------------------------------------------------------------------------------ migration

def test_version_6_results_are_kept_as_generate(db_url, tmp_path):
    """A database at version 6 with a result and its samples: migrated, they read as ``generate`` results
    (no acc_norm, no scores), the schema matches the models, and new results take every protocol."""
    engine = jobs_db.make_engine(db_url)
    jobs_db.migrate(engine, jobs_db.MIGRATIONS[:6])
    with engine.begin() as conn:  # today's models, stamped 6: take away what version 7 adds
        for table, column in (("evaluations", "protocol"), ("evaluations", "accuracy_norm"),
                              ("eval_samples", "scores")):
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute(sa.text("INSERT INTO evaluations (base_model, benchmark, accuracy, correct, total, created_at, "
                             "owner) VALUES ('tiny', 'AddSub', 0.5, 1, 2, '2026-01-01 00:00:00', 'local')"))
        conn.execute(sa.text("INSERT INTO eval_samples (evaluation_id, index, question, gold, extracted, correct) "
                             "VALUES (1, 0, 'q0', '3', '3', :yes), (1, 1, 'q1', '4', '5', :no)"
                             .replace("index", engine.dialect.identifier_preparer.quote("index"))),
                     {"yes": True, "no": False})
    engine.dispose()

    service = make_service(tmp_path, db_url)
    try:
        (old,) = service.list_evaluations()
        assert (old["benchmark"], old["protocol"], old["accuracy"], old["accuracy_norm"]) == \
               ("AddSub", "generate", 0.5, None)
        assert [(s["index"], s["correct"], s["scores"]) for s in service.eval_samples(old["id"])] == \
               [(0, True, None), (1, False, None)]
        with service.db.engine.connect() as conn:
            assert jobs_db.schema_version(conn) == jobs_db.latest_version() == 7
            inspector = sa.inspect(conn)
            for table in Base.metadata.sorted_tables:
                assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.columns.keys())
        new = record(service, [True, False, True], "loglikelihood", benchmark="AddSub", accuracy_norm=1.0)
        assert service.get_evaluation(new)["protocol"] == "loglikelihood"
        assert service.eval_samples(new)[0]["scores"] == [-1.5, -2.25]
        assert [e["id"] for e in service.list_evaluations(protocol="generate")] == [old["id"]]
    finally:
        service.close()


# ------------------------------------------------------------------------------------------ records

def test_a_result_keeps_its_protocol_acc_norm_and_scores(service):
    ev = record(service, [True, False], "loglikelihood", accuracy_norm=0.75)
    got = service.get_evaluation(ev)
    assert (got["protocol"], got["accuracy"], got["accuracy_norm"]) == ("loglikelihood", 0.5, 0.75)
    assert [s["scores"] for s in service.eval_samples(ev)] == [[-1.5, -2.25], [-3.0, -0.5]]
    assert service.list_evaluations(protocol="loglikelihood")[0]["id"] == ev
    assert service.list_evaluations(protocol="lm-eval") == []
    with pytest.raises(ValueError, match="protocol: unknown protocol 'beam'"):
        record(service, [True], "beam")
    with pytest.raises(ValueError, match="protocol: unknown protocol"):
        service.list_evaluations(protocol="beam")
    bad = samples([True, False], scores=True)
    bad[1]["scores"] = [-1.0, math.inf]
    with pytest.raises(ValueError, match=r"samples\[1\]\.scores: every score must be finite"):
        service.record_evaluation(benchmark="piqa", base_model="tiny", protocol="loglikelihood", accuracy=0.5,
                                  correct=1, total=2, samples=bad)
    with pytest.raises(ValueError, match=r"samples\[0\]\.scores: expected a list of numbers"):
        service.record_evaluation(benchmark="piqa", base_model="tiny", protocol="loglikelihood", accuracy=1,
                                  correct=1, total=1, samples=[{"index": 0, "correct": True, "scores": "high"}])
    assert len(service.list_evaluations()) == 1  # neither refused result was stored


@pytest.fixture
def store(db_url, tmp_path):
    """A service on SQLite and on PostgreSQL (``db_url``)."""
    service = make_service(tmp_path, db_url)
    yield service
    service.close()


def test_two_protocols_of_one_model_and_benchmark_are_two_cells(store):
    service = store
    record(service, [True, False, False, False])                                  # piqa, generate: 25%
    record(service, [True, True, True, False], "loglikelihood", accuracy_norm=0.5)  # piqa, loglik: 75%
    record(service, [True, True], "lm-eval", accuracy_norm=1.0)                  # piqa, lm-eval: 100%
    record(service, [False, True], model="other")                                 # another model, generate
    matrix = service.comparison()
    assert [c["label"] for c in matrix["columns"]] == ["piqa (generate)", "piqa (loglik)", "piqa (lm-eval)"]
    assert [(c["benchmark"], c["protocol"]) for c in matrix["columns"]] == \
           [("piqa", "generate"), ("piqa", "loglikelihood"), ("piqa", "lm-eval")]
    other, tiny = matrix["rows"]  # base models by name
    assert {k: (v["accuracy"], v["accuracy_norm"]) for k, v in tiny["results"].items()} == {
        "piqa (generate)": (0.25, None), "piqa (loglik)": (0.75, 0.5), "piqa (lm-eval)": (1.0, 1.0)}
    assert list(other["results"]) == ["piqa (generate)"]
    assert [c["label"] for c in service.comparison(protocols=["loglikelihood"])["columns"]] == ["piqa (loglik)"]

    head, *lines = service.comparison_csv(matrix).splitlines()
    assert head.split(",")[5:] == ["piqa (generate) accuracy", "piqa (loglik) accuracy", "piqa (loglik) acc_norm",
                                   "piqa (lm-eval) accuracy", "piqa (lm-eval) acc_norm"]
    assert lines[0].split(",")[5:] == ["0.5", "", "", "", ""]
    assert lines[1].split(",")[5:] == ["0.25", "0.75", "0.5", "1", "1"]
    md = service.comparison_markdown(matrix).splitlines()
    assert md[0].endswith("| piqa (generate) | piqa (loglik) | piqa (loglik) acc_norm | piqa (lm-eval) | "
                          "piqa (lm-eval) acc_norm |")
    assert md[2].endswith("| 50.0 |  |  |  |  |") and md[3].endswith("| 25.0 | 75.0 | 50.0 | 100.0 | 100.0 |")


def test_disagreements_and_mcnemar_pair_only_like_with_like(store):
    service = store
    a_gen = record(service, [True, True, False, False])
    b_gen = record(service, [True, False, True, False], model="other")
    a_ll = record(service, [True, True, True, True], "loglikelihood")
    other_bench = record(service, [True, True, True, True], benchmark="boolq", model="other")
    assert [r["index"] for r in service.disagreements({"a": a_gen, "b": b_gen})] == [1, 2]
    test = service.mcnemar({"a": a_gen, "b": b_gen})
    assert (test["a"], test["b"], test["questions"], test["n10"], test["n01"], test["p_value"]) == \
           ("a", "b", 4, 1, 1, 1.0)
    for pair, why in (({"a": a_ll, "b": b_gen}, r"a: piqa \(loglik\); b: piqa \(generate\)"),
                      ({"a": a_gen, "b": other_bench}, r"a: piqa \(generate\); b: boolq \(generate\)")):
        with pytest.raises(JobError, match=f"one benchmark under one protocol.*{why}"):
            service.disagreements(pair)
        with pytest.raises(JobError, match=f"McNemar pairs results of one benchmark under one protocol.*{why}"):
            service.mcnemar(pair)
    with pytest.raises(JobError, match="McNemar compares two results, got 3"):
        service.mcnemar({"a": a_gen, "b": b_gen, "c": a_ll})


# ------------------------------------------------------------------------------- studies and merges

def test_study_results_and_missing_evaluations_are_per_protocol(service, tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "rows.json")
    job_id = service.submit(tiny_spec(tiny_model_dir, data))
    with service.db.write() as s:
        study = Study(name="s", spec={}, cells=[{"job_id": job_id, "coordinates": {"config": "lora", "seed": 0}}])
        s.add(study)
        s.flush()
        study_id = study.id
    for protocol, correct in (("generate", [True, False]), ("loglikelihood", [True, True])):
        service.record_evaluation(benchmark="piqa", base_model="tiny", protocol=protocol, job_id=job_id,
                                  accuracy=sum(correct) / 2, correct=sum(correct), total=2, samples=samples(correct))
    results = {r.benchmark: r.accuracy for r in service.study_results(study_id)}
    assert results == {"piqa (generate)": 0.5, "piqa (loglik)": 1.0}

    job = service.get(job_id)
    assert service._missing_evaluations([job], ["piqa", "boolq"], "loglikelihood") == [(job_id, ["boolq"])]
    assert service._missing_evaluations([job], ["piqa"], "lm-eval") == [(job_id, ["piqa"])]


# ------------------------------------------------------------------------------------------ the tab

def test_compare_tab_shows_protocols_and_refuses_loglikelihood_without_choices(service):
    from app import compare_tab

    record(service, [True, False, False, False])
    record(service, [True, True, True, False], "loglikelihood", accuracy_norm=0.5)
    record(service, [False, True, True, True], "loglikelihood", model="other", accuracy_norm=0.25)
    table, bars, _, column, dis, test, matrix = compare_tab.results(service, None, "piqa (loglik)", False)
    headers, rows = table["value"]["headers"], table["value"]["data"]
    assert headers == ["model", "method", "trainable params", "piqa (generate)", "piqa (loglik)", "mean"]
    assert rows[1][3:5] == ["25.0 (1/4)", "75.0 (3/4), norm 50.0"] and rows[0][3] == ""
    assert {t.name for t in bars.data} == {"base: other", "base: tiny"}
    assert list(bars.data[0].x) == ["piqa (generate)", "piqa (loglik)"] and bars.data[0].name == "base: tiny"
    assert list(bars.data[0].hovertext) == ["base: tiny<br>piqa (generate): 25.0%",
                                            "base: tiny<br>piqa (loglik): 75.0%, acc_norm 50.0%"]
    assert bars.layout.xaxis.title.text == "benchmark (protocol)"
    assert column["choices"] == ["piqa (generate)", "piqa (loglik)"] and column["value"] == "piqa (loglik)"
    assert dis["value"]["headers"] == ["question", "gold", "base: other", "base: tiny"]
    assert len(dis["value"]["data"]) == 4  # every question of the loglik results, none of the generate one
    assert "McNemar test on piqa (loglik), **base: other** against **base: tiny** over 4 questions" in test
    *_, test, _ = compare_tab.results(service, None, "piqa (generate)", True)
    assert test.startswith("McNemar test: needs two models")

    refused = compare_tab.run_evaluations(service, ["base:tiny"], ["piqa", "builtin:math", "AddSub"], 5, 32,
                                          "loglikelihood")
    assert "**eval.protocol**" in refused["value"] and "builtin:math, AddSub have none" in refused["value"]
    assert service.list_jobs(kind="evaluate") == []


def test_the_service_refuses_loglikelihood_without_choices_at_submit(service, tiny_model_dir, tmp_path):
    """Not only the Compare tab: an API or CLI caller is refused before anything is queued."""
    from core.fields import ConfigError

    spec = tiny_spec(tiny_model_dir, write_data(tmp_path / "d.json"))
    spec.eval.benchmarks, spec.eval.protocol = ["piqa", "AddSub"], "loglikelihood"
    with pytest.raises(ConfigError, match="AddSub has none") as err:
        service.submit(spec, kind="evaluate")
    assert err.value.field == "eval.protocol" and service.list_jobs() == []
    spec.eval.benchmarks = ["piqa"]
    service.cancel(service.submit(spec, kind="evaluate"))  # a benchmark with options is queued


def test_cli_lists_protocols_and_acc_norm(service, monkeypatch, capsys):
    from jobs.__main__ import main

    record(service, [True, False])
    record(service, [True, True, True, False], "loglikelihood", accuracy_norm=0.5)
    monkeypatch.setenv("WORKBENCH_DB_URL", service.url)
    monkeypatch.setenv("WORKBENCH_HOME", str(service.home))
    assert main(["evaluations", "--protocol", "loglikelihood"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "piqa (loglik)" in line and "75.00%  (3/4)  norm  50.00%  base tiny" in line
    assert main(["evaluations"]) == 0
    assert "piqa (generate)" in capsys.readouterr().out
    assert main(["compare"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.endswith("| piqa (generate) | piqa (loglik) | piqa (loglik) acc_norm |")


QUIZ = [{"instruction": "Which is a fruit?", "choices": ["apple", "hammer", "cloud"], "answer": 0},
        {"instruction": "How many legs has a cat?", "choices": ["two", "four"], "answer": "four"},
        {"instruction": "What colour is snow?", "choices": ["white", "green"], "answer": 0}]


def test_an_evaluate_job_records_its_protocol(service, tiny_model_dir, tmp_path):
    """The child's evaluate runner stores what ``core.evaluate`` returns: a loglikelihood result with its
    acc_norm and each question's per-choice scores, beside a generate result of the same file."""
    from jobs.run import run_job

    quiz = tmp_path / "quiz.json"
    quiz.write_text(json.dumps(QUIZ))
    ids = [service.submit_evaluation([str(quiz)], model=str(tiny_model_dir),
                                     settings={"protocol": protocol, "max_new_tokens": 2, "batch_size": 2})
           for protocol in ("loglikelihood", "generate")]
    for job_id in ids:
        assert run_job(service, job_id) == 0, service.get(job_id)["traceback"]
    loglik, = service.list_evaluations(protocol="loglikelihood")
    generated, = service.list_evaluations(protocol="generate")
    assert (loglik["run_job_id"], loglik["total"], generated["run_job_id"]) == (ids[0], 3, ids[1])
    assert loglik["accuracy_norm"] is not None and generated["accuracy_norm"] is None
    assert [len(s["scores"]) for s in service.eval_samples(loglik["id"])] == [3, 2, 2]
    assert all(s["scores"] is None for s in service.eval_samples(generated["id"]))
    assert [c["label"] for c in service.comparison()["columns"]] == [f"{quiz} (generate)", f"{quiz} (loglik)"]
