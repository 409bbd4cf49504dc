"""The jobs service: the one API the UI and the CLI use to submit, watch, stop, resume and clean up jobs.

Every method returns plain data (ints, dicts, lists of dicts, paths), never ORM objects, so callers
need no session. ``core`` (and with it torch) is imported only by the methods that need it, so
listing jobs stays fast.

A job's files live in its output directory, ``$WORKBENCH_HOME/runs/<id>/``: ``spec.json``,
``train.log`` (the child's stdout and stderr), ``metrics.jsonl``, ``checkpoints/step-<N>/``,
``adapter/`` and ``exports/``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator

import sqlalchemy as sa

from core.deployment import SYSTEM, Actor, Deployment, Limits
from core.deployment import current as current_deployment

from .compare import ComparisonAPI
from .db import Database, workbench_home
from .schema import ACTIVE, FINISHED, KINDS, LOCAL_OWNER, EvalSample, Evaluation, Job, MetricPoint, Upload, utcnow
from .studies import StudiesAPI

LOG_FILE = "train.log"
MAX_LOG_LINES = 100_000
ARTIFACT_LABELS = {"adapter": "adapter (workbench format)", "peft": "LoRA in PEFT format",
                   "merged": "merged full model"}
ARTIFACT_KINDS = tuple(ARTIFACT_LABELS)
CHECK_ROWS = 50  # rows of a data file read at submit to catch a wrong file or column mapping early


class JobError(RuntimeError):
    """An operation the job's state does not allow (delete a running job, resume without checkpoint...)."""


class QuotaError(JobError):
    """A limit of this deployment (``core.deployment.Limits``) would be exceeded; the message names it."""


