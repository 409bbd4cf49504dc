"""Evaluations: benchmark results and their per-example predictions, as the worker records them and the
UI, the CLI and the comparison read them.

``evaluation_dict`` and ``sample_dict`` are the plain-data shapes callers get. Part of the service API
(``JobService`` inherits these methods); an evaluation belongs to the owner of the job that ran it.
"""

from __future__ import annotations

from typing import Any, Iterable

import sqlalchemy as sa

from .access import ServiceBase
from .errors import JobNotFound, iso, row_id
from .schema import LOCAL_OWNER, EvalSample, Evaluation, Job


def evaluation_dict(e: Evaluation) -> dict[str, Any]:
    return {"id": e.id, "job_id": e.job_id, "run_job_id": e.run_job_id, "base_model": e.base_model,
            "benchmark": e.benchmark, "accuracy": e.accuracy, "correct": e.correct, "total": e.total,
            "seconds": e.seconds, "settings": e.settings, "created_at": iso(e.created_at), "owner": e.owner}


def sample_dict(s: EvalSample) -> dict[str, Any]:
    return {"index": s.index, "question": s.question, "gold": s.gold, "response": s.response,
            "extracted": s.extracted, "correct": bool(s.correct)}


class EvaluationsAPI(ServiceBase):
    """Mixin of ``JobService``: needs only the shared base (``db``, ownership, ``_require_system``)."""

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


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
