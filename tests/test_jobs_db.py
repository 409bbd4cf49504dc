"""The jobs database and service without worker processes: schema and migrations, atomic claims,
submit-time validation, delete/resume rules, concurrent metric writes, evaluation records, and the
child's train/evaluate dispatch run in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from core import ConfigError
from jobs import JobError, JobNotFound, JobService
from jobs import db as jobs_db
from jobs.run import run_job
from jobs.schema import Base
from tests.test_jobs_support import METRIC_WRITER, REPO, child_env, cli, make_service, tiny_spec


def count_rows(service, table: str) -> int:
    with service.db.engine.connect() as conn:
        return conn.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar()


# ------------------------------------------------------------------------------------------ schema

def test_new_database_is_wal_versioned_and_matches_the_models(service):
    with service.db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
        assert jobs_db.schema_version(conn) == jobs_db.latest_version()
        inspector = sa.inspect(conn)
        for table in Base.metadata.sorted_tables:
            assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.columns.keys())


def test_an_old_database_is_migrated_not_replaced(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    first = make_service(tmp_path)
    first.close()
    svc = jobs_db.Database(url)
    with svc.write() as s:
        s.execute(sa.text("INSERT INTO jobs (name, kind, status, spec, created_at, step, cancel_requested) "
                          "VALUES ('kept', 'train', 'succeeded', '{}', '2026-01-01', 3, 0)"))
    svc.dispose()

    calls = []
    nxt = jobs_db.latest_version() + 1

    def add_note(conn):
        calls.append(nxt)
        jobs_db.add_column(conn, "jobs", sa.Column("note", sa.String(50), nullable=True))

    monkeypatch.setattr(jobs_db, "MIGRATIONS", jobs_db.MIGRATIONS + [(nxt, "a note per job", add_note)])
    engine = jobs_db.make_engine(url)
    assert jobs_db.migrate(engine) == nxt
    assert jobs_db.migrate(engine) == nxt and calls == [nxt]  # applied once
    with engine.connect() as conn:
        assert "note" in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
        assert conn.exec_driver_sql("SELECT name FROM jobs").scalar() == "kept"
        assert jobs_db.schema_version(conn) == nxt
    engine.dispose()

    monkeypatch.setattr(jobs_db, "MIGRATIONS", jobs_db.MIGRATIONS[:1])
    with pytest.raises(jobs_db.SchemaError, match="newer"):
        jobs_db.Database(url)


def test_default_url_is_in_workbench_home(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_DB_URL", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "wb"))
    assert jobs_db.default_url() == f"sqlite:///{tmp_path / 'wb' / 'workbench.db'}"
    monkeypatch.setenv("WORKBENCH_DB_URL", "sqlite:///x.db")
    assert jobs_db.default_url() == "sqlite:///x.db"
    assert jobs_db.absolute_url("sqlite:///x.db") == f"sqlite:///{Path('x.db').resolve()}"


# ------------------------------------------------------------------------------------------ submit

@pytest.mark.parametrize("change,field", [
    (lambda d, tmp: d["adapter"].update(method="nope"), "adapter.method"),
    (lambda d, tmp: d["data"].update(source=str(tmp / "missing.json")), "data.source"),
    (lambda d, tmp: d["train"].update(learning_rate=-1e-3), "train.learning_rate"),
    (lambda d, tmp: d["model"].update(name=str(tmp / "no-such-model")), "model.name"),
    (lambda d, tmp: d["model"].update(name="not a model id!"), "model.name"),
    (lambda d, tmp: d["adapter"]["settings"].update(r=0), "adapter.r"),
])
def test_bad_specs_are_rejected_at_submit(service, tiny_model_dir, data, tmp_path, change, field):
    spec = tiny_spec(tiny_model_dir, data).to_dict()
    change(spec, tmp_path)
    with pytest.raises(ConfigError) as err:
        service.submit(spec)
    assert err.value.field == field
    assert count_rows(service, "jobs") == 0


def test_cli_submit_prints_the_id_last_and_rejects_bad_specs(service, tiny_model_dir, data, tmp_path):
    spec = tiny_spec(tiny_model_dir, data)
    good = tmp_path / "spec.json"
    good.write_text(spec.to_json())
    out = cli(service, "submit", str(good))
    job_id = int(out.stdout.strip().splitlines()[-1])
    assert service.get(job_id)["status"] == "queued"
    spec.train.learning_rate = -1.0
    bad = tmp_path / "bad.json"
    bad.write_text(spec.to_json())
    out = cli(service, "submit", str(bad), check=False)
    assert out.returncode == 2 and "train.learning_rate" in out.stderr
    assert [j["id"] for j in service.list_jobs()] == [job_id]


def test_submit_makes_paths_absolute_and_accepts_hub_ids(service, tiny_model_dir, data, monkeypatch):
    monkeypatch.chdir(data.parent)
    spec = tiny_spec(tiny_model_dir, data.name)
    job = service.get(service.submit(spec))
    assert job["spec"]["data"]["source"] == str(data.resolve())
    assert job["out_dir"] == str(service.home / "runs" / str(job["id"]))
    spec.model.name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert service.submit(spec) > job["id"]


# ------------------------------------------------------------------------------------------ claims

def test_a_queued_job_is_claimed_once(service, tiny_model_dir, data):
    job_id = service.submit(tiny_spec(tiny_model_dir, data))
    barrier = threading.Barrier(8)
    wins = []

    def claim(n):
        barrier.wait()
        wins.append(service.claim(job_id, f"test:{n}"))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert service.get(job_id)["status"] == "running"


def test_delete_and_resume_rules(service, tiny_model_dir, data):
    job_id = service.submit(tiny_spec(tiny_model_dir, data))
    with pytest.raises(JobError, match="cancel it first"):
        service.delete(job_id)
    service.claim(job_id, "test:1")
    with pytest.raises(JobError, match="cancel it first"):
        service.delete(job_id)
    with pytest.raises(JobError, match="only interrupted"):
        service.resume(job_id)
    service.finish(job_id, "interrupted")
    with pytest.raises(JobError, match="no checkpoint"):
        service.resume(job_id)
    out = Path(service.get(job_id)["out_dir"])
    (out / "adapter").mkdir(parents=True)
    (out / "train.log").write_text("hello\n")
    service.delete(job_id)
    assert not out.exists()
    with pytest.raises(JobNotFound):
        service.get(job_id)
    assert count_rows(service, "jobs") == 0


# ---------------------------------------------------------------------------------- concurrency



def test_metric_writes_while_reading_never_lock(service, tiny_model_dir, data):
    job_id = service.submit(tiny_spec(tiny_model_dir, data))
    other = service.submit(tiny_spec(tiny_model_dir, data))
    service.claim(job_id, "test:1")
    n = 500
    writer = subprocess.Popen([sys.executable, "-c", METRIC_WRITER, str(job_id), str(n), "200"], cwd=REPO,
                              env=child_env(service), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors, reads = [], 0

    def second_writer():  # the UI writing too (cancel flags, progress of another job)
        try:
            while writer.poll() is None:
                service.set_fields(other, phase=f"t{time.monotonic()}")
                time.sleep(0.02)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=second_writer)
    t.start()
    try:
        while writer.poll() is None:
            points = service.metrics(job_id, since_step=max(0, reads - 50))
            service.get(job_id)
            service.list_jobs(limit=10)
            reads += 1
            assert all(p["type"] == "step" for p in points)
    except Exception as err:  # noqa: BLE001
        errors.append(err)
    t.join()
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    assert "locked" not in err and not errors, (err, errors)
    assert [p["step"] for p in service.metrics(job_id)] == list(range(1, n + 1))
    assert service.get(job_id)["progress"]["step"] == n
    assert reads > 20


# ------------------------------------------------------------------------------------ evaluations

def test_evaluation_records_and_samples(service):
    samples = [{"index": i, "question": f"q{i}", "gold": str(i), "response": f"The answer is {i % 2}",
                "extracted": str(i % 2), "correct": i % 2 == i} for i in range(4)]
    ev = service.record_evaluation(benchmark="gsm8k", base_model="smollm2-135m-instruct", accuracy=0.5, correct=2,
                                   total=4, seconds=1.5, samples=samples, settings={"limit": 4})
    assert service.list_evaluations(base_only=True)[0]["accuracy"] == 0.5
    assert [s["index"] for s in service.eval_samples(ev)] == [0, 1, 2, 3]
    assert [s["index"] for s in service.eval_samples(ev, only="wrong")] == [2, 3]
    assert service.eval_samples(ev, offset=1, limit=1)[0]["question"] == "q1"
    service.delete_evaluation(ev)
    assert service.list_evaluations() == [] and count_rows(service, "eval_samples") == 0


def test_child_dispatches_train_then_evaluate_in_process(service, tiny_model_dir, data):
    """run_job (the child's body) in this process with the real core.evaluate on the built-in math set:
    a training job with a benchmark after training, an evaluation job of its adapter, one of the base model."""
    pytest.importorskip("core.evaluate")
    spec = tiny_spec(tiny_model_dir, data, max_steps=3, eval_every=0, save_every=0)
    spec.eval.benchmarks, spec.eval.limit, spec.eval.max_new_tokens = ["builtin:math"], 3, 4
    train_id = service.submit(spec)
    assert run_job(service, train_id) == 0
    job = service.get(train_id)
    assert job["status"] == "succeeded", job["traceback"]
    assert [p["step"] for p in service.metrics(train_id) if p["type"] == "step"] == [1, 2, 3]
    (after_training,) = service.list_evaluations(job_id=train_id)
    assert after_training["benchmark"] == "builtin:math" and after_training["run_job_id"] == train_id
    assert after_training["total"] == 3 and job["result"]["evaluations"] == [after_training["id"]]

    eval_id = service.submit_evaluation(["builtin:math"], job_id=train_id,
                                        settings={"limit": 2, "max_new_tokens": 4})
    base_id = service.submit_evaluation(["builtin:math"], model=str(tiny_model_dir),
                                        settings={"limit": 2, "max_new_tokens": 4})
    assert service.get(eval_id)["kind"] == "evaluate" and service.get(eval_id)["target_job_id"] == train_id
    assert run_job(service, eval_id) == 0 and run_job(service, base_id) == 0
    assert service.get(eval_id)["status"] == "succeeded", service.get(eval_id)["traceback"]
    assert service.get(base_id)["status"] == "succeeded", service.get(base_id)["traceback"]
    assert len(service.list_evaluations(job_id=train_id)) == 2
    (base,) = service.list_evaluations(base_only=True)
    assert base["run_job_id"] == base_id and base["base_model"] == str(tiny_model_dir) and base["total"] == 2
    samples = service.eval_samples(base["id"])
    assert len(samples) == 2 and len({s["index"] for s in samples}) == 2
    assert all(s["question"] and s["gold"] is not None and isinstance(s["correct"], bool) for s in samples)
    with pytest.raises(ConfigError):
        service.submit_evaluation([], job_id=train_id)


def test_failed_job_resumes_exactly_in_process(service, tiny_model_dir, data, monkeypatch):
    """Fast twin of the kill -9 test: a job failing at step 10 resumes from its step-8 checkpoint
    (mid-epoch: 5 batches per epoch) with the losses of an uninterrupted run."""
    spec = tiny_spec(tiny_model_dir, data, dropout=0.1, max_steps=12, eval_every=4, save_every=4)
    full_id = service.submit(spec)
    assert run_job(service, full_id) == 0
    broken_id = service.submit(spec)
    monkeypatch.setenv("WORKBENCH_TEST_FAIL_AT_STEP", "10")
    assert run_job(service, broken_id) == 1
    monkeypatch.delenv("WORKBENCH_TEST_FAIL_AT_STEP")
    assert service.get(broken_id)["status"] == "failed"
    resumed_id = service.resume(broken_id)
    assert service.get(resumed_id)["resume_checkpoint"].endswith("step-8")
    assert run_job(service, resumed_id) == 0

    def losses(job_id, **kw):
        return {p["step"]: p["loss"] for p in service.metrics(job_id, **kw) if p["type"] == "step"}

    full, resumed = losses(full_id), losses(resumed_id)
    assert sorted(resumed) == [9, 10, 11, 12]
    assert [resumed[s] for s in range(9, 13)] == pytest.approx([full[s] for s in range(9, 13)], abs=1e-6)
    assert losses(resumed_id, history=True) == pytest.approx(full, abs=1e-6)


def test_recover_marks_only_jobs_without_their_process(service, tiny_model_dir, data):
    from jobs.service import worker_tag
    from jobs.worker import Worker

    spec = tiny_spec(tiny_model_dir, data)
    ids = {k: service.submit(spec) for k in ("recycled", "starting", "elsewhere", "orphan", "alive")}
    dead_worker = worker_tag(2**22 + 12345)  # no such pid
    service.claim(ids["recycled"], dead_worker)
    service.set_pid(ids["recycled"], os.getpid())  # alive, but not `python -m jobs.run <id>`
    service.claim(ids["starting"], worker_tag())  # claimed by a live worker, child not started yet
    service.claim(ids["elsewhere"], "another-host:1")
    service.set_pid(ids["elsewhere"], 2**22 + 1)
    service.claim(ids["orphan"], dead_worker)  # claimed by a worker that died before spawning
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "jobs.run",
                             str(ids["alive"])])
    try:
        service.claim(ids["alive"], dead_worker)  # its worker died; the child lives on
        service.set_pid(ids["alive"], proc.pid)
        lost = Worker(service).recover()
    finally:
        proc.kill()
        proc.wait()
    assert sorted(lost) == sorted([ids["recycled"], ids["orphan"]])
    status = {k: service.get(i)["status"] for k, i in ids.items()}
    assert status == {"recycled": "interrupted", "starting": "running", "elsewhere": "running",
                      "orphan": "interrupted", "alive": "running"}
    assert sorted(Worker(service).recover()) == [ids["alive"]]  # once the child is gone


def test_ids_and_run_directories_are_never_reused(service, tiny_model_dir, data):
    spec = tiny_spec(tiny_model_dir, data)
    first = service.submit(spec)
    service.cancel(first)
    service.delete(first, files=False)
    stale = service.runs_dir / str(first + 1)
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text("{}\n")  # left behind by an older database
    second = service.submit(spec)
    assert second == first + 1
    out = Path(service.get(second)["out_dir"])
    assert out != stale and out.name.startswith(f"{second}-")
    third = service.submit(spec)
    assert third == second + 1
    service.cancel(second)
    out.mkdir()
    service.delete(second)
    assert not out.exists() and stale.exists()


def test_version_3_metric_points_get_the_metric_names(tmp_path):
    """Before version 4 a point was ``kind='train'`` with ``train_loss``; migrated, it reads as the trainer
    reports it (``type='step'``, ``loss``) and nothing is lost."""
    url = f"sqlite:///{tmp_path / 'v3.db'}"
    engine = sa.create_engine(url)
    jobs_db.migrate(engine, jobs_db.MIGRATIONS[:3])
    with engine.begin() as conn:  # today's models, stamped 3: put back version 3's column names
        conn.exec_driver_sql("ALTER TABLE metric_points RENAME COLUMN type TO kind")
        conn.exec_driver_sql("ALTER TABLE metric_points RENAME COLUMN loss TO train_loss")
        conn.exec_driver_sql("INSERT INTO jobs (name, kind, status, spec, step, cancel_requested, created_at, owner) "
                             "VALUES ('old', 'train', 'succeeded', '{}', 2, 0, '2026-01-01 00:00:00', 'local')")
        conn.exec_driver_sql("INSERT INTO metric_points (job_id, kind, step, train_loss, wall_time) "
                             "VALUES (1, 'train', 1, 2.5, 0), (1, 'eval', 1, NULL, 0)")
    engine.dispose()
    svc = JobService(url, home=tmp_path / "home")
    points = svc.metrics(1)
    assert [(p["type"], p["step"], p["loss"]) for p in points] == [("step", 1, 2.5), ("eval", 1, None)]
    svc.close()