class JobNotFound(JobError, KeyError):
    """No such job, or one the caller may not see (the same message: ids of others' jobs are no oracle)."""

    def __init__(self, job_id: Any, what: str = "job"):
        super().__init__(f"no {what} {str(job_id)[:40]}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def host_name() -> str:
    return socket.gethostname()


def worker_tag(pid: int | None = None) -> str:
    """``host:pid`` naming a worker process."""
    return f"{host_name()}:{pid or os.getpid()}"


def _iso(value: dt.datetime | None) -> str | None:
    return value.replace(tzinfo=dt.timezone.utc).isoformat() if value else None


def job_dict(job: Job) -> dict[str, Any]:
    """A job as plain data (what ``get``/``list_jobs``/``show --json`` give)."""
    started, finished = job.started_at, job.finished_at
    duration = None
    if started:
        duration = ((finished or utcnow()) - started).total_seconds()
    total = job.total_steps
    return {
        "id": job.id, "name": job.name, "kind": job.kind, "status": job.status,
        "created_at": _iso(job.created_at), "started_at": _iso(started), "finished_at": _iso(finished),
        "duration_s": duration,
        "progress": {"step": job.step or 0, "total": total, "epoch": job.epoch, "eta_s": job.eta_s,
                     "fraction": (job.step or 0) / total if total else None, "phase": job.phase,
                     "loss": job.last_loss, "heartbeat_at": _iso(job.heartbeat_at)},
        "best_val_loss": job.best_val_loss,
        "error": job.error, "traceback": job.traceback, "exit_code": job.exit_code,
        "pid": job.pid, "worker": job.worker,
        "out_dir": job.out_dir, "resumes_job_id": job.resumes_job_id, "resume_checkpoint": job.resume_checkpoint,
        "target_job_id": job.target_job_id, "cancel_requested": bool(job.cancel_requested),
        "study_id": job.study_id, "info": job.info, "result": job.result, "spec": job.spec, "owner": job.owner,
    }


def metric_dict(p: MetricPoint) -> dict[str, Any]:
    """A metric point; ``loss`` on training steps, ``val_loss`` on validations (the shape app.charts reads)."""
    return {"id": p.id, "job_id": p.job_id, "type": "step" if p.kind == "train" else "eval", "step": p.step,
            "epoch": p.epoch, "loss": p.train_loss, "val_loss": p.val_loss, "lr": p.lr, "grad_norm": p.grad_norm,
            "tokens_per_s": p.tokens_per_s, "elapsed_s": p.elapsed_s, "wall_time": p.wall_time}


def evaluation_dict(e: Evaluation) -> dict[str, Any]:
    return {"id": e.id, "job_id": e.job_id, "run_job_id": e.run_job_id, "base_model": e.base_model,
            "benchmark": e.benchmark, "accuracy": e.accuracy, "correct": e.correct, "total": e.total,
            "seconds": e.seconds, "settings": e.settings, "created_at": _iso(e.created_at), "owner": e.owner}


def sample_dict(s: EvalSample) -> dict[str, Any]:
    return {"index": s.index, "question": s.question, "gold": s.gold, "response": s.response,
            "extracted": s.extracted, "correct": bool(s.correct)}


INT64_MAX = 2**63 - 1


def row_id(value: Any, what: str = "job") -> int:
    """An id from a caller (a widget, the HTTP API, the CLI): a positive integer, else ``JobNotFound``."""
    if isinstance(value, bool):
        raise JobNotFound(value, what)
    try:
        number = int(value) if isinstance(value, (int, str)) else int(value) if float(value).is_integer() else None
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not 0 < number <= INT64_MAX:
        raise JobNotFound(value, what)
    return number


def checkpoint_step(path: str | Path | None) -> int | None:
    """N of a ``.../step-N`` checkpoint directory."""
    if not path:
        return None
    m = re.fullmatch(r"step-(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def _as_text(value: Any, field: str) -> str:
    from core.config import ConfigError

    if not isinstance(value, str) or "\x00" in value or len(value) > 4096:
        raise ConfigError(field, f"expected a name or path (got {str(value)[:40]!r})")
    return value


def _config_layers(model: str) -> int | None:
    """The decoder depth a checkpoint folder's ``config.json`` states (None when not a readable folder)."""
    path = Path(model) / "config.json"
    try:
        if path.stat().st_size > 4 * 2**20:
            return None
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class JobService(ComparisonAPI, StudiesAPI):
    """Jobs in one database (``url``; default ``$WORKBENCH_DB_URL`` or ``$WORKBENCH_HOME/workbench.db``).

    ``home`` is where job directories are made (default ``$WORKBENCH_HOME``).
    """

    def __init__(self, url: str | None = None, home: str | Path | None = None,
                 deployment: Deployment | None = None, actor: Actor = SYSTEM):
        self.db = Database(url)
        self.url = self.db.url
        if home is None:
            home = workbench_home()
        self.home = Path(home).expanduser().resolve()
        self.deployment = deployment or current_deployment()
        self.actor = actor

    def scoped(self, actor: Actor) -> "JobService":
        """This service acting for ``actor``: same database, every call checked against that owner.

        The UI and the HTTP API only ever hold scoped services; the worker, the job child and the
        server's own CLI use the unscoped one (``SYSTEM``, an admin).
        """
        view = copy.copy(self)
        view.actor = actor
        return view

    # ----------------------------------------------------------------------------------- ownership
    @property
    def owner(self) -> str:
        """The owner recorded on what this actor creates (the server's own CLI creates ``local`` jobs)."""
        return LOCAL_OWNER if self.actor == SYSTEM else self.actor.name

    def may_see(self, owner: str | None) -> bool:
        return self.actor.admin or owner == self.actor.name

    def _mine(self, query: Any, column: Any) -> Any:
        """``query`` restricted to rows this actor may see."""
        return query if self.actor.admin else query.where(column == self.actor.name)

    def _job(self, s: Any, job_id: Any) -> Job:
        """The job row, if it exists and this actor may see it; ``JobNotFound`` otherwise (either way)."""
        job = s.get(Job, row_id(job_id))
        if job is None or not self.may_see(job.owner):
            raise JobNotFound(job_id)
        return job

    def _require_system(self, what: str) -> None:
        """Worker-side operations (claim, progress, final status, results) are not for visitors."""
        if self.actor != SYSTEM:
            raise PermissionError(f"{what} is done by the workbench's worker, not through the UI or API")

    @property
    def limits(self) -> Limits:
        return self.deployment.limits

    def _check_quota(self, new_jobs: int = 1, owner: str | None = None) -> None:
        """Room for ``new_jobs`` more queued jobs of ``owner`` and on the server (admins are not limited)."""
        if self.actor.admin:
            return
        owner = owner or self.owner
        with self.db.read() as s:
            total = s.scalar(sa.select(sa.func.count(Job.id)).where(Job.status.in_(ACTIVE))) or 0
            mine = s.scalar(sa.select(sa.func.count(Job.id)).where(Job.status.in_(ACTIVE), Job.owner == owner)) or 0
        if mine + new_jobs > self.limits.active_jobs_per_owner:
            raise QuotaError(f"you have {mine} queued or running jobs; this workbench allows "
                             f"{self.limits.active_jobs_per_owner} at a time: wait for one to finish or cancel one")
        if total + new_jobs > self.limits.active_jobs_total:
            raise QuotaError(f"the workbench is busy ({total} jobs queued or running, the limit is "
                             f"{self.limits.active_jobs_total}): try again when some have finished")

    def close(self) -> None:
        self.db.dispose()

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    # ------------------------------------------------------------------------------------- submit
    def check_spec(self, spec: Any, kind: str = "train") -> Any:
        """Parse and validate a spec (``JobSpec``, dict or JSON text); return the ``JobSpec``.

        Raises ``core.config.ConfigError`` naming the field at fault. Beyond ``JobSpec.validate()``:
        a data file must exist, and the model must be a catalogue name, an existing checkpoint
        directory or a plausible hub id. Local paths are made absolute (the child runs elsewhere).
        """
        from core.config import ConfigError, JobSpec

        if kind not in KINDS:
            raise ConfigError("kind", f"unknown job kind {kind!r}; use {', '.join(KINDS)}")
        if isinstance(spec, str):
            spec = JobSpec.from_json(spec)
        elif isinstance(spec, dict):
            spec = JobSpec.from_dict(spec)
        elif not isinstance(spec, JobSpec):
            raise ConfigError("spec", f"expected a JobSpec, a dict or JSON text, not {type(spec).__name__}")
        else:
            spec = JobSpec.from_dict(spec.to_dict())  # a private copy
        spec.validate()
        self._check_remote_code(spec)
        self._check_model(spec)
        if kind == "train":
            self._check_data(spec)
            self._check_size(spec)
        elif kind == "evaluate" and not spec.eval.benchmarks:
            raise ConfigError("eval.benchmarks", "name at least one benchmark to evaluate")
        self._check_benchmarks(spec)
        return spec

    def _check_remote_code(self, spec: Any) -> None:
        """A model's own Python code runs only in a job child, only where the server allows it, and in
        team mode only for admins; never in public mode."""
        from core.config import ConfigError

        if not spec.model.trust_remote_code:
            return
        d = self.deployment
        if d.public:
            raise ConfigError("model.trust_remote_code", "a model's own code never runs on this public workbench")
        if not d.allow_remote_code:
            raise ConfigError("model.trust_remote_code", "this workbench does not run a model's own code "
                                                         "(the server sets WORKBENCH_ALLOW_REMOTE_CODE=1 to allow it)")
        if d.mode == "team" and not self.actor.admin:
            raise ConfigError("model.trust_remote_code", "only an admin may run a model's own code on this workbench")

    def _check_size(self, spec: Any) -> None:
        """The deployment's per-job limits (admins are not limited)."""
        from core.config import ConfigError

        if self.actor.admin:
            return
        lim, t = self.limits, spec.train
        if t.max_steps > lim.max_steps:
            raise ConfigError("train.max_steps", f"this workbench allows at most {lim.max_steps:,} steps per job")
        if t.max_steps == 0 and t.epochs > lim.max_epochs:
            raise ConfigError("train.epochs", f"this workbench allows at most {lim.max_epochs:g} epochs per job "
                                              f"(or set train.max_steps <= {lim.max_steps:,})")

    def _check_benchmarks(self, spec: Any) -> None:
        """Every benchmark named exists (a registry name or a data file the sources rules allow), and the
        deployment's example limit holds."""
        from core.config import ConfigError
        from core.benchmarks import benchmark_info

        for i, name in enumerate(spec.eval.benchmarks):
            if benchmark_info(name) is not None:
                continue
            try:
                self._resolve_file(name, f"eval.benchmarks[{i}]")
            except ConfigError:
                raise ConfigError("eval.benchmarks", f"unknown benchmark {str(name)[:80]!r}: name one of the "
                                                     "registry's benchmarks or a JSON/JSONL/CSV file") from None
        cap = self.limits.eval_examples
        if cap and spec.eval.benchmarks and not self.actor.admin and not 0 < spec.eval.limit <= cap:
            raise ConfigError("eval.limit", f"this workbench evaluates at most {cap:,} examples per benchmark: "
                                            f"set eval.limit between 1 and {cap:,}")

    def _check_model(self, spec: Any) -> None:
        """The model is one this deployment may load (``core.sources``); a local folder is recorded by
        its real path (the child runs elsewhere), and its layer count bounds ``adapter.layers``."""
        from core.sources import check_job_remote_code, resolve_model

        source = resolve_model(_as_text(spec.model.name, "model.name"), self.deployment)
        check_job_remote_code(source, spec.model, self.deployment)  # the job could run it: else say which switch
        spec.model.name = source.location
        layers = _config_layers(spec.model.name)
        if layers is not None:
            from core.config import ConfigError, parse_layers

            try:
                parse_layers(spec.adapter.layers, layers)
            except ConfigError as err:
                raise err.within("adapter") from None

    def _check_data(self, spec: Any) -> None:
        """The data source is one this actor may read, and its first rows are valid training rows."""
        from core.config import ConfigError
        from core.data import load_records

        spec.data.source = self.resolve_data(spec.data.source)
        if spec.data.source.startswith("builtin:") or Path(spec.data.source).suffix == "":
            return  # built-in (checked in the repository's tests) or a hub dataset (read by the job)
        try:
            load_records(spec.data.source, spec.data.columns, limit=CHECK_ROWS, deployment=self.deployment,
                         uploads_dir=self.uploads_dir)
        except ConfigError as err:
            raise ConfigError("data.source", err.message) from None

    def resolve_model(self, name: Any, field: str = "model.name") -> str:
        """What a model name stands for under this deployment's rules: a catalogue name, a hub id, or a
        checkpoint folder's real path. ``ConfigError`` on ``field`` otherwise (in public and team mode
        one message for missing and not allowed)."""
        from core.sources import resolve_model

        source = resolve_model(_as_text(name, field), self.deployment, field=field)
        return source.location

    def resolve_data(self, source: Any, field: str = "data.source", kind: str | None = None) -> str:
        """What a data source stands for under this deployment's rules, for this actor: ``builtin:*``, a hub
        id, or a file's real path; an upload only if it is the actor's own. ``kind`` restricts it to one
        kind (the UI's hub-id field passes ``"hub"``, so a local path typed there is refused)."""
        from core.sources import resolve_data

        found = resolve_data(_as_text(source, field), self.deployment, field=field, uploads_dir=self.uploads_dir,
                             kind=kind)
        if found.kind == "upload" and not self.actor.admin and self.upload_name(found.location) is None:
            from core.sources import SourceError

            raise SourceError(field, f"{found.display_name!r} is not found or not allowed here: upload it again")
        return found.name if found.kind in ("builtin", "hub") else found.location

    def _resolve_file(self, name: Any, field: str) -> str:
        """A benchmark given as a data file or hub id (not a registry name)."""
        return self.resolve_data(name, field=field)

    def submit(self, spec: Any, kind: str = "train", *, name: str | None = None,
               target_job_id: int | None = None, study_id: int | None = None) -> int:
        """Validate and queue a job; return its id. Invalid: ``ConfigError`` and nothing written.

        ``kind="evaluate"`` runs ``spec.eval.benchmarks`` on ``spec.model`` with the adapter of
        ``target_job_id`` (or on the bare base model when it is None).
        """
        if kind == "export":
            raise JobError("export jobs are queued with export(job_id, artifact)")
        spec = self.check_spec(spec, kind)
        if target_job_id is not None:
            target = self.get(target_job_id)
            if kind != "evaluate":
                from core.config import ConfigError

                raise ConfigError("target_job_id", "only evaluate jobs take a target job")
            if target["kind"] != "train":
                raise JobError(f"job {target_job_id} is not a training job")
        self._check_quota()
        return self._insert(spec, kind, name=name, target_job_id=target_job_id, study_id=study_id)

    def submit_evaluation(self, benchmarks: Iterable[str], job_id: int | None = None, model: str | None = None,
                          settings: Any = None, name: str | None = None) -> int:
        """Queue an evaluation of a training job's adapter (``job_id``) or of a base model (``model``)."""
        from core.config import EvalSettings, JobSpec

        if job_id is not None:
            job_id = row_id(job_id)
            spec = JobSpec.from_dict(self.get(job_id)["spec"])
            if model:
                spec.model.name = model
        else:
            spec = JobSpec()
            if model:
                spec.model.name = model
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
                study_id: int | None = None, owner: str | None = None, info: dict | None = None) -> int:
        with self.db.write() as s:
            job = Job(name=(name or spec.name or f"{kind} {spec.adapter.method}")[:200], kind=kind,
                      status="queued", spec=spec.to_dict(), resumes_job_id=resumes_job_id,
                      resume_checkpoint=resume_checkpoint, target_job_id=target_job_id, study_id=study_id,
                      step=0, cancel_requested=False, owner=owner or self.owner, info=info)
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
            return job_dict(self._job(s, job_id))

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
            return [job_dict(j) for j in s.scalars(q)]

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
        """The end of the job's log (its child's stdout and stderr); '' before it starts."""
        path = self.log_path(job_id)
        if not path.is_file():
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            if not tail_lines:
                return f.read()
            return "".join(deque(f, maxlen=max(1, min(int(tail_lines), MAX_LOG_LINES))))

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
                            resume_checkpoint=str(checkpoint), study_id=job["study_id"], owner=job["owner"])

    def resume_point(self, job_id: int) -> Path | None:
        """The checkpoint ``resume`` would continue from: the job's latest, else the one it started from."""
        from core.train import latest_checkpoint

        job = self.get(job_id)
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

    # ------------------------------------------------------------------------------------ artifacts
    def artifact(self, job_id: int, kind: str = "adapter") -> Path | None:
        """The zip of a job's adapter in form ``kind`` if an export job has built it since the adapter
        was last written; None otherwise (then ``export`` queues one)."""
        target, adapter = self._artifact_paths(self.get(job_id), kind)
        if not (adapter / "adapter_config.json").is_file() or not target.is_file():
            return None
        newest = max(p.stat().st_mtime for p in adapter.iterdir())
        return target if target.stat().st_mtime >= newest else None

    def export(self, job_id: int, kind: str = "adapter") -> int:
        """Queue an export job building ``kind`` of a training job's adapter; return its id (or the id of
        the export of the same artifact already queued or running). The web process never exports: a
        merged model of a large base takes minutes and gigabytes.

        ``adapter``: the workbench adapter directory as trained (``core.load_adapter`` reads it);
        ``peft``: LoRA in the Hugging Face PEFT layout (``core.export_peft``);
        ``merged``: a full model with the LoRA update folded into its weights (``core.export_merged``).
        """
        from core.config import JobSpec

        job = self.get(job_id)
        self._artifact_paths(job, kind)
        if job["kind"] != "train":
            raise JobError(f"job {job['id']} is an {job['kind']} job; only training jobs have adapters")
        if not (Path(job["out_dir"]) / "adapter" / "adapter_config.json").is_file():
            raise JobError(f"job {job['id']} has no adapter yet (status {job['status']})")
        if kind != "adapter":
            from core import methods

            method = methods.get(job["spec"]["adapter"]["method"])
            if kind not in method.exports:
                able = ", ".join(m.label for m in methods.all() if kind in m.exports)
                raise JobError(f"a {method.label} adapter has no {ARTIFACT_LABELS[kind]} export (methods that "
                               f"have: {able}); job {job['id']}: download the adapter instead")
        with self.db.read() as s:
            pending = s.scalars(sa.select(Job).where(Job.kind == "export", Job.target_job_id == job["id"],
                                                     Job.status.in_(ACTIVE))).all()
            for p in pending:
                if (p.info or {}).get("artifact") == kind:
                    return p.id
        self._check_quota(owner=job["owner"])
        spec = JobSpec.from_dict(job["spec"])
        return self._insert(spec, "export", name=f"export job {job['id']}: {ARTIFACT_LABELS[kind]}",
                            target_job_id=job["id"], owner=job["owner"], info={"artifact": kind})

    @staticmethod
    def _artifact_paths(job: dict[str, Any], kind: str) -> tuple[Path, Path]:
        """(the zip ``kind`` of ``job`` is built into, the job's adapter directory)."""
        if kind not in ARTIFACT_KINDS:
            raise JobError(f"unknown artifact {str(kind)[:40]!r}; use {', '.join(ARTIFACT_KINDS)}")
        out = Path(job["out_dir"])
        return out / "exports" / f"job{job['id']}-{kind}.zip", out / "adapter"

    def build_artifact(self, job_id: int, kind: str) -> Path:
        """Build the zip ``kind`` of a job's adapter (run by an export job's child); return its path."""
        self._require_system("building an export")
        job = self.get(job_id)
        target, adapter = self._artifact_paths(job, kind)
        if not (adapter / "adapter_config.json").is_file():
            raise JobError(f"job {job_id} has no adapter (status {job['status']})")
        exports = target.parent
        exports.mkdir(parents=True, exist_ok=True)
        if kind == "adapter":
            return _zip_dir(adapter, target)
        import core
        from core.config import JobSpec
        from core.models import load_model

        settings = JobSpec.from_dict(job["spec"]).model
        settings.device = "cpu"
        loaded = load_model(settings)
        core.load_adapter(loaded.model, adapter, tokenizer=loaded.tokenizer)
        exporter = core.export_peft if kind == "peft" else core.export_merged
        with tempfile.TemporaryDirectory(dir=exports) as tmp:
            folder = Path(tmp) / f"job{job_id}-{kind}"
            exporter(loaded.model, folder)
            if kind == "merged" and not any(folder.glob("tokenizer*")):
                loaded.tokenizer.save_pretrained(folder)
            return _zip_dir(folder, target)

    # -------------------------------------------------------------------------------------- uploads
    @property
    def uploads_dir(self) -> Path:
        return self.home / "uploads"

    def store_upload(self, file_path: str | Path, name: str | None = None) -> dict[str, Any]:
        """Keep an uploaded data file: checked (type, size, quota), stored once under a content-hash name
        (the browser's name is never used as a path), recorded for its owner. Returns ``{"path", "name",
        "bytes"}``; the rows are read by the caller (``core.data``), which calls ``forget_upload`` when
        they are not valid."""
        src = Path(file_path)
        name = Path(str(name or src.name)).name[:200] or "upload"
        suffix = Path(name).suffix.lower() or src.suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise JobError(f"{name}: unsupported file type {suffix or '(none)'!r}; upload "
                           f"{', '.join(UPLOAD_SUFFIXES)}")
        if not src.is_file():
            raise JobError(f"{name}: the upload did not arrive; try again")
        size = src.stat().st_size
        if size > self.limits.upload_file_bytes:
            raise QuotaError(f"{name} is {_size(size)}; this workbench takes files up to "
                             f"{_size(self.limits.upload_file_bytes)}")
        digest = _sha256(src)
        with self.db.read() as s:
            used = s.scalar(sa.select(sa.func.coalesce(sa.func.sum(Upload.bytes), 0)).where(
                Upload.owner == self.owner)) or 0
            known = s.scalar(sa.select(Upload).where(Upload.owner == self.owner, Upload.digest == digest))
            known_path = known.path if known is not None else None
        target = self.uploads_dir / f"{digest[:32]}{suffix}"
        if known_path is None and not self.actor.admin and used + size > self.limits.upload_bytes_per_owner:
            raise QuotaError(f"your uploads take {_size(used)} and this one {_size(size)}; this workbench keeps "
                             f"{_size(self.limits.upload_bytes_per_owner)} per user")
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        if known_path is None:
            with self.db.write() as s:
                s.add(Upload(owner=self.owner, digest=digest, name=name, path=str(target), bytes=size))
        target.with_name(target.name + ".name").write_text(name, encoding="utf-8")
        return {"path": str(target), "name": name, "bytes": size}

    def forget_upload(self, path: str | Path) -> None:
        """Drop this actor's record of an upload (one whose rows turned out unreadable), and the file
        when no other owner uploaded the same content."""
        with self.db.write() as s:
            s.execute(sa.delete(Upload).where(Upload.owner == self.owner, Upload.path == str(path)))
            others = s.scalar(sa.select(sa.func.count(Upload.id)).where(Upload.path == str(path)))
        if not others:
            Path(path).unlink(missing_ok=True)
            Path(f"{path}.name").unlink(missing_ok=True)

    def upload_name(self, path: str | Path) -> str | None:
        """The name an upload of this actor was uploaded under (None: not one of theirs)."""
        with self.db.read() as s:
            q = self._mine(sa.select(Upload.name).where(Upload.path == str(path)), Upload.owner)
            return s.scalars(q).first()

    # ----------------------------------------------------------------------------------------- chat
    @contextlib.contextmanager
    def generation_slot(self) -> Iterator[None]:
        """Held while this actor's chat or arena answer is generated in the web process: in public mode
        one at a time per visitor (a second one gets ``QuotaError``)."""
        if not self.deployment.public:
            yield
            return
        with _GENERATING_LOCK:
            if self.actor.name in _GENERATING:
                raise QuotaError("one answer at a time: wait for the current answer to finish")
            _GENERATING.add(self.actor.name)
        try:
            yield
        finally:
            with _GENERATING_LOCK:
                _GENERATING.discard(self.actor.name)

    # ---------------------------------------------------------------------------------- evaluations
    def record_evaluation(self, *, benchmark: str, base_model: str, accuracy: float, correct: int, total: int,
                          seconds: float | None = None, samples: Iterable[dict[str, Any]] = (),
                          job_id: int | None = None, run_job_id: int | None = None,
                          settings: dict[str, Any] | None = None) -> int:
        """Store a benchmark result and its per-example predictions; return the evaluation id.

        The evaluation belongs to the owner of the job that ran it (worker side only)."""
        self._require_system("recording an evaluation")
        with self.db.write() as s:
            runner = s.get(Job, run_job_id) if run_job_id is not None else None
            ev = Evaluation(job_id=job_id, run_job_id=run_job_id, base_model=base_model, benchmark=benchmark,
                            accuracy=float(accuracy), correct=int(correct), total=int(total),
                            seconds=None if seconds is None else float(seconds), settings=settings,
                            owner=runner.owner if runner is not None else LOCAL_OWNER)
            s.add(ev)
            s.flush()
            rows = [{"evaluation_id": ev.id, "index": int(x.get("index", i)), "question": str(x.get("question", "")),
                     "gold": _text(x.get("gold")), "response": _text(x.get("response")),
                     "extracted": _text(x.get("extracted")), "correct": bool(x.get("correct"))}
                    for i, x in enumerate(samples)]
            if rows:
                s.execute(sa.insert(EvalSample), rows)
            return ev.id

    def list_evaluations(self, job_id: int | None = None, base_only: bool = False, benchmark: str | None = None,
                         base_model: str | None = None) -> list[dict[str, Any]]:
        """Evaluations, newest first; of one job, of base models only, of a benchmark or base model."""
        q = self._mine(sa.select(Evaluation).order_by(Evaluation.id.desc()), Evaluation.owner)
        if job_id is not None:
            q = q.where(Evaluation.job_id == row_id(job_id))
        if base_only:
            q = q.where(Evaluation.job_id.is_(None))
        if benchmark:
            q = q.where(Evaluation.benchmark == benchmark)
        if base_model:
            q = q.where(Evaluation.base_model == base_model)
        with self.db.read() as s:
            return [evaluation_dict(e) for e in s.scalars(q)]

    def get_evaluation(self, evaluation_id: int) -> dict[str, Any]:
        with self.db.read() as s:
            return evaluation_dict(self._evaluation(s, evaluation_id))

    def _evaluation(self, s: Any, evaluation_id: Any) -> Evaluation:
        ev = s.get(Evaluation, row_id(evaluation_id, "evaluation"))
        if ev is None or not self.may_see(ev.owner):
            raise JobNotFound(evaluation_id, "evaluation")
        return ev

    def eval_samples(self, evaluation_id: int, only: str | None = None, offset: int = 0,
                     limit: int | None = None) -> list[dict[str, Any]]:
        """Per-example predictions of an evaluation, by index; ``only`` = "correct" or "wrong"."""
        with self.db.read() as s:
            evaluation_id = self._evaluation(s, evaluation_id).id
        q = sa.select(EvalSample).where(EvalSample.evaluation_id == evaluation_id).order_by(EvalSample.index)
        if only == "correct":
            q = q.where(EvalSample.correct.is_(True))
        elif only == "wrong":
            q = q.where(EvalSample.correct.is_(False))
        q = q.offset(offset)
        if limit:
            q = q.limit(limit)
        with self.db.read() as s:
            return [sample_dict(x) for x in s.scalars(q)]

    def delete_evaluation(self, evaluation_id: int) -> None:
        with self.db.write() as s:
            evaluation_id = self._evaluation(s, evaluation_id).id
            s.execute(sa.delete(EvalSample).where(EvalSample.evaluation_id == evaluation_id))
            s.execute(sa.delete(Evaluation).where(Evaluation.id == evaluation_id))

    # ------------------------------------------------------------------------------ worker's side
    def claim(self, job_id: int, worker: str | None = None) -> bool:
        """Atomically move a queued job to running for ``worker``; False if someone else got it."""
        self._require_system("claiming a job")
        with self.db.write() as s:
            res = s.execute(sa.update(Job).where(Job.id == int(job_id), Job.status == "queued")
                            .values(status="running", started_at=utcnow(), heartbeat_at=utcnow(),
                                    worker=worker or worker_tag(), phase="starting", pid=None, exit_code=None))
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


_GENERATING: set[str] = set()
_GENERATING_LOCK = threading.Lock()
UPLOAD_SUFFIXES = (".json", ".jsonl", ".csv")


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _zip_dir(folder: Path, target: Path) -> Path:
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(folder.name) / path.relative_to(folder))
    os.replace(tmp, target)
    return target
