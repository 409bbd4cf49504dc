"""Artifacts of a training job: the downloadable zips of its adapter, and the export jobs that build them.

``ARTIFACT_LABELS`` names the forms (workbench adapter, PEFT layout, merged full model); ``export``
queues an export job, that job's child calls ``build_artifact``, and ``artifact`` finds a built zip
that is still current. Part of the service API (``JobService`` inherits these methods).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .access import ServiceBase
from .errors import JobError
from .merges import ADAPTER_KINDS
from .schema import ACTIVE, Job

ARTIFACT_LABELS = {"adapter": "adapter (workbench format)", "peft": "LoRA in PEFT format",
                   "merged": "merged full model"}
ARTIFACT_KINDS = tuple(ARTIFACT_LABELS)


class ArtifactsAPI(ServiceBase):
    """Mixin of ``JobService``: needs ``get`` and ``_insert``."""

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
        if job["kind"] not in ADAPTER_KINDS:
            raise JobError(f"job {job['id']} is an {job['kind']} job; only training and merge jobs have adapters")
        if not (Path(job["out_dir"]) / "adapter" / "adapter_config.json").is_file():
            self.check_files_here(job_id)  # run elsewhere, runs directory not shared: say so, not "no adapter"
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


def _zip_dir(folder: Path, target: Path) -> Path:
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(folder.name) / path.relative_to(folder))
    os.replace(tmp, target)
    return target
