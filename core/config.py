"""Configuration dataclasses: the one description of an adapter, a training run and a job.

Each section is a ``core.fields.Settings`` dataclass, every setting a strictly checked field (see
``core.fields``); a method's own settings are declared with its record (``core.methods``). Defaults
follow the LLM-Adapters study (Hu et al., EMNLP 2023). Only ``adapter.arch`` takes ``null``, which is
its default. A method's settings are named under ``adapter`` directly (``adapter.r``) in errors.
Standard library only: importing this pulls no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from .fields import (INT64_MAX, MAX_BENCHMARKS, MAX_COUNT, MAX_LAYER, MAX_TEXT, ConfigError, Settings,
                     check_choice, check_text, dump_json, key_name, parse_json, plain, refuse_unknown,
                     section_field, setting, show)

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
                raise ConfigError("layers", f"{expected} (got {show(spec)})")
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
                raise ConfigError("layers", f"layer entries must be whole numbers (got {show(i)})")
            picked.add(_layer_index(i))
    else:
        raise ConfigError("layers", f"{expected} (got {show(spec)})")
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
        shown = given if isinstance(given, str) else show(given)
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
        raise ConfigError("arch", f"must be a JSON object or null (got {show(arch)})")
    if not arch:
        return
    for key in arch:
        if key not in ARCH_KEYS:
            raise ConfigError(f"arch.{key_name(key)}", f"unknown key; known: {', '.join(ARCH_KEYS)}")
    for key in ("layers", "roles"):
        if key not in arch:
            raise ConfigError(f"arch.{key}", 'missing; expected {"layers": "path.to.layers", "roles": {"q": ...}}')
    check_text("arch.layers", arch["layers"], empty_ok=False)
    roles = arch["roles"]
    if not isinstance(roles, dict) or not roles or len(roles) > 16:
        raise ConfigError("arch.roles", f"must be a JSON object from role to module path (got {show(roles)})")
    for role, path in roles.items():
        check_text("arch.roles", role, 16, empty_ok=False, what="a role ")
        check_text("arch.roles", path, empty_ok=False, what=f"{role!r} ")
    if arch.get("fused_layout") is not None:
        check_choice("arch.fused_layout", arch["fused_layout"], ("concat", "per_head"))
    if arch.get("backbone") is not None:
        check_text("arch.backbone", arch["backbone"], empty_ok=False)


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
            raise ConfigError("preset", f"unknown preset {show(name)}; known: {', '.join(PRESETS)}")
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
        settings = self.settings.to_dict() if isinstance(self.settings, Settings) else plain(self.settings)
        out = {"method": self.method, "layers": plain(self.layers), "settings": settings}
        if self.arch:
            out["arch"] = {k: plain(v) for k, v in self.arch.items()} if isinstance(self.arch, dict) else self.arch
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """The adapter of a JSON object. ``"settings"`` must be an object when given; ``"arch"`` may be null."""
        if not isinstance(data, dict):
            raise ConfigError("adapter", f"must be a JSON object (got {show(data)})")
        refuse_unknown(data, ("method", "layers", "settings", "arch"), "key of adapter")
        settings_cls = _method(data.get("method", DEFAULT_METHOD)).settings
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise ConfigError("settings", f"must be a JSON object (got {show(settings)})")
        return cls(method=data.get("method", DEFAULT_METHOD), layers=plain(data.get("layers", "all")),
                   settings=settings_cls.from_dict(settings), arch=data.get("arch"))

    def to_json(self) -> str:
        return dump_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        return cls.from_dict(parse_json(text, "adapter"))


# --------------------------------------------------------------------------------------------------
# Model, data, training and job settings.

DEFAULT_MODEL = "smollm2-135m-instruct"
QUANTIZATIONS = ("none", "nf4")


@dataclass
class ModelSettings(Settings):
    name: str = setting(DEFAULT_MODEL, "catalogue name, Hugging Face hub id or local directory")
    precision: str = setting("auto", "auto = bf16 where the hardware supports it, else fp32",
                             choices=("auto", "fp32", "bf16", "fp16"))
    device: str = setting("auto", "auto = cuda if available, else cpu", choices=("auto", "cpu", "cuda"))
    trust_remote_code: bool = setting(False, "allow code shipped with a hub model to run")
    quantization: str = setting("none", "nf4 = QLoRA: the frozen linear layers (all but the output head) in 4-bit "
                                        "NormalFloat, computed in the precision above (bf16 on a GPU); LoRA and "
                                        "DoRA only; needs the optional package bitsandbytes",
                                choices=QUANTIZATIONS)

    def check(self) -> None:
        if not self.name.strip():
            raise ConfigError("name", "name a model")


def check_quantization(model: ModelSettings, adapter: AdapterConfig) -> None:
    """A 4-bit base (QLoRA) trains only the methods whose record says ``quantized_base``: ``ConfigError``
    on ``model.quantization`` otherwise."""
    if model.quantization == "none" or _method(adapter.method).quantized_base:
        return
    from . import methods

    able = [m.label for m in methods.all() if m.quantized_base]
    raise ConfigError("model.quantization", f"{model.quantization} (QLoRA) trains {' or '.join(able)} on a 4-bit "
                                            f"base, not {adapter.method!r}; choose one of those methods, or set "
                                            "quantization to none")


BUILTIN_DATASET = "builtin:math"
COLUMN_ROLES = ("instruction", "input", "output", "answer", "messages")  # messages: conversations


@dataclass
class DataSettings(Settings):
    source: str = setting(BUILTIN_DATASET, "builtin:math, a JSON/JSONL/CSV file, or a hub dataset id")
    columns: dict = setting({}, "mapping from our names (instruction, input, output; messages) to the file's columns",
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


TRACKERS = ("trackio", "tensorboard", "mlflow", "wandb")
PROTOCOLS = ("generate", "loglikelihood")


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
    devices: int = setting(1, "training processes: one per GPU, or CPU processes (gloo); more than 1 needs "
                              "strategy ddp", min=1, max=64, integer=True)
    strategy: str = setting("single", "single = one process; ddp = torchrun starts `devices` processes, each "
                                      "on its share of every batch, adapter gradients all-reduced",
                            choices=("single", "ddp"))
    rank_timeout_s: int = setting(300, "with several processes: seconds one waits for the others (to start, at "
                                       "each step) before the run fails, so a dead or stuck process cannot "
                                       "hang the rest", min=1, max=86400, integer=True)
    report_to: list = setting([], "experiment trackers that also receive the run (the spec as config, every "
                                  "step's metrics, evaluation results): trackio, tensorboard, mlflow, wandb "
                                  "(each an optional package)", choices=TRACKERS)

    def check(self) -> None:
        if self.devices > 1 and self.strategy != "ddp":
            raise ConfigError("devices", f"{self.devices} processes need strategy ddp (got {self.strategy})")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", f"must be > 0 (got {self.learning_rate})")
        if self.batch_size % self.devices:
            raise ConfigError("batch_size", f"must be a multiple of devices: each of the {self.devices} processes "
                                            f"takes an equal share of a step's {self.batch_size} examples")
        share = self.batch_size // self.devices  # examples per process and step
        what = "batch_size" if self.devices == 1 else f"batch_size / devices = {share}, each process's share"
        if self.micro_batch_size > share:
            raise ConfigError("micro_batch_size", f"must be <= {what} ({self.micro_batch_size} > {share})")
        if share % self.micro_batch_size:
            raise ConfigError("micro_batch_size", f"must divide {what} ({share} % {self.micro_batch_size} != 0)")
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
    protocol: str = setting("generate", "generate = the paper's (generate an answer, extract it by its rules); "
                                        "loglikelihood = lm-evaluation-harness's multiple choice (the summed "
                                        "log-probability of each choice's text; benchmarks with choices only)",
                            choices=PROTOCOLS)


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

    def check(self) -> None:
        check_quantization(self.model, self.adapter)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        if not isinstance(data, dict):
            raise ConfigError("spec", f"a job spec is a JSON object (got {show(data)})")
        return super().from_dict(data)

    def to_json(self) -> str:
        return dump_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> "JobSpec":
        """The spec of JSON text; ``ConfigError('spec', ...)`` when it is not a JSON object."""
        return cls.from_dict(parse_json(text, "spec"))
