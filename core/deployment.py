"""Deployment modes, their limits, and who is acting: the rules a running workbench enforces.

``WORKBENCH_MODE`` picks one of three modes (``public`` is automatic on a Hugging Face Space, where
``SPACE_ID`` is set):

- ``local`` (default): one trusted user on their own machine. No login, served on 127.0.0.1, any
  server path, precise error messages, generous limits.
- ``team``: a shared server. A login is required, every job belongs to its user, admins
  (``WORKBENCH_ADMINS``) see everything. Server paths only under ``WORKBENCH_DATA_DIRS``.
- ``public``: anonymous visitors of a public demo (a Space). Each visitor is a token the server
  issued; base models and hub datasets come from an allowlist; no server paths; no remote code;
  tight quotas. Errors about sources never reveal whether something exists.

This module reads the environment only; it imports nothing heavy, so every layer (``core``, ``jobs``,
``app``) can ask it. Tests build a ``Deployment`` directly instead of patching the environment.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

MODES = ("local", "team", "public")


class DeploymentError(ValueError):
    """The server's own settings are wrong (a bad ``WORKBENCH_*`` variable): the server refuses to start."""


@dataclass(frozen=True)
class Limits:
    """Quotas of one deployment. Each is overridden by ``WORKBENCH_LIMIT_<NAME>`` (e.g.
    ``WORKBENCH_LIMIT_ACTIVE_JOBS_PER_OWNER=5``)."""

    active_jobs_per_owner: int      # queued + running jobs one owner may have
    active_jobs_total: int          # queued + running jobs on the whole server
    max_steps: int                  # optimiser steps of one training job
    max_epochs: float               # passes over the data of one training job
    max_wall_s: float               # wall time of one job before it is stopped
    study_jobs: int                 # training jobs one study may launch
    dataset_rows: int               # rows read from one dataset
    upload_bytes_per_owner: int     # bytes of uploaded data files kept per owner
    upload_file_bytes: int          # bytes of one uploaded or read data file
    min_free_disk_bytes: int        # free space under WORKBENCH_HOME a job needs to start
    chat_new_tokens: int            # new tokens of one chat answer
    chat_models_resident: int       # models kept loaded for chat in the web process (LRU)
    eval_examples: int              # examples of one benchmark run (0 = all)
    prompt_chars: int               # characters of one chat question or arena prompt
    arena_battles: int              # arena battles one voter may start in 10 minutes (0 = no limit; admins: none)


GiB = 2**30
MiB = 2**20

DEFAULT_LIMITS: dict[str, Limits] = {
    "local": Limits(active_jobs_per_owner=1000, active_jobs_total=1000, max_steps=10_000_000, max_epochs=10_000.0,
                    max_wall_s=30 * 86400.0, study_jobs=2000, dataset_rows=50_000_000,
                    upload_bytes_per_owner=50 * GiB, upload_file_bytes=2 * GiB, min_free_disk_bytes=512 * MiB,
                    chat_new_tokens=4096, chat_models_resident=4, eval_examples=0, prompt_chars=4000,
                    arena_battles=0),
    "team": Limits(active_jobs_per_owner=16, active_jobs_total=64, max_steps=1_000_000, max_epochs=1000.0,
                   max_wall_s=7 * 86400.0, study_jobs=500, dataset_rows=10_000_000,
                   upload_bytes_per_owner=5 * GiB, upload_file_bytes=1 * GiB, min_free_disk_bytes=2 * GiB,
                   chat_new_tokens=2048, chat_models_resident=3, eval_examples=0, prompt_chars=4000,
                   arena_battles=300),
    "public": Limits(active_jobs_per_owner=3, active_jobs_total=12, max_steps=2000, max_epochs=10.0,
                     max_wall_s=2 * 3600.0, study_jobs=3, dataset_rows=50_000,
                     upload_bytes_per_owner=200 * MiB, upload_file_bytes=50 * MiB, min_free_disk_bytes=2 * GiB,
                     chat_new_tokens=256, chat_models_resident=2, eval_examples=500, prompt_chars=4000,
                     arena_battles=30),
}


@dataclass(frozen=True)
class Actor:
    """Who is asking. ``name`` is the owner key stored on jobs: ``local`` in local mode, the login
    name in team mode, ``anon:<id>`` for a public visitor, ``hf:<user>`` for a Hugging Face login.
    ``admin`` sees and acts on every owner's jobs."""

    name: str
    admin: bool = False

    @property
    def label(self) -> str:
        """A short display form (anonymous ids shortened)."""
        if self.name.startswith("anon:"):
            return f"visitor {self.name[5:13]}"
        return self.name.removeprefix("hf:")


LOCAL_USER = Actor("local", admin=True)
SYSTEM = Actor("system", admin=True)  # the worker, the job child and the server's own CLI


# lm-eval's tasks a public visitor may name (WORKBENCH_LMEVAL_TASKS replaces the list): the commonsense
# sets of the paper, each one hub dataset of a few MB. Any other name could start a group of dozens of
# tasks or a download of gigabytes on the server's disk and time.
PUBLIC_LMEVAL_TASKS = ("arc_easy", "arc_challenge", "boolq", "piqa", "hellaswag", "winogrande", "openbookqa",
                       "social_iqa")


