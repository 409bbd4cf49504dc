"""Jobs end to end with real child processes on a tiny model: success, cancel, crash, kill -9 and
resume, two workers on one database, failures shown by the CLI."""

from __future__ import annotations

import json
import os
import signal
import zipfile
from pathlib import Path

import pytest

from core.fields import ConfigError
from core.train import latest_checkpoint
from jobs import JobService, Worker, start_worker_thread
from jobs.checks import CHECK_ROWS
from tests.test_jobs_support import (cli, make_service, start_worker_process, tiny_spec, kill_worker_mid_job, wait_final,
                                     wait_for, write_data)


def run_until_idle(service: JobService, concurrency: int = 1) -> None:
    Worker(service, concurrency=concurrency, poll_s=0.1).run(until_idle=True)


def train_losses(service, job_id, **kw):
    return {p["step"]: p["loss"] for p in service.metrics(job_id, **kw) if p["type"] == "step"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """One job run to success by a worker (shared by the tests that only read it)."""
    tmp = tmp_path_factory.mktemp("finished")
    service = make_service(tmp)
    job_id = service.submit(tiny_spec(tiny_model_dir, write_data(tmp / "rows.json"), max_steps=6))
    assert service.get(job_id)["status"] == "queued"
    run_until_idle(service)
    yield service, job_id
    service.close()


def test_submit_runs_to_success(finished):
    service, job_id = finished
    job = service.get(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == job["progress"]["total"] == 6
    assert job["finished_at"] and job["started_at"] and job["exit_code"] == 0
    points = service.metrics(job_id)
    assert [p["step"] for p in points if p["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert all(p["loss"] > 0 and p["lr"] > 0 and p["tokens_per_s"] > 0 for p in points if p["type"] == "step")
    vals = [(p["step"], p["val_loss"]) for p in points if p["type"] == "eval"]
    assert [s for s, _ in vals] == [3, 6]
    assert job["best_val_loss"] == pytest.approx(min(v for _, v in vals))
    assert job["info"]["trainable"] > 0 and job["result"]["trainable_params"] == job["info"]["trainable"]
    # the database agrees with the trainer's own metrics.jsonl
    lines = [json.loads(x) for x in (Path(job["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines if x["type"] == "step"] == [p["loss"] for p in points if p["type"] == "step"]
    files = service.files(job_id)
    assert files["adapter"] and (Path(files["adapter"]) / "adapter.safetensors").is_file()
    assert "succeeded" in service.logs(job_id, 5) and "step 6/6" in service.logs(job_id)
    assert [p["step"] for p in service.metrics(job_id, since_step=4)] == [5, 6, 6]


def test_artifacts_are_built_by_export_jobs(finished, tiny_model_dir):
    service, job_id = finished
    exports = {kind: service.export(job_id, kind) for kind in ("adapter", "peft", "merged")}
    assert all(service.artifact(job_id, kind) is None for kind in exports)  # queued, not built in this process
    run_until_idle(service)
    for kind, export_id in exports.items():
        job = service.get(export_id)
        assert (job["kind"], job["status"], job["target_job_id"]) == ("export", "succeeded", job_id), job["error"]
        assert Path(job["result"]["path"]) == service.artifact(job_id, kind)
    with zipfile.ZipFile(service.artifact(job_id, "adapter")) as zf:
        assert {"adapter/adapter.safetensors", "adapter/adapter_config.json"} <= set(zf.namelist())
    with zipfile.ZipFile(service.artifact(job_id, "peft")) as zf:
        names = set(zf.namelist())
        assert any(n.endswith("adapter_model.safetensors") for n in names)
        assert any(n.endswith("adapter_config.json") for n in names)
    with zipfile.ZipFile(service.artifact(job_id, "merged")) as zf:
        assert any(n.endswith("config.json") for n in zf.namelist())
    for export_id in exports.values():  # the listing of training jobs is not cluttered by them
        service.delete(export_id)


def test_cli_show_and_list(finished):
    service, job_id = finished
    shown = json.loads(cli(service, "show", str(job_id), "--json").stdout)
    assert shown["status"] == "succeeded" and shown["out_dir"] == service.get(job_id)["out_dir"]
    assert shown["progress"]["step"] == 6 and shown["error"] is None
    table = cli(service, "list").stdout
    assert "succeeded" in table and "tiny" in table


def test_cancel_mid_run(service, tiny_model_dir, data, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEST_STEP_DELAY", "0.15")
    job_id = service.submit(tiny_spec(tiny_model_dir, data, max_steps=200, eval_every=0, save_every=0))
    worker = start_worker_thread(service, poll_s=0.1)
    try:
        wait_for(lambda: service.get(job_id)["progress"]["step"] >= 3, 60, what="step 3")
        assert service.cancel(job_id) == "running"
        job = wait_final(service, job_id, 30)
    finally:
        worker.stop()
    assert job["status"] == "cancelled", job["error"]
    assert 3 <= job["progress"]["step"] < 200
    assert job["result"]["status"] == "stopped"
    assert (Path(job["out_dir"]) / "adapter" / "adapter.safetensors").is_file()
    steps = [p["step"] for p in service.metrics(job_id)]
    assert steps == list(range(1, job["progress"]["step"] + 1))  # every step up to the stop, nothing after
    assert latest_checkpoint(job["out_dir"]).name == f"step-{job['progress']['step']}"
    assert service.cancel(job_id) == "cancelled"  # idempotent


def test_a_job_marked_interrupted_under_its_process_stops_and_stays_interrupted(service, tiny_model_dir, data,
                                                                                 monkeypatch):
    """What a lease sweep does to a job whose worker on another machine fell silent while its process
    lives on: the process stops at its next step with a checkpoint and does not overwrite the status."""
    monkeypatch.setenv("WORKBENCH_TEST_STEP_DELAY", "0.15")
    job_id = service.submit(tiny_spec(tiny_model_dir, data, max_steps=200, eval_every=0, save_every=0))
    worker = start_worker_thread(service, poll_s=0.1)
    try:
        wait_for(lambda: service.get(job_id)["progress"]["step"] >= 3, 60, what="step 3")
        assert service.finish(job_id, "interrupted", error="its worker stopped heartbeating")
        wait_for(lambda: not worker.children, 30, what="the job's process to stop")
    finally:
        worker.stop()
    job = service.get(job_id)
    assert job["status"] == "interrupted" and "stopped at its next step" in job["error"]
    assert 3 <= job["progress"]["step"] < 200
    assert latest_checkpoint(job["out_dir"]).name == f"step-{job['progress']['step']}"


def test_queued_job_cancels_at_once(service, tiny_model_dir, data):
    job_id = service.submit(tiny_spec(tiny_model_dir, data))
    assert service.cancel(job_id) == "cancelled"
    assert service.queued_ids() == []


def test_crash_and_kill_are_failures_with_their_reason(service, tiny_model_dir, tmp_path, monkeypatch):
    """A child that raises, one whose data is bad, one killed by SIGKILL: failed, with what was written kept."""
    monkeypatch.setenv("WORKBENCH_TEST_FAIL_AT_STEP", "3")
    early = write_data(tmp_path / "early.json", [{"instruction": "x", "output": "y"}] * 5 + [{"instruction": "x", "output": 3}])
    with pytest.raises(ConfigError, match="row 6"):  # the first rows are read at submit
        service.submit(tiny_spec(tiny_model_dir, early))
    late = [{"instruction": "x", "output": "y"}] * (CHECK_ROWS + 9) + [{"instruction": "x", "output": 3}]
    bad = write_data(tmp_path / "bad.json", late)
    bad_id = service.submit(tiny_spec(tiny_model_dir, bad))
    raise_id = service.submit(tiny_spec(tiny_model_dir, write_data(tmp_path / "ok.json")))
    run_until_idle(service, concurrency=2)

    job = service.get(bad_id)
    assert job["status"] == "failed" and f"row {len(late)}" in job["error"] and "Traceback" in job["traceback"]
    assert service.metrics(bad_id) == []
    shown = cli(service, "show", str(bad_id)).stdout
    assert "failed" in shown and f"row {len(late)}" in shown

    job = service.get(raise_id)
    assert job["status"] == "failed" and "injected failure at step 3" in job["error"]
    assert job["exit_code"] == 1
    assert [p["step"] for p in service.metrics(raise_id) if p["type"] == "step"] == [1, 2, 3]  # nothing lost
    assert "injected failure" in service.logs(raise_id)


def test_killed_child_is_failed_by_the_worker(service, tiny_model_dir, data, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEST_STEP_DELAY", "0.15")
    job_id = service.submit(tiny_spec(tiny_model_dir, data, max_steps=200, eval_every=0, save_every=0))
    worker = start_worker_thread(service, poll_s=0.1)
    try:
        wait_for(lambda: service.get(job_id)["progress"]["step"] >= 2, 60, what="step 2")
        os.killpg(service.get(job_id)["pid"], signal.SIGKILL)
        job = wait_final(service, job_id, 30)
    finally:
        worker.stop()
    assert job["status"] == "failed" and "SIGKILL" in job["error"] and job["exit_code"] == -signal.SIGKILL
    assert len(service.metrics(job_id)) >= 2  # what the child had written stays


def test_kill_worker_and_child_then_resume_matches_uninterrupted_run(service, tiny_model_dir, data):
    """kill -9 of the worker and its child mid-run: a new worker marks the job interrupted; the resumed
    job continues from the last checkpoint with exactly the losses of an uninterrupted run."""
    spec = tiny_spec(tiny_model_dir, data, dropout=0.1, max_steps=12, eval_every=4, save_every=4)
    reference = service.submit(spec)
    victim = service.submit(spec)
    kill_worker_mid_job(service, victim, 6, "0.2", "--concurrency", "2")  # past its step-4 checkpoint
    assert service.get(victim)["status"] == "running"  # nobody has noticed yet

    new_worker = Worker(service, poll_s=0.1)
    assert victim in new_worker.recover()
    job = service.get(victim)
    assert job["status"] == "interrupted" and job["error"]
    # the reference job's child outlived its worker and finishes on its own
    assert wait_final(service, reference, 60)["status"] == "succeeded"

    checkpoint = service.resume_point(victim)
    assert checkpoint is not None and checkpoint.name in ("step-4", "step-8")
    resumed = service.resume(victim)
    assert service.get(resumed)["resumes_job_id"] == victim
    new_worker.run(until_idle=True)
    job = service.get(resumed)
    assert job["status"] == "succeeded", job["error"]

    full = train_losses(service, reference)
    start = int(checkpoint.name.split("-")[1])
    mine = train_losses(service, resumed)
    assert sorted(mine) == list(range(start + 1, 13))
    assert [mine[s] for s in sorted(mine)] == pytest.approx([full[s] for s in sorted(mine)], rel=1e-6)
    before = train_losses(service, victim)
    assert [before[s] for s in range(1, start + 1)] == pytest.approx([full[s] for s in range(1, start + 1)], rel=1e-6)
    chain = service.metrics(resumed, history=True)
    steps = [p["step"] for p in chain if p["type"] == "step"]
    assert steps == list(range(1, 13))
    assert [p["loss"] for p in chain if p["type"] == "step"] == pytest.approx([full[s] for s in steps], rel=1e-6)
    assert job["best_val_loss"] == pytest.approx(service.get(reference)["best_val_loss"], rel=1e-6)


def test_two_workers_run_each_job_once(service, tiny_model_dir, data):
    ids = [service.submit(tiny_spec(tiny_model_dir, data, max_steps=2, eval_every=0, save_every=0))
           for _ in range(5)]
    workers = [start_worker_process(service, "--until-idle", OMP_NUM_THREADS="1") for _ in range(2)]
    outputs = [w.communicate(timeout=150)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    started = [line for out in outputs for line in out.splitlines() if " started in pid " in line]
    assert sorted(int(line.split("job ")[1].split()[0]) for line in started) == ids
    for job_id in ids:
        job = service.get(job_id)
        assert job["status"] == "succeeded", job["error"]
        assert service.logs(job_id, 0).count(f"== job {job_id} (train)") == 1
        assert [p["step"] for p in service.metrics(job_id) if p["type"] == "step"] == [1, 2]
