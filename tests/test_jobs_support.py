"""Helpers of the jobs tests (no tests here): a tiny job spec, a service on a temporary database (SQLite,
or a fresh PostgreSQL database on the server of ``$WORKBENCH_TEST_DB_URL``), waiting, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from core import AdapterConfig, JobSpec
from jobs import JobService

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}."}
        for a in range(1, 7) for b in range(2, 6)]


def write_data(path: Path, rows=ROWS) -> Path:
    path.write_text(json.dumps(rows))
    return path


def tiny_spec(model_dir, data_path, dropout: float = 0.05, **train) -> JobSpec:
    """A LoRA job on the tiny checkpoint: 20 training rows, 4 validation rows, batches of 4."""
    spec = JobSpec(name="tiny")
    spec.model.name = str(model_dir)
    spec.model.precision = "fp32"
    spec.model.device = "cpu"
    spec.adapter = AdapterConfig.for_method("lora", r=4, alpha=8, dropout=dropout)
    spec.data.source = str(data_path)
    spec.data.val_size = 4
    spec.train.batch_size, spec.train.micro_batch_size = 4, 2
    spec.train.learning_rate, spec.train.warmup_steps = 1e-2, 1
    spec.train.max_steps, spec.train.eval_every, spec.train.save_every = 6, 3, 3
    for key, value in train.items():
        setattr(spec.train, key, value)
    return spec


TEST_DB_ENV = "WORKBENCH_TEST_DB_URL"  # a PostgreSQL server the tests may create databases on (.ci/postgres.sh)


def make_service(tmp: Path, url: str | None = None) -> JobService:
    """A service on ``url`` (default a SQLite file in ``tmp``) with its home in ``tmp/home``."""
    return JobService(url or f"sqlite:///{tmp / 'jobs.db'}", home=tmp / "home")


@contextlib.contextmanager
def fresh_database(backend: str, tmp: Path) -> Iterator[str]:
    """The URL of an empty database for one test: a SQLite file in ``tmp``, or a new database on the
    PostgreSQL server of ``$WORKBENCH_TEST_DB_URL``, dropped afterwards (skipped when that is unset)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'jobs.db'}"
        return
    server = os.environ.get(TEST_DB_ENV, "").strip()
    if not server:
        pytest.skip(f"{TEST_DB_ENV} is not set: no PostgreSQL server to test on (`.ci/postgres.sh start` makes one)")
    name = f"wb_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


# A job's child as the tests see it write: one metric point and the progress per transaction (the worst
# case), paced at RATE points a second; prints "wrote N in S".
METRIC_WRITER = textwrap.dedent("""
    import sys, time
    from jobs import JobService
    from jobs.run import Recorder
    service = JobService()
    job_id, n, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    rec = Recorder(service, job_id)
    start = time.monotonic()
    for i in range(1, n + 1):
        rec.add(type="step", step=i, loss=1.0 / i, lr=1e-3)
        rec.update(step=i)
        rec.flush()
        rec.cancel_requested()
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print("wrote", n, "in", round(time.monotonic() - start, 3))
""")


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_dead(pid: int, timeout: float = 30.0) -> None:
    """Until ``pid`` is gone or a zombie: a SIGKILL is delivered asynchronously, slowly on a loaded machine."""
    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return True
        return state in ("Z", "X")

    wait_for(gone, timeout, what=f"pid {pid} to die")


def kill_worker_mid_job(service: JobService, job_id: int, min_step: int, step_delay: str,
                        *worker_args: str) -> None:
    """Start a worker process, let job ``job_id`` pass step ``min_step``, then ``kill -9`` the worker
    and the job's child process group, and wait until both are gone."""
    pid = None
    worker = start_worker_process(service, *worker_args, WORKBENCH_TEST_STEP_DELAY=step_delay)
    try:
        wait_for(lambda: service.get(job_id)["progress"]["step"] >= min_step, 90,
                 what=f"job {job_id} past step {min_step}")
        pid = service.get(job_id)["pid"]
    finally:
        if pid is None:
            worker.kill()
            worker.wait(10)
    worker.kill()
    os.killpg(pid, signal.SIGKILL)
    worker.wait(10)
    wait_dead(pid)


def wait_final(service: JobService, job_id: int, timeout: float = 90.0) -> dict:
    return wait_for(lambda: (lambda j: j if j["status"] not in ("queued", "running") else None)(service.get(job_id)),
                    timeout, what=f"job {job_id} to finish")


def child_env(service: JobService, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(WORKBENCH_HOME=str(service.home), WORKBENCH_DB_URL=service.url, PYTHONPATH=str(REPO), **extra)
    return env


def cli(service: JobService, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO, env=child_env(service),
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"jobs {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def start_worker_process(service: JobService, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs", "worker", "--poll", "0.1", *args], cwd=REPO,
                            env=child_env(service, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
