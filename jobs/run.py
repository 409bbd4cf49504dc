"""The child process of one job: ``python -m jobs.run <id>``.

The worker starts it (stdout and stderr going to ``runs/<id>/train.log``) after claiming the job; run
by hand on a queued job it claims the job itself, then runs the runner of the job's kind
(``jobs.runners``). This module is the process around it: the ``Recorder`` that buffers metric points and
progress and writes them in one transaction every ~1 s (or every 50 points), the job's ``cancel_requested``
flag read at most every 0.5 s, the ``StopFlag`` of SIGTERM/SIGINT (status ``interrupted``) and the
``Budget``; a runner stops at its next step when any of them says so.

The deployment's limits (``core.deployment.Limits``) hold here too: a job does not start with less
free disk than ``min_free_disk_bytes``, and a job of an owner who is not an admin stops (cancelled,
adapter saved) at ``max_steps`` or after ``max_wall_s``. This process is the only place where a
model's own Python code may run (``core.sources.allow_remote_code_here``), and only where the server
and the spec both ask for it.

Under torchrun (``train.devices`` > 1, ``jobs.launch``) every rank runs this: rank 0 claims the job, tells
the others whether it starts, and runs it as one process does, alone writing progress, metrics, files and
status; the others train silently and stop at rank 0's decision each step (cancel, a SIGTERM torchrun
passes on, or torchrun gone). A rank that fails records why (the first final status written wins), so
a killed rank ends the job ``failed``, named by the rank that lost it (``core.distributed.RankFailure``).

Any exception ends the job ``failed`` with its message and the end of its traceback, after the
buffered points are written.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from core import progress
from core.config import JobSpec
from core.deployment import current

from .schema import Job, MetricPoint, utcnow
from .service import JobService, worker_tag

if TYPE_CHECKING:
    from core.distributed import Ranks

FLUSH_EVERY_S = 1.0
FLUSH_POINTS = 50
CANCEL_POLL_S = 0.5
TRACEBACK_CHARS = 4000
# The child's own final word wins over a worker that wrongly took it for dead ("interrupted").
MINE = ("running", "interrupted")
LOST = ("its worker stopped heartbeating and another worker marked it interrupted; this process stopped at "
        "its next step with a checkpoint (Resume continues from it)")


class Cancelled(Exception):
    """Raised inside an evaluation when the job is cancelled."""


class StopFlag:
    """Set by SIGTERM/SIGINT, or once ``launcher`` (torchrun's pid) is gone: the run stops cleanly at the next
    step. ``signal`` names the cause."""

    def __init__(self, launcher: int | None = None) -> None:
        self.signal: str | None = None
        self.launcher = launcher
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        if self.signal is None and self.launcher is not None and os.getppid() != self.launcher:
            # torchrun killed (kill -9): its ranks live in sessions of their own and would train on, orphaned
            self.signal = f"the end of torchrun (pid {self.launcher})"
        return self.signal is not None

    def install(self) -> None:
        def handler(signum, _frame):  # noqa: ANN001
            self.signal = signal.Signals(signum).name
            print(f"== received {self.signal}: stopping at the next step", flush=True)

        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (run_job called in-process)
            pass

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class Recorder:
    """Buffers a job's metric points and progress; writes them together in one short transaction."""

    def __init__(self, service: JobService, job_id: int):
        self.service, self.job_id = service, job_id
        self.points: list[dict[str, Any]] = []
        self.pending: dict[str, Any] = {}
        self.last_flush = time.monotonic()
        self.last_cancel_check = 0.0
        self.cancel = False
        self.lost = False  # the job left ``running`` under us (see ``cancel_requested``)
        self.step_label, self.step_started = "", 0.0  # the long step ``progress`` last heard of

    def progress(self, label: str, done: int, total: int | None, detail: str | None = None) -> None:
        """The job's ``core.progress`` sink: a long step (conversion, export, merge...) as the job's phase,
        step, total and ETA, written with the next flush (at once when the step starts or ends, which the
        log says in a line each)."""
        now = time.monotonic()
        if label != self.step_label or done == 0:
            self.step_label, self.step_started = label, now
        eta = (now - self.step_started) / done * (total - done) if total and done else None
        self.update(phase=label[:100], step=int(done), total_steps=int(total) if total else None, eta_s=eta)
        edge = done == 0 or (total is not None and done >= total)
        if edge:
            print(f"== {label}: {done}/{total if total is not None else '?'}" + (f" ({detail})" if detail else ""),
                  flush=True)
        if edge or self.due():
            self.flush()

    def add(self, **point: Any) -> None:
        self.points.append({"job_id": self.job_id, "wall_time": time.time(), **point})

    def update(self, **values: Any) -> None:
        self.pending.update(values)

    def due(self) -> bool:
        return len(self.points) >= FLUSH_POINTS or time.monotonic() - self.last_flush >= FLUSH_EVERY_S

    def flush(self) -> None:
        points, pending = self.points, self.pending
        self.points, self.pending = [], {}
        with self.service.db.write() as s:
            if points:
                s.execute(sa.insert(MetricPoint), points)
            s.execute(sa.update(Job).where(Job.id == self.job_id).values(heartbeat_at=utcnow(), **pending))
        self.last_flush = time.monotonic()

    def cancel_requested(self) -> bool:
        """The job's cancel flag, read from the database at most every ``CANCEL_POLL_S``; also True once
        the job is no longer ``running`` (``lost``): a live worker marked it ``interrupted`` because the
        worker that started this process stopped heartbeating (another machine's worker cannot see this
        process). Someone may resume it from its last checkpoint, so this process stops at its next step
        with a checkpoint of its own rather than train on beside the resumed run, and leaves the status
        ``interrupted`` (``LOST``)."""
        if self.cancel:
            return True
        now = time.monotonic()
        if now - self.last_cancel_check >= CANCEL_POLL_S:
            self.last_cancel_check = now
            with self.service.db.read() as s:
                flag, status = s.execute(sa.select(Job.cancel_requested, Job.status)
                                         .where(Job.id == self.job_id)).one()
            self.lost = status != "running"
            self.cancel = bool(flag) or self.lost
        return self.cancel


class Budget:
    """The deployment's per-job limits for this job's owner: steps and wall time (admins have none)."""

    def __init__(self, owner: str) -> None:
        deployment = current()
        self.limited = not deployment.is_admin(owner)
        self.max_steps = deployment.limits.max_steps
        self.max_wall_s = deployment.limits.max_wall_s
        self.started = time.monotonic()
        self.reason: str | None = None

    def spent(self, step: int = 0, total: int | None = None) -> bool:
        """True once a limit is reached (``total``: the run's planned steps; a run planned within the
        step limit is never cut short at its last step)."""
        if not self.limited or self.reason:
            return self.reason is not None
        if step >= self.max_steps and (total is None or total > self.max_steps):
            self.reason = f"stopped at this workbench's limit of {self.max_steps:,} steps per job"
        elif time.monotonic() - self.started > self.max_wall_s:
            self.reason = f"stopped at this workbench's limit of {self.max_wall_s / 3600:g} h per job"
        return self.reason is not None


def check_disk(service: JobService) -> None:
    """Refuse to start with less free space under the runs folder than the deployment asks for."""
    import shutil

    need = current().limits.min_free_disk_bytes
    service.runs_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(service.runs_dir).free
    if free < need:
        raise OSError(f"only {free / 2**30:.1f} GiB free under {service.runs_dir}; a job needs "
                      f"{need / 2**30:.1f} GiB to start (WORKBENCH_LIMIT_MIN_FREE_DISK_BYTES): free some space")


def run_job(service: JobService, job_id: int) -> int:
    """Run job ``job_id`` to a final status; return the process exit code (0 = the job ended as planned).

    Under torchrun this is every rank's body: rank 0 leads (``_lead``), the others follow (``_follow``).
    """
    from core import distributed
    from core.devices import resolve_device

    ranks = distributed.Ranks()
    if distributed.world_size() > 1:
        try:
            spec = JobSpec.from_dict(service.get(job_id)["spec"])
            ranks = distributed.join(resolve_device(spec.model.device), spec.train.rank_timeout_s)
        except Exception as err:  # no rank can start: the first to say why is heard
            error = f"rank {os.environ.get('RANK')} could not start: {type(err).__name__}: {err}"
            service.finish(job_id, "failed", only_if=MINE, phase=None, error=error[:2000])
            raise
    try:
        return _lead(service, job_id, ranks) if ranks.main else _follow(service, job_id, ranks)
    finally:
        ranks.leave()


def _lead(service: JobService, job_id: int, ranks: Ranks) -> int:
    """The job run by one process, or by rank 0 of several: claim, start, record, finish.

    The other ranks hear once whether the job starts: yes just before its runner, no on any way out
    before that (``started``).
    """
    job = service.get(job_id)
    if job["status"] == "queued":
        if not service.claim(job_id, worker_tag()):
            print(f"job {job_id} was taken by another worker", file=sys.stderr)
            ranks.agree(False)
            return 1
    elif job["status"] != "running":
        print(f"job {job_id} is {job['status']}: nothing to run", file=sys.stderr)
        ranks.agree(False)
        return 1
    pid = os.getpid() if ranks.world == 1 else os.getppid()  # torchrun's: what the worker started and signals
    service.set_pid(job_id, pid)
    job = service.get(job_id)
    where = f"pid {pid}" if ranks.world == 1 else f"pid {os.getpid()}, rank 0 of {ranks.world} under torchrun pid {pid}"
    print(f"== job {job_id} ({job['kind']}) '{job['name']}' run by worker {job['worker']} in {where} "
          f"at {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    stop = StopFlag(launcher=pid if ranks.world > 1 else None)
    stop.install()
    rec = Recorder(service, job_id)
    budget = Budget(job["owner"])
    started = False
    try:
        check_disk(service)
        if rec.cancel_requested():
            service.finish(job_id, "cancelled", only_if=MINE, phase=None)
            print("== cancelled before it started", flush=True)
            return 0
        from .runners import RUNNERS  # the runners use this module's Recorder, StopFlag and Budget

        runner = RUNNERS.get(job["kind"])
        if runner is None:
            raise ValueError(f"unknown job kind {job['kind']!r}")
        started = True
        ranks.agree(True)
        with progress.watching(rec.progress):
            status, values = runner(service, job, rec, stop, budget)
        if rec.lost:
            status, values["error"] = "interrupted", LOST
        values.setdefault("error", None)
        rec.flush()
        service.finish(job_id, status, only_if=MINE, **values)
        print(f"== job {job_id} {status}", flush=True)
        return 0
    except BaseException as err:  # noqa: BLE001 - every way out must leave a final status
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        sys.stderr.flush()
        cancelled = isinstance(err, Cancelled)
        try:
            rec.flush()
        except Exception:  # the database itself may be the problem; the status write below retries
            traceback.print_exc()
        if cancelled:
            service.finish(job_id, "interrupted" if stop.signal or rec.lost else "cancelled", only_if=MINE,
                           phase=None, error=f"stopped by {stop.signal}" if stop.signal else
                           LOST if rec.lost else budget.reason)
            print(f"== job {job_id} stopped during evaluation", flush=True)
            return 0
        message = f"{type(err).__name__}: {err}".strip()
        service.finish(job_id, "failed", only_if=MINE, phase=None, error=message[:2000],
                       traceback=tb[-TRACEBACK_CHARS:])
        print(f"== job {job_id} failed: {message}", flush=True)
        return 1
    finally:
        stop.restore()
        if not started:
            ranks.agree(False)


def _follow(service: JobService, job_id: int, ranks: Ranks) -> int:
    """A rank after the first: once rank 0 says the job starts, train its share, writing nothing.

    Other kinds of job run on rank 0 alone. A failure here is recorded as this rank's (the first final
    status written wins: when rank 0 saw it first, its account stands).
    """
    if not ranks.agree(False):  # the value is rank 0's
        return 0
    job = service.get(job_id)
    if job["kind"] != "train":
        return 0
    from core.distributed import RankFailure
    from core.train import train

    stop = StopFlag()
    stop.install()  # a SIGTERM ends the run through rank 0's stop decision, not by ending this process
    try:
        train(JobSpec.from_dict(job["spec"]), job["out_dir"], resume_from=job["resume_checkpoint"])
        return 0
    except BaseException as err:  # noqa: BLE001 - the job must learn why this rank ended
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        sys.stderr.flush()
        message = f"{type(err).__name__}: {err}"  # a RankFailure names the ranks itself
        if not isinstance(err, RankFailure):
            message = f"rank {ranks.rank} failed: {message}"
        service.finish(job_id, "failed", only_if=MINE, phase=None, error=message.strip()[:2000],
                       traceback=tb[-TRACEBACK_CHARS:])
        return 1
    finally:
        stop.restore()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m jobs.run <job id>", file=sys.stderr)
        return 2
    try:  # progress bars of model loading would fill the log with carriage returns
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
    from core.sources import allow_remote_code_here

    allow_remote_code_here()  # the only process that may; core still asks the server's switch and the spec
    service = JobService()
    try:
        return run_job(service, int(args[0]))
    finally:
        service.close()


if __name__ == "__main__":
    sys.exit(main())
