"""Artifacts of a training job: the downloadable zips of its adapter, and the export jobs that build them.

``ARTIFACT_LABELS`` names the forms (workbench adapter, PEFT layout, merged full model, and for llama.cpp
and Ollama the merged model as GGUF F16/Q8_0, an Ollama bundle, and a LoRA as a GGUF adapter); ``export``
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

from core import progress

from .access import ServiceBase
from .errors import JobError
from .merges import ADAPTER_KINDS
from .schema import ACTIVE, Job

ARTIFACT_LABELS = {"adapter": "adapter (workbench format)", "peft": "LoRA in PEFT format",
                   "merged": "merged full model", "gguf-f16": "merged model as GGUF F16 (llama.cpp)",
                   "gguf-q8_0": "merged model as GGUF Q8_0 (llama.cpp)",
                   "ollama": "Ollama: GGUF Q8_0 + Modelfile", "gguf-lora": "LoRA as a GGUF adapter (llama.cpp)"}
ARTIFACT_KINDS = tuple(ARTIFACT_LABELS)
# The method export (``core.methods.Method.exports``) each artifact is built from; GGUF ones also need a
# LLaMA-family base (``core.gguf_export.MODEL_TYPES``), and a GGUF LoRA a method whose update is a plain LoRA.
NEEDS = {"peft": "peft", "merged": "merged", "gguf-f16": "merged", "gguf-q8_0": "merged", "ollama": "merged",
         "gguf-lora": "peft"}
GGUF_KINDS = ("gguf-f16", "gguf-q8_0", "ollama", "gguf-lora")


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
        ``merged``: a full model with the LoRA update folded into its weights (``core.export_merged``);
        ``gguf-f16``/``gguf-q8_0``: that merged model as one GGUF file (``core.gguf_export``);
        ``ollama``: the Q8_0 GGUF with a ``Modelfile`` in the prompt format the job trained with
        (``core.ollama``); ``gguf-lora``: the LoRA as a llama.cpp adapter for the base model's GGUF.
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
            _check_exportable(job, kind)
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

        spec = JobSpec.from_dict(job["spec"])
        settings = spec.model
        settings.device = "cpu"
        label = f"exporting {kind}"  # three stages; a conversion and the zip report their own steps between
        progress.report(label, 0, 3, "loading the model and the adapter")
        loaded = load_model(settings)
        core.load_adapter(loaded.model, adapter, tokenizer=loaded.tokenizer)
        progress.report(label, 1, 3, f"writing the {ARTIFACT_LABELS[kind]}")
        with tempfile.TemporaryDirectory(dir=exports) as tmp:
            folder = Path(tmp) / f"job{job_id}-{kind}"
            if kind in GGUF_KINDS:
                _write_gguf(kind, loaded, spec.data.template, folder)
            else:
                (core.export_peft if kind == "peft" else core.export_merged)(loaded.model, folder)
            if kind == "merged" and not any(folder.glob("tokenizer*")):
                loaded.tokenizer.save_pretrained(folder)
            progress.report(label, 2, 3, "zipping")
            path = _zip_dir(folder, target)
        progress.report(label, 3, 3)
        return path


def _check_exportable(job: dict[str, Any], kind: str) -> None:
    """``JobError`` when ``job``'s adapter has no ``kind`` export: its method lacks the export the
    artifact is built from, or (GGUF) its base is not LLaMA-family or its update not a plain LoRA."""
    from core import methods
    from core.gguf_export import MODEL_TYPES

    method = methods.get(job["spec"]["adapter"]["method"])
    lora_only = kind == "gguf-lora"
    able = lambda m: NEEDS[kind] in m.exports and (not lora_only or m.merge_family == "lora")  # noqa: E731
    if not able(method):
        others = ", ".join(m.label for m in methods.all() if able(m))
        raise JobError(f"a {method.label} adapter has no {ARTIFACT_LABELS[kind]} export (methods that "
                       f"have: {others}); job {job['id']}: download the adapter instead")
    if kind in GGUF_KINDS:
        model_type = _adapter_meta(job).get("model_type")
        if model_type not in MODEL_TYPES:
            raise JobError(f"job {job['id']}: GGUF export covers LLaMA-family models ({', '.join(MODEL_TYPES)}); "
                           f"this adapter's base is {model_type!r}")


def _adapter_meta(job: dict[str, Any]) -> dict[str, Any]:
    from core.inject import read_adapter_config

    return read_adapter_config(Path(job["out_dir"]) / "adapter")


def _write_gguf(kind: str, loaded: Any, prompt_template: str, folder: Path) -> None:
    """The files of GGUF artifact ``kind`` in ``folder``: ``model.gguf`` (+ ``Modelfile``) or ``adapter.gguf``."""
    from core import gguf_export, ollama

    folder.mkdir(parents=True)
    if kind == "gguf-lora":
        gguf_export.export_lora_gguf(loaded.model, folder / "adapter.gguf")
        return
    text = None
    if kind == "ollama":  # before the merge: an unknown chat template fails in a second, not minutes
        text = ollama.modelfile(ollama.ollama_format(loaded.tokenizer, prompt_template))
    gguf_export.export_merged_gguf(loaded.model, loaded.tokenizer, folder / "model.gguf",
                                   "f16" if kind == "gguf-f16" else "q8_0")
    if text is not None:
        (folder / "Modelfile").write_text(text)


def _zip_dir(folder: Path, target: Path) -> Path:
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in progress.track([p for p in sorted(folder.rglob("*")) if p.is_file()], f"zipping {target.name}"):
            zf.write(path, Path(folder.name) / path.relative_to(folder))
    os.replace(tmp, target)
    return target
