"""The worker: claims queued jobs and runs each in its own process, ``python -m jobs.run <id>``.

- Claiming is one ``UPDATE jobs SET status='running' ... WHERE id=? AND status='queued'``; a worker
  runs the job only if that changed a row, so two workers on one database never run the same job.
- Each child runs in its own session/process group (``start_new_session``): a Ctrl-C in the worker's
  terminal does not reach it, and a job can be signalled as a group. Its stdout and stderr go to the
  job's ``train.log``; it writes its own progress, metrics and final status.
- A child that exits without a final status (crash, OOM kill, ``kill -9``) is marked ``failed`` with
  its exit code or signal and the end of its log.
- On start, and every ``sweep_s`` after, jobs left ``running`` whose process is gone are marked
  ``interrupted`` (``resume`` continues them from their last checkpoint). A process counts as the
  job's only if ``/proc/<pid>/cmdline`` is ``... -m jobs.run <id>``, so a recycled pid does not keep a
  dead job alive; jobs run by a worker on another host are left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .launch import child_command, processes
from .service import LOG_FILE, JobService, host_name, worker_tag

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
    """Runs queued jobs of ``service``'s database, at most ``concurrency`` at a time."""

    def __init__(self, service: JobService, concurrency: int = 1, poll_s: float = 1.0, sweep_s: float = 10.0):
        self.service = service
        self.concurrency = max(1, int(concurrency))
        self.poll_s = poll_s
        self.sweep_s = sweep_s
        self.tag = worker_tag()
        self.children: dict[int, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._last_sweep = 0.0
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------
    def recover(self) -> list[int]:
        """Mark ``running`` jobs with no live process as ``interrupted``; return their ids."""
        self._last_sweep = time.monotonic()
        lost = []
        for job in self.service.running_jobs():
            if job["id"] in self.children or job_process_alive(job):
                continue
            # re-read under the write: the job may have finished between the list and now
            if self.service.finish(job["id"], "interrupted", phase=None,
                                   error=job.get("error") or "the job's process ended without a result "
                                                             "(worker or machine stopped)"):
                lost.append(job["id"])
                print(f"[worker {self.tag}] job {job['id']} was left running by a dead process: interrupted",
                      flush=True)
                if job.get("study_id") is not None:  # a study carries on by itself after a restart
                    new_id = self.service.resume_study_job(job["id"])
                    if new_id is not None:
                        print(f"[worker {self.tag}] study {job['study_id']}: job {job['id']} resumes as {new_id}",
                              flush=True)
        return lost

    def spawn(self, job_id: int) -> subprocess.Popen | None:
        job = self.service.get(job_id)
        out = Path(job["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(WORKBENCH_HOME=str(self.service.home), WORKBENCH_DB_URL=self.service.url, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        if self.concurrency > 1 and "OMP_NUM_THREADS" not in os.environ:
            # jobs side by side: share the cores instead of each spinning threads on all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.concurrency))
        try:
            with open(out / LOG_FILE, "ab") as log:
                proc = subprocess.Popen(child_command(job_id, processes(job["spec"])), cwd=REPO_ROOT, env=env,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        except OSError as err:
            self.service.finish(job_id, "failed", phase=None, error=f"could not start the job process: {err}")
            return None
        self.children[job_id] = proc
        self.service.set_pid(job_id, proc.pid)
        print(f"[worker {self.tag}] job {job_id} started in pid {proc.pid}", flush=True)
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
        for job_id in self.service.queued_ids(limit=self.concurrency + 5):
            if self.service.claim(job_id, self.tag):
                return job_id
        return None

    def tick(self) -> None:
        """One round: reap, sweep for lost jobs now and then, start jobs up to the concurrency limit."""
        self.reap()
        if time.monotonic() - self._last_sweep >= self.sweep_s:
            self.recover()
        while len(self.children) < self.concurrency and not self._stop.is_set():
            job_id = self.claim_next()
            if job_id is None:
                break
            self.spawn(job_id)

    @property
    def busy(self) -> bool:
        return bool(self.children)

    def run(self, until_idle: bool = False) -> None:
        """Loop until ``stop()`` (or, with ``until_idle``, until nothing is queued or running here)."""
        while not self._stop.is_set():
            try:
                self.tick()  # the first one sweeps for jobs lost by a dead worker
            except Exception as err:  # a database hiccup must not kill the worker
                print(f"[worker {self.tag}] error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            if until_idle and not self.children and not self.service.queued_ids(limit=1):
                break
            self._stop.wait(self.poll_s)
        self.reap()

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


def start_worker_thread(service: JobService, concurrency: int = 1, poll_s: float = 1.0) -> Worker:
    """Start a worker in a daemon thread of this process (for app.py); ``worker.stop()`` ends it."""
    worker = Worker(service, concurrency=concurrency, poll_s=poll_s)
    worker.thread = threading.Thread(target=worker.run, name="jobs-worker", daemon=True)
    worker.thread.start()
    return worker


def main(service: JobService, concurrency: int = 1, poll_s: float = 1.0, until_idle: bool = False) -> int:
    """``python -m jobs worker``: run until SIGTERM/SIGINT (or idle with ``until_idle``)."""
    worker = Worker(service, concurrency=concurrency, poll_s=poll_s)

    def handler(signum, _frame):  # noqa: ANN001
        print(f"[worker {worker.tag}] {signal.Signals(signum).name}: no new jobs; running ones continue",
              flush=True)
        worker._stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    print(f"[worker {worker.tag}] database {service.url}, concurrency {worker.concurrency}", flush=True)
    worker.run(until_idle=until_idle)
    return 0
