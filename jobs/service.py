"""The jobs service: the one API the UI and the CLI use to submit, watch, stop, resume and clean up jobs.

Every method returns plain data (ints, dicts, lists of dicts, paths), never ORM objects, so callers
need no session. ``core`` (and with it torch) is imported only by the methods that need it, so
listing jobs stays fast.

A job's files live in its output directory, ``$WORKBENCH_HOME/runs/<id>/``: ``spec.json``,
``train.log`` (the child's stdout and stderr), ``metrics.jsonl``, ``checkpoints/step-<N>/``,
``adapter/`` and ``exports/``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from collections import deque
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa

from .compare import ComparisonAPI
from .db import Database, workbench_home
from .schema import ACTIVE, FINISHED, KINDS, EvalSample, Evaluation, Job, MetricPoint, utcnow
from .studies import StudiesAPI

LOG_FILE = "train.log"
ARTIFACT_KINDS = ("adapter", "peft", "merged")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv")


class JobError(RuntimeError):
    """An operation the job's state does not allow (delete a running job, resume without checkpoint...)."""


class JobNotFound(JobError, KeyError):
    def __init__(self, job_id: Any):
        super().__init__(f"no job {job_id}")

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
        "study_id": job.study_id, "info": job.info, "result": job.result, "spec": job.spec,
    }


def metric_dict(p: MetricPoint) -> dict[str, Any]:
    """A metric point; ``loss`` on training steps, ``val_loss`` on validations (the shape app.charts reads)."""
    return {"id": p.id, "job_id": p.job_id, "type": "step" if p.kind == "train" else "eval", "step": p.step,
            "epoch": p.epoch, "loss": p.train_loss, "val_loss": p.val_loss, "lr": p.lr, "grad_norm": p.grad_norm,
            "tokens_per_s": p.tokens_per_s, "elapsed_s": p.elapsed_s, "wall_time": p.wall_time}


def evaluation_dict(e: Evaluation) -> dict[str, Any]:
    return {"id": e.id, "job_id": e.job_id, "run_job_id": e.run_job_id, "base_model": e.base_model,
            "benchmark": e.benchmark, "accuracy": e.accuracy, "correct": e.correct, "total": e.total,
            "seconds": e.seconds, "settings": e.settings, "created_at": _iso(e.created_at)}


def sample_dict(s: EvalSample) -> dict[str, Any]:
    return {"index": s.index, "question": s.question, "gold": s.gold, "response": s.response,
            "extracted": s.extracted, "correct": bool(s.correct)}


