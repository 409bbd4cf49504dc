"""Configuration dataclasses: the one description of an adapter, a training run and a job.

Every setting is a dataclass field whose ``metadata`` carries what a form needs to draw it and what
``validate()`` needs to check it: ``help`` (one line), ``min``/``max`` for numbers, ``choices`` for
enumerations, ``max_len`` for text, ``max_items`` for lists, ``keys`` for mappings. The UI builds its
widgets from these fields (``fields_of``), so the engine and the UI cannot drift apart. Defaults follow
the LLM-Adapters study (Hu et al., EMNLP 2023).

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
JSON object"), not a silent default: leave the key out to get the default. Only ``adapter.arch`` takes
``null``, which is its default. ``from_dict`` checks the shape (objects where sections belong, no unknown
keys); ``validate()`` checks the values. Errors are ``ConfigError(field, message)`` with the dotted path
of the field at fault; a method's settings are named under ``adapter`` directly (``adapter.r``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

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
            out[f.name] = value.to_dict() if "settings" in f.metadata and hasattr(value, "to_dict") else _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        """The settings of a JSON object (``None``: all defaults). Shape only; ``validate()`` checks values."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("settings", f"{cls.__name__} must be a JSON object (got {_show(data)})")
        names = {f.name: f for f in dataclasses.fields(cls)}
        _refuse_unknown(data, names, f"setting for {cls.__name__}")
        kwargs = {}
        for name, value in data.items():
            sub = names[name].metadata.get("settings")
            if sub is not None:
                if not isinstance(value, dict):
                    raise ConfigError(name, f"must be a JSON object (got {_show(value)})")
                try:
                    value = sub.from_dict(value)
                except ConfigError as err:
                    raise err.within(name) from None
            kwargs[name] = _plain(value)
        return cls(**kwargs)


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a field value: tuples become lists; lists and mappings are copied."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _show(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for one-line messages."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past the digit limit of str(), a very deep list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _key_name(key: Any) -> str:
    """An unknown key as a field name: itself when short and printable, else its repr, cut to 60."""
    text = key if isinstance(key, str) and key.isprintable() else repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_unknown(data: dict, known: Any, what: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(_key_name(key), f"unknown {what}; known: {', '.join(known)}")


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
            raise ConfigError(name, f"must be a JSON object (got {_show(value)})")
        try:
            value.validate()
        except ConfigError as err:
            raise err.within(name) from None
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false (got {_show(value)})")
    elif kind == "number":
        value = _check_number(name, value, meta)
    elif kind == "choice":
        _check_choice(name, value, meta["choices"])
    elif kind == "choice_or_number":
        if not (isinstance(value, str) and value in meta["choices"]):
            if not _is_number(value):
                raise ConfigError(name, f"must be a number or one of {', '.join(meta['choices'])} "
                                        f"(got {_show(value)})")
            value = _check_number(name, value, meta)
    elif kind == "choice_list":
        _check_list(name, value, len(meta["choices"]))
        for item in value:
            _check_choice(name, item, meta["choices"])
    elif kind == "list":
        _check_list(name, value, meta.get("max_items", MAX_BENCHMARKS))
        for i, item in enumerate(value):
            _check_text(name, item, meta.get("max_len", MAX_TEXT), empty_ok=False, what=f"entry {i} ")
    elif kind == "mapping":
        _check_mapping(name, value, meta.get("keys"), meta.get("max_len", MAX_TEXT))
    else:
        _check_text(name, value, meta.get("max_len", MAX_TEXT))
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(name: str, value: Any, meta: Any) -> int | float:
    if not _is_number(value):
        raise ConfigError(name, f"must be a number (got {_show(value)})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number (got {_show(value)})")
    given = value
    if meta.get("integer") and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(name, f"must be a whole number (got {_show(value)})")
        value = int(value)
    lo, hi = meta.get("min"), meta.get("max")
    if meta.get("integer"):  # every integer fits an int64, whatever the field's own range
        lo = -INT64_MAX - 1 if lo is None else max(lo, -INT64_MAX - 1)
        hi = INT64_MAX if hi is None else min(hi, INT64_MAX)
    if lo is not None and value < lo:
        raise ConfigError(name, f"must be >= {lo} (got {_show(given)})")
    if hi is not None and value > hi:
        raise ConfigError(name, f"must be <= {hi} (got {_show(given)})")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not (isinstance(value, str) and value in choices):
        raise ConfigError(name, f"must be one of {', '.join(choices)} (got {_show(value)})")


def _check_text(name: str, value: Any, max_len: int = MAX_TEXT, empty_ok: bool = True, what: str = "") -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"{what}must be a string (got {_show(value)})")
    if len(value) > max_len:
        raise ConfigError(name, f"{what}must be at most {max_len} characters (got {len(value)})")
    if "\x00" in value:
        raise ConfigError(name, f"{what}must not contain NUL characters (got {_show(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(name, f"{what}must be valid Unicode, not a lone surrogate (got {_show(value)})") from None
    if not empty_ok and not value.strip():
        raise ConfigError(name, f"{what}must not be empty (got {_show(value)})")
    return value


def _check_list(name: str, value: Any, max_items: int) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(name, f"must be a JSON array (got {_show(value)})")
    if len(value) > max_items:
        raise ConfigError(name, f"at most {max_items} entries (got {len(value)})")
    seen = []
    for item in value:
        if item in seen:
            raise ConfigError(name, f"lists {_show(item)} twice")
        seen.append(item)


def _check_mapping(name: str, value: Any, keys: tuple[str, ...] | None, max_len: int) -> None:
    if not isinstance(value, dict):
        raise ConfigError(name, f"must be a JSON object (got {_show(value)})")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(name, f"keys must be strings (got {_show(key)})")
        if keys is not None and key not in keys:
            raise ConfigError(name, f"unknown key {_show(key)}; use {', '.join(keys)}")
        _check_text(name, item, max_len, empty_ok=False, what=f"{_show(key)} ")


def fields_of(settings_cls: type) -> list[dict[str, Any]]:
    """Describe a settings dataclass for a form: name, default, help, min/max/choices."""
    out = []
    for f in dataclasses.fields(settings_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        out.append({"name": f.name, "default": _plain(default), **f.metadata})
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


def _dump_json(data: dict[str, Any]) -> str:
    try:
        return json.dumps(data, indent=2, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise ConfigError("spec", "holds a value JSON cannot carry (NaN, Infinity, an object); "
                                  "validate() names the field") from None


# --------------------------------------------------------------------------------------------------
# Adapter methods. Each method's settings dataclass is declared with its record in its family's file
# (core/adapters/); config reaches them through the registry (core.methods) inside functions only,
# so importing this module stays free of torch.

ROLES = ("q", "k", "v", "o", "gate", "up", "down")  # the linear layers of a decoder layer an adapter can name
DEFAULT_METHOD = "lora"


class _RegistryView(Mapping):
    """A read-only mapping computed from the method registry on every access (so a method registered
    later appears in it too)."""

    def __init__(self, items: Any, doc: str):
        self._items = items
        self.__doc__ = doc

    def _mapping(self) -> dict[str, Any]:
        from . import methods

        return self._items(methods.all())

    def __getitem__(self, key: str) -> Any:
        return self._mapping()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())

    def __repr__(self) -> str:
        return repr(self._mapping())


METHOD_SETTINGS: Mapping[str, type[Settings]] = _RegistryView(
    lambda ms: {m.name: m.settings for m in ms}, "Method name -> its settings dataclass, from the registry.")
# The paper's names for its configurations, declared by each method's record.
PRESETS: Mapping[str, tuple[str, dict[str, Any]]] = _RegistryView(
    lambda ms: {p: (m.name, dict(v)) for m in ms for p, v in m.presets.items()},
    "Preset name (AdapterH, LoRA, ...) -> (method, settings overrides), from the registry.")


_LAYER_PART = re.compile(r"(-?[0-9]+)(?:-(-?[0-9]+))?")


def parse_layers(spec: str | list[int], num_layers: int | None = None) -> list[int] | None:
    """Parse a layer selection: ``"all"``, ``"0,2,5"``, ``"0-11"``, ``"0-3,8"`` or a list of ints.

    Returns the sorted indices, or ``None`` for all layers. With ``num_layers`` known, indices out of
    range raise ``ConfigError('layers', ...)``; negative indices count from the end. Whatever the model,
    an index beyond +-``MAX_LAYER`` is refused (before a range like ``"0-999999999"`` is expanded), and
    list entries must be ints (not ``true``, not ``1.5``).
    """
    expected = "expected 'all', a list like '0,2,5', a range like '0-11' or a JSON array of ints"
    picked: set[int] = set()
    if isinstance(spec, str):
        if len(spec) > MAX_TEXT:
            raise ConfigError("layers", f"must be at most {MAX_TEXT} characters (got {len(spec)})")
        text = "".join(spec.split())
        if text.lower() in ("", "all"):
            return None
        for part in text.split(","):
            match = _LAYER_PART.fullmatch(part)
            if match is None:
                raise ConfigError("layers", f"{expected} (got {_show(spec)})")
            a = _layer_index(match[1])
            b = a if match[2] is None else _layer_index(match[2])
            if b < a:
                raise ConfigError("layers", f"range {part!r} runs backwards")
            picked.update(range(a, b + 1))
    elif isinstance(spec, (list, tuple)):
        if len(spec) > 2 * MAX_LAYER:
            raise ConfigError("layers", f"at most {2 * MAX_LAYER} entries (got {len(spec)})")
        for i in spec:
            if not isinstance(i, int) or isinstance(i, bool):
                raise ConfigError("layers", f"layer entries must be whole numbers (got {_show(i)})")
            picked.add(_layer_index(i))
    else:
        raise ConfigError("layers", f"{expected} (got {_show(spec)})")
    if not picked:
        raise ConfigError("layers", "the selection is empty")
    if num_layers is not None:
        bad = [i for i in picked if not -num_layers <= i < num_layers]
        if bad:
            raise ConfigError("layers", f"layer {bad[0]} is out of range: the model has {num_layers} layers "
                                        f"(0-{num_layers - 1})")
        picked = {i % num_layers for i in picked}
    return sorted(picked)


def _layer_index(given: str | int) -> int:
    index = given
    if isinstance(given, str):
        index = int(given) if len(given) <= 12 else MAX_LAYER  # no int() of a thousand-digit string
    if not -MAX_LAYER <= index < MAX_LAYER:
        shown = given if isinstance(given, str) else _show(given)
        raise ConfigError("layers", f"layer {shown[:60]} is out of range: no model has over {MAX_LAYER} layers")
    return index


def _method(name: Any) -> Any:
    """The registry's record of method ``name``; ``ConfigError('method')`` for anything else."""
    from . import methods

    return methods.get(name)


ARCH_KEYS = ("layers", "roles", "fused_layout", "backbone")


def _check_arch(arch: Any) -> None:
    """The shape of a hand-written architecture row; ``core.arch.ArchSpec`` checks its meaning on attach."""
    if arch is None:
        return
    if not isinstance(arch, dict):
        raise ConfigError("arch", f"must be a JSON object or null (got {_show(arch)})")
    if not arch:
        return
    for key in arch:
        if key not in ARCH_KEYS:
            raise ConfigError(f"arch.{_key_name(key)}", f"unknown key; known: {', '.join(ARCH_KEYS)}")
    for key in ("layers", "roles"):
        if key not in arch:
            raise ConfigError(f"arch.{key}", 'missing; expected {"layers": "path.to.layers", "roles": {"q": ...}}')
    _check_text("arch.layers", arch["layers"], empty_ok=False)
    roles = arch["roles"]
    if not isinstance(roles, dict) or not roles or len(roles) > 16:
        raise ConfigError("arch.roles", f"must be a JSON object from role to module path (got {_show(roles)})")
    for role, path in roles.items():
        _check_text("arch.roles", role, 16, empty_ok=False, what="a role ")
        _check_text("arch.roles", path, empty_ok=False, what=f"{role!r} ")
    if arch.get("fused_layout") is not None:
        _check_choice("arch.fused_layout", arch["fused_layout"], ("concat", "per_head"))
    if arch.get("backbone") is not None:
        _check_text("arch.backbone", arch["backbone"], empty_ok=False)


@dataclass
class AdapterConfig:
    """Which adapter method, on which layers, with which settings.

    JSON form: ``{"method": "lora", "layers": "all", "settings": {"r": 32, ...}}``. Settings left out
    (``settings=None`` in Python, no ``"settings"`` key in JSON) are the method's defaults.
    """

    method: str = DEFAULT_METHOD
    layers: Any = "all"
    settings: Settings | None = None
    arch: dict | None = None  # a hand-written architecture row for models not in core.arch's table

    def __post_init__(self) -> None:
        if self.settings is None or isinstance(self.settings, dict):
            from . import methods

            if isinstance(self.method, str) and self.method in methods.names():
                self.settings = _method(self.method).settings.from_dict(self.settings)
            elif self.settings is not None:
                _method(self.method)  # raises: dict settings of an unknown method
            # else: an unknown method without settings; validate() names the method

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AdapterConfig":
        """A configuration named as in the paper (``AdapterH``, ``LoRA``, ...), with overrides."""
        if not (isinstance(name, str) and name in PRESETS):
            raise ConfigError("preset", f"unknown preset {_show(name)}; known: {', '.join(PRESETS)}")
        method, values = PRESETS[name]
        return cls(method=method, settings=_method(method).settings(**{**values, **overrides}))

    @classmethod
    def for_method(cls, method: str, layers: Any = "all", **settings: Any) -> "AdapterConfig":
        return cls(method=method, layers=layers, settings=_method(method).settings.from_dict(settings))

    def validate(self, num_layers: int | None = None) -> "AdapterConfig":
        method = _method(self.method)
        if not isinstance(self.settings, method.settings):
            raise ConfigError("settings", f"method {self.method!r} takes {method.settings.__name__}, "
                                          f"got {type(self.settings).__name__}")
        self.settings.validate()
        parse_layers(self.layers, num_layers)
        if method.all_layers_only and parse_layers(self.layers) is not None:
            raise ConfigError("layers", f"{method.label} acts on every layer at once; use 'all'")
        _check_arch(self.arch)
        return self

    def to_dict(self) -> dict[str, Any]:
        settings = self.settings.to_dict() if isinstance(self.settings, Settings) else _plain(self.settings)
        out = {"method": self.method, "layers": _plain(self.layers), "settings": settings}
        if self.arch:
            out["arch"] = {k: _plain(v) for k, v in self.arch.items()} if isinstance(self.arch, dict) else self.arch
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """The adapter of a JSON object. ``"settings"`` must be an object when given; ``"arch"`` may be null."""
        if not isinstance(data, dict):
            raise ConfigError("adapter", f"must be a JSON object (got {_show(data)})")
        _refuse_unknown(data, ("method", "layers", "settings", "arch"), "key of adapter")
        settings_cls = _method(data.get("method", DEFAULT_METHOD)).settings
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise ConfigError("settings", f"must be a JSON object (got {_show(settings)})")
        return cls(method=data.get("method", DEFAULT_METHOD), layers=_plain(data.get("layers", "all")),
                   settings=settings_cls.from_dict(settings), arch=data.get("arch"))

    def to_json(self) -> str:
        return _dump_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        return cls.from_dict(parse_json(text, "adapter"))


# --------------------------------------------------------------------------------------------------
# Model, data, training and job settings.

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelSettings(Settings):
    name: str = setting(DEFAULT_MODEL, "catalogue name, Hugging Face hub id or local directory")
    precision: str = setting("auto", "auto = bf16 where the hardware supports it, else fp32",
                             choices=("auto", "fp32", "bf16", "fp16"))
    device: str = setting("auto", "auto = cuda if available, else cpu", choices=("auto", "cpu", "cuda"))
    trust_remote_code: bool = setting(False, "allow code shipped with a hub model to run")

    def check(self) -> None:
        if not self.name.strip():
            raise ConfigError("name", "name a model")


BUILTIN_DATASET = "builtin:math"
COLUMN_ROLES = ("instruction", "input", "output", "answer")


@dataclass
class DataSettings(Settings):
    source: str = setting(BUILTIN_DATASET, "builtin:math, a JSON/JSONL/CSV file, or a hub dataset id")
    columns: dict = setting({}, "mapping from our names (instruction, input, output) to the file's columns",
                            keys=COLUMN_ROLES)
    template: str = setting("alpaca", "prompt template: the LLM-Adapters (alpaca) one or the model's chat template",
                            choices=("alpaca", "chat"))
    cutoff_len: int = setting(256, "maximum tokens per example; longer rows are truncated",
                              min=16, max=32768, integer=True)
    train_on_inputs: bool = setting(False, "also train on the prompt tokens")
    val_size: float = setting(120, "validation rows: a count (>= 1) or a fraction (< 1); 0 = none",
                              min=0, max=10_000_000)
    limit: int = setting(0, "use only the first N rows (0 = all)", min=0, max=MAX_COUNT, integer=True)

    def check(self) -> None:
        if not self.source.strip():
            raise ConfigError("source", "name a dataset")


@dataclass
class TrainSettings(Settings):
    epochs: float = setting(3.0, "passes over the training data (ignored when max_steps > 0)", min=0.0, max=10000.0)
    max_steps: int = setting(0, "stop after this many optimiser steps (0 = use epochs)",
                             min=0, max=MAX_COUNT, integer=True)
    batch_size: int = setting(16, "examples per optimiser step", min=1, max=65536, integer=True)
    micro_batch_size: int = setting(4, "examples per forward pass (gradient accumulation)",
                                    min=1, max=65536, integer=True)
    learning_rate: float = setting(3e-4, "peak learning rate (> 0)", max=10.0)
    warmup_steps: int = setting(100, "linear warm-up steps", min=0, max=MAX_COUNT, integer=True)
    schedule: str = setting("linear", "learning-rate schedule after warm-up", choices=("linear", "cosine", "constant"))
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0.0, max=1.0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 = off)", min=0.0, max=1e6)
    eval_every: int = setting(50, "validation loss every N steps (0 = only at the end)",
                              min=0, max=MAX_COUNT, integer=True)
    save_every: int = setting(50, "checkpoint every N steps (0 = only at the end)", min=0, max=MAX_COUNT, integer=True)
    log_every: int = setting(1, "report training loss every N steps", min=1, max=MAX_COUNT, integer=True)
    seed: int = setting(42, "random seed", min=0, max=INT64_MAX, integer=True)
    kernels: str = setting("fast", "training speed paths: fast (CPU kernels, one dropout mask shared by q/k/v "
                                   "LoRA) or reference (plain Hugging Face forward and autograd)",
                           choices=("fast", "reference"))

    def check(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", f"must be > 0 (got {self.learning_rate})")
        if self.micro_batch_size > self.batch_size:
            raise ConfigError("micro_batch_size", f"must be <= batch_size ({self.micro_batch_size} > {self.batch_size})")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError("micro_batch_size", f"must divide batch_size ({self.batch_size} % {self.micro_batch_size} != 0)")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("epochs", "set epochs > 0 or max_steps > 0")


@dataclass
class EvalSettings(Settings):
    benchmarks: list = setting([], "benchmarks to run after training (names or file paths)",
                               max_items=MAX_BENCHMARKS)
    limit: int = setting(0, "evaluate only N examples per benchmark (0 = all)", min=0, max=MAX_COUNT, integer=True)
    sample_seed: int = setting(-1, "seeded sample of `limit` examples (-1 = the first N)",
                               min=-1, max=INT64_MAX, integer=True)
    max_new_tokens: int = setting(256, "generation budget per answer", min=1, max=4096, integer=True)
    batch_size: int = setting(32, "prompts generated together", min=1, max=4096, integer=True)


@dataclass
class JobSpec(Settings):
    """Everything a training job needs; the JSON stored with a job and given to ``python -m core train``.

    ``from_dict`` takes a JSON object of the sections below (each an object; leave one out for its
    defaults); ``validate()`` checks every value and returns the spec.
    """

    name: str = setting("", "job name (free text)")
    model: ModelSettings = section_field(ModelSettings)
    adapter: AdapterConfig = section_field(AdapterConfig)
    data: DataSettings = section_field(DataSettings)
    train: TrainSettings = section_field(TrainSettings)
    eval: EvalSettings = section_field(EvalSettings)

    SECTIONS: ClassVar[tuple[str, ...]] = ("model", "adapter", "data", "train", "eval")

    def validate(self) -> "JobSpec":
        return super().validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        if not isinstance(data, dict):
            raise ConfigError("spec", f"a job spec is a JSON object (got {_show(data)})")
        return super().from_dict(data)

    def to_json(self) -> str:
        return _dump_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> "JobSpec":
        """The spec of JSON text; ``ConfigError('spec', ...)`` when it is not a JSON object."""
        return cls.from_dict(parse_json(text, "spec"))
