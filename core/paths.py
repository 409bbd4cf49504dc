"""Where the workbench keeps its files: ``$WORKBENCH_HOME`` (default ``./workbench_data``); reading the
JSON files a user hands the command lines, with one-line errors that name the file as given; and how
the command lines report an error (``cli_error``). Standard library only: ``python -m jobs`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from .fields import ConfigError, parse_json

DEBUG_ENV = "WORKBENCH_DEBUG"
MAX_TEXT_BYTES = 64 * 2**20  # a spec or study file is kilobytes; this catches a model file given by mistake

HOME_ENV = "WORKBENCH_HOME"
DEFAULT_HOME = "workbench_data"


class WorkbenchHomeError(RuntimeError):
    """``$WORKBENCH_HOME`` (or a folder in it) is a file, cannot be created, or is not writable."""


class InputFileError(ValueError):
    """A file named on a command line is missing, a folder, unreadable, not text, empty or not JSON."""


def _home_error(given: str, problem: str) -> WorkbenchHomeError:
    where = f"{given} (${HOME_ENV})" if os.environ.get(HOME_ENV) else f"{given} (the default of ${HOME_ENV})"
    return WorkbenchHomeError(f"the data folder {where} {problem}; set {HOME_ENV} to a writable folder")


def _make_dir(path: Path, given: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise _home_error(given, "is a file, not a folder") from None
    except NotADirectoryError:
        raise _home_error(given, "is inside a file, not a folder") from None
    except OSError as err:
        raise _home_error(given, f"cannot be created ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _home_error(given, "is not writable")
    return path


def workbench_home() -> Path:
    """The data directory (database, runs, converted models), created on first use.

    Raises ``WorkbenchHomeError`` naming the folder and the variable when it cannot be used.
    """
    given = os.environ.get(HOME_ENV) or DEFAULT_HOME
    return _make_dir(Path(given).expanduser().resolve(), given)


def _subdir(name: str) -> Path:
    home = workbench_home()
    return _make_dir(home / name, str(Path(os.environ.get(HOME_ENV) or DEFAULT_HOME) / name))


def models_dir() -> Path:
    return _subdir("models")


def runs_dir() -> Path:
    return _subdir("runs")


def read_text(name: str, what: str = "file") -> str:
    """The text of the file ``name`` (``-``: standard input), UTF-8 with or without a byte-order mark.

    Every way it can fail raises ``InputFileError`` with one line naming ``name`` as given.
    """
    if name == "-":
        name, data = "<stdin>", sys.stdin.buffer.read()
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            raise InputFileError(f"{name} is a folder, not a {what}")
        try:
            if path.stat().st_size > MAX_TEXT_BYTES:
                raise InputFileError(f"{name} is {path.stat().st_size / 2**20:,.0f} MB: too large for a {what}")
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputFileError(f"{name}: no such file") from None
        except OSError as err:
            raise InputFileError(f"cannot read {name}: {(err.strerror or str(err)).lower()}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputFileError(f"{name} is not a text file (not UTF-8); expected a {what}") from None
    if "\x00" in text:
        raise InputFileError(f"{name} is a binary file; expected a {what}")
    if not text.strip():
        raise InputFileError(f"{name} is empty; expected a {what}")
    return text


def read_json(name: str, what: str = "JSON file", parse: Callable[[dict], Any] | None = None) -> Any:
    """The JSON object in the file ``name`` (see ``read_text``), through ``parse`` if given (e.g.
    ``JobSpec.from_dict``). Anything wrong, a ``ConfigError`` of ``parse`` included, raises
    ``InputFileError`` naming the file: ``spec.json: train.learning_rate: must be > 0 (got -1)``.
    """
    text = read_text(name, what)
    name = "<stdin>" if name == "-" else name
    try:
        data = parse_json(text)  # strict: no NaN, no stack-deep nesting, no endless digits
    except ConfigError as err:
        raise InputFileError(f"{name}: {err.message}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise InputFileError(f"{name} holds {kind}, not a JSON object; expected a {what}")
    if parse is None:
        return data
    with settings_of(name):
        try:
            return parse(data)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as err:
            raise InputFileError(f"{name} is not a valid {what}: {err}") from err


@contextlib.contextmanager
def settings_of(name: str) -> Iterator[None]:
    """``with settings_of("spec.json"): service.submit(spec)``: a ``ConfigError`` in the block is reported
    as being in that file (an ``InputFileError`` naming it)."""
    try:
        yield
    except ConfigError as err:
        raise InputFileError(f"{name}: {err}") from err


def cli_error(message: str, code: int) -> int:
    """Print ``error: message`` as one line on stderr, after the traceback of the exception being
    handled when ``$WORKBENCH_DEBUG`` is set (not ``0``); return the exit status ``code``.

    The command lines' convention: 2 when what was asked is wrong (arguments, a file, an id), 1 when
    it could not be done.
    """
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exc()
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"error: {line}", file=sys.stderr)
    return code
