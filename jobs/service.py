"""The jobs service: the one API the UI and the CLI use to submit, watch, stop, resume and clean up jobs.

Every method returns plain data (ints, dicts, lists of dicts, paths), never ORM objects, so callers
need no session. ``core`` (and with it torch) is imported only by the methods that need it, so
listing jobs stays fast.

A job's files live in its output directory, ``$WORKBENCH_HOME/runs/<id>/``: ``spec.json``,
``train.log`` (the child's stdout and stderr), ``metrics.jsonl``, ``checkpoints/step-<N>/``,
``adapter/`` and ``exports/``. With workers on several machines, ``runs/`` must be one shared folder
(the same path everywhere): a job writes its files where its worker runs, the web server reads them
where it runs, and ``FilesNotHere`` says which worker and host a job ran on when they cannot be seen.

This module holds the jobs themselves (submit, read, control, the worker's side). ``JobService``
inherits the rest of the API from one mixin per concern: ``checks`` (what a spec may ask for),
``artifacts`` (exports), ``evaluations``, ``uploads`` (and chat limits), ``compare``, ``studies``,
``workers`` (the registry, claims by capability, leases) and ``arena`` (the blind arena's pools and votes).
Who may see and do what (owner, quotas) is ``access.ServiceBase``, which they all share; the
exceptions are in ``errors``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa

from .arena import ArenaAPI
from .artifacts import ArtifactsAPI
from .checks import SpecChecksAPI
from .compare import ComparisonAPI
from .errors import JobError, iso, row_id
from .evaluations import EvaluationsAPI
from .lmeval_jobs import LmEvalAPI
from .schema import ACTIVE, FINISHED, EvalSample, Evaluation, Job, MetricPoint, utcnow
from .launch import processes
from .merges import ADAPTER_KINDS, MERGE_KINDS, MergesAPI
from .studies import StudiesAPI
from .uploads import UploadsAPI
from .workers import WorkersAPI

LOG_FILE = "train.log"
MAX_LOG_LINES = 100_000
HOST_ENV = "WORKBENCH_WORKER_HOST"


class FilesNotHere(JobError):
    """A job's files are not on this machine: it ran on another host and the runs directory is not shared."""


def host_name() -> str:
    """This machine's name as workers record it: ``$WORKBENCH_WORKER_HOST``, else the host name. Two
    machines must not share one (containers on one host network do): a worker judges the jobs of its
    own host by their process ids."""
    return os.environ.get(HOST_ENV, "").strip() or socket.gethostname()


def worker_tag(pid: int | None = None) -> str:
    """``host:pid`` naming a worker process."""
    return f"{host_name()}:{pid or os.getpid()}"


def job_dict(job: Job) -> dict[str, Any]:
    """A job as plain data (what ``get``/``list_jobs``/``show --json`` give)."""
    started, finished = job.started_at, job.finished_at
    duration = None
    if started:
        duration = ((finished or utcnow()) - started).total_seconds()
    total = job.total_steps
    return {
        "id": job.id, "name": job.name, "kind": job.kind, "status": job.status,
        "created_at": iso(job.created_at), "started_at": iso(started), "finished_at": iso(finished),
        "duration_s": duration,
        "progress": {"step": job.step or 0, "total": total, "epoch": job.epoch, "eta_s": job.eta_s,
                     "fraction": (job.step or 0) / total if total else None, "phase": job.phase,
                     "loss": job.last_loss, "heartbeat_at": iso(job.heartbeat_at)},
        "best_val_loss": job.best_val_loss,
        "error": job.error, "traceback": job.traceback, "exit_code": job.exit_code,
        "pid": job.pid, "worker": job.worker,
        "ran_on": {"worker_id": job.worker_id, "tag": job.runner.tag, "host": job.runner.host}
        if job.runner is not None else None,
        "needs": {"device": job.device, "processes": job.processes, "gpu_memory": job.gpu_memory},
        "out_dir": job.out_dir, "resumes_job_id": job.resumes_job_id, "resume_checkpoint": job.resume_checkpoint,
        "target_job_id": job.target_job_id, "cancel_requested": bool(job.cancel_requested),
        "study_id": job.study_id, "info": job.info, "result": job.result, "spec": job.spec, "owner": job.owner,
    }


