"""Studies through the jobs backbone, and the comparison matrix, with real child processes on a tiny model."""

from __future__ import annotations

import json

from core.study import StudySpec
from jobs import JobService, Worker
from jobs.db import MIGRATIONS, migrate
from tests.test_jobs_support import kill_worker_mid_job, tiny_spec, write_data

QUESTIONS = [{"instruction": f"What is {a} plus 2?", "input": "", "output": "", "answer": str(a + 2)}
             for a in range(3)]


def study_spec(tiny_model_dir, tmp_path, **train) -> StudySpec:
    base = tiny_spec(tiny_model_dir, write_data(tmp_path / "rows.json"), **train)
    bench = tmp_path / "tiny_bench.json"
    bench.write_text(json.dumps(QUESTIONS))
    base.eval.benchmarks = [str(bench)]
    base.eval.max_new_tokens = 4
    return StudySpec(name="grid", base=base, methods=["lora", "series"],
                     values={"lora": [2, 4], "series": [4, 8]})


def rig(service, study_id: int, accuracies: dict[str, list[bool]]) -> None:
    """Record evaluations with known per-question correctness for every cell (newest wins)."""
    study = service.get_study(study_id)
    for cell in study["cells"]:
        correct = accuracies[cell["coordinates"]["config"]]
        service.record_evaluation(benchmark="rigged", base_model="tiny", accuracy=sum(correct) / len(correct),
                                  correct=sum(correct), total=len(correct), job_id=cell["job_id"],
                                  samples=[{"index": i, "question": f"q{i}", "gold": "1", "response": "",
                                            "extracted": "1" if c else "0", "correct": c}
                                           for i, c in enumerate(correct)])


def test_grid_study_runs_every_job_and_evaluation(service, tiny_model_dir, tmp_path):
    spec = study_spec(tiny_model_dir, tmp_path, max_steps=2, eval_every=0, save_every=0)
    plan = service.plan_study(spec)
    assert plan["num_jobs"] == 4 and plan["estimated_s"] > 0
    study_id = service.submit_study(spec)
    Worker(service, poll_s=0.1).run(until_idle=True)
    study = service.get_study(study_id)
    assert study["status"] == "succeeded", [j["error"] for j in study["jobs"]]
    assert all(len(service.list_evaluations(job_id=j["id"])) == 1 for j in study["jobs"])
    report = service.study_report(study_id)
    (bench,) = report["analysis"]
    assert len(report["analysis"][bench]["configs"]) == 4

    n = 30
    truth = {"lora @both r=2": 0.3, "lora @both r=4": 0.9, "series @mlp bottleneck=4": 0.5,
             "series @mlp bottleneck=8": 0.6}
    rig(service, study_id, {k: [i < v * n for i in range(n)] for k, v in truth.items()})
    a = service.study_report(study_id)["analysis"]["rigged (generate)"]
    assert [(c["config"], round(c["mean"], 3)) for c in a["configs"]] == sorted(
        ((k, v) for k, v in truth.items()), key=lambda kv: -kv[1])
    assert [b["config"] for b in a["best_per_method"]] == ["lora @both r=4", "series @mlp bottleneck=8"]
    assert a["mcnemar"]["n10"] == 9 and a["mcnemar"]["n01"] == 0 and a["mcnemar"]["significant"]
    assert {(r["method"], r["placement"]) for r in a["by_placement"]} == {("lora", "both"), ("series", "mlp")}


def test_study_survives_a_worker_restart(service, tiny_model_dir, tmp_path):
    spec = study_spec(tiny_model_dir, tmp_path, max_steps=8, eval_every=0, save_every=2)
    spec.methods, spec.values = ["lora"], {"lora": [2, 4]}
    study_id = service.submit_study(spec)
    first = service.get_study(study_id)["cells"][0]["job_id"]
    kill_worker_mid_job(service, first, 3, "0.3")  # past its step-2 checkpoint
    restarted = Worker(service, poll_s=0.1)
    assert first in restarted.recover()
    cells = service.get_study(study_id)["cells"]
    assert cells[0]["job_id"] != first and service.get(cells[0]["job_id"])["resumes_job_id"] == first
    restarted.run(until_idle=True)
    study = service.get_study(study_id)
    assert study["status"] == "succeeded", [j["error"] for j in study["jobs"]]
    assert len(service.study_results(study_id)) == 2


def test_comparison_matrix_of_two_jobs(service, tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "rows.json")
    ids = [service.submit(tiny_spec(tiny_model_dir, data, max_steps=1, eval_every=0, save_every=0)) for _ in range(2)]
    Worker(service, poll_s=0.1).run(until_idle=True)
    for job_id, acc in zip(ids, (0.25, 0.75)):
        service.record_evaluation(benchmark="AddSub", base_model="tiny", accuracy=acc, correct=int(4 * acc), total=4,
                                  job_id=job_id, samples=[{"index": i, "question": f"q{i}", "gold": "1",
                                                           "extracted": str(int(i < 4 * acc)), "correct": i < 4 * acc}
                                                          for i in range(4)])
    service.record_evaluation(benchmark="AddSub", base_model="tiny", accuracy=0.0, correct=0, total=4)
    matrix = service.comparison([f"job:{ids[0]}", f"job:{ids[1]}", "base:tiny"])
    assert [c["label"] for c in matrix["columns"]] == ["AddSub (generate)"]
    assert [r["results"]["AddSub (generate)"]["accuracy"] for r in matrix["rows"]] == [0.25, 0.75, 0.0]
    assert matrix["rows"][0]["trainable_params"] > 0 and matrix["rows"][0]["train_time_s"] > 0
    assert matrix["rows"][2]["method"] == "base"
    md = service.comparison_markdown(matrix)
    assert "| 75.0 |" in md and md.count("\n") == 5
    csv_text = service.comparison_csv(matrix)
    assert csv_text.splitlines()[0].endswith("AddSub (generate) accuracy") and ",0.75" in csv_text
    evs = {r["label"]: r["results"]["AddSub (generate)"]["evaluation_id"] for r in matrix["rows"][:2]}
    rows = service.disagreements(evs)
    assert [r["index"] for r in rows] == [1, 2]


def test_studies_migration_keeps_existing_jobs(tmp_path):
    """A version-1 database (before studies) is migrated in place: its jobs survive, studies work."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    migrate(engine, MIGRATIONS[:1])  # today's models, stamped version 1: drop what version 2 adds
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE studies")
        conn.exec_driver_sql("INSERT INTO jobs (name, kind, status, spec, step, cancel_requested, created_at) "
                             "VALUES ('old', 'train', 'succeeded', '{}', 0, 0, '2026-01-01 00:00:00')")
    engine.dispose()
    svc = JobService(url, home=tmp_path / "home")
    assert [j["name"] for j in svc.list_jobs()] == ["old"]
    assert svc.list_studies() == []
    svc.close()


def test_a_study_of_chat_data_is_planned_from_its_turns(service, tiny_model_dir, tmp_path):
    """The plan's size estimate reads a conversation's turns (no instruction/output columns there)."""
    spec = study_spec(tiny_model_dir, tmp_path)
    turns = [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a" * 40}]
    spec.base.data.source = str(tmp_path / "chat.json")
    (tmp_path / "chat.json").write_text(json.dumps([{"messages": turns}] * 12))
    spec.base.data.template = "chat"
    plan = service.plan_study(spec)
    assert plan["num_jobs"] == 4 and plan["estimated_s"] > 0
