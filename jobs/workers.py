"""The worker registry: workers register, heartbeat, claim the jobs their devices can run, and find
the jobs of workers whose lease ran out.

Every time here is the database's clock (``jobs.db.db_now``): machines sharing one database may
disagree about the time, the database does not. A worker is *live* while its last heartbeat is
younger than its lease, *stale* after; a running job of a stale worker is interrupted by whichever
live worker sweeps first (``Worker.expire_leases``), and a resumed job can pick it up again.

Claims stay exactly-once however many workers ask at once: the candidates are read and claimed in one
write transaction, the claim is a conditional ``UPDATE ... WHERE status = 'queued'``, and on
PostgreSQL the candidates are read ``FOR UPDATE SKIP LOCKED``, so concurrent workers take different
jobs instead of queueing behind one another's row locks (SQLite's write transaction already holds the
whole database).

Who sees what: admins and every user of ``local`` and ``team`` mode see each worker's host, process and
tag; a visitor of ``public`` mode sees only its devices and state, and only their own jobs on it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from .access import ServiceBase
from .db import db_now
from .devices import Devices, assign, summary
from .schema import Job, WorkerRecord, utcnow

PRUNE_AFTER_S = 7 * 86400.0   # rows of workers silent this long are deleted when another registers
SHOWN_STALE_S = 86400.0       # stale (not stopped) workers stay in the list this long, then drop out


def claimable(devices: Devices, busy: set[int]) -> Any:
    """The SQL condition on ``jobs`` a worker offering ``devices`` (GPUs ``busy`` taken) could run now;
    ``jobs.devices.assign`` then decides for each candidate (which GPUs, the memory of each)."""
    if not devices.gpus:
        return Job.device.in_(("cpu", "auto"))
    free = [g for g in devices.gpus if g.index not in busy]
    if not free:
        return Job.device == "cpu"
    return sa.or_(Job.device == "cpu",
                  sa.and_(Job.processes <= len(free),
                          sa.or_(Job.gpu_memory.is_(None), Job.gpu_memory <= max(g.memory for g in free))))


class WorkersAPI(ServiceBase):
    """The registry side of ``JobService``."""

    # ------------------------------------------------------------------------------ worker's side
    def register_worker(self, tag: str, host: str, pid: int, devices: Devices, concurrency: int,
                        lease_s: float) -> int:
        """Add a worker (and delete rows of workers silent for ``PRUNE_AFTER_S`` that no running job
        names: the lease sweep still needs those); return its id."""
        self._require_system("registering a worker")
        running = sa.select(Job.worker_id).where(Job.status == "running", Job.worker_id.is_not(None))
        with self.db.write() as s:
            s.execute(sa.delete(WorkerRecord).where(WorkerRecord.heartbeat_at < db_now(-PRUNE_AFTER_S),
                                                    WorkerRecord.id.not_in(running)))
            row = WorkerRecord(tag=tag[:200], host=host[:255], pid=pid, devices=devices.to_dict(),
                               concurrency=concurrency, lease_s=float(lease_s), started_at=db_now(),
                               heartbeat_at=db_now())
            s.add(row)
            s.flush()
            return row.id

    def heartbeat(self, worker_id: int) -> bool:
        """Renew the worker's lease; False when its row is gone (pruned while it was silent: register again)."""
        self._require_system("a worker's heartbeat")
        with self.db.write() as s:
            res = s.execute(sa.update(WorkerRecord).where(WorkerRecord.id == int(worker_id))
                            .values(heartbeat_at=db_now()))
            return res.rowcount == 1

    def worker_stopped(self, worker_id: int) -> None:
        """A clean exit: the worker leaves the list (its running children report on their own)."""
        self._require_system("stopping a worker")
        with self.db.write() as s:
            s.execute(sa.update(WorkerRecord).where(WorkerRecord.id == int(worker_id)).values(stopped_at=db_now()))

    def claim_next(self, worker_id: int, tag: str, devices: Devices, busy: set[int],
                   candidates: int = 10) -> tuple[int, tuple[int, ...]] | None:
        """Claim the oldest queued job this worker can run now; (job id, GPUs given to it) or None."""
        self._require_system("claiming a job")
        query = (sa.select(Job.id, Job.device, Job.processes, Job.gpu_memory)
                 .where(Job.status == "queued", claimable(devices, busy))
                 .order_by(Job.id).limit(candidates).with_for_update(skip_locked=True))
        with self.db.write() as s:
            for job_id, device, processes, gpu_memory in s.execute(query).all():
                gpus = assign(devices, busy, device, processes, gpu_memory)
                if gpus is None:
                    continue
                res = s.execute(sa.update(Job).where(Job.id == job_id, Job.status == "queued").values(
                    status="running", started_at=utcnow(), heartbeat_at=utcnow(), worker=tag, worker_id=worker_id,
                    phase="starting", pid=None, exit_code=None))
                if res.rowcount == 1:
                    return job_id, gpus
        return None

    def has_claimable(self, devices: Devices) -> bool:
        """Whether a queued job exists that a worker offering ``devices`` could ever run."""
        self._require_system("listing the queue")
        with self.db.read() as s:
            return s.scalar(sa.select(Job.id).where(Job.status == "queued", claimable(devices, set())).limit(1)) \
                is not None

    def lease_expired_jobs(self) -> list[dict[str, Any]]:
        """Running jobs whose worker's heartbeat is older than that worker's lease, with the worker's
        tag, host and lease (what the sweeping worker tells in the job's error)."""
        self._require_system("sweeping for lost jobs")
        query = (sa.select(Job.id, Job.worker, Job.pid, Job.study_id, Job.error, WorkerRecord.tag, WorkerRecord.host,
                           WorkerRecord.lease_s)
                 .join(WorkerRecord, WorkerRecord.id == Job.worker_id)
                 .where(Job.status == "running", WorkerRecord.heartbeat_at < db_now(-WorkerRecord.lease_s)))
        with self.db.read() as s:
            return [dict(row._mapping) for row in s.execute(query)]

    # ----------------------------------------------------------------------------------- UI's side
    def list_workers(self) -> list[dict[str, Any]]:
        """Workers not stopped and heard from within ``SHOWN_STALE_S``, live ones first: devices, state,
        the age of the last heartbeat (database clock) and the running jobs this actor may see."""
        w = WorkerRecord
        with self.db.read() as s:
            now = s.scalar(sa.select(db_now()))
            rows = s.execute(sa.select(w.id, w.tag, w.host, w.pid, w.devices, w.concurrency, w.lease_s, w.heartbeat_at)
                             .where(w.stopped_at.is_(None), w.heartbeat_at >= db_now(-SHOWN_STALE_S))
                             .order_by(w.id)).all()
            running = s.execute(sa.select(Job.worker_id, Job.id, Job.owner).where(
                Job.status == "running", Job.worker_id.in_([r.id for r in rows]))).all() if rows else []
        out = []
        for r in rows:
            age = max(0.0, (now - r.heartbeat_at).total_seconds())
            on_it = [(job_id, owner) for worker_id, job_id, owner in running if worker_id == r.id]
            item = {"id": r.id, "devices": r.devices, "summary": summary(r.devices), "concurrency": r.concurrency,
                    "lease_s": r.lease_s, "heartbeat_age_s": age, "live": age <= r.lease_s, "running": len(on_it),
                    "jobs": sorted(job_id for job_id, owner in on_it if self.may_see(owner)),
                    "tag": None, "host": None, "pid": None}
            if self.may_see_workers:
                item.update(tag=r.tag, host=r.host, pid=r.pid)
            out.append(item)
        out.sort(key=lambda item: (not item["live"], item["id"]))
        return out