def checkpoint_step(path: str | Path | None) -> int | None:
    """N of a ``.../step-N`` checkpoint directory."""
    if not path:
        return None
    m = re.fullmatch(r"step-(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or \
        bool(re.match(r"^[A-Za-z]:", name))


class JobService(ComparisonAPI, StudiesAPI):
    """Jobs in one database (``url``; default ``$WORKBENCH_DB_URL`` or ``$WORKBENCH_HOME/workbench.db``).

    ``home`` is where job directories are made (default ``$WORKBENCH_HOME``).
    """

    def __init__(self, url: str | None = None, home: str | Path | None = None):
        self.db = Database(url)
        self.url = self.db.url
        if home is None:
            home = workbench_home()
        self.home = Path(home).expanduser().resolve()

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
        self._check_model(spec)
        if kind == "train":
            self._check_data(spec)
        elif not spec.eval.benchmarks:
            raise ConfigError("eval.benchmarks", "name at least one benchmark to evaluate")
        return spec

    @staticmethod
    def _check_model(spec: Any) -> None:
        from core.config import ConfigError
        from core.models import CATALOGUE

        name = str(spec.model.name).strip()
        if name in CATALOGUE:
            return
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError("model.name", f"{name!r} is a directory without config.json: give the folder "
                                                "of a Hugging Face checkpoint")
            spec.model.name = str(path.resolve())
            return
        if path.exists():
            raise ConfigError("model.name", f"{name!r} is a file, not a checkpoint directory")
        if _looks_like_path(name):
            raise ConfigError("model.name", f"no model directory at {name!r}")
        if not _HUB_ID.match(name):
            raise ConfigError("model.name", f"{name!r} is not a catalogue model ({', '.join(CATALOGUE)}), "
                                            "a local checkpoint directory or a hub id like 'owner/model'")

    @staticmethod
    def _check_data(spec: Any) -> None:
        from core.config import ConfigError

        source = str(spec.data.source).strip()
        if source.startswith("builtin:"):
            from core.data import BUILTIN_FILES

            if source not in BUILTIN_FILES:
                raise ConfigError("data.source", f"unknown built-in dataset {source!r}; known: "
                                                 f"{', '.join(BUILTIN_FILES)}")
            return
        path = Path(source).expanduser()
        if path.is_file():
            spec.data.source = str(path.resolve())
            return
        if path.exists():
            raise ConfigError("data.source", f"{source!r} is not a file")
        if path.suffix.lower() in _DATA_SUFFIXES or _looks_like_path(source):
            raise ConfigError("data.source", f"no such file: {source}")
        if not _HUB_ID.match(source):
            raise ConfigError("data.source", f"{source!r} is neither a file nor a hub dataset id")

    def submit(self, spec: Any, kind: str = "train", *, name: str | None = None,
               target_job_id: int | None = None, study_id: int | None = None) -> int:
        """Validate and queue a job; return its id. Invalid: ``ConfigError`` and nothing written.

        ``kind="evaluate"`` runs ``spec.eval.benchmarks`` on ``spec.model`` with the adapter of
        ``target_job_id`` (or on the bare base model when it is None).
        """
        spec = self.check_spec(spec, kind)
        if target_job_id is not None:
            target = self.get(target_job_id)
            if kind != "evaluate":
                from core.config import ConfigError

                raise ConfigError("target_job_id", "only evaluate jobs take a target job")
            if target["kind"] != "train":
                raise JobError(f"job {target_job_id} is not a training job")
        return self._insert(spec, kind, name=name, target_job_id=target_job_id, study_id=study_id)

    def submit_evaluation(self, benchmarks: Iterable[str], job_id: int | None = None, model: str | None = None,
                          settings: Any = None, name: str | None = None) -> int:
        """Queue an evaluation of a training job's adapter (``job_id``) or of a base model (``model``)."""
        from core.config import EvalSettings, JobSpec

        if job_id is not None:
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
                study_id: int | None = None) -> int:
        with self.db.write() as s:
            job = Job(name=(name or spec.name or f"{kind} {spec.adapter.method}")[:200], kind=kind,
                      status="queued", spec=spec.to_dict(), resumes_job_id=resumes_job_id,
                      resume_checkpoint=resume_checkpoint, target_job_id=target_job_id, study_id=study_id,
                      step=0, cancel_requested=False)
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
            job = s.get(Job, int(job_id))
            if job is None:
                raise JobNotFound(job_id)
            return job_dict(job)

    def list_jobs(self, status: str | Iterable[str] | None = None, kind: str | None = None,
                  limit: int | None = None, study_id: int | None = None) -> list[dict[str, Any]]:
        """Jobs, newest first; filter by status (one or several), kind, study."""
        q = sa.select(Job).order_by(Job.id.desc())
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
            job = s.get(Job, int(job_id))
            if job is None:
                raise JobNotFound(job_id)
            points = [metric_dict(p) for p in s.scalars(self._metric_query(job.id, since_step, None))]
            current, seen, bound = job, {job.id}, None
            while history and current.resumes_job_id is not None and current.resumes_job_id not in seen:
                upto = checkpoint_step(current.resume_checkpoint)
                if upto is not None:
                    bound = upto if bound is None else min(bound, upto)
                prev = s.get(Job, current.resumes_job_id)
                if prev is None:
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
            return "".join(deque(f, maxlen=tail_lines))

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
            job = s.get(Job, int(job_id))
            if job is None:
                raise JobNotFound(job_id)
            if job.status == "queued":
                job.status, job.finished_at, job.phase = "cancelled", utcnow(), None
            elif job.status == "running":
                job.cancel_requested = True
            return job.status

    def resume(self, job_id: int) -> int:
        """Queue a new job continuing ``job_id`` from its last checkpoint; return the new id."""
        job = self.get(job_id)
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
        return self._insert(spec, "train", name=job["name"], resumes_job_id=job["id"],
                            resume_checkpoint=str(checkpoint), study_id=job["study_id"])

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
            job = s.get(Job, int(job_id))
            if job is None:
                raise JobNotFound(job_id)
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
    def job_artifact(self, job_id: int, kind: str = "adapter") -> Path:
        """A zip of the job's adapter in one of three forms; returns its path (under ``out_dir/exports``).

        ``adapter``: the workbench adapter directory as trained (``core.load_adapter`` reads it);
        ``peft``: LoRA in the Hugging Face PEFT layout (``core.export_peft``);
        ``merged``: a full model with the LoRA update folded into its weights (``core.export_merged``).
        """
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"unknown artifact {kind!r}; use {', '.join(ARTIFACT_KINDS)}")
        job = self.get(job_id)
        out = Path(job["out_dir"])
        adapter = out / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise JobError(f"job {job_id} has no adapter yet (status {job['status']})")
        exports = out / "exports"
        exports.mkdir(parents=True, exist_ok=True)
        target = exports / f"job{job_id}-{kind}.zip"
        newest = max(p.stat().st_mtime for p in adapter.iterdir())
        if target.is_file() and target.stat().st_mtime >= newest:
            return target
        if kind == "adapter":
            return _zip_dir(adapter, target)
        import core
        from core.config import JobSpec

        spec = JobSpec.from_dict(job["spec"])
        if spec.adapter.method != "lora":
            raise JobError(f"{kind} export is for LoRA adapters; job {job_id} trained {spec.adapter.method}")
        exporter = getattr(core, "export_peft" if kind == "peft" else "export_merged", None)
        if exporter is None:
            raise NotImplementedError(f"{kind} export needs core.export_merged(model, directory), which this "
                                      "version of core does not provide yet")
        from core.models import load_model

        settings = JobSpec.from_dict(job["spec"]).model
        settings.device = "cpu"
        loaded = load_model(settings)
        core.load_adapter(loaded.model, adapter, tokenizer=loaded.tokenizer)
        with tempfile.TemporaryDirectory(dir=exports) as tmp:
            folder = Path(tmp) / f"job{job_id}-{kind}"
            exporter(loaded.model, folder)
            if kind == "merged" and not any(folder.glob("tokenizer*")):
                loaded.tokenizer.save_pretrained(folder)
            return _zip_dir(folder, target)

    # ---------------------------------------------------------------------------------- evaluations
    def record_evaluation(self, *, benchmark: str, base_model: str, accuracy: float, correct: int, total: int,
                          seconds: float | None = None, samples: Iterable[dict[str, Any]] = (),
                          job_id: int | None = None, run_job_id: int | None = None,
                          settings: dict[str, Any] | None = None) -> int:
        """Store a benchmark result and its per-example predictions; return the evaluation id."""
        with self.db.write() as s:
            ev = Evaluation(job_id=job_id, run_job_id=run_job_id, base_model=base_model, benchmark=benchmark,
                            accuracy=float(accuracy), correct=int(correct), total=int(total),
                            seconds=None if seconds is None else float(seconds), settings=settings)
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
        q = sa.select(Evaluation).order_by(Evaluation.id.desc())
        if job_id is not None:
            q = q.where(Evaluation.job_id == int(job_id))
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
            ev = s.get(Evaluation, int(evaluation_id))
            if ev is None:
                raise KeyError(f"no evaluation {evaluation_id}")
            return evaluation_dict(ev)

    def eval_samples(self, evaluation_id: int, only: str | None = None, offset: int = 0,
                     limit: int | None = None) -> list[dict[str, Any]]:
        """Per-example predictions of an evaluation, by index; ``only`` = "correct" or "wrong"."""
        q = sa.select(EvalSample).where(EvalSample.evaluation_id == int(evaluation_id)).order_by(EvalSample.index)
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
            s.execute(sa.delete(EvalSample).where(EvalSample.evaluation_id == int(evaluation_id)))
            s.execute(sa.delete(Evaluation).where(Evaluation.id == int(evaluation_id)))

    # ------------------------------------------------------------------------------ worker's side
    def claim(self, job_id: int, worker: str | None = None) -> bool:
        """Atomically move a queued job to running for ``worker``; False if someone else got it."""
        with self.db.write() as s:
            res = s.execute(sa.update(Job).where(Job.id == int(job_id), Job.status == "queued")
                            .values(status="running", started_at=utcnow(), heartbeat_at=utcnow(),
                                    worker=worker or worker_tag(), phase="starting", pid=None, exit_code=None))
            return res.rowcount == 1

    def queued_ids(self, limit: int = 10) -> list[int]:
        with self.db.read() as s:
            return list(s.scalars(sa.select(Job.id).where(Job.status == "queued").order_by(Job.id).limit(limit)))

    def set_pid(self, job_id: int, pid: int) -> None:
        with self.db.write() as s:
            s.execute(sa.update(Job).where(Job.id == int(job_id)).values(pid=pid))

    def finish(self, job_id: int, status: str, *, only_if: Iterable[str] | None = ("running",),
               **values: Any) -> bool:
        """Set a final status (and columns) unless the job already left ``only_if``; True if it was set."""
        assert status in FINISHED, status
        q = sa.update(Job).where(Job.id == int(job_id))
        if only_if is not None:
            q = q.where(Job.status.in_(list(only_if)))
        with self.db.write() as s:
            return s.execute(q.values(status=status, finished_at=utcnow(), eta_s=None, **values)).rowcount == 1

    def set_fields(self, job_id: int, **values: Any) -> None:
        with self.db.write() as s:
            s.execute(sa.update(Job).where(Job.id == int(job_id)).values(**values))

    def running_jobs(self) -> list[dict[str, Any]]:
        return self.list_jobs(status="running")


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
