"""One queue, many workers, without job processes, on SQLite and on PostgreSQL (``db_url``): the schema
and its migration, exactly-once claims under contention, claims by capability, leases on the database's
clock, who sees which worker, and the error when a job's files are on another machine."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from core.deployment import Actor, Deployment
from jobs import JobService, Worker
from jobs import db as jobs_db
from jobs import launch
from jobs.devices import GiB, Devices, DevicesError, Gpu, assign, parse_devices, visible_devices
from jobs.schema import Base, WorkerRecord
from jobs.service import FilesNotHere, host_name
from tests.test_jobs_support import REPO, cli, make_service, tiny_spec

CPU = Devices(cpus=4)
TWO_GPUS = Devices(gpus=(Gpu(0, "fake", 40 * GiB), Gpu(1, "fake", 40 * GiB)), cpus=4)


@pytest.fixture
def queue(db_url, tmp_path):
    svc = make_service(tmp_path, db_url)
    yield svc
    svc.close()


def submit(service: JobService, model, data, device: str = "cpu", processes: int = 1, **kw) -> int:
    spec = tiny_spec(model, data)
    spec.model.device = device
    if processes > 1:
        spec.train.devices, spec.train.strategy = processes, "ddp"
    return service.submit(spec, **kw)


def register(service: JobService, tag: str, devices: Devices = CPU, host: str = "elsewhere", lease_s: float = 30.0):
    return service.register_worker(tag, host, 1, devices, 1, lease_s)


# ------------------------------------------------------------------------------------------ schema

def test_schema_is_created_versioned_and_pooled(queue):
    with queue.db.engine.connect() as conn:
        assert jobs_db.schema_version(conn) == jobs_db.latest_version()
        inspector = sa.inspect(conn)
        for table in Base.metadata.sorted_tables:
            assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.columns.keys())
    if queue.db.engine.dialect.name == "postgresql":
        assert queue.db.engine.dialect.driver == "psycopg"
        assert queue.db.engine.pool.size() == jobs_db.POOL_SIZE and queue.db.engine.pool._pre_ping


def test_version_4_gets_workers_and_what_queued_jobs_need(db_url):
    engine = jobs_db.make_engine(db_url)
    jobs_db.migrate(engine, jobs_db.MIGRATIONS[:4])
    with engine.begin() as conn:  # today's models stamped 4: take version 5's table and columns away
        conn.exec_driver_sql("DROP TABLE workers")
        conn.exec_driver_sql("DROP INDEX ix_jobs_worker_id")
        for column in ("worker_id", "device", "processes", "gpu_memory"):
            conn.exec_driver_sql(f"ALTER TABLE jobs DROP COLUMN {column}")
        for status, spec in [("queued", '{"model": {"device": "cuda"}, "train": {"devices": 2}}'),
                             ("succeeded", '{"model": {"device": "cpu"}}')]:
            conn.exec_driver_sql("INSERT INTO jobs (name, kind, status, spec, step, cancel_requested, created_at, "
                                 f"owner) VALUES ('old', 'train', '{status}', '{spec}', 0, false, "
                                 "'2026-01-01 00:00:00', 'local')")
    engine.dispose()
    svc = JobService(db_url)
    try:
        with svc.db.engine.connect() as conn:
            assert jobs_db.schema_version(conn) == jobs_db.latest_version() and sa.inspect(conn).has_table("workers")
        queued, done = sorted(svc.list_jobs(), key=lambda j: j["id"])
        assert queued["needs"] == {"device": "cuda", "processes": 2, "gpu_memory": None}
        assert done["needs"] == {"device": "auto", "processes": 1, "gpu_memory": None}  # never claimed again
        assert queued["ran_on"] is None
    finally:
        svc.close()


# ------------------------------------------------------------------------------------------ claims

def test_only_training_runs_on_several_processes(queue, tiny_model_dir, data):
    """An evaluation copies its training job's spec, train.devices included, but runs in one process:
    it must neither start torchrun nor wait for (and hold) the training's GPUs."""
    train = submit(queue, tiny_model_dir, data, device="cuda", processes=2)
    spec = tiny_spec(tiny_model_dir, data)
    spec.model.device, spec.train.devices, spec.train.strategy = "cuda", 2, "ddp"
    spec.eval.benchmarks = ["builtin:math"]
    evaluation = queue.submit(spec, "evaluate")
    assert queue.get(train)["needs"]["processes"] == 2
    assert queue.get(evaluation)["needs"]["processes"] == 1
    assert launch.child_command(evaluation, launch.processes(spec.to_dict(), "evaluate"))[1:] == [
        "-m", "jobs.run", str(evaluation)]
    assert "--nproc-per-node=2" in launch.child_command(train, launch.processes(spec.to_dict(), "train"))


