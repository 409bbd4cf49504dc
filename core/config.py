"""Configuration dataclasses: the one description of an adapter, a training run and a job.

Every setting is a dataclass field whose ``metadata`` carries what a form needs to draw it and what
``validate()`` needs to check it: ``help`` (one line), ``min``/``max`` for numbers, ``choices`` for
enumerations. The UI builds its widgets from these fields (``fields_of``), so the engine and the UI
cannot drift apart. Defaults follow the LLM-Adapters study (Hu et al., EMNLP 2023).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


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
    """A dataclass field carrying form/validation metadata (``min``, ``max``, ``choices``)."""
    if isinstance(default, (list, dict, tuple)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


class Settings:
    """Base of every settings dataclass: generic checks from field metadata and JSON round-trip."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Cross-field checks a subclass adds; raise ``ConfigError``."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Settings) else _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        data = dict(data or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting for {cls.__name__}; known: {', '.join(names)}")
        kwargs = {}
        for name, value in data.items():
            sub = names[name].metadata.get("settings")
            kwargs[name] = sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
        return cls(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_field(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if isinstance(value, Settings):
        try:
            value.validate()
        except ConfigError as err:
            raise err.within(f.name) from None
        return
    choices = meta.get("choices")
    if choices is not None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v not in choices and not (meta.get("number_ok") and _is_number(v)):
                raise ConfigError(f.name, f"{v!r} is not one of {', '.join(map(str, choices))}")
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is None and hi is None:
        return
    if not _is_number(value):
        raise ConfigError(f.name, f"must be a number (got {value!r})")
    if lo is not None and value < lo:
        raise ConfigError(f.name, f"must be >= {lo} (got {value})")
    if hi is not None and value > hi:
        raise ConfigError(f.name, f"must be <= {hi} (got {value})")
    if meta.get("integer") and int(value) != value:
        raise ConfigError(f.name, f"must be a whole number (got {value})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


# --------------------------------------------------------------------------------------------------
# Adapter methods: one small dataclass each.

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
PLACEMENTS = ("attn", "mlp", "both")
NON_LINEARITIES = ("tanh", "relu", "gelu", "silu")


@dataclass
class LoraSettings(Settings):
    """LoRA: W x + (alpha / r) * B A x, with A (r x in) random and B (out x r) zero at start."""

    r: int = setting(32, "rank of the low-rank update", min=1, max=4096, integer=True)
    alpha: float = setting(64.0, "scaling numerator: the update is multiplied by alpha / r", min=1e-6)
    dropout: float = setting(0.05, "dropout on the LoRA input", min=0.0, max=0.99)
    targets: list[str] = setting(["q", "k", "v", "up", "down"], "roles of the linear layers to adapt",
                                 choices=ROLES)

    def check(self) -> None:
        if not self.targets:
            raise ConfigError("targets", "name at least one role")


@dataclass
class SeriesSettings(Settings):
    """Series (bottleneck) adapter after a block: h + up(act(down(h))), up zero-initialised."""

    bottleneck: int = setting(256, "bottleneck width", min=1, max=65536, integer=True)
    non_linearity: str = setting("tanh", "activation inside the bottleneck", choices=NON_LINEARITIES)
    dropout: float = setting(0.0, "dropout on the adapter input", min=0.0, max=0.99)
    placement: str = setting("mlp", "after attention (attn), after the MLP (mlp) or both (AdapterH)",
                             choices=PLACEMENTS)


@dataclass
class ParallelSettings(Settings):
    """Parallel adapter beside a block: block(x) + s * up(act(down(x))); s fixed or learned."""

    bottleneck: int = setting(256, "bottleneck width", min=1, max=65536, integer=True)
    scale: Any = setting(1.0, "output scale: a number, or 'learned' (Scaled Parallel)",
                         choices=("learned",), number_ok=True)
    non_linearity: str = setting("relu", "activation inside the bottleneck", choices=NON_LINEARITIES)
    dropout: float = setting(0.0, "dropout on the adapter input", min=0.0, max=0.99)
    placement: str = setting("mlp", "beside attention (attn), the MLP (mlp) or both", choices=PLACEMENTS)


@dataclass
class PrefixSettings(Settings):
    """Prefix tuning: trainable keys/values prepended in every attention layer."""

    num_virtual_tokens: int = setting(10, "number of prefix positions", min=1, max=512, integer=True)
    reparam_hidden: int = setting(512, "hidden size of the MLP reparameterisation (0 = none)",
                                  min=0, max=65536, integer=True)


@dataclass
class PromptSettings(Settings):
    """Prompt tuning: trainable soft-prompt embeddings prepended to the input."""

    num_virtual_tokens: int = setting(10, "number of soft-prompt tokens", min=1, max=512, integer=True)
    init: str = setting("text", "initialise from the embeddings of init_text, or random",
                        choices=("text", "random"))
    init_text: str = setting("Solve the following math problem step by step.",
                             "text whose token embeddings initialise the prompt")


@dataclass
class PTuningSettings(Settings):
    """P-tuning: virtual-token embeddings produced by a prompt encoder (MLP or LSTM)."""

    num_virtual_tokens: int = setting(10, "number of virtual tokens", min=1, max=512, integer=True)
    encoder: str = setting("mlp", "prompt encoder", choices=("mlp", "lstm"))
    encoder_hidden: int = setting(256, "hidden size of the prompt encoder", min=1, max=65536, integer=True)


METHOD_SETTINGS: dict[str, type[Settings]] = {
    "lora": LoraSettings,
    "series": SeriesSettings,
    "parallel": ParallelSettings,
    "prefix": PrefixSettings,
    "prompt": PromptSettings,
    "ptuning": PTuningSettings,
}

# The paper's names for its configurations.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "LoRA": ("lora", {}),
    "AdapterH": ("series", {"placement": "both"}),
    "AdapterP": ("series", {"placement": "mlp"}),
    "Parallel": ("parallel", {}),
    "Scaled_Parallel": ("parallel", {"scale": "learned"}),
    "Prefix": ("prefix", {}),
}


def parse_layers(spec: str | list[int], num_layers: int | None = None) -> list[int] | None:
    """Parse a layer selection: ``"all"``, ``"0,2,5"``, ``"0-11"``, ``"0-3,8"`` or a list of ints.

    Returns the sorted indices, or ``None`` for all layers. With ``num_layers`` known, indices out of
    range raise ``ConfigError('layers', ...)``; negative indices count from the end.
    """
    if isinstance(spec, str) and spec.strip().lower() in ("", "all"):
        return None
    picked: set[int] = set()
    try:
        if isinstance(spec, str):
            for part in spec.replace(" ", "").split(","):
                if "-" in part[1:]:
                    lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                    a, b = int(lo), int(hi)
                    if b < a:
                        raise ConfigError("layers", f"range {part!r} runs backwards")
                    picked.update(range(a, b + 1))
                else:
                    picked.add(int(part))
        else:
            picked.update(int(i) for i in spec)
    except (TypeError, ValueError):
        raise ConfigError("layers", f"expected 'all', a list like '0,2,5' or a range like '0-11' (got {spec!r})")
    if not picked:
        raise ConfigError("layers", "the selection is empty")
    if num_layers is not None:
        bad = [i for i in picked if not -num_layers <= i < num_layers]
        if bad:
            raise ConfigError("layers", f"layer {bad[0]} is out of range: the model has {num_layers} layers "
                                        f"(0-{num_layers - 1})")
        picked = {i % num_layers for i in picked}
    return sorted(picked)


@dataclass
class AdapterConfig:
    """Which adapter method, on which layers, with which settings.

    JSON form: ``{"method": "lora", "layers": "all", "settings": {"r": 32, ...}}``.
    """

    method: str = "lora"
    layers: Any = "all"
    settings: Settings = field(default_factory=LoraSettings)
    arch: dict | None = None  # a hand-written architecture row for models not in core.arch's table

    def __post_init__(self) -> None:
        if isinstance(self.settings, dict):
            cls = METHOD_SETTINGS.get(self.method)
            if cls is None:
                raise ConfigError("method", f"unknown method {self.method!r}; known: {', '.join(METHOD_SETTINGS)}")
            self.settings = cls.from_dict(self.settings)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AdapterConfig":
        """A configuration named as in the paper (``AdapterH``, ``LoRA``, ...), with overrides."""
        if name not in PRESETS:
            raise ConfigError("preset", f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        method, values = PRESETS[name]
        return cls(method=method, settings=METHOD_SETTINGS[method](**{**values, **overrides}))

    @classmethod
    def for_method(cls, method: str, layers: Any = "all", **settings: Any) -> "AdapterConfig":
        if method not in METHOD_SETTINGS:
            raise ConfigError("method", f"unknown method {method!r}; known: {', '.join(METHOD_SETTINGS)}")
        return cls(method=method, layers=layers, settings=METHOD_SETTINGS[method].from_dict(settings))

    def validate(self, num_layers: int | None = None) -> "AdapterConfig":
        cls = METHOD_SETTINGS.get(self.method)
        if cls is None:
            raise ConfigError("method", f"unknown method {self.method!r}; known: {', '.join(METHOD_SETTINGS)}")
        if not isinstance(self.settings, cls):
            raise ConfigError("settings", f"method {self.method!r} takes {cls.__name__}, "
                                          f"got {type(self.settings).__name__}")
        self.settings.validate()
        parse_layers(self.layers, num_layers)
        if self.method in ("prompt", "ptuning") and parse_layers(self.layers) is not None:
            raise ConfigError("layers", f"{self.method} acts on the input embeddings; use 'all'")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "layers": _plain(self.layers), "settings": self.settings.to_dict()}
        if self.arch:
            out["arch"] = self.arch
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        unknown = sorted(set(data) - {"method", "layers", "settings", "arch"})
        if unknown:
            raise ConfigError(unknown[0], "unknown key; expected method, layers, settings, arch")
        method = data.get("method", "lora")
        if method not in METHOD_SETTINGS:
            raise ConfigError("method", f"unknown method {method!r}; known: {', '.join(METHOD_SETTINGS)}")
        return cls(method=method, layers=data.get("layers", "all"),
                   settings=METHOD_SETTINGS[method].from_dict(data.get("settings")), arch=data.get("arch"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        return cls.from_dict(json.loads(text))


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
        if not str(self.name).strip():
            raise ConfigError("name", "name a model")


BUILTIN_DATASET = "builtin:math"


@dataclass
class DataSettings(Settings):
    source: str = setting(BUILTIN_DATASET, "builtin:math, a JSON/JSONL/CSV file, or a hub dataset id")
    columns: dict = setting({}, "mapping from our names (instruction, input, output) to the file's columns")
    template: str = setting("alpaca", "prompt template: the LLM-Adapters (alpaca) one or the model's chat template",
                            choices=("alpaca", "chat"))
    cutoff_len: int = setting(256, "maximum tokens per example; longer rows are truncated",
                              min=16, max=32768, integer=True)
    train_on_inputs: bool = setting(False, "also train on the prompt tokens")
    val_size: float = setting(120, "validation rows: a count (>= 1) or a fraction (< 1); 0 = none", min=0)
    limit: int = setting(0, "use only the first N rows (0 = all)", min=0, integer=True)

    def check(self) -> None:
        if not str(self.source).strip():
            raise ConfigError("source", "name a dataset")
        unknown = sorted(set(self.columns) - {"instruction", "input", "output", "answer"})
        if unknown:
            raise ConfigError("columns", f"unknown column role {unknown[0]!r}; use instruction, input, output, answer")


@dataclass
class TrainSettings(Settings):
    epochs: float = setting(3.0, "passes over the training data (ignored when max_steps > 0)", min=0.0)
    max_steps: int = setting(0, "stop after this many optimiser steps (0 = use epochs)", min=0, integer=True)
    batch_size: int = setting(16, "examples per optimiser step", min=1, max=65536, integer=True)
    micro_batch_size: int = setting(4, "examples per forward pass (gradient accumulation)", min=1, integer=True)
    learning_rate: float = setting(3e-4, "peak learning rate (> 0)", max=10.0)
    warmup_steps: int = setting(100, "linear warm-up steps", min=0, integer=True)
    schedule: str = setting("linear", "learning-rate schedule after warm-up", choices=("linear", "cosine", "constant"))
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0.0, max=1.0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 = off)", min=0.0)
    eval_every: int = setting(50, "validation loss every N steps (0 = only at the end)", min=0, integer=True)
    save_every: int = setting(50, "checkpoint every N steps (0 = only at the end)", min=0, integer=True)
    log_every: int = setting(1, "report training loss every N steps", min=1, integer=True)
    seed: int = setting(42, "random seed", min=0, integer=True)

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
    benchmarks: list = setting([], "benchmarks to run after training (names or file paths)")
    limit: int = setting(0, "evaluate only N examples per benchmark (0 = all)", min=0, integer=True)
    sample_seed: int = setting(-1, "seeded sample of `limit` examples (-1 = the first N)", min=-1, integer=True)
    max_new_tokens: int = setting(256, "generation budget per answer", min=1, max=4096, integer=True)
    batch_size: int = setting(32, "prompts generated together", min=1, max=4096, integer=True)


@dataclass
class JobSpec(Settings):
    """Everything a training job needs; the JSON stored with a job and given to ``python -m core train``."""

    name: str = setting("", "job name (free text)")
    model: ModelSettings = field(default_factory=ModelSettings, metadata={"settings": ModelSettings})
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata={"settings": None})
    data: DataSettings = field(default_factory=DataSettings, metadata={"settings": DataSettings})
    train: TrainSettings = field(default_factory=TrainSettings, metadata={"settings": TrainSettings})
    eval: EvalSettings = field(default_factory=EvalSettings, metadata={"settings": EvalSettings})

    SECTIONS: ClassVar[tuple[str, ...]] = ("model", "adapter", "data", "train", "eval")

    def validate(self) -> "JobSpec":
        for section in self.SECTIONS:
            try:
                getattr(self, section).validate()
            except ConfigError as err:
                raise err.within(section) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{s: getattr(self, s).to_dict() for s in self.SECTIONS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        if not isinstance(data, dict):
            raise ConfigError("spec", "a job spec is a JSON object")
        data = dict(data)
        unknown = sorted(set(data) - {"name", *cls.SECTIONS})
        if unknown:
            raise ConfigError(unknown[0], f"unknown section; expected name, {', '.join(cls.SECTIONS)}")
        kwargs: dict[str, Any] = {"name": str(data.get("name", ""))}
        parsers = {"model": ModelSettings.from_dict, "adapter": AdapterConfig.from_dict,
                   "data": DataSettings.from_dict, "train": TrainSettings.from_dict,
                   "eval": EvalSettings.from_dict}
        for section, parse in parsers.items():
            if section in data:
                try:
                    kwargs[section] = parse(data[section] or {})
                except ConfigError as err:
                    raise err.within(section) from None
                except TypeError as err:
                    raise ConfigError(section, str(err)) from None
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError("spec", f"not valid JSON: {err}") from None
        return cls.from_dict(data)
