"""The Train tab's form as data: pure conversions between the form dict and a ``JobSpec``.

A form is a plain dict of field path -> widget value (``"train.learning_rate"``, ``"adapter.lora.r"``,
``"data.kind"``); ``spec_from_form`` reads a validated ``JobSpec`` from it and ``form_from_spec`` is
its inverse (cloning a job). Also here: the form a fresh page shows (``default_form``), a paper
preset's values, the fields whose choices are roles, and the command line equivalent to a spec.
Nothing here draws a widget or handles an event: that is ``app.train_tab``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core import data as data_mod
from core import methods
from core.config import BUILTIN_DATASET, DEFAULT_METHOD, PRESETS, ROLES, AdapterConfig, DataSettings, EvalSettings, JobSpec, ModelSettings, TrainSettings
from core.fields import ConfigError, fields_of
from core.estimate import estimate
from core.paths import workbench_home
from core.sources import MATH_OPS, split_builtin

from .forms import collect, spread

DATA_KINDS = ("built-in", "upload", "server path", "hub id")
SOURCE_KINDS = dict(zip(DATA_KINDS, ("builtin", "upload", "local", "hub")))  # core.sources' names


def model_settings(form: dict[str, Any]) -> ModelSettings:
    return ModelSettings.from_dict(collect(ModelSettings, "model", form))


def adapter_config(form: dict[str, Any]) -> AdapterConfig:
    """The adapter the form describes (not validated). ``ConfigError`` for unparsable widget values."""
    method = form.get("adapter.method") or DEFAULT_METHOD
    try:
        settings_cls = methods.get(method).settings
    except ConfigError as err:
        raise err.within("adapter") from None
    values = collect(settings_cls, f"adapter.{method}", form)
    layers = str(form.get("adapter.layers") or "all").strip() or "all"
    return AdapterConfig(method=method, layers=layers, settings=settings_cls(**values))


def data_source(form: dict[str, Any]) -> str:
    """The ``data.source`` string of the chosen kind; uploads are the stored copy's path."""
    kind = form.get("data.kind") or DATA_KINDS[0]
    if kind == "built-in":
        value = form.get("data.builtin") or BUILTIN_DATASET
        ops = [op for op in MATH_OPS if op in (form.get("data.builtin_ops") or [])]
        if ops and len(ops) < len(MATH_OPS):  # a part of the set: the rows using only these operations
            value = f"{value}?ops={','.join(ops)}"
    elif kind == "upload":
        value = form.get("data.upload") or ""
        if not value or not isinstance(value, str):
            raise ConfigError("data.source", "upload a JSON, JSONL or CSV file first")
    elif kind == "server path":  # whether it may be read is the service's call (core.sources' rules)
        value = (form.get("data.server_path") or "").strip()
        if not value:
            raise ConfigError("data.source", "give the path of a JSON, JSONL or CSV file on the server")
    elif kind == "hub id":
        value = (form.get("data.hub_id") or "").strip()
        if not value:
            raise ConfigError("data.source", "give a Hugging Face dataset id, e.g. user/name")
    else:
        raise ConfigError("data.source", f"unknown data kind {kind!r}")
    return value


def spec_from_form(form: dict[str, Any]) -> JobSpec:
    """The validated job spec of the form; ``ConfigError`` naming the field otherwise."""
    data = collect(DataSettings, "data", form, skip=("source",))
    data["source"] = data_source(form)
    benchmarks = list(form.get("eval.benchmarks") or [])
    spec = JobSpec(
        name=str(form.get("name") or "").strip(),
        model=model_settings(form),
        adapter=adapter_config(form),
        data=DataSettings.from_dict(data),
        train=TrainSettings.from_dict(collect(TrainSettings, "train", form)),
        eval=EvalSettings.from_dict({**collect(EvalSettings, "eval", form, skip=("benchmarks",)),
                                     "benchmarks": benchmarks}),
    )
    spec.validate()
    estimate(spec.model, spec.adapter, spec.data, spec.train)  # the adapter fits this model (roles, layers)
    if not spec.name:
        spec.name = default_job_name(spec)
    return spec


def default_job_name(spec: JobSpec) -> str:
    model = Path(spec.model.name).name or spec.model.name
    return f"{spec.adapter.method}-{model}"


def form_from_spec(spec: JobSpec, uploads: Path | None = None) -> dict[str, Any]:
    """Form values for ``spec`` (clone a job into the Train tab): the inverse of ``spec_from_form``."""
    values: dict[str, Any] = {"name": f"{spec.name} (copy)" if spec.name else ""}
    values.update(spread(ModelSettings, "model", spec.model.to_dict()))
    method = spec.adapter.method
    values["adapter.method"] = method
    layers = spec.adapter.layers
    values["adapter.layers"] = ",".join(map(str, layers)) if isinstance(layers, list) else str(layers)
    values.update(spread(methods.get(method).settings, f"adapter.{method}", spec.adapter.settings.to_dict()))
    values.update(spread(DataSettings, "data", spec.data.to_dict(), skip=("source",)))
    source = spec.data.source
    uploads = uploads or upload_dir()
    if source.partition("?")[0] in data_mod.BUILTIN_FILES:
        base, ops = split_builtin(source)
        values.update({"data.kind": "built-in", "data.builtin": base, "data.builtin_ops": list(ops or [])})
    elif Path(source).parent == uploads:
        values.update({"data.kind": "upload", "data.upload": source})
    elif Path(source).expanduser().is_file() or source.startswith(("/", ".", "~")):
        values.update({"data.kind": "server path", "data.server_path": source})
    else:
        values.update({"data.kind": "hub id", "data.hub_id": source})
    values.update(spread(TrainSettings, "train", spec.train.to_dict()))
    values.update(spread(EvalSettings, "eval", spec.eval.to_dict(), skip=("benchmarks",)))
    values["eval.benchmarks"] = list(spec.eval.benchmarks)
    return values


def default_form() -> dict[str, Any]:
    """The form as a fresh page shows it: every method's defaults, the default job spec."""
    values: dict[str, Any] = {}
    for m in methods.all():
        values.update(spread(m.settings, f"adapter.{m.name}", m.settings().to_dict()))
    values.update({"data.builtin": BUILTIN_DATASET, "data.builtin_ops": [], "data.upload": None, "data.server_path": "", "data.hub_id": ""})
    values.update(form_from_spec(JobSpec()))
    return values


def cli_text(spec: JobSpec) -> str:
    return ("# Save the JSON above as spec.json, then either queue it for the workbench's worker:\n"
            "python -m jobs submit spec.json\n"
            "# or train in the foreground, with a progress bar:\n"
            "python -m core train --config spec.json\n")


def preset_values(preset: str) -> dict[str, Any]:
    """Form values setting the method and its settings to a paper preset (defaults + the preset's overrides)."""
    if preset not in PRESETS:
        return {}
    method, overrides = PRESETS[preset]
    settings_cls = methods.get(method).settings
    return {"adapter.method": method, **spread(settings_cls, f"adapter.{method}", settings_cls(**overrides).to_dict())}


def role_fields() -> list[str]:
    """Form paths of the method settings whose choices are roles (LoRA's ``targets``)."""
    return [f"adapter.{m.name}.{meta['name']}" for m in methods.all() for meta in fields_of(m.settings)
            if meta.get("choices") == ROLES]


def upload_dir() -> Path:
    return workbench_home() / "uploads"