@dataclass(frozen=True)
class Deployment:
    """The mode and every rule that follows from it (see the module docstring)."""

    mode: str = "local"
    admins: frozenset[str] = frozenset()
    data_dirs: tuple[Path, ...] = ()
    allowed_models: tuple[str, ...] = ()      # beyond the catalogue (public mode)
    allowed_datasets: tuple[str, ...] = ()    # hub dataset ids (public mode)
    allow_remote_code: bool = False           # WORKBENCH_ALLOW_REMOTE_CODE=1 (never in public)
    lmeval_tasks: tuple[str, ...] = PUBLIC_LMEVAL_TASKS  # named lm-eval tasks a public visitor may run
    on_space: bool = False                    # SPACE_ID is set
    oauth: bool = False                       # a Space with OAuth configured
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS["local"])

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DeploymentError(f"WORKBENCH_MODE={self.mode!r} is not one of {', '.join(MODES)}")

    @property
    def local(self) -> bool:
        return self.mode == "local"

    @property
    def public(self) -> bool:
        return self.mode == "public"

    @property
    def precise_errors(self) -> bool:
        """Whether a missing source may be named as missing (only in local mode: elsewhere one generic
        message, so that errors cannot be used to probe the server's files)."""
        return self.mode == "local"

    @property
    def remote_code_possible(self) -> bool:
        """Whether any job may run a model's own Python code (the server's switch, and never in public)."""
        return self.allow_remote_code and self.mode != "public"

    def is_admin(self, name: str) -> bool:
        return self.mode == "local" or name in self.admins

    def with_limits(self, **values: Any) -> "Deployment":
        """A copy with some limits changed (tests, and the settings page of a later release)."""
        return dataclasses.replace(self, limits=dataclasses.replace(self.limits, **values))

    @classmethod
    def for_mode(cls, mode: str, **values: Any) -> "Deployment":
        """A deployment of ``mode`` with that mode's default limits (and other fields as given)."""
        if mode not in MODES:
            raise DeploymentError(f"WORKBENCH_MODE={mode!r} is not one of {', '.join(MODES)}")
        values.setdefault("limits", DEFAULT_LIMITS[mode])
        return cls(mode=mode, **values)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Deployment":
        """The deployment the environment describes; ``DeploymentError`` naming the bad variable."""
        env = os.environ if env is None else env
        on_space = bool(env.get("SPACE_ID", "").strip())
        mode = (env.get("WORKBENCH_MODE", "").strip().lower() or ("public" if on_space else "local"))
        if mode not in MODES:
            raise DeploymentError(f"WORKBENCH_MODE={mode!r} is not one of {', '.join(MODES)}")
        limits = _limits_from_env(DEFAULT_LIMITS[mode], env)
        allow_remote = _flag(env, "WORKBENCH_ALLOW_REMOTE_CODE")
        return cls(mode=mode, admins=frozenset(_list(env.get("WORKBENCH_ADMINS", ""))),
                   data_dirs=tuple(_data_dirs(env.get("WORKBENCH_DATA_DIRS", ""))),
                   allowed_models=tuple(_list(env.get("WORKBENCH_ALLOWED_MODELS", ""))),
                   allowed_datasets=tuple(_list(env.get("WORKBENCH_ALLOWED_DATASETS", ""))),
                   allow_remote_code=allow_remote, on_space=on_space,
                   lmeval_tasks=tuple(_list(env["WORKBENCH_LMEVAL_TASKS"])) if "WORKBENCH_LMEVAL_TASKS" in env
                   else PUBLIC_LMEVAL_TASKS,
                   oauth=on_space and bool(env.get("OAUTH_CLIENT_ID", "").strip()), limits=limits)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise DeploymentError(f"{name}={value!r}: use 1 or 0")


def _data_dirs(text: str) -> list[Path]:
    """``WORKBENCH_DATA_DIRS``: folders (``os.pathsep`` or comma separated) whose files jobs may read,
    by their real path (symlinks resolved once here)."""
    out = []
    for part in text.replace(os.pathsep, ",").split(","):
        if part.strip():
            out.append(Path(os.path.realpath(Path(part.strip()).expanduser())))
    return out


def _limits_from_env(base: Limits, env: Mapping[str, str]) -> Limits:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(Limits):
        name = f"WORKBENCH_LIMIT_{f.name.upper()}"
        raw = env.get(name, "").strip()
        if not raw:
            continue
        kind = type(getattr(base, f.name))
        try:
            value = kind(float(raw)) if kind is int else float(raw)
        except ValueError:
            raise DeploymentError(f"{name}={raw!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise DeploymentError(f"{name}={raw!r} must be a finite number >= 0")
        changes[f.name] = value
    return dataclasses.replace(base, **changes)


_current: Deployment | None = None
_in_call: contextvars.ContextVar[Deployment | None] = contextvars.ContextVar("workbench_deployment", default=None)


def current() -> Deployment:
    """The deployment in force: the one of the web page whose handler is running (``using``), else
    this process's (from the environment, read once; ``configure`` replaces it)."""
    global _current
    scoped = _in_call.get()
    if scoped is not None:
        return scoped
    if _current is None:
        _current = Deployment.from_env()
    return _current


@contextlib.contextmanager
def using(deployment: Deployment) -> Iterator[Deployment]:
    """Run a block under ``deployment``'s rules (each handler call of a page runs under the page's)."""
    token = _in_call.set(deployment)
    try:
        yield deployment
    finally:
        _in_call.reset(token)


def configure(deployment: Deployment | None) -> None:
    """Set this process's deployment (the app at start; tests). ``None``: read the environment again."""
    global _current
    _current = deployment
