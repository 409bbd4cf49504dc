"""Studies in the service: launch a grid as one ``Study`` row of jobs; cancel, resume, report it.

The grid, the statistics and the tables are ``core.study``'s; this module stores and runs them.
Part of the service API (``JobService`` inherits these methods).
"""

from __future__ import annotations

import statistics
from typing import Any

import sqlalchemy as sa

from .access import ServiceBase
from .errors import JobNotFound, QuotaError, row_id
from .evaluations import result_label
from .schema import ACTIVE, Study

DEFAULT_TOKENS_PER_S = 400.0  # bench/RESULTS.md: LoRA on SmolLM2 on this 2-core CPU


class StudiesAPI(ServiceBase):
    """Mixin of ``JobService``: needs ``check_spec``, ``submit``, ``get``, ``list_jobs``, ``cancel``, ``resume``,
    ``resume_point``, ``list_evaluations`` and ``eval_samples``."""

    def plan_study(self, study: Any) -> dict[str, Any]:
        """Validate a study and say what launching it means: its cells and an estimated time."""
        from core.study import StudySpec, estimate_seconds, expand

        study = study if isinstance(study, StudySpec) else StudySpec.from_dict(study)
        if not self.actor.admin and study.size() > self.limits.study_jobs:  # before making any cell
            raise QuotaError(f"the study has {study.size():,} jobs; this workbench launches at most "
                             f"{self.limits.study_jobs:,} per study: vary fewer values or seeds")
        study.validate()
        cells = expand(study)
        for cell in cells:
            self.check_spec(cell.spec, "train")
        t = study.base.train
        rows, mean_tokens = self._data_size(study.base)
        seconds = estimate_seconds(len(cells), rows * mean_tokens, t.epochs, t.max_steps, t.batch_size,
                                   mean_tokens, self.measured_tokens_per_s())
        return {"study": study, "cells": cells, "num_jobs": len(cells), "estimated_s": seconds}

    def _data_size(self, spec: Any) -> tuple[int, float]:
        """Training rows and a rough mean of tokens per row (4 characters per token)."""
        from core.data import load_records

        records = load_records(spec.data.source, spec.data.columns, spec.data.limit)
        chars = statistics.fmean(_row_chars(r) + 200 for r in records)  # + the template's own text
        return len(records), min(chars / 4, spec.data.cutoff_len)

    def measured_tokens_per_s(self) -> float:
        """Mean training throughput of finished jobs on this installation (a default before any)."""
        rates = [j["result"]["tokens_per_s"] for j in self.list_jobs(status="succeeded", kind="train")
                 if (j.get("result") or {}).get("tokens_per_s")]
        return statistics.fmean(rates) if rates else DEFAULT_TOKENS_PER_S

    def submit_study(self, study: Any) -> int:
        """Queue every cell of the grid (each trains, then runs the study's benchmarks); return the study id."""
        plan = self.plan_study(study)
        study = plan["study"]
        self._check_quota(new_jobs=plan["num_jobs"])
        with self.db.write() as s:
            row = Study(name=study.name[:200], spec=study.to_dict(), cells=[], owner=self.owner)
            s.add(row)
            s.flush()
            study_id = row.id
        cells = [{"job_id": self.submit(c.spec, "train", name=c.spec.name, study_id=study_id),
                  "coordinates": c.coordinates()} for c in plan["cells"]]
        self._set_cells(study_id, cells)
        return study_id

    def _set_cells(self, study_id: int, cells: list[dict[str, Any]]) -> None:
        with self.db.write() as s:
            s.get(Study, study_id).cells = cells

    def get_study(self, study_id: int) -> dict[str, Any]:
        with self.db.read() as s:
            row = s.get(Study, row_id(study_id, "study"))
            if row is None or not self.may_see(row.owner):
                raise JobNotFound(study_id, "study")
            data = {"id": row.id, "name": row.name, "spec": row.spec, "cells": list(row.cells or []),
                    "created_at": row.created_at.isoformat(timespec="seconds")}
        jobs = [self.get(c["job_id"]) for c in data["cells"]]
        counts: dict[str, int] = {}
        for j in jobs:
            counts[j["status"]] = counts.get(j["status"], 0) + 1
        data["jobs"] = jobs
        data["counts"] = counts
        data["status"] = ("running" if any(j["status"] in ACTIVE for j in jobs) else
                          "succeeded" if jobs and all(j["status"] == "succeeded" for j in jobs) else "stopped")
        return data

    def list_studies(self) -> list[dict[str, Any]]:
        with self.db.read() as s:
            ids = list(s.scalars(self._mine(sa.select(Study.id).order_by(Study.id.desc()), Study.owner)))
        return [self.get_study(i) for i in ids]

    def cancel_study(self, study_id: int) -> int:
        """Cancel every queued or running job of the study; return how many."""
        jobs = self.get_study(study_id)["jobs"]
        for j in jobs:
            if j["status"] in ACTIVE:
                self.cancel(j["id"])
        return sum(1 for j in jobs if j["status"] in ACTIVE)

    def resume_study(self, study_id: int) -> list[int]:
        """Continue every unfinished cell: from its last checkpoint, or afresh when it has none."""
        study = self.get_study(study_id)
        cells, new_ids = [], []
        for cell, job in zip(study["cells"], study["jobs"]):
            if job["status"] in ("succeeded", *ACTIVE):
                cells.append(cell)
                continue
            if self.resume_point(job["id"]) is not None:
                new_id = self.resume(job["id"])
            else:
                new_id = self.submit(job["spec"], "train", name=job["name"], study_id=study_id)
            new_ids.append(new_id)
            cells.append({**cell, "job_id": new_id})
        self._set_cells(study_id, cells)
        return new_ids

    def resume_study_job(self, job_id: int) -> int | None:
        """After a worker restart: continue one interrupted job of a study in its cell (None if it cannot)."""
        job = self.get(job_id)
        if job.get("study_id") is None or self.resume_point(job_id) is None:
            return None
        new_id = self.resume(job_id)
        study = self.get_study(job["study_id"])
        self._set_cells(study["id"], [{**c, "job_id": new_id} if c["job_id"] == job_id else c for c in study["cells"]])
        return new_id

    def study_results(self, study_id: int) -> list[Any]:
        """One ``core.study.CellResult`` per finished cell, benchmark and protocol (newest evaluation), its
        benchmark named with the protocol (``result_label``) so the analysis never pools two protocols."""
        from core.study import CellResult

        study = self.get_study(study_id)
        results = []
        for cell, job in zip(study["cells"], study["jobs"]):
            latest: dict[str, dict] = {}
            for ev in sorted(self.list_evaluations(job_id=job["id"]), key=lambda e: e["id"]):
                latest[result_label(ev["benchmark"], ev["protocol"])] = ev
            trainable = (job.get("info") or {}).get("trainable") or (job.get("result") or {}).get("trainable_params") or 0
            for label, ev in latest.items():
                correct = [s["correct"] for s in sorted(self.eval_samples(ev["id"]), key=lambda s: s["index"])]
                results.append(CellResult(cell["coordinates"], label, ev["accuracy"], int(trainable), correct))
        return results

    def study_report(self, study_id: int) -> dict[str, Any]:
        """The paper-style analysis of a study and its Markdown tables."""
        from core.study import analyse, tables_markdown

        analysis = analyse(self.study_results(study_id))
        return {"analysis": analysis, "markdown": tables_markdown(analysis)}


def _row_chars(record: dict[str, Any]) -> int:
    """Characters of a training row's text: its turns for a conversation, else instruction, input, output."""
    if "messages" in record:
        return sum(len(turn["content"]) for turn in record["messages"])
    return len(record["instruction"]) + len(record.get("input", "")) + len(record["output"])
