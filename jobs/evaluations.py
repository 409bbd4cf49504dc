"""Evaluations: benchmark results and their per-example predictions, as the worker records them and the
UI, the CLI and the comparison read them.

``evaluation_dict`` and ``sample_dict`` are the plain-data shapes callers get. Part of the service API
(``JobService`` inherits these methods); an evaluation belongs to the owner of the job that ran it.

A result is identified by its model, its benchmark and its *protocol*, how it was scored (``PROTOCOLS``):
``generate`` (the paper's: generate an answer, extract it), ``loglikelihood`` (multiple choice by the
summed log-probability of each choice, ``core.evaluate``) or ``lm-eval`` (a run of lm-evaluation-harness).
The same model and benchmark under two protocols are two results, never one replacing the other.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import sqlalchemy as sa

from core.config import PROTOCOLS as EVAL_PROTOCOLS

from .access import ServiceBase
from .errors import JobNotFound, iso, row_id
from .schema import LOCAL_OWNER, EvalSample, Evaluation, Job

LMEVAL_PROTOCOL = "lm-eval"
PROTOCOLS = (*EVAL_PROTOCOLS, LMEVAL_PROTOCOL)  # what evaluations.protocol may hold
PROTOCOL_SHORT = {"generate": "generate", "loglikelihood": "loglik", LMEVAL_PROTOCOL: "lm-eval"}  # in labels


def result_label(benchmark: str, protocol: str) -> str:
    """How tables, charts and exports name a benchmark scored under a protocol: ``piqa (loglik)``."""
    return f"{benchmark} ({PROTOCOL_SHORT.get(protocol, protocol)})"


def evaluation_dict(e: Evaluation) -> dict[str, Any]:
    return {"id": e.id, "job_id": e.job_id, "run_job_id": e.run_job_id, "base_model": e.base_model,
            "benchmark": e.benchmark, "protocol": e.protocol, "accuracy": e.accuracy,
            "accuracy_norm": e.accuracy_norm, "correct": e.correct, "total": e.total, "seconds": e.seconds,
            "settings": e.settings, "created_at": iso(e.created_at), "owner": e.owner}


def sample_dict(s: EvalSample) -> dict[str, Any]:
    return {"index": s.index, "question": s.question, "gold": s.gold, "response": s.response,
            "extracted": s.extracted, "correct": bool(s.correct), "scores": s.scores}


class EvaluationsAPI(ServiceBase):
    """Mixin of ``JobService``: needs only the shared base (``db``, ownership, ``_require_system``)."""

    def record_evaluation(self, *, benchmark: str, base_model: str, accuracy: float, correct: int, total: int,
                          seconds: float | None = None, samples: Iterable[dict[str, Any]] = (),
                          job_id: int | None = None, run_job_id: int | None = None,
                          settings: dict[str, Any] | None = None, protocol: str = "generate",
                          accuracy_norm: float | None = None) -> int:
        """Store a benchmark result under ``protocol`` and its per-example predictions (each may carry
        ``scores``, its choices' summed log-probabilities); return the evaluation id.

        The evaluation belongs to the owner of the job that ran it (worker side only)."""
        self._require_system("recording an evaluation")
        protocol = check_protocol(protocol)
        with self.db.write() as s:
            runner = s.get(Job, run_job_id) if run_job_id is not None else None
            ev = Evaluation(job_id=job_id, run_job_id=run_job_id, base_model=base_model, benchmark=benchmark,
                            protocol=protocol, accuracy=float(accuracy),
                            accuracy_norm=None if accuracy_norm is None else float(accuracy_norm),
                            correct=int(correct), total=int(total),
                            seconds=None if seconds is None else float(seconds), settings=settings,
                            owner=runner.owner if runner is not None else LOCAL_OWNER)
            s.add(ev)
            s.flush()
            rows = [{"evaluation_id": ev.id, "index": int(x.get("index", i)), "question": str(x.get("question", "")),
                     "gold": _text(x.get("gold")), "response": _text(x.get("response")),
                     "extracted": _text(x.get("extracted")), "correct": bool(x.get("correct")),
                     "scores": _scores(x.get("scores"), i)}
                    for i, x in enumerate(samples)]
            if rows:
                s.execute(sa.insert(EvalSample), rows)
            return ev.id

    def list_evaluations(self, job_id: int | None = None, base_only: bool = False, benchmark: str | None = None,
                         base_model: str | None = None, protocol: str | None = None) -> list[dict[str, Any]]:
        """Evaluations, newest first; of one job, of base models only, of a benchmark, base model or protocol."""
        q = self._mine(sa.select(Evaluation).order_by(Evaluation.id.desc()), Evaluation.owner)
        if job_id is not None:
            q = q.where(Evaluation.job_id == row_id(job_id))
        if base_only:
            q = q.where(Evaluation.job_id.is_(None))
        if benchmark:
            q = q.where(Evaluation.benchmark == benchmark)
        if base_model:
            q = q.where(Evaluation.base_model == base_model)
        if protocol:
            q = q.where(Evaluation.protocol == check_protocol(protocol))
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


def check_protocol(protocol: Any) -> str:
    """``protocol`` if it is one of ``PROTOCOLS``; ``ValueError`` naming the field and the choices otherwise."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: unknown protocol {str(protocol)[:40]!r}; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _scores(value: Any, row: int) -> list[float] | None:
    """A sample's per-choice scores as finite floats (None when it has none); ``ValueError`` naming the row."""
    if value is None:
        return None
    try:
        scores = [float(v) for v in value]
    except (TypeError, ValueError) as err:
        raise ValueError(f"samples[{row}].scores: expected a list of numbers ({err})") from None
    if not all(math.isfinite(v) for v in scores):
        raise ValueError(f"samples[{row}].scores: every score must be finite (got {scores[:8]})")
    return scores