def test_claims_are_exactly_once_under_contention(queue, tiny_model_dir, data):
    ids = [submit(queue, tiny_model_dir, data) for _ in range(12)]
    workers = [register(queue, f"w{n}") for n in range(6)]
    barrier = threading.Barrier(len(workers))
    claimed: dict[int, list[int]] = {w: [] for w in workers}
    errors = []

    def drain(worker_id: int) -> None:
        try:
            barrier.wait()
            while (got := queue.claim_next(worker_id, f"elsewhere:{worker_id}", CPU, set())) is not None:
                claimed[worker_id].append(got[0])
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(i for got in claimed.values() for i in got) == ids
    for worker_id, got in claimed.items():
        assert all(queue.get(i)["ran_on"]["worker_id"] == worker_id for i in got)
    assert queue.claim_next(workers[0], "elsewhere:1", CPU, set()) is None


def test_a_worker_claims_only_what_its_devices_can_run(queue, tiny_model_dir, data):
    cpu1 = submit(queue, tiny_model_dir, data, "cpu")
    cuda1 = submit(queue, tiny_model_dir, data, "cuda")
    big = submit(queue, tiny_model_dir, data, "cuda", 2, gpu_memory=80 * GiB)
    auto2 = submit(queue, tiny_model_dir, data, "auto", 2)
    cuda2 = submit(queue, tiny_model_dir, data, "cuda", 2)
    cpu_worker, gpu_worker = register(queue, "cpu"), register(queue, "gpu", TWO_GPUS)

    assert queue.claim_next(cpu_worker, "h:1", CPU, set()) == (cpu1, ())
    assert queue.claim_next(cpu_worker, "h:1", CPU, set()) == (auto2, ())   # auto on a CPU worker: gloo
    assert queue.claim_next(cpu_worker, "h:1", CPU, set()) is None          # cuda jobs wait for a GPU worker
    assert queue.claim_next(gpu_worker, "h:2", TWO_GPUS, set()) == (cuda1, (0,))
    assert queue.claim_next(gpu_worker, "h:2", TWO_GPUS, {0}) is None       # one GPU free; cuda2 needs two
    assert queue.claim_next(gpu_worker, "h:2", TWO_GPUS, set()) == (cuda2, (0, 1))
    assert queue.get(big)["status"] == "queued"                             # 80 GiB per GPU: nobody here
    assert not queue.has_claimable(TWO_GPUS) and not queue.has_claimable(CPU)
    assert queue.has_claimable(Devices(gpus=(Gpu(0, "big", 96 * GiB), Gpu(3, "big", 96 * GiB))))


def test_devices_are_parsed_and_given_to_children():
    found = [Gpu(0, "a", 16 * GiB), Gpu(1, "b", 80 * GiB)]
    assert parse_devices("cpu", found).kind == "cpu"
    assert parse_devices("auto", []).kind == "cpu" and parse_devices("auto", found).gpus == tuple(found)
    assert parse_devices("cuda:1", found).gpus == (found[1],)
    with pytest.raises(DevicesError, match="no GPU 2 here"):
        parse_devices("cuda:0,2", found)
    with pytest.raises(DevicesError, match="no CUDA GPU is visible"):
        parse_devices("cuda", [])
    with pytest.raises(DevicesError, match="write auto, cpu, cuda"):
        parse_devices("gpu", found)
    both = Devices(gpus=tuple(found))
    assert assign(both, set(), "cuda", 1, 40 * GiB) == (1,)  # the one that fits
    assert assign(both, set(), "auto", 1, None) == (0,)      # the smallest that fits: the large one stays free
    assert assign(both, {1}, "cuda", 1, 40 * GiB) is None
    assert visible_devices((0, 2), "4,5,6") == "4,6" and visible_devices((1,)) == "1" and visible_devices(()) == ""


# ------------------------------------------------------------------------------------------ leases

def test_a_job_outlives_its_worker_only_for_the_lease_on_the_database_clock(queue, tiny_model_dir, data):
    job_id = submit(queue, tiny_model_dir, data)
    far = register(queue, "far", host="far-machine", lease_s=30.0)
    assert queue.claim_next(far, "far-machine:7", CPU, set()) == (job_id, ())
    sweeper = Worker(queue, devices=CPU, name="near", heartbeat_s=0.5, lease_s=2.0)
    assert sweeper.recover() == [] and sweeper.expire_leases() == []  # another host's job: only the lease tells
    (listed,) = queue.list_workers()
    assert listed["live"] and listed["heartbeat_age_s"] < 5 and listed["jobs"] == [job_id]

    with queue.db.write() as s:  # silent for a minute, by the database's own clock
        s.execute(sa.update(WorkerRecord).where(WorkerRecord.id == far).values(heartbeat_at=jobs_db.db_now(-60)))
    (listed,) = queue.list_workers()
    assert not listed["live"] and 59 < listed["heartbeat_age_s"] < 90
    assert sweeper.expire_leases() == [job_id]
    job = queue.get(job_id)
    assert job["status"] == "interrupted" and "far on host far-machine" in job["error"] and "30 s lease" in job["error"]
    assert sweeper.expire_leases() == []  # once
    assert queue.heartbeat(far) and queue.list_workers()[0]["live"]


