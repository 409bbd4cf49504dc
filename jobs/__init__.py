"""Background jobs: a SQLAlchemy schema over SQLite (or any database URL), the service API the UI and
the CLI use, a worker that runs each job as ``python -m jobs.run <id>``, and a CLI (``python -m jobs``).

    from jobs import JobService, start_worker_thread
    service = JobService()                    # $WORKBENCH_DB_URL or $WORKBENCH_HOME/workbench.db
    worker = start_worker_thread(service)     # in-process worker (app.py)
    job_id = service.submit(spec)             # JobSpec / dict / JSON; ConfigError if invalid
"""

from .errors import JobError, JobNotFound
from .service import JobService
from .worker import Worker, start_worker_thread

__all__ = ["JobError", "JobNotFound", "JobService", "Worker", "start_worker_thread"]
