"""Who is asking, and what they may see: the base every part of the service API shares.

``ServiceBase`` holds the database, the home folder, the deployment and the ``Actor`` the service acts
for (``scoped`` makes a view for another actor), and the checks every mixin of ``JobService`` uses:
ownership (``owner``, ``may_see``, ``_mine``, ``_job``), who sees workers' hosts (``may_see_workers``),
worker-only operations (``_require_system``)
and quotas (``limits``, ``_check_quota``). Kept in one place so the rules cannot differ between jobs,
artifacts, evaluations, uploads and studies.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from core.deployment import SYSTEM, Actor, Deployment, Limits
from core.deployment import current as current_deployment

from .db import Database, workbench_home
from .errors import JobNotFound, QuotaError, row_id
from .schema import ACTIVE, LOCAL_OWNER, Job

_View = TypeVar("_View", bound="ServiceBase")


class ServiceBase:
    """One database (``url``; default ``$WORKBENCH_DB_URL`` or ``$WORKBENCH_HOME/workbench.db``) seen by one actor.

    ``home`` is where job directories and uploads are kept (default ``$WORKBENCH_HOME``).
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

    def scoped(self: _View, actor: Actor) -> _View:
        """This service acting for ``actor``: same database, every call checked against that owner.

        The UI and the HTTP API only ever hold scoped services; the worker, the job child and the
        server's own CLI use the unscoped one (``SYSTEM``, an admin).
        """
        view = copy.copy(self)
        view.actor = actor
        return view

    def close(self) -> None:
        self.db.dispose()

    # ----------------------------------------------------------------------------------- ownership
    @property
    def owner(self) -> str:
        """The owner recorded on what this actor creates (the server's own CLI creates ``local`` jobs)."""
        return LOCAL_OWNER if self.actor == SYSTEM else self.actor.name

    def may_see(self, owner: str | None) -> bool:
        return self.actor.admin or owner == self.actor.name

    @property
    def may_see_workers(self) -> bool:
        """Whether this actor may see the hosts, processes and tags of workers: everyone but a public
        visitor (a host name tells a stranger about the server's machines)."""
        return self.actor.admin or not self.deployment.public

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

    # -------------------------------------------------------------------------------------- quotas
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
