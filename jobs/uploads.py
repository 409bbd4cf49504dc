"""Uploads and chat limits: data files visitors upload (checked, stored once by content hash, counted
against their owner's quota), and the one-answer-at-a-time slot for generation in the web process.

Part of the service API (``JobService`` inherits these methods).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa

from .access import ServiceBase
from .errors import JobError, QuotaError
from .schema import Upload

UPLOAD_SUFFIXES = (".json", ".jsonl", ".csv")
_GENERATING: set[str] = set()  # actors with an answer being generated in this process (public mode)
_GENERATING_LOCK = threading.Lock()


class UploadsAPI(ServiceBase):
    """Mixin of ``JobService``: needs only the shared base (``db``, ``home``, ownership, ``limits``)."""

    @property
    def uploads_dir(self) -> Path:
        return self.home / "uploads"

    def store_upload(self, file_path: str | Path, name: str | None = None) -> dict[str, Any]:
        """Keep an uploaded data file: checked (type, size, quota), stored once under a content-hash name
        (the browser's name is never used as a path), recorded for its owner. Returns ``{"path", "name",
        "bytes"}``; the rows are read by the caller (``core.data``), which calls ``forget_upload`` when
        they are not valid."""
        src = Path(file_path)
        name = Path(str(name or src.name)).name[:200] or "upload"
        suffix = Path(name).suffix.lower() or src.suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise JobError(f"{name}: unsupported file type {suffix or '(none)'!r}; upload "
                           f"{', '.join(UPLOAD_SUFFIXES)}")
        if not src.is_file():
            raise JobError(f"{name}: the upload did not arrive; try again")
        size = src.stat().st_size
        if size > self.limits.upload_file_bytes:
            raise QuotaError(f"{name} is {_size(size)}; this workbench takes files up to "
                             f"{_size(self.limits.upload_file_bytes)}")
        digest = _sha256(src)
        with self.db.read() as s:
            used = s.scalar(sa.select(sa.func.coalesce(sa.func.sum(Upload.bytes), 0)).where(
                Upload.owner == self.owner)) or 0
            known = s.scalar(sa.select(Upload).where(Upload.owner == self.owner, Upload.digest == digest))
            known_path = known.path if known is not None else None
        target = self.uploads_dir / f"{digest[:32]}{suffix}"
        if known_path is None and not self.actor.admin and used + size > self.limits.upload_bytes_per_owner:
            raise QuotaError(f"your uploads take {_size(used)} and this one {_size(size)}; this workbench keeps "
                             f"{_size(self.limits.upload_bytes_per_owner)} per user")
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        if known_path is None:
            with self.db.write() as s:
                s.add(Upload(owner=self.owner, digest=digest, name=name, path=str(target), bytes=size))
        target.with_name(target.name + ".name").write_text(name, encoding="utf-8")
        return {"path": str(target), "name": name, "bytes": size}

    def forget_upload(self, path: str | Path) -> None:
        """Drop this actor's record of an upload (one whose rows turned out unreadable), and the file
        when no other owner uploaded the same content."""
        with self.db.write() as s:
            s.execute(sa.delete(Upload).where(Upload.owner == self.owner, Upload.path == str(path)))
            others = s.scalar(sa.select(sa.func.count(Upload.id)).where(Upload.path == str(path)))
        if not others:
            Path(path).unlink(missing_ok=True)
            Path(f"{path}.name").unlink(missing_ok=True)

    def upload_name(self, path: str | Path) -> str | None:
        """The name an upload of this actor was uploaded under (None: not one of theirs)."""
        with self.db.read() as s:
            q = self._mine(sa.select(Upload.name).where(Upload.path == str(path)), Upload.owner)
            return s.scalars(q).first()

    # ----------------------------------------------------------------------------------------- chat
    @contextlib.contextmanager
    def generation_slot(self) -> Iterator[None]:
        """Held while this actor's chat or arena answer is generated in the web process: in public mode
        one at a time per visitor (a second one gets ``QuotaError``)."""
        if not self.deployment.public:
            yield
            return
        with _GENERATING_LOCK:
            if self.actor.name in _GENERATING:
                raise QuotaError("one answer at a time: wait for the current answer to finish")
            _GENERATING.add(self.actor.name)
        try:
            yield
        finally:
            with _GENERATING_LOCK:
                _GENERATING.discard(self.actor.name)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