def test_long_silent_workers_are_pruned_unless_a_running_job_names_them(queue, tiny_model_dir, data):
    job_id = submit(queue, tiny_model_dir, data)
    busy, idle = register(queue, "busy"), register(queue, "idle")
    queue.claim_next(busy, "elsewhere:1", CPU, set())
    with queue.db.write() as s:
        s.execute(sa.update(WorkerRecord).values(heartbeat_at=jobs_db.db_now(-8 * 86400)))
    register(queue, "new")
    with queue.db.read() as s:
        assert sorted(s.scalars(sa.select(WorkerRecord.tag))) == ["busy", "new"]
    assert Worker(queue, devices=CPU).expire_leases() == [job_id]  # the sweep still finds the job's worker


def test_a_worker_stops_its_child_when_another_took_its_job(queue, tiny_model_dir, data):
    job_id = submit(queue, tiny_model_dir, data)
    worker = Worker(queue, devices=CPU, heartbeat_s=0.5, lease_s=2.0)
    assert worker.claim_next() == job_id
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    worker.children[job_id] = child
    try:
        assert worker.stop_lost_children() == []  # still its job
        queue.finish(job_id, "interrupted", error="its worker stopped heartbeating")
        assert worker.stop_lost_children() == [job_id]
        assert child.wait(30) == -15
    finally:
        child.kill()
        child.wait()
        worker.unregister()
    assert queue.list_workers() == []  # a clean exit leaves the list


# ------------------------------------------------------------------------------------------ who sees what

def test_hosts_are_shown_to_users_but_not_to_public_visitors(queue, db_url, tmp_path, tiny_model_dir, data):
    job_id = submit(queue, tiny_model_dir, data)
    gpu = register(queue, "gpu-a", TWO_GPUS, host="gpu-box")
    queue.claim_next(gpu, "gpu-box:7", TWO_GPUS, set())
    with queue.db.write() as s:
        s.execute(sa.text("UPDATE jobs SET owner = 'anon:visitor'"))
    assert queue.get(job_id)["ran_on"] == {"worker_id": gpu, "tag": "gpu-a", "host": "gpu-box"}
    with pytest.raises(FilesNotHere, match=r"worker gpu-a on host gpu-box.*must be one folder shared"):
        queue.logs(job_id)
    with pytest.raises(FilesNotHere, match=r"worker gpu-a on host gpu-box"):
        queue.export(job_id, "peft")  # not "no adapter yet": the adapter may well be on gpu-box
    assert queue.list_workers()[0]["host"] == "gpu-box"
    assert "worker    gpu-a on gpu-box" in cli(queue, "show", str(job_id)).stdout

    team = JobService(db_url, home=tmp_path / "home", deployment=Deployment.for_mode("team"))
    public = JobService(db_url, home=tmp_path / "home", deployment=Deployment.for_mode("public"))
    try:
        assert team.scoped(Actor("bob")).list_workers()[0]["tag"] == "gpu-a"
        assert team.scoped(Actor("bob")).list_workers()[0]["jobs"] == []  # not bob's job: counted only
        visitor = public.scoped(Actor("anon:visitor"))
        (seen,) = visitor.list_workers()
        assert (seen["tag"], seen["host"], seen["pid"], seen["jobs"], seen["running"]) == (None, None, None, [job_id], 1)
        job = visitor.get(job_id)
        assert job["ran_on"] is None and job["worker"] is None and job["pid"] is None
        with pytest.raises(FilesNotHere) as err:
            visitor.logs(job_id)
        assert "gpu" not in str(err.value)
        assert public.scoped(Actor("anon:stranger")).list_workers()[0]["jobs"] == []
    finally:
        team.close()
        public.close()


def test_files_of_a_job_run_here_are_not_reported_missing(queue, tiny_model_dir, data):
    job_id = submit(queue, tiny_model_dir, data)
    here = register(queue, "here", host=host_name())
    queue.claim_next(here, f"{host_name()}:1", CPU, set())
    assert queue.logs(job_id) == ""  # not started writing yet: nothing to say about sharing


# ------------------------------------------------------------------------------------------ CLI

def test_worker_cli_documents_and_checks_its_options(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORKBENCH_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "jobs", "worker", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for words in ("--devices", "cuda:0,1", "--tag", "--lease", "--heartbeat", "runs directory"):
        assert words in out.stdout, words
    bad = subprocess.run([sys.executable, "-m", "jobs", "worker", "--devices", "gpu"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: --devices 'gpu': write auto, cpu, cuda (every GPU) or cuda:0,1 (those GPUs)"
    short = subprocess.run([sys.executable, "-m", "jobs", "worker", "--lease", "1", "--heartbeat", "1"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "at least twice --heartbeat" in short.stderr


def test_workers_cli_lists_the_registry(queue):
    register(queue, "gpu-a", TWO_GPUS, host="gpu-box")
    out = cli(queue, "workers").stdout
    assert "gpu-a" in out and "gpu-box" in out and "cuda ×2 (fake, 40 GiB each)" in out and "live" in out
