"""The worker: claims queued jobs and runs each in its own process, ``python -m jobs.run <id>``.

- A worker registers itself (host, pid, tag, the devices it offers: ``jobs.devices``) and renews its
  lease with a heartbeat every ``heartbeat_s`` from a thread of its own, on the database's clock.
- It claims only jobs its devices can run (``WorkersAPI.claim_next``); claiming is one
  ``UPDATE jobs SET status='running' ... WHERE id=? AND status='queued'``; a worker runs the job only
  if that changed a row, so two workers on one database never run the same job. The child sees only
  the GPUs it was given (``CUDA_VISIBLE_DEVICES``).
- Each child runs in its own session/process group (``start_new_session``): a Ctrl-C in the worker's
  terminal does not reach it, and a job can be signalled as a group. Its stdout and stderr go to the
  job's ``train.log``; it writes its own progress, metrics and final status.
- A child that exits without a final status (crash, OOM kill, ``kill -9``) is marked ``failed`` with
  its exit code or signal and the end of its log.
- On start, and every ``sweep_s`` after, jobs left ``running`` whose process is gone are marked
  ``interrupted`` (``resume`` continues them from their last checkpoint). A process counts as the
  job's only if ``/proc/<pid>/cmdline`` is ``... -m jobs.run <id>``, so a recycled pid does not keep a
  dead job alive. Jobs of other hosts are judged by their worker's lease instead: a job whose worker
  has not heartbeaten for longer than its lease is interrupted by any live worker (on its own host, a
  job whose process still runs is left alone). A worker that finds one of its own jobs interrupted
  that way (it was cut off from the database) stops that job's process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .devices import Devices, parse_devices, summary, visible_devices
from .launch import child_command, processes
from .service import LOG_FILE, JobService, host_name, worker_tag

HEARTBEAT_S = 5.0   # how often a worker renews its lease
LEASE_S = 30.0      # how long its jobs survive a silent worker before another interrupts them

REPO_ROOT = Path(__file__).resolve().parents[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")  # a zombie has exited
    except (OSError, IndexError):
        return True


def is_job_process(pid: int, job_id: int) -> bool:
    """Is ``pid`` a live ``python -m jobs.run <job_id>``?"""
    if not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self").exists():
        return True  # no /proc (macOS): trust the pid
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return b"jobs.run" in args and str(job_id).encode() in args


def job_process_alive(job: dict[str, Any]) -> bool:
    """Whether a ``running`` job still has a process working on it (as far as this host can tell)."""
    host, _, wpid = (job.get("worker") or "").rpartition(":")
    if host and host != host_name():
        return True  # another machine's job: we cannot see its processes
    if job.get("pid"):
        return is_job_process(int(job["pid"]), int(job["id"]))
    # claimed, child not started yet: alive while the claiming worker is
    return wpid.isdigit() and pid_alive(int(wpid))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory, or kill -9)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


class Worker:
    """Runs queued jobs of ``service``'s database that ``devices`` can run, at most ``concurrency`` at a time.

    ``name`` is the tag shown in the Jobs tab (default ``host:pid``); ``devices`` defaults to what
    ``--devices auto`` finds. The lease (``lease_s``, at least twice ``heartbeat_s``) is how long this
    worker's jobs outlive its silence; ``sweep_s`` (default ``heartbeat_s``) how often it looks for
    lost jobs.
    """

    def __init__(self, service: JobService, concurrency: int = 1, poll_s: float = 1.0, sweep_s: float | None = None,
                 devices: Devices | None = None, name: str | None = None, heartbeat_s: float = HEARTBEAT_S,
                 lease_s: float = LEASE_S):
        if not 0 < 2 * heartbeat_s <= lease_s:
            raise ValueError(f"the lease ({lease_s:g} s) must be at least twice the heartbeat ({heartbeat_s:g} s), "
                             "or one late heartbeat would cost this worker its jobs")
        self.service = service
        self.concurrency = max(1, int(concurrency))
        self.poll_s = poll_s
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self.sweep_s = heartbeat_s if sweep_s is None else sweep_s
        self.devices = devices if devices is not None else parse_devices("auto")
        self.tag = worker_tag()
        self.name = name or self.tag
        self.worker_id: int | None = None
        self.children: dict[int, subprocess.Popen] = {}
        self.gpus: dict[int, tuple[int, ...]] = {}  # job id -> the GPUs its processes were given
        self._stop = threading.Event()
        self._last_sweep = 0.0
        self.thread: threading.Thread | None = None
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        print(f"[worker {self.name}] {message}", flush=True)

    def recover(self) -> list[int]:
        """Mark ``running`` jobs with no live process as ``interrupted``; return their ids."""
        self._last_sweep = time.monotonic()
        lost = []
        for job in self.service.running_jobs():
            if job["id"] in self.children or job_process_alive(job):
                continue
            if self._interrupt(job, job.get("error") or "the job's process ended without a result "
                                                        "(worker or machine stopped)", "was left running by a dead process"):
                lost.append(job["id"])
        return lost

    def expire_leases(self) -> list[int]:
        """Interrupt running jobs whose worker's lease ran out (a job of this host whose process still
        runs is left alone); return their ids."""
        lost = []
        for job in self.service.lease_expired_jobs():
            host = (job["worker"] or "").rpartition(":")[0]
            if job["id"] in self.children or (host == host_name() and job_process_alive(job)):
                continue
            error = (f"its worker {job['tag']} on host {job['host']} stopped heartbeating for longer than its "
                     f"{job['lease_s']:g} s lease (worker or machine stopped, or cut off from the database)")
            if self._interrupt(job, error, f"lost its worker {job['tag']} on {job['host']}"):
                lost.append(job["id"])
        return lost

    def _interrupt(self, job: dict[str, Any], error: str, why: str) -> bool:
        """Mark a lost job interrupted (unless it finished meanwhile) and resume it if a study owns it."""
        # conditional on still running: the job may have finished between the read and now
        if not self.service.finish(job["id"], "interrupted", phase=None, error=error):
            return False
        self.log(f"job {job['id']} {why}: interrupted")
        if job.get("study_id") is not None:  # a study carries on by itself after a restart
            new_id = self.service.resume_study_job(job["id"])
            if new_id is not None:
                self.log(f"study {job['study_id']}: job {job['id']} resumes as {new_id}")
        return True

    def stop_lost_children(self) -> list[int]:
        """SIGTERM the children of jobs another worker interrupted (this worker's lease had run out):
        their results would land on a job that is no longer theirs. Returns those job ids."""
        stopped = []
        for job_id, proc in list(self.children.items()):
            if proc.poll() is None and self.service.get(job_id)["status"] == "interrupted":
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGTERM)
                stopped.append(job_id)
                self.log(f"job {job_id} was interrupted by another worker while this one was silent: stopping it")
        return stopped

    # ------------------------------------------------------------------------------------ registry
    def register(self) -> int:
        """Add this worker to the registry (once) and start its heartbeat thread; return its id."""
        if self.worker_id is None:
            self.worker_id = self.service.register_worker(self.name, host_name(), os.getpid(), self.devices,
                                                          self.concurrency, self.lease_s)
            self.log(f"registered as worker {self.worker_id}: {summary(self.devices)}, "
                     f"lease {self.lease_s:g} s, heartbeat every {self.heartbeat_s:g} s")
        if self._beat is None or not self._beat.is_alive():
            self._beat = threading.Thread(target=self._heartbeats, name="jobs-worker-heartbeat", daemon=True)
            self._beat.start()
        return self.worker_id

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.service.heartbeat(self.worker_id):  # pruned while silent: back in the registry
                    self.worker_id = self.service.register_worker(
                        self.name, host_name(), os.getpid(), self.devices, self.concurrency, self.lease_s)
            except Exception as err:  # the database is away: keep trying; the lease says how long we may
                self.log(f"heartbeat failed: {type(err).__name__}: {err}")

    def unregister(self) -> None:
        """A clean exit: stop the heartbeat and leave the registry's list."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(self.heartbeat_s + 5)
        if self.worker_id is not None:
            with contextlib.suppress(Exception):  # the database may be what stopped us
                self.service.worker_stopped(self.worker_id)

    def spawn(self, job_id: int) -> subprocess.Popen | None:
        job = self.service.get(job_id)
        out = Path(job["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(WORKBENCH_HOME=str(self.service.home), WORKBENCH_DB_URL=self.service.url, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(self.gpus.get(job_id, ()), os.environ.get("CUDA_VISIBLE_DEVICES"))
        if self.concurrency > 1 and "OMP_NUM_THREADS" not in os.environ:
            # jobs side by side: share the cores instead of each spinning threads on all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.concurrency))
        try:
            with open(out / LOG_FILE, "ab") as log:
                proc = subprocess.Popen(child_command(job_id, processes(job["spec"], job["kind"])), cwd=REPO_ROOT, env=env,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        except OSError as err:
            self.service.finish(job_id, "failed", phase=None, error=f"could not start the job process: {err}")
            return None
        self.children[job_id] = proc
        self.service.set_pid(job_id, proc.pid)
        gpus = self.gpus.get(job_id, ())
        self.log(f"job {job_id} started in pid {proc.pid}" + (f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""))
        return proc

    def reap(self) -> list[int]:
        """Collect children that exited; fail those that left no final status. Returns their job ids."""
        done = []
        for job_id, proc in list(self.children.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.children[job_id]
            done.append(job_id)
            self.service.set_fields(job_id, exit_code=code)
            how = _describe_exit(code)
            if self.service.finish(job_id, "failed", phase=None, exit_code=code,
                                   error=f"the job process {how} without reporting a result",
                                   traceback=self.service.logs(job_id, 30) or None):
                print(f"[worker {self.tag}] job {job_id}: process {how}: failed", flush=True)
        return done

    def claim_next(self) -> int | None:
        """Claim the oldest queued job this worker's free devices can run; its id, or None."""
        busy = {i for job_id, gpus in self.gpus.items() if job_id in self.children for i in gpus}
        claimed = self.service.claim_next(self.register(), self.tag, self.devices, busy,
                                          candidates=self.concurrency + 10)
        if claimed is None:
            return None
        job_id, gpus = claimed
        self.gpus[job_id] = gpus
        return job_id

    def tick(self) -> None:
        """One round: reap, sweep for lost jobs now and then, start jobs up to the concurrency limit."""
        self.reap()
        self.gpus = {job_id: gpus for job_id, gpus in self.gpus.items() if job_id in self.children}
        if time.monotonic() - self._last_sweep >= self.sweep_s:
            self.recover()
            self.expire_leases()
            self.stop_lost_children()
        while len(self.children) < self.concurrency and not self._stop.is_set():
            job_id = self.claim_next()
            if job_id is None:
                break
            self.spawn(job_id)

    @property
    def busy(self) -> bool:
        return bool(self.children)

    def run(self, until_idle: bool = False) -> None:
        """Loop until ``stop()`` (or, with ``until_idle``, until nothing it could run is queued and
        nothing runs here)."""
        try:
            while not self._stop.is_set():
                try:
                    self.tick()  # the first one registers and sweeps for jobs lost by a dead worker
                except Exception as err:  # a database hiccup must not kill the worker
                    print(f"[worker {self.name}] error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                if until_idle and not self.children and not self.service.has_claimable(self.devices):
                    break
                self._stop.wait(self.poll_s)
            self.reap()
        finally:
            self.unregister()

    def stop(self, terminate_children: bool = False, wait: float | None = 5.0) -> None:
        """Stop claiming. Children keep running (they report on their own) unless ``terminate_children``:
        then each gets SIGTERM and stops at its next step with a checkpoint (status ``interrupted``)."""
        self._stop.set()
        if terminate_children:
            for proc in self.children.values():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except OSError:
                    pass
        if self.thread is not None and wait:
            self.thread.join(wait)


def start_worker_thread(service: JobService, concurrency: int = 1, poll_s: float = 1.0, **options: Any) -> Worker:
    """Start a worker in a daemon thread of this process (for app.py); ``worker.stop()`` ends it.
    ``options``: the other arguments of ``Worker`` (devices, name, heartbeat_s, lease_s)."""
    worker = Worker(service, concurrency=concurrency, poll_s=poll_s, **options)
    worker.thread = threading.Thread(target=worker.run, name="jobs-worker", daemon=True)
    worker.thread.start()
    return worker


def main(service: JobService, concurrency: int = 1, poll_s: float = 1.0, until_idle: bool = False,
         **options: Any) -> int:
    """``python -m jobs worker``: run until SIGTERM/SIGINT (or idle with ``until_idle``). ``options``:
    the other arguments of ``Worker`` (devices, name, heartbeat_s, lease_s)."""
    worker = Worker(service, concurrency=concurrency, poll_s=poll_s, **options)

    def handler(signum, _frame):  # noqa: ANN001
        worker.log(f"{signal.Signals(signum).name}: no new jobs; running ones continue")
        worker._stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    worker.log(f"database {service.db.name}, runs in {service.runs_dir}, concurrency {worker.concurrency}")
    worker.run(until_idle=until_idle)
    return 0
