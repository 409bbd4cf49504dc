"""The Study tab's widgets as a study: the bases a study starts from, what it can compare (methods and
presets), the text fields parsed (values, seeds, learning rates), the paper's grids as widget values,
and ``build_study``, which turns a plain ``inputs`` dict into a checked ``core.study.StudySpec``.
"""

from __future__ import annotations

from typing import Any

from core import methods as registry
from core.config import PRESETS as CONFIG_PRESETS
from core.config import JobSpec
from core.fields import ConfigError
from core.study import StudySpec, hyperparameter_study, placement_study
from jobs.compare import JOB_KEY, job_key, parse_model_key

from .train_form import spec_from_form

PRESET_PLACEMENT, PRESET_HYPER, PRESET_CUSTOM = "placement study", "hyperparameter study", "custom"
PRESETS = (PRESET_PLACEMENT, PRESET_HYPER, PRESET_CUSTOM)
BASE_FORM, BASE_DEFAULT = "form", "default"


def base_choices(service: Any) -> list[tuple[str, str]]:
    """(label, value) of the bases a study can start from: the Train form, the default spec, each job."""
    jobs = [j for j in service.list_jobs() if j.get("kind", "train") == "train"]
    return [("the Train tab's form", BASE_FORM), ("the default job", BASE_DEFAULT),
            *[(f"job {j['id']} · {j['name']}", job_key(j["id"])) for j in jobs]]


def base_spec(service: Any, choice: str | None, train_form: dict[str, Any] | None = None) -> JobSpec:
    """The base job spec of the chosen source; ``ConfigError('base', ...)`` when it cannot be had."""
    choice = choice or BASE_FORM
    if choice == BASE_FORM:
        return spec_from_form(train_form) if train_form else JobSpec()
    if choice == BASE_DEFAULT:
        return JobSpec()
    if choice.startswith(JOB_KEY):
        try:
            return JobSpec.from_dict(service.get(parse_model_key(choice)[1])["spec"])
        except (KeyError, ValueError) as err:
            raise ConfigError("base", f"cannot use {choice} as the base: {err}") from None
    raise ConfigError("base", f"unknown base {choice!r}")


def parse_ints(text: Any, field: str) -> list[int]:
    """``"4,8,16"`` (commas or spaces) -> ``[4, 8, 16]``; ``ConfigError(field)`` for anything else."""
    items = [t for t in str(text or "").replace(",", " ").split()]
    out = []
    for t in items:
        try:
            out.append(int(t))
        except ValueError:
            raise ConfigError(field, f"{t!r} is not a whole number; give numbers like 4,8,16") from None
    return out


def entry_choices() -> list[tuple[str, str]]:
    """(label, value) of what a study can compare: each method, then each preset (a method with settings
    of its own, e.g. DoRA, PiSSA, AdapterH), labelled with its method."""
    return [*((m.label, m.name) for m in registry.all()),
            *((f"{p} ({registry.label(method)} preset)", p) for p, (method, _) in CONFIG_PRESETS.items())]


def parse_learning_rates(text: Any) -> dict[str, float]:
    """``"ia3=3e-3, vera=1e-2"`` (commas or spaces) -> ``{"ia3": 0.003, "vera": 0.01}``;
    ``ConfigError('learning_rates')`` for anything else."""
    out: dict[str, float] = {}
    for item in str(text or "").replace(",", " ").split():
        entry, sep, value = item.partition("=")
        if entry in out:
            raise ConfigError("learning_rates", f"{entry[:40]} is given twice")
        try:
            if not sep or not entry:
                raise ValueError
            out[entry] = float(value)
        except ValueError:
            raise ConfigError("learning_rates", f"{item[:40]!r}: write method=rate, e.g. ia3=3e-3") from None
    return out


def build_study(base: JobSpec, inputs: dict[str, Any]) -> StudySpec:
    """The study of the widgets, checked by ``StudySpec.validate`` (errors name ``methods``,
    ``placements.<method>``, ``values.<method>``, ``seeds``, ``learning_rates``, ``eval.benchmarks``).
    ``inputs``: ``name``, ``methods`` (methods and presets), ``seeds`` (text), ``learning_rates`` (text),
    ``benchmarks`` (list; empty = the base job's), ``placements.<method>`` (list), ``values.<method>`` (text)."""
    chosen = list(inputs.get("methods") or [])
    known = [m for m in registry.all() if m.name in chosen]
    placements = {m.name: list(inputs.get(f"placements.{m.name}") or []) for m in known if m.placements}
    values = {m.name: sorted(dict.fromkeys(parse_ints(inputs.get(f"values.{m.name}"), f"values.{m.name}")))
              for m in known if m.value_setting}
    seeds = list(dict.fromkeys(parse_ints(inputs.get("seeds"), "seeds")))
    base = JobSpec.from_dict(base.to_dict())
    if inputs.get("benchmarks"):
        base.eval.benchmarks = list(inputs["benchmarks"])
    name = str(inputs.get("name") or "").strip() or "study"
    return StudySpec(name=name, base=base, methods=chosen, placements=placements, values=values,
                     seeds=seeds, learning_rates=parse_learning_rates(inputs.get("learning_rates"))).validate()


def hidden_size(base: JobSpec) -> int:
    """The base model's hidden size (a guess of 512 when its config cannot be read)."""
    try:
        from core.estimate import model_config

        return int(getattr(model_config(base.model), "hidden_size", 512) or 512)
    except Exception:  # a preset is only a suggestion: never fail on it
        return 512


def preset_inputs(preset: str, base: JobSpec | None = None) -> dict[str, Any]:
    """Widget values of a preset: methods, placements per method, values per method (text)."""
    base = base or JobSpec()
    if preset == PRESET_PLACEMENT:
        study = placement_study(base)
    elif preset == PRESET_HYPER:
        study = hyperparameter_study(base, hidden_size(base))
    else:
        return {}
    out: dict[str, Any] = {"methods": list(study.methods), "name": study.name}
    for m in registry.all():
        if m.placements:
            out[f"placements.{m.name}"] = list(study.placements.get(m.name) or [m.placements.default])
        if m.value_setting:
            vals = study.values.get(m.name) or [getattr(m.settings(), m.value_setting)]
            out[f"values.{m.name}"] = ",".join(map(str, vals))
    return out
