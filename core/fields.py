"""What a setting is and how every one is checked: the typed, strict fields all specs are made of.

Every setting is a dataclass field whose ``metadata`` carries what a form needs to draw it and what
``validate()`` needs to check it: ``help`` (one line), ``min``/``max`` for numbers, ``choices`` for
enumerations, ``max_len`` for text, ``max_items`` for lists, ``keys`` for mappings. The UI builds its
widgets from these fields (``fields_of``), so the engine and the UI cannot drift apart.

Specs arrive from strangers (the HTTP API, uploaded JSON), so the checks are strict and all live in one
place, ``_check_field``, which reads a field's kind from its default (as the form does):

- booleans are JSON booleans, never ``"false"`` or ``0``;
- numbers are finite (no NaN, no Infinity), never booleans, and within the field's ``min``/``max``
  (every numeric field has both); integer fields take an int or an integral float (``3.0`` from a form
  widget), which ``validate()`` turns into the int;
- text is a string without NUL characters or lone surrogates, at most ``max_len`` (4096) characters;
- lists are JSON arrays of the right items, without duplicates (refused, not silently dropped);
- mappings are JSON objects of string to non-empty string.

An explicit ``null`` where a mapping, list or section belongs is an error naming the field ("must be a
JSON object"), not a silent default: leave the key out to get the default. ``from_dict`` checks the
shape (objects where sections belong, no unknown keys); ``validate()`` checks the values. Errors are
``ConfigError(field, message)`` with the dotted path of the field at fault. ``parse_json`` reads JSON
as strictly. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import field
from typing import Any

MAX_TEXT = 4096  # characters in a name, a path, a hub id
MAX_BENCHMARKS = 50
MAX_LAYER = 4096  # no model has more layers; bounds "0-N" selections before they are expanded
MAX_COUNT = 10**9  # steps, rows: far beyond any job, far below int64
INT64_MAX = 2**63 - 1
MAX_JSON_CHARS = 1_000_000  # a job spec is a few kilobytes


class ConfigError(ValueError):
    """An invalid setting. ``field`` names it (dotted for nested specs, e.g. ``train.learning_rate``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def within(self, prefix: str) -> "ConfigError":
        """The same error with its field path prefixed (``r`` -> ``adapter.r``)."""
        return ConfigError(f"{prefix}.{self.field}", self.message)


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying form/validation metadata (``min``, ``max``, ``choices``, ...)."""
    if isinstance(default, (list, dict, tuple)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def section_field(cls: type) -> Any:
    """A dataclass field holding a nested settings object (a section of a ``JobSpec``)."""
    return field(default_factory=cls, metadata={"settings": cls})


class Settings:
    """Base of every settings dataclass: generic checks from field metadata and JSON round-trip."""

    def validate(self):
        """Check every field (``ConfigError`` naming the first bad one); integral floats become ints."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _check_field(f, value)
            if checked is not value:
                setattr(self, f.name, checked)
        self.check()
        return self

    def check(self) -> None:
        """Cross-field checks a subclass adds; raise ``ConfigError``."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if "settings" in f.metadata and hasattr(value, "to_dict") else plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        """The settings of a JSON object (``None``: all defaults). Shape only; ``validate()`` checks values."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("settings", f"{cls.__name__} must be a JSON object (got {show(data)})")
        names = {f.name: f for f in dataclasses.fields(cls)}
        refuse_unknown(data, names, f"setting for {cls.__name__}")
        kwargs = {}
        for name, value in data.items():
            sub = names[name].metadata.get("settings")
            if sub is not None:
                if not isinstance(value, dict):
                    raise ConfigError(name, f"must be a JSON object (got {show(value)})")
                try:
                    value = sub.from_dict(value)
                except ConfigError as err:
                    raise err.within(name) from None
            kwargs[name] = plain(value)
        return cls(**kwargs)


def plain(value: Any) -> Any:
    """A JSON-ready copy of a field value: tuples become lists; lists and mappings are copied."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def show(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for one-line messages."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past the digit limit of str(), a very deep list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def key_name(key: Any) -> str:
    """An unknown key as a field name: itself when short and printable, else its repr, cut to 60."""
    text = key if isinstance(key, str) and key.isprintable() else repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse_unknown(data: dict, known: Any, what: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(key_name(key), f"unknown {what}; known: {', '.join(known)}")


def _kind(f: dataclasses.Field) -> str:
    """What a field holds, read from its metadata and default the way the form reads it."""
    meta = f.metadata
    if "settings" in meta:
        return "section"
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if meta.get("choices") is not None:
        if isinstance(default, (list, tuple)):
            return "choice_list"
        return "choice_or_number" if meta.get("number_ok") else "choice"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (int, float)):
        return "number"
    if isinstance(default, dict):
        return "mapping"
    if isinstance(default, (list, tuple)):
        return "list"
    return "text"


def _check_field(f: dataclasses.Field, value: Any) -> Any:
    """Check one field's value against its kind and metadata; return it (an integral float as int)."""
    name, meta = f.name, f.metadata
    kind = _kind(f)
    if kind == "section":
        if not isinstance(value, meta["settings"]):
            raise ConfigError(name, f"must be a JSON object (got {show(value)})")
        try:
            value.validate()
        except ConfigError as err:
            raise err.within(name) from None
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false (got {show(value)})")
    elif kind == "number":
        value = _check_number(name, value, meta)
    elif kind == "choice":
        check_choice(name, value, meta["choices"])
    elif kind == "choice_or_number":
        if not (isinstance(value, str) and value in meta["choices"]):
            if not _is_number(value):
                raise ConfigError(name, f"must be a number or one of {', '.join(meta['choices'])} "
                                        f"(got {show(value)})")
            value = _check_number(name, value, meta)
    elif kind == "choice_list":
        _check_list(name, value, len(meta["choices"]))
        for item in value:
            check_choice(name, item, meta["choices"])
    elif kind == "list":
        _check_list(name, value, meta.get("max_items", MAX_BENCHMARKS))
        for i, item in enumerate(value):
            check_text(name, item, meta.get("max_len", MAX_TEXT), empty_ok=False, what=f"entry {i} ")
    elif kind == "mapping":
        _check_mapping(name, value, meta.get("keys"), meta.get("max_len", MAX_TEXT))
    else:
        check_text(name, value, meta.get("max_len", MAX_TEXT))
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(name: str, value: Any, meta: Any) -> int | float:
    if not _is_number(value):
        raise ConfigError(name, f"must be a number (got {show(value)})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number (got {show(value)})")
    given = value
    if meta.get("integer") and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(name, f"must be a whole number (got {show(value)})")
        value = int(value)
    lo, hi = meta.get("min"), meta.get("max")
    if meta.get("integer"):  # every integer fits an int64, whatever the field's own range
        lo = -INT64_MAX - 1 if lo is None else max(lo, -INT64_MAX - 1)
        hi = INT64_MAX if hi is None else min(hi, INT64_MAX)
    if lo is not None and value < lo:
        raise ConfigError(name, f"must be >= {lo} (got {show(given)})")
    if hi is not None and value > hi:
        raise ConfigError(name, f"must be <= {hi} (got {show(given)})")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not (isinstance(value, str) and value in choices):
        raise ConfigError(name, f"must be one of {', '.join(choices)} (got {show(value)})")


def check_text(name: str, value: Any, max_len: int = MAX_TEXT, empty_ok: bool = True, what: str = "") -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"{what}must be a string (got {show(value)})")
    if len(value) > max_len:
        raise ConfigError(name, f"{what}must be at most {max_len} characters (got {len(value)})")
    if "\x00" in value:
        raise ConfigError(name, f"{what}must not contain NUL characters (got {show(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(name, f"{what}must be valid Unicode, not a lone surrogate (got {show(value)})") from None
    if not empty_ok and not value.strip():
        raise ConfigError(name, f"{what}must not be empty (got {show(value)})")
    return value


def _check_list(name: str, value: Any, max_items: int) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(name, f"must be a JSON array (got {show(value)})")
    if len(value) > max_items:
        raise ConfigError(name, f"at most {max_items} entries (got {len(value)})")
    seen = []
    for item in value:
        if item in seen:
            raise ConfigError(name, f"lists {show(item)} twice")
        seen.append(item)


def _check_mapping(name: str, value: Any, keys: tuple[str, ...] | None, max_len: int) -> None:
    if not isinstance(value, dict):
        raise ConfigError(name, f"must be a JSON object (got {show(value)})")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(name, f"keys must be strings (got {show(key)})")
        if keys is not None and key not in keys:
            raise ConfigError(name, f"unknown key {show(key)}; use {', '.join(keys)}")
        check_text(name, item, max_len, empty_ok=False, what=f"{show(key)} ")


def fields_of(settings_cls: type) -> list[dict[str, Any]]:
    """Describe a settings dataclass for a form: name, default, help, min/max/choices."""
    out = []
    for f in dataclasses.fields(settings_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        out.append({"name": f.name, "default": plain(default), **f.metadata})
    return out


def parse_json(text: str | bytes, field: str = "spec") -> Any:
    """The value of JSON ``text``, strictly: ``ConfigError(field, ...)`` for anything else.

    Refuses what Python's ``json`` lets through (``NaN``, ``Infinity``), nesting deep enough to exhaust
    the stack, numbers past ``int``'s digit limit and texts over a megabyte; a leading UTF-8 BOM is
    skipped (editors on Windows write one).
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(field, "not valid JSON: not UTF-8 text") from None
    if not isinstance(text, str):
        raise ConfigError(field, f"expected JSON text (got {type(text).__name__})")
    if len(text) > MAX_JSON_CHARS:
        raise ConfigError(field, f"at most {MAX_JSON_CHARS} characters of JSON (got {len(text)})")
    try:
        return json.loads(text.removeprefix("\ufeff"), parse_constant=_refuse_constant)
    except _NotJSON as err:
        raise ConfigError(field, f"not valid JSON: {err} is not a JSON number") from None
    except json.JSONDecodeError as err:
        raise ConfigError(field, f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise ConfigError(field, "not valid JSON: nested too deeply") from None
    except ValueError:  # an integer with more digits than int() takes (4300)
        raise ConfigError(field, "not valid JSON: a number with too many digits") from None


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(name)


def dump_json(data: dict[str, Any]) -> str:
    try:
        return json.dumps(data, indent=2, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise ConfigError("spec", "holds a value JSON cannot carry (NaN, Infinity, an object); "
                                  "validate() names the field") from None
