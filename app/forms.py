"""Widgets generated from the settings dataclasses, so the form and the engine cannot drift apart.

``fields_of(cls)`` (core.config) describes each field: name, default, help, min/max, choices. Here each
field becomes one Gradio widget (``widget_for``), and two pure functions convert between what the
widget holds and what the dataclass wants (``parse_value`` / ``widget_value``). Handlers receive the
form as a plain dict keyed by *field paths* such as ``"train.learning_rate"`` or ``"adapter.lora.r"``,
never by element ids.

Ranges are *not* enforced by the widgets (a Gradio ``minimum`` would reject the value before our
handler runs, with its own message); they are checked by ``validate()`` and shown next to the form.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import gradio as gr

from core.fields import ConfigError, fields_of, parse_json


def _label(name: str) -> str:
    return name.replace("_", " ")


def _range_text(meta: dict[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f" [{lo}–{hi}]"
    if lo is not None:
        return f" (≥ {lo})"
    if hi is not None:
        return f" (≤ {hi})"
    return ""


def kind_of(meta: dict[str, Any]) -> str:
    """What widget a field needs: checkboxes, radio, dropdown, choice_or_number, bool, int, float, json, text."""
    default, choices = meta["default"], meta.get("choices")
    if choices is not None:
        if isinstance(default, (list, tuple)):
            return "checkboxes"
        if meta.get("number_ok"):
            return "choice_or_number"
        return "radio" if len(choices) <= 4 else "dropdown"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int) and meta.get("integer"):
        return "int"
    if isinstance(default, (int, float)):
        return "float"
    if isinstance(default, (dict, list)):
        return "json"
    return "text"


def widget_value(meta: dict[str, Any], value: Any) -> Any:
    """The value a widget of this field shows for ``value``."""
    kind = kind_of(meta)
    if kind == "json":
        return json.dumps(value) if value else ""
    if kind == "choice_or_number":
        return str(value)
    if kind == "checkboxes":
        return list(value or [])
    return value


def parse_value(meta: dict[str, Any], raw: Any, path: str) -> Any:
    """The dataclass value of what the widget holds; ``ConfigError(path, ...)`` when it cannot be one."""
    kind = kind_of(meta)
    if kind in ("int", "float"):
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise ConfigError(path, "enter a number")
        try:
            number = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(path, f"must be a number (got {str(raw)[:60]!r})") from None
        if not math.isfinite(number):
            raise ConfigError(path, f"must be a finite number (got {raw!r})")
        if kind == "int":
            if number != int(number):
                raise ConfigError(path, f"must be a whole number (got {raw})")
            return int(number)
        return number
    if kind == "choice_or_number":
        text = str(raw if raw is not None else "").strip()
        if text in meta["choices"]:
            return text
        try:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError(text)
            return number
        except ValueError:
            raise ConfigError(path, f"a number or one of {', '.join(meta['choices'])} (got {text!r})") from None
    if kind == "json":
        if isinstance(raw, (dict, list)):  # an API call may send the JSON value itself
            value = raw
        else:
            text = raw.strip() if isinstance(raw, str) else ""
            if raw is not None and not isinstance(raw, str):
                raise ConfigError(path, f"expected JSON text (got {str(raw)[:60]!r})")
            if not text:
                return type(meta["default"])()
            value = parse_json(text, path)
        if not isinstance(value, type(meta["default"])):
            raise ConfigError(path, f"expected a JSON {type(meta['default']).__name__}")
        return value
    if kind == "checkboxes":
        if raw is not None and not isinstance(raw, (list, tuple)):
            raise ConfigError(path, f"expected a list of choices (got {str(raw)[:60]!r})")
        return list(raw or [])
    if kind == "bool":
        if raw is None:
            return False
        if not isinstance(raw, bool):
            raise ConfigError(path, f"expected true or false (got {str(raw)[:60]!r})")
        return raw
    return raw if raw is not None else ""


def widget_for(meta: dict[str, Any], value: Any = None, **overrides: Any) -> gr.components.Component:
    """One Gradio widget for a field (label = field name, info = its help and range)."""
    kind = kind_of(meta)
    value = widget_value(meta, meta["default"] if value is None else value)
    common = dict(label=_label(meta["name"]), info=meta.get("help", "") + _range_text(meta))
    common.update(overrides)
    if kind == "checkboxes":
        return gr.CheckboxGroup(choices=list(meta["choices"]), value=value, **common)
    if kind == "radio":
        return gr.Radio(choices=list(meta["choices"]), value=value, **common)
    if kind == "dropdown":
        return gr.Dropdown(choices=list(meta["choices"]), value=value, **common)
    if kind == "choice_or_number":
        choices = [str(meta["default"])] + [c for c in meta["choices"] if c != str(meta["default"])]
        return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **common)
    if kind == "bool":
        return gr.Checkbox(value=value, **common)
    if kind == "int":
        return gr.Number(value=value, precision=0, **common)
    if kind == "float":
        step = 1e-5 if abs(float(meta["default"] or 0)) < 1e-2 and meta["default"] else 0.01
        return gr.Number(value=value, step=step, **common)
    if kind == "json":
        return gr.Textbox(value=value, lines=1, placeholder="{}", **common)
    return gr.Textbox(value=value, **common)


@dataclass
class Form:
    """Widgets in a fixed order, each known by its field path; turns Gradio's positional values into a dict."""

    paths: list[str] = field(default_factory=list)
    components: list[Any] = field(default_factory=list)

    def add(self, path: str, component: Any) -> Any:
        if path in self.paths:
            raise ValueError(f"duplicate form path {path}")
        self.paths.append(path)
        self.components.append(component)
        return component

    def __getitem__(self, path: str) -> Any:
        return self.components[self.paths.index(path)]

    def as_dict(self, values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.paths, values))

    def values_in_order(self, values: dict[str, Any]) -> list[Any]:
        """Gradio outputs for every widget: the value where ``values`` has one, else unchanged."""
        return [values[p] if p in values else gr.skip() for p in self.paths]


def add_fields(form: Form, settings_cls: type, prefix: str, skip: Iterable[str] = (),
               overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Draw a widget for every field of ``settings_cls`` (except ``skip``) into the current layout."""
    overrides = overrides or {}
    made = {}
    for meta in fields_of(settings_cls):
        if meta["name"] in skip:
            continue
        made[meta["name"]] = form.add(f"{prefix}.{meta['name']}", widget_for(meta, **overrides.get(meta["name"], {})))
    return made


def collect(settings_cls: type, prefix: str, form: dict[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """The settings dict of ``settings_cls`` from the form values under ``prefix``."""
    out = {}
    for meta in fields_of(settings_cls):
        path = f"{prefix}.{meta['name']}"
        if meta["name"] in skip or path not in form:
            continue
        out[meta["name"]] = parse_value(meta, form[path], path)
    return out


def spread(settings_cls: type, prefix: str, values: dict[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """Form values (path -> widget value) from a settings dict: the inverse of ``collect``."""
    out = {}
    for meta in fields_of(settings_cls):
        if meta["name"] in skip or meta["name"] not in values:
            continue
        out[f"{prefix}.{meta['name']}"] = widget_value(meta, values[meta["name"]])
    return out
