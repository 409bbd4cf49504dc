"""What the service's callers see of a refusal, and the plain-data conventions every part of the service shares.

The exceptions (``JobError``, ``QuotaError``, ``JobNotFound``), ``row_id`` (an id from a caller, checked)
and ``iso`` (a stored time as ISO text). A leaf module: the service's mixins import it without cycles.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

INT64_MAX = 2**63 - 1


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


def iso(value: dt.datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 text with its offset; None stays None."""
    return value.replace(tzinfo=dt.timezone.utc).isoformat() if value else None