def metric_dict(p: MetricPoint) -> dict[str, Any]:
    """A metric point as ``core.metrics`` names it (the shape app.charts reads), with its id, job and time."""
    return {c.name: getattr(p, c.name) for c in MetricPoint.__table__.columns}


def checkpoint_step(path: str | Path | None) -> int | None:
    """N of a ``.../step-N`` checkpoint directory."""
    if not path:
        return None
    m = re.fullmatch(r"step-(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


class JobService(MergesAPI, SpecChecksAPI, ArtifactsAPI, EvaluationsAPI, UploadsAPI, ComparisonAPI, StudiesAPI, WorkersAPI,
                 ArenaAPI, LmEvalAPI):
    """Jobs in one database (``url``; default ``$WORKBENCH_DB_URL`` or ``$WORKBENCH_HOME/workbench.db``).

    ``home`` is where job directories are made (default ``$WORKBENCH_HOME``); ``deployment`` and
    ``actor`` say whose rules and whose view (``scoped``) every call is checked against.
    """

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    # ------------------------------------------------------------------------------------- submit
    def submit(self, spec: Any, kind: str = "train", *, name: str | None = None,
               target_job_id: int | None = None, study_id: int | None = None, gpu_memory: int | None = None) -> int:
        """Validate and queue a job; return its id. Invalid: ``ConfigError`` and nothing written.

        ``kind="evaluate"`` runs ``spec.eval.benchmarks`` on ``spec.model`` with the adapter of
        ``target_job_id`` (or on the bare base model when it is None). ``gpu_memory`` (bytes): only a
        worker whose GPUs each have that much claims it (``jobs.devices``).
        """
        if gpu_memory is not None and (isinstance(gpu_memory, bool) or not isinstance(gpu_memory, int)
                                       or gpu_memory <= 0):
            from core.fields import ConfigError

            raise ConfigError("gpu_memory", f"must be a positive number of bytes (got {gpu_memory!r})")
        if kind == "export":
            raise JobError("export jobs are queued with export(job_id, artifact)")
        if kind in MERGE_KINDS:  # their parents are checked and recorded there
            raise JobError(f"{kind} jobs are queued with submit_merge or submit_weight_search")
        spec = self.check_spec(spec, kind)
        if target_job_id is not None:
            target = self.get(target_job_id)
            if kind != "evaluate":
                from core.fields import ConfigError

                raise ConfigError("target_job_id", "only evaluate jobs take a target job")
            if target["kind"] not in ADAPTER_KINDS:
                raise JobError(f"job {target_job_id} is not a training or merge job")
        self._check_quota()
        return self._insert(spec, kind, name=name, target_job_id=target_job_id, study_id=study_id,
                            gpu_memory=gpu_memory)

    def evaluation_spec(self, job_id: int | None, model: str | None = None) -> Any:
        """The spec an evaluation starts from: the training job's (its base model, adapter and template), or
        the defaults for a bare base model; ``model`` replaces the base model's name when given."""
        from core.config import JobSpec

        spec = JobSpec.from_dict(self.get(job_id)["spec"]) if job_id is not None else JobSpec()
        if model:
            spec.model.name = model
        return spec

    def submit_evaluation(self, benchmarks: Iterable[str], job_id: int | None = None, model: str | None = None,
                          settings: Any = None, name: str | None = None) -> int:
        """Queue an evaluation of a training job's adapter (``job_id``) or of a base model (``model``)."""
        from core.config import EvalSettings

        if job_id is not None:
            job_id = row_id(job_id)
        spec = self.evaluation_spec(job_id, model)
        if settings is None:
            settings = spec.eval if job_id is not None else EvalSettings()
        elif isinstance(settings, dict):
            settings = EvalSettings.from_dict(settings)
        settings = EvalSettings.from_dict(settings.to_dict())
        settings.benchmarks = list(benchmarks)
        spec.eval = settings
        label = name or f"eval {'job ' + str(job_id) if job_id is not None else spec.model.name}: " \
                        f"{', '.join(settings.benchmarks)}"
        return self.submit(spec, "evaluate", name=label, target_job_id=job_id)

    def _insert(self, spec: Any, kind: str, *, name: str | None = None, resumes_job_id: int | None = None,
                resume_checkpoint: str | None = None, target_job_id: int | None = None,
                study_id: int | None = None, owner: str | None = None, info: dict | None = None,
                gpu_memory: int | None = None) -> int:
        data = spec.to_dict()
        with self.db.write() as s:
            job = Job(name=(name or spec.name or f"{kind} {spec.adapter.method}")[:200], kind=kind,
                      status="queued", spec=data, resumes_job_id=resumes_job_id,
                      resume_checkpoint=resume_checkpoint, target_job_id=target_job_id, study_id=study_id,
                      step=0, cancel_requested=False, owner=owner or self.owner, info=info,
                      device=spec.model.device, processes=processes(data, kind), gpu_memory=gpu_memory)
            s.add(job)
            s.flush()
            out = self.runs_dir / str(job.id)
            if out.exists():  # left by a database that was deleted or replaced: never mix two jobs' files
                out = self.runs_dir / f"{job.id}-{time.strftime('%Y%m%d-%H%M%S')}"
            job.out_dir = str(out)
            return job.id

    # ---------------------------------------------------------------------------------------- read
    def get(self, job_id: int) -> dict[str, Any]:
        with self.db.read() as s:
            return self._shown(job_dict(self._job(s, job_id)))

    def _shown(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job as this actor may see it: a public visitor does not learn hosts or processes."""
        if not self.may_see_workers:
            job.update(pid=None, worker=None, ran_on=None)
        return job

    def list_jobs(self, status: str | Iterable[str] | None = None, kind: str | None = None,
                  limit: int | None = None, study_id: int | None = None) -> list[dict[str, Any]]:
        """Jobs, newest first; filter by status (one or several), kind, study."""
        q = self._mine(sa.select(Job).order_by(Job.id.desc()), Job.owner)
        if status:
            q = q.where(Job.status.in_([status] if isinstance(status, str) else list(status)))
        if kind:
            q = q.where(Job.kind == kind)
        if study_id is not None:
            q = q.where(Job.study_id == study_id)
        if limit:
            q = q.limit(limit)
        with self.db.read() as s:
            return [self._shown(job_dict(j)) for j in s.scalars(q)]

    def metrics(self, job_id: int, since_step: int | None = None, history: bool = False) -> list[dict[str, Any]]:
        """Metric points of a job ordered by step (training point before validation at a step).

        ``since_step``: only points with step > since_step (a step's points are written together,
        so polling with the last step seen misses nothing). ``history``: for a resumed job, also the
        points of the jobs it continues, up to the checkpoint it started from (each point says its
        ``job_id``), giving one curve over the whole chain.
        """
        with self.db.read() as s:
            job = self._job(s, job_id)
            points = [metric_dict(p) for p in s.scalars(self._metric_query(job.id, since_step, None))]
            current, seen, bound = job, {job.id}, None
            while history and current.resumes_job_id is not None and current.resumes_job_id not in seen:
                upto = checkpoint_step(current.resume_checkpoint)
                if upto is not None:
                    bound = upto if bound is None else min(bound, upto)
                prev = s.get(Job, current.resumes_job_id)
                if prev is None or not self.may_see(prev.owner):
                    break
                points += [metric_dict(p) for p in s.scalars(self._metric_query(prev.id, since_step, bound))]
                seen.add(prev.id)
                current = prev
        points.sort(key=lambda p: (p["step"], p["type"] == "eval", p["id"]))
        return points

    @staticmethod
    def _metric_query(job_id: int, since_step: int | None, upto: int | None):
        q = sa.select(MetricPoint).where(MetricPoint.job_id == job_id)
        if since_step is not None:
            q = q.where(MetricPoint.step > since_step)
        if upto is not None:
            q = q.where(MetricPoint.step <= upto)
        return q

    def output_dir(self, job_id: int) -> Path:
        return Path(self.get(job_id)["out_dir"])

    def log_path(self, job_id: int) -> Path:
        return self.output_dir(job_id) / LOG_FILE

    def logs(self, job_id: int, tail_lines: int | None = 200) -> str:
        """The end of the job's log (its child's stdout and stderr); '' before it starts.
        ``FilesNotHere`` when it ran on another host and its files cannot be seen from here."""
        path = self.log_path(job_id)
        if not path.is_file():
            self.check_files_here(job_id)
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            if not tail_lines:
                return f.read()
            return "".join(deque(f, maxlen=max(1, min(int(tail_lines), MAX_LOG_LINES))))

    def check_files_here(self, job_id: int) -> None:
        """``FilesNotHere`` naming the worker and its host (to those who may see them), when the job ran
        on another host and its output directory is missing here: the runs directory is not shared."""
        with self.db.read() as s:
            job = self._job(s, job_id)
            runner = job.runner
            if not job.started_at or not job.out_dir or runner is None or runner.host == host_name() \
                    or Path(job.out_dir).exists():
                return
            if not self.may_see_workers:
                raise FilesNotHere(f"job {job.id} ran on another machine whose files this server cannot see "
                                   "(its runs directory is not shared)")
            raise FilesNotHere(f"job {job.id} ran on worker {runner.tag} on host {runner.host}, and its files "
                               f"({job.out_dir}) are not on this machine: the runs directory ({self.runs_dir}) must "
                               "be one folder shared by every worker and the web server (README: Scaling out)")

    def files(self, job_id: int) -> dict[str, Any]:
        """Where a job's files are: output dir, adapter (None until saved), log, metrics, checkpoints."""
        out = self.output_dir(job_id)
        adapter = out / "adapter"
        ckpts = sorted((p for p in (out / "checkpoints").glob("step-*") if (p / "state.pt").is_file()),
                       key=lambda p: checkpoint_step(p) or 0) if (out / "checkpoints").is_dir() else []
        return {"out_dir": str(out),
                "adapter": str(adapter) if (adapter / "adapter_config.json").is_file() else None,
                "log": str(out / LOG_FILE) if (out / LOG_FILE).is_file() else None,
                "metrics": str(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else None,
                "spec": str(out / "spec.json") if (out / "spec.json").is_file() else None,
                "checkpoints": [str(p) for p in ckpts]}

    # ------------------------------------------------------------------------------------- control
    def cancel(self, job_id: int) -> str:
        """Cancel: a queued job at once; a running one stops at its next step with its adapter saved.

        Returns the status after the request ("cancelled", or "running" while the child winds down;
        a finished job's status is returned unchanged).
        """
        with self.db.write() as s:
            job = self._job(s, job_id)
            if job.status == "queued":
                job.status, job.finished_at, job.phase = "cancelled", utcnow(), None
            elif job.status == "running":
                job.cancel_requested = True
            return job.status

    def resume(self, job_id: int) -> int:
        """Queue a new job continuing ``job_id`` from its last checkpoint; return the new id."""
        job = self.get(job_id)
        job_id = job["id"]
        if job["kind"] != "train":
            raise JobError(f"job {job_id} is an {job['kind']} job; only training jobs resume")
        if job["status"] not in ("interrupted", "failed", "cancelled"):
            raise JobError(f"job {job_id} is {job['status']}; only interrupted, failed or cancelled jobs resume")
        checkpoint = self.resume_point(job_id)
        if checkpoint is None:
            raise JobError(f"job {job_id} has no checkpoint to resume from (it stopped before its first save; "
                           "checkpoints are written every train.save_every steps): submit it again")
        with self.db.read() as s:
            pending = s.scalar(sa.select(Job.id).where(Job.resumes_job_id == int(job_id), Job.status.in_(ACTIVE)))
        if pending is not None:
            raise JobError(f"job {pending} is already resuming job {job_id}")
        from core.config import JobSpec

        spec = JobSpec.from_dict(job["spec"])
        self._check_quota(owner=job["owner"])
        return self._insert(spec, "train", name=job["name"], resumes_job_id=job["id"],
                            resume_checkpoint=str(checkpoint), study_id=job["study_id"], owner=job["owner"],
                            gpu_memory=job["needs"]["gpu_memory"])

    def resume_point(self, job_id: int) -> Path | None:
        """The checkpoint ``resume`` would continue from: the job's latest, else the one it started from."""
        from core.train import latest_checkpoint

        job = self.get(job_id)
        self.check_files_here(job_id)
        found = latest_checkpoint(job["out_dir"]) if job["out_dir"] else None
        if found is None and job["resume_checkpoint"] and (Path(job["resume_checkpoint"]) / "state.pt").is_file():
            found = Path(job["resume_checkpoint"])
        return found

    def delete(self, job_id: int, files: bool = True) -> None:
        """Delete a job, its metrics and evaluations, and (``files``) its output directory.

        A queued or running job is refused: cancel it first (and wait for it to stop).
        """
        with self.db.write() as s:
            job = self._job(s, job_id)
            job_id = job.id
            if job.status in ACTIVE:
                raise JobError(f"job {job_id} is {job.status}: cancel it first")
            out_dir = job.out_dir
            s.execute(sa.update(Job).where(Job.resumes_job_id == job.id).values(resumes_job_id=None))
            s.execute(sa.update(Job).where(Job.target_job_id == job.id).values(target_job_id=None))
            s.execute(sa.delete(MetricPoint).where(MetricPoint.job_id == job.id))
            ev_ids = s.scalars(sa.select(Evaluation.id).where(Evaluation.job_id == job.id)).all()
            if ev_ids:
                s.execute(sa.delete(EvalSample).where(EvalSample.evaluation_id.in_(ev_ids)))
                s.execute(sa.delete(Evaluation).where(Evaluation.id.in_(ev_ids)))
            s.execute(sa.update(Evaluation).where(Evaluation.run_job_id == job.id).values(run_job_id=None))
            s.delete(job)
        if files and out_dir:
            path = Path(out_dir)
            # only ever remove a job directory: <...>/runs/<id>
            if (path.name == str(job_id) or path.name.startswith(f"{job_id}-")) and path.parent.name == "runs" \
                    and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------ worker's side
    def claim(self, job_id: int, worker: str | None = None, worker_id: int | None = None) -> bool:
        """Atomically move a queued job to running for ``worker`` (registered as ``worker_id``); False if
        someone else got it. A worker claims with ``claim_next``, which also matches its devices."""
        self._require_system("claiming a job")
        with self.db.write() as s:
            res = s.execute(sa.update(Job).where(Job.id == int(job_id), Job.status == "queued")
                            .values(status="running", started_at=utcnow(), heartbeat_at=utcnow(),
                                    worker=worker or worker_tag(), worker_id=worker_id, phase="starting", pid=None,
                                    exit_code=None))
            return res.rowcount == 1

    def queued_ids(self, limit: int = 10) -> list[int]:
        self._require_system("listing the queue")
        with self.db.read() as s:
            return list(s.scalars(sa.select(Job.id).where(Job.status == "queued").order_by(Job.id).limit(limit)))

    def set_pid(self, job_id: int, pid: int) -> None:
        self._require_system("recording a job's process")
        with self.db.write() as s:
            s.execute(sa.update(Job).where(Job.id == int(job_id)).values(pid=pid))

    def finish(self, job_id: int, status: str, *, only_if: Iterable[str] | None = ("running",),
               **values: Any) -> bool:
        """Set a final status (and columns) unless the job already left ``only_if``; True if it was set."""
        self._require_system("ending a job")
        assert status in FINISHED, status
        q = sa.update(Job).where(Job.id == int(job_id))
        if only_if is not None:
            q = q.where(Job.status.in_(list(only_if)))
        with self.db.write() as s:
            return s.execute(q.values(status=status, finished_at=utcnow(), eta_s=None, **values)).rowcount == 1

    def set_fields(self, job_id: int, **values: Any) -> None:
        self._require_system("updating a job")
        with self.db.write() as s:
            s.execute(sa.update(Job).where(Job.id == int(job_id)).values(**values))

    def running_jobs(self) -> list[dict[str, Any]]:
        return self.list_jobs(status="running")
