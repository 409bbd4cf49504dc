"""Several training processes (torchrun; gloo on CPU, NCCL on CUDA) compute what one process computes.

Two CPU ranks on the tiny checkpoint, fp32 and no dropout: the same losses as one process with the
same global batch; a checkpoint moves from 2 processes to 1 and back; a cancel stops both ranks; a
killed rank fails the job, named, while the other ends at once instead of waiting for the timeout.
The tests marked ``cuda`` run where there is a GPU (two for DDP) and skip elsewhere. The GPU machine
has no SQLAlchemy, so this module imports ``jobs`` (and the jobs tests' helpers) only in the job tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import AdapterConfig, ConfigError, JobSpec
from core.callbacks import TrainCallbacks
from core.data import shard
from core.distributed import Ranks
from core.train import CPU_ONLY, Trainer, latest_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
RANK_TIMEOUT_S = 30  # train.rank_timeout_s here: a hang would show as a test slower than this
# tests.test_jobs_support's rows (that module imports jobs, hence SQLAlchemy)
ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}."}
        for a in range(1, 7) for b in range(2, 6)]


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    return path


def spec_for(model_dir, data, devices: int = 1, **train_settings) -> JobSpec:
    """LoRA without dropout on the tiny checkpoint, fp32 on the CPU: 20 training rows, 4 validation rows,
    6 steps of 4 examples (2 per rank on 2 processes), validation and a checkpoint at step 3."""
    spec = JobSpec(name="tiny")
    spec.model.name, spec.model.precision, spec.model.device = str(model_dir), "fp32", "cpu"
    spec.adapter = AdapterConfig.for_method("lora", r=4, alpha=8, dropout=0.0)
    spec.data.source, spec.data.val_size = str(data), 4
    settings = dict(batch_size=4, micro_batch_size=2, learning_rate=1e-2, warmup_steps=1, max_steps=6,
                    eval_every=3, save_every=3, devices=devices, strategy="ddp" if devices > 1 else "single",
                    rank_timeout_s=RANK_TIMEOUT_S)
    for key, value in {**settings, **train_settings}.items():
        setattr(spec.train, key, value)
    return spec


class Recorder(TrainCallbacks):
    def __init__(self) -> None:
        self.steps, self.evals = [], []

    def on_step(self, report) -> None:
        self.steps.append(report)

    def on_eval(self, report) -> None:
        self.evals.append(report)


def torchrun_train(spec, out: Path, *args: str, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """``python -m core train`` on ``nproc`` processes, one thread each; fails the test on a non-zero exit."""
    config = out.parent / f"{out.name}-spec.json"
    config.write_text(spec.to_json())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "core", "train", "--config", str(config), "--out", str(out), *args]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def logged(out: Path, kind: str = "step", key: str = "loss") -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if r["type"] == kind}


def one_process(tiny_model_dir, rows, out: Path, **kw) -> Recorder:
    rec = Recorder()
    train(spec_for(tiny_model_dir, rows), out, rec, **kw)
    return rec


# ------------------------------------------------------------------------------------------------------
# Without launching anything

def test_one_process_ranks_pass_values_through_and_shard_is_every_nth():
    ranks = Ranks()
    assert ranks.main and ranks.agree(True) and not ranks.agree(False)
    assert ranks.sum([1.5, 3]) == [1.5, 3]
    batch = list(range(7))
    assert shard(batch, 0, 1) is batch
    assert shard(batch, 0, 2) == [0, 2, 4, 6] and shard(batch, 1, 2) == [1, 3, 5]
    assert sorted(shard(batch, 0, 3) + shard(batch, 1, 3) + shard(batch, 2, 3)) == batch


@pytest.mark.parametrize("change,field,words", [
    ({"devices": 3, "strategy": "ddp"}, "train.batch_size", "multiple of devices"),
    ({"devices": 2, "strategy": "ddp", "micro_batch_size": 4}, "train.micro_batch_size", "each process's share"),
    ({"devices": 2, "strategy": "ddp", "batch_size": 6, "micro_batch_size": 2},
     "train.micro_batch_size", "must divide batch_size / devices = 3"),
    ({"devices": 2, "strategy": "single"}, "train.devices", "strategy ddp"),
])
def test_the_global_batch_must_split_evenly_across_processes(tiny_model_dir, rows, tmp_path, change, field, words):
    with pytest.raises(ConfigError) as err:
        Trainer(spec_for(tiny_model_dir, rows, **change), tmp_path / "out")
    assert err.value.field == field and words in str(err.value)


def test_several_devices_in_one_process_say_how_to_start_them(tiny_model_dir, rows, tmp_path):
    trainer = Trainer(spec_for(tiny_model_dir, rows, devices=2), tmp_path / "out")
    with pytest.raises(ConfigError) as err:
        trainer.setup()
    assert err.value.field == "train.devices"
    assert "--nproc-per-node 2" in str(err.value) and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------
# Two CPU processes under torchrun

@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_on_one(tiny_model_dir, tmp_path, rows):
    one = one_process(tiny_model_dir, rows, tmp_path / "one")
    losses = [r.loss for r in one.steps]
    assert len(losses) == 6 and len(set(losses)) == 6

    torchrun_train(spec_for(tiny_model_dir, rows, devices=2), tmp_path / "two")
    two = logged(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    assert [two[s] for s in range(1, 7)] == pytest.approx(losses, rel=1e-5)
    val = logged(tmp_path / "two", "eval", "val_loss")
    assert [val[3], val[6]] == pytest.approx([e.val_loss for e in one.evals], rel=1e-5)
    assert (tmp_path / "two" / "adapter" / "adapter.safetensors").is_file()
    assert json.loads((tmp_path / "two" / "spec.json").read_text())["train"]["devices"] == 2

    checkpoint = latest_checkpoint(tmp_path / "two")
    assert checkpoint is not None and checkpoint.name == "step-3"
    rest = one_process(tiny_model_dir, rows, tmp_path / "two-then-one", resume_from=checkpoint)
    assert [r.step for r in rest.steps] == [4, 5, 6]
    assert [r.loss for r in rest.steps] == pytest.approx(losses[3:], rel=1e-5)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two(tiny_model_dir, tmp_path, rows):
    one = one_process(tiny_model_dir, rows, tmp_path / "one")
    checkpoint = latest_checkpoint(tmp_path / "one")
    assert checkpoint is not None and checkpoint.name == "step-3"
    torchrun_train(spec_for(tiny_model_dir, rows, devices=2), tmp_path / "one-then-two", "--resume", str(checkpoint))
    rest = logged(tmp_path / "one-then-two")
    assert sorted(rest) == [4, 5, 6]
    assert [rest[s] for s in (4, 5, 6)] == pytest.approx([r.loss for r in one.steps][3:], rel=1e-5)


def rank_pids(launcher: int) -> dict[int, int]:
    """The pid of each rank torchrun (pid ``launcher``) started, by rank (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0") if ppid == launcher else []
        except (OSError, IndexError, ValueError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


class Launch:
    """Job ``job_id`` run on 2 processes as the worker runs it (``jobs.launch``; rank 0 claims it if queued),
    its output in ``log``. ``ranks`` (rank -> pid) once ``find_ranks`` has looked."""

    def __init__(self, service, job_id: int, log: Path, **env: str):
        from jobs.launch import child_command
        from tests.test_jobs_support import child_env

        self.log, self.ranks = log, {}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(child_command(job_id, 2), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=child_env(service, OMP_NUM_THREADS="1", **env))

    def find_ranks(self) -> dict[int, int]:
        self.ranks = rank_pids(self.proc.pid)
        assert sorted(self.ranks) == [0, 1], self.output()
        return self.ranks

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def end(self, timeout: float) -> None:
        """Wait for torchrun and the ranks to exit; past ``timeout``, kill them and fail."""
        from tests.test_jobs_support import wait_dead

        deadline = time.monotonic() + timeout
        try:
            self.proc.wait(timeout)
            for pid in self.ranks.values():
                wait_dead(pid, max(0.1, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, AssertionError):
            for pid in [*self.ranks.values(), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.proc.wait(30)
            raise AssertionError(f"torchrun or its ranks still running after {timeout}s:\n{self.output()}") from None


@pytest.mark.slow
@pytest.mark.parametrize("how,status,error", [
    ("cancel", "cancelled", None),
    ("SIGTERM", "interrupted", "stopped by SIGTERM"),  # what Worker.stop(terminate_children=True) sends torchrun
    ("SIGKILL", "interrupted", "stopped by the end of torchrun"),  # its ranks, in sessions of their own, stop too
])
def test_a_cancel_or_signal_stops_both_ranks_with_a_checkpoint(service, tiny_model_dir, rows, tmp_path, how, status,
                                                               error):
    from tests.test_jobs_support import wait_final, wait_for

    spec = spec_for(tiny_model_dir, rows, devices=2, max_steps=200, eval_every=0, save_every=0)
    job_id = service.submit(spec)
    launch = Launch(service, job_id, tmp_path / "launch.log", WORKBENCH_TEST_STEP_DELAY="0.2")
    try:
        wait_for(lambda: service.get(job_id)["progress"]["step"] >= 2, 180, what="step 2")
        launch.find_ranks()
        if how == "cancel":
            assert service.cancel(job_id) == "running"
        else:
            os.kill(launch.proc.pid, getattr(signal, how))
        job = wait_final(service, job_id, 60)
    finally:
        launch.end(60)  # the ranks too: no orphan trains on
    assert job["status"] == status and job["result"]["status"] == "stopped", launch.output()
    assert (job["error"] is None) if error is None else (error in job["error"])
    steps = [p["step"] for p in service.metrics(job_id)]
    assert steps == list(range(1, job["progress"]["step"] + 1))  # rank 0 alone wrote, once per step
    assert latest_checkpoint(job["out_dir"]).name == f"step-{job['progress']['step']}"
    assert (Path(job["out_dir"]) / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_fails_the_job_by_name_and_the_other_does_not_hang(service, tiny_model_dir, rows, tmp_path,
                                                                         victim):
    """Rank 0 records the death of rank 1; when rank 0 itself is killed, rank 1 records it."""
    from tests.test_jobs_support import wait_for

    spec = spec_for(tiny_model_dir, rows, devices=2, max_steps=200, eval_every=0, save_every=0)
    job_id = service.submit(spec)
    launch = Launch(service, job_id, tmp_path / "launch.log", WORKBENCH_TEST_STEP_DELAY="0.2")
    try:
        wait_for(lambda: service.get(job_id)["progress"]["step"] >= 2, 180, what="step 2")
        ranks = launch.find_ranks()
        os.kill(ranks[victim], signal.SIGKILL)
        killed = time.monotonic()
    finally:
        launch.end(2 * RANK_TIMEOUT_S)
    assert time.monotonic() - killed < RANK_TIMEOUT_S, "the other rank waited for the timeout, not failing at once"
    assert launch.proc.returncode != 0
    job = service.get(job_id)
    assert job["status"] == "failed", launch.output()
    assert f"rank {victim} (pid {ranks[victim]}) has died; rank {1 - victim} stopped" in job["error"]
    assert 2 <= job["progress"]["step"] < 200


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_ranks_that_cannot_start_fail_the_job_saying_why(service, tiny_model_dir, rows, tmp_path):
    spec = spec_for(tiny_model_dir, rows, devices=2)
    spec.model.device = "cuda"
    job_id = service.submit(spec)
    assert service.claim(job_id, "tester:1")  # as a worker does before it starts the job's processes
    launch = Launch(service, job_id, tmp_path / "launch.log")
    launch.end(120)
    assert launch.proc.returncode != 0
    job = service.get(job_id)
    assert job["status"] == "failed", launch.output()
    assert "could not start: ModelLoadError: device 'cuda' was asked for" in job["error"]


# ------------------------------------------------------------------------------------------------------
# On CUDA (skipped without a GPU)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_cuda_in_bf16_with_sdpa_and_without_the_cpu_kernels(tiny_model_dir, tmp_path, rows):
    spec = spec_for(tiny_model_dir, rows, max_steps=8)
    spec.model.device, spec.model.precision = "cuda", "auto"
    rec = Recorder()
    trainer = Trainer(spec, tmp_path / "out", rec)
    trainer.setup()
    try:
        assert trainer.device.type == "cuda" and trainer.dtype == torch.bfloat16
        assert trainer.model.get_input_embeddings().weight.dtype == torch.bfloat16  # the frozen base
        assert trainer.model.config._attn_implementation == "sdpa"
        assert not trainer.parts & CPU_ONLY and "head_loss" in trainer.parts
        result = trainer.train()
    finally:
        trainer.cleanup()
    assert result.status == "completed" and all(r.loss == r.loss for r in rec.steps)
    assert rec.steps[-1].loss < rec.steps[0].loss and result.peak_memory_mb > 0


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_like_one(tiny_model_dir, tmp_path, rows):
    spec = spec_for(tiny_model_dir, rows)
    spec.model.device = "cuda"
    one = Recorder()
    train(spec, tmp_path / "one", one)
    spec.train.devices, spec.train.strategy = 2, "ddp"
    torchrun_train(spec, tmp_path / "two")
    two = logged(tmp_path / "two")
    assert [two[s] for s in range(1, 7)] == pytest.approx([r.loss for r in one.steps], rel=1e-4)
