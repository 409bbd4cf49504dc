"""The tables (SQLAlchemy 2 ORM): jobs, their metric points, evaluations and evaluated examples, and
the workers that run jobs.

These models are the head of the schema: a new database is created from them. Changing them means
appending a migration to ``jobs.db.MIGRATIONS`` too, so existing databases follow.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

KINDS = ("train", "evaluate", "export", "merge", "weight-search", "lmeval")  # every job kind (jobs.runners.RUNNERS)
LOCAL_OWNER = "local"  # the owner of every job of local mode, and of jobs made before owners existed
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
DEVICES = ("auto", "cpu", "cuda")  # a job's model.device: what it needs of a worker (jobs.devices)
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: sa.JSON}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = {"sqlite_autoincrement": True}  # ids are never reused, nor their run directories

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), default="")
    kind: Mapped[str] = mapped_column(sa.String(16), default="train")
    status: Mapped[str] = mapped_column(sa.String(16), default="queued", index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)
    # who runs it: the child's pid, "host:pid" of the worker that claimed it and that worker's row
    pid: Mapped[int | None] = mapped_column(sa.Integer)
    worker: Mapped[str | None] = mapped_column(sa.String(200))
    # WorkerRecord.id, no foreign key: rows of long-gone workers are pruned, the job keeps ``worker``
    worker_id: Mapped[int | None] = mapped_column(sa.Integer, index=True)
    # what it needs of a worker, from its spec at submit (a claim filters on these columns)
    device: Mapped[str] = mapped_column(sa.String(8), default="auto", server_default="auto")
    processes: Mapped[int] = mapped_column(sa.Integer, default=1, server_default="1")
    gpu_memory: Mapped[int | None] = mapped_column(sa.BigInteger)  # bytes each of its GPUs must have
    exit_code: Mapped[int | None] = mapped_column(sa.Integer)
    # progress
    phase: Mapped[str | None] = mapped_column(sa.String(100))
    step: Mapped[int] = mapped_column(sa.Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(sa.Integer)
    epoch: Mapped[float | None] = mapped_column(sa.Float)
    eta_s: Mapped[float | None] = mapped_column(sa.Float)
    last_loss: Mapped[float | None] = mapped_column(sa.Float)
    best_val_loss: Mapped[float | None] = mapped_column(sa.Float)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)
    # outcome
    error: Mapped[str | None] = mapped_column(sa.Text)
    traceback: Mapped[str | None] = mapped_column(sa.Text)
    info: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)    # on_start: trainable params, device...
    result: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)  # TrainResult fields
    out_dir: Mapped[str | None] = mapped_column(sa.Text)
    # lineage and control
    resumes_job_id: Mapped[int | None] = mapped_column(sa.ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    resume_checkpoint: Mapped[str | None] = mapped_column(sa.Text)
    target_job_id: Mapped[int | None] = mapped_column(sa.ForeignKey("jobs.id", ondelete="SET NULL"))  # evaluate
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    study_id: Mapped[int | None] = mapped_column(sa.Integer, index=True)  # for a later feature (studies)
    # who may see and act on it: core.deployment.Actor.name ("local", a login, "anon:<id>", "hf:<user>")
    owner: Mapped[str] = mapped_column(sa.String(200), default=LOCAL_OWNER, server_default=LOCAL_OWNER, index=True)

    metrics: Mapped[list["MetricPoint"]] = relationship(back_populates="job", cascade="all, delete-orphan",
                                                        passive_deletes=True)
    runner: Mapped["WorkerRecord | None"] = relationship(
        primaryjoin="foreign(Job.worker_id) == WorkerRecord.id", viewonly=True, lazy="joined")


class MetricPoint(Base):
    """One logged training step (``type='step'``: loss, lr, ...) or validation (``type='eval'``: val_loss);
    the columns are the names of ``core.metrics``, from the trainer's reports to the charts."""

    __tablename__ = "metric_points"
    __table_args__ = (sa.Index("ix_metric_points_job_step", "job_id", "step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(sa.String(8), default="step")
    step: Mapped[int] = mapped_column(sa.Integer)
    epoch: Mapped[float | None] = mapped_column(sa.Float)
    loss: Mapped[float | None] = mapped_column(sa.Float)
    val_loss: Mapped[float | None] = mapped_column(sa.Float)
    lr: Mapped[float | None] = mapped_column(sa.Float)
    grad_norm: Mapped[float | None] = mapped_column(sa.Float)
    tokens_per_s: Mapped[float | None] = mapped_column(sa.Float)
    elapsed_s: Mapped[float | None] = mapped_column(sa.Float)  # training time so far
    wall_time: Mapped[float] = mapped_column(sa.Float)         # unix time when logged

    job: Mapped[Job] = relationship(back_populates="metrics")


class Evaluation(Base):
    """A benchmark result of a job's adapter, or of a bare base model (``job_id`` NULL), under one protocol."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    run_job_id: Mapped[int | None] = mapped_column(sa.ForeignKey("jobs.id", ondelete="SET NULL"))  # who ran it
    base_model: Mapped[str] = mapped_column(sa.String(500))
    benchmark: Mapped[str] = mapped_column(sa.String(200), index=True)
    # how it was scored (jobs.evaluations.PROTOCOLS): part of a result's identity with model and benchmark
    protocol: Mapped[str] = mapped_column(sa.String(32), default="generate", server_default="generate")
    accuracy: Mapped[float] = mapped_column(sa.Float)
    accuracy_norm: Mapped[float | None] = mapped_column(sa.Float)  # lm-eval's acc_norm (loglikelihood, lm-eval)
    correct: Mapped[int] = mapped_column(sa.Integer)
    total: Mapped[int] = mapped_column(sa.Integer)
    seconds: Mapped[float | None] = mapped_column(sa.Float)
    settings: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    owner: Mapped[str] = mapped_column(sa.String(200), default=LOCAL_OWNER, server_default=LOCAL_OWNER, index=True)

    samples: Mapped[list["EvalSample"]] = relationship(back_populates="evaluation", cascade="all, delete-orphan",
                                                       passive_deletes=True, order_by="EvalSample.index")


class EvalSample(Base):
    __tablename__ = "eval_samples"

    id: Mapped[int] = mapped_column(primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(sa.ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(sa.Integer)
    question: Mapped[str] = mapped_column(sa.Text, default="")
    gold: Mapped[str | None] = mapped_column(sa.Text)
    response: Mapped[str | None] = mapped_column(sa.Text)
    extracted: Mapped[str | None] = mapped_column(sa.Text)
    correct: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    scores: Mapped[list[Any] | None] = mapped_column(sa.JSON)  # per choice, its summed log-probability

    evaluation: Mapped[Evaluation] = relationship(back_populates="samples")


class Study(Base):
    """A grid of training jobs (each with its evaluations) launched as one; ``cells`` maps grid points to jobs."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), default="")
    spec: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    # [{"job_id": int, "coordinates": {...}}], the job id updated when a cell is resumed
    cells: Mapped[list[Any]] = mapped_column(sa.JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    owner: Mapped[str] = mapped_column(sa.String(200), default=LOCAL_OWNER, server_default=LOCAL_OWNER, index=True)


class Upload(Base):
    """A data file a visitor uploaded: stored once by content hash under ``uploads/``, counted per owner
    against the upload quota, shown under the name it was uploaded with."""

    __tablename__ = "uploads"
    __table_args__ = (sa.UniqueConstraint("owner", "digest", name="uq_uploads_owner_digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(200), index=True)
    digest: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str] = mapped_column(sa.String(300))   # the file name the browser sent (display only)
    path: Mapped[str] = mapped_column(sa.Text)           # the stored copy, uploads/<digest><suffix>
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)


class WorkerRecord(Base):
    """A worker process (``python -m jobs worker``, or the web server's own thread): where it runs, what
    devices it offers, and its heartbeat on the database's clock. A running job whose worker's
    heartbeat is older than that worker's ``lease_s`` is interrupted by any live worker."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(primary_key=True)
    tag: Mapped[str] = mapped_column(sa.String(200))   # a name the operator gave (--tag), else host:pid
    host: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int] = mapped_column(sa.Integer)
    # jobs.devices.Devices.to_dict(): {"kind": "cpu", "cpus": 16} or {"kind": "cuda", "gpus": [...]}
    devices: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    concurrency: Mapped[int] = mapped_column(sa.Integer, default=1)
    lease_s: Mapped[float] = mapped_column(sa.Float)
    started_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)     # the database's clock (jobs.db.db_now)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, index=True)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)  # a clean exit


class ArenaPool(Base):
    """A set of models (``job:<id>`` / ``base:<name>`` keys) that the blind arena pits against each other.
    Its owner votes in it; an admin may share it, and then every visitor may vote in it too."""

    __tablename__ = "arena_pools"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100), default="")
    owner: Mapped[str] = mapped_column(sa.String(200), index=True)
    models: Mapped[list[Any]] = mapped_column(sa.JSON, default=list)
    shared: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)


class ArenaVote(Base):
    """One blind battle of a pool: the prompt, the two anonymised models and their answers, the settings
    both answered with, and the vote (NULL until the voter votes; only voted rows count and export)."""

    __tablename__ = "arena_votes"
    __table_args__ = (sa.Index("ix_arena_votes_voter_created", "voter", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pool_id: Mapped[int] = mapped_column(sa.ForeignKey("arena_pools.id", ondelete="CASCADE"), index=True)
    voter: Mapped[str] = mapped_column(sa.String(200))   # core.deployment.Actor.name of who battled and voted
    prompt: Mapped[str] = mapped_column(sa.Text)
    source: Mapped[str | None] = mapped_column(sa.String(200))   # a benchmark's name, None for a typed prompt
    example: Mapped[int | None] = mapped_column(sa.Integer)       # the benchmark example's index
    gold: Mapped[str | None] = mapped_column(sa.Text)             # its correct answer (shown after the vote)
    model_a: Mapped[str] = mapped_column(sa.String(600))
    model_b: Mapped[str] = mapped_column(sa.String(600))
    answer_a: Mapped[str | None] = mapped_column(sa.Text)         # NULL until generated
    answer_b: Mapped[str | None] = mapped_column(sa.Text)
    settings: Mapped[dict[str, Any]] = mapped_column(sa.JSON)    # max_new_tokens (as capped), temperature, top_p
    vote: Mapped[str | None] = mapped_column(sa.String(16))       # core.arena.VOTES
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    voted_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)
