"""Studies: the LLM-Adapters empirical study as one action — a grid of adapters, placements and values.

A study is a base ``JobSpec`` (model, data, training and evaluation settings) and a grid: methods x
placements x hyperparameter values x seeds; what each method offers a study (its placements, the setting
its value axis varies, the paper's sweep) is declared by its record in the registry (``core.methods``).
An entry of ``methods`` is a method (``lora``) or a preset, a method with settings of its own (``DoRA``,
``rsLoRA``, ``PiSSA``: the names ``core.config.PRESETS`` knows); ``learning_rates`` gives an entry a
learning rate of its own (methods differ by orders of magnitude: (IA)³ and VeRA want ~100x LoRA's).
``expand`` turns a study into one ``JobSpec`` per cell, each labelled with its coordinates; ``analyse``
turns per-cell results (accuracy and per-question correctness) into the paper's tables, with a McNemar
test of the best configuration against the runner-up. Pure functions: the jobs layer stores and runs
the cells.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from . import methods
from .config import PRESETS, AdapterConfig, JobSpec
from .fields import ConfigError, parse_json


def default_methods() -> list[str]:
    """The methods a study compares when it names none: the paper's with a placement axis (LoRA, series,
    parallel)."""
    return [m.name for m in methods.all() if m.paper and m.placements]


@dataclass
class StudySpec:
    """A grid over a base job. A method left out of ``placements``/``values`` gets its default placement
    and value; a method given an empty list there is an error (it would silently mean the default)."""

    name: str = "study"
    base: JobSpec = field(default_factory=JobSpec)
    methods: list[str] = field(default_factory=default_methods)
    placements: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [42])
    learning_rates: dict[str, float] = field(default_factory=dict)

    def validate(self) -> "StudySpec":
        """Check the grid and every cell's job spec; ``ConfigError`` naming the field (``placements.lora``,
        ``values.series``: the axis of one method)."""
        self.base.validate()
        if not self.methods:
            raise ConfigError("methods", "choose at least one method")
        known = [*methods.names(), *PRESETS]
        for m in [*self.methods, *self.placements, *self.values, *self.learning_rates]:
            if m not in known:
                field_name = ("methods" if m in self.methods else "placements" if m in self.placements
                              else "values" if m in self.values else "learning_rates")
                raise ConfigError(field_name, f"unknown method or preset {m!r}; known: {', '.join(known)}")
        for m in self.learning_rates:
            if m not in self.methods:
                raise ConfigError(f"learning_rates.{m}", f"{m} is not among the study's methods")
        for m, places in self.placements.items():
            method = method_of(m)
            options = method.placements.options if method.placements else {}
            for p in places:
                if p not in options:
                    raise ConfigError(f"placements.{m}", f"{m} has no placement {p!r}; "
                                                         f"it has {', '.join(options) or 'none'}")
            if not options:
                raise ConfigError(f"placements.{m}", f"{method.label} has no placements; leave {m} out of them")
            if not places:
                raise ConfigError(f"placements.{m}", f"choose at least one placement for {method.label}, or "
                                                     f"leave {m} out of placements for its default "
                                                     f"({method.placements.default})")
        for m, values in self.values.items():
            method = method_of(m)
            if method.value_setting is None:
                raise ConfigError(f"values.{m}", f"{method.label} has no value to vary; leave {m} out of values")
            if not values:
                default = getattr(method.settings(), method.value_setting)
                raise ConfigError(f"values.{m}", f"give at least one {method.value_setting} for {method.label}, or "
                                                 f"leave {m} out of values for its default ({default})")
        if not self.seeds:
            raise ConfigError("seeds", "give at least one seed")
        if not self.base.eval.benchmarks:
            raise ConfigError("eval.benchmarks", "a study compares accuracies: name at least one benchmark")
        if self.size() > MAX_CELLS:
            raise ConfigError("values", f"the grid has {self.size():,} cells; a study has at most {MAX_CELLS:,}")
        for cell in expand(self):
            try:
                cell.spec.validate()
            except ConfigError as err:
                if err.field == f"adapter.{cell.setting}":  # a value of the axis: name the axis
                    raise ConfigError(f"values.{cell.entry}", f"{cell.setting}={cell.value}: {err.message}") from None
                if err.field == "train.learning_rate":
                    raise ConfigError(f"learning_rates.{cell.entry}", err.message) from None
                raise
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.to_dict(), "methods": self.methods,
                "placements": self.placements, "values": self.values, "seeds": self.seeds,
                "learning_rates": self.learning_rates}

    def size(self) -> int:
        """How many cells ``expand`` makes (computed without making them)."""
        total = 0
        for method in self.methods:
            places = len(self.placements.get(method) or [None])
            total += places * len(self.values.get(method) or [None]) * len(self.seeds)
        return total

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudySpec":
        """A study from JSON data, every part type-checked (``ConfigError`` naming it); the values
        themselves are checked by ``validate`` through the cells' job specs."""
        if not isinstance(data, dict):
            raise ConfigError("study", "a study is a JSON object")
        keys = ("name", "base", "methods", "placements", "values", "seeds", "learning_rates")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise ConfigError(unknown[0], f"unknown study key; expected {', '.join(keys)}")
        name = data.get("name", "study")
        if not isinstance(name, str) or len(name) > 200:
            raise ConfigError("name", "a study name is text of at most 200 characters")
        try:
            base = JobSpec.from_dict(data.get("base", {}))
        except ConfigError as err:
            raise err.within("base") from None
        return cls(name=name, base=base,
                   methods=_texts(data["methods"], "methods") if "methods" in data else default_methods(),
                   placements=_lists_by_method(data.get("placements", {}), "placements", _texts),
                   values=_lists_by_method(data.get("values", {}), "values", _numbers),
                   seeds=_seeds(data.get("seeds", [42])),
                   learning_rates=_learning_rates(data.get("learning_rates", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "StudySpec":
        return cls.from_dict(parse_json(text, "study"))


MAX_AXIS = 100  # entries of one axis (methods, placements, values, seeds) of a study
MAX_CELLS = 10_000  # cells of one study, whatever the deployment allows (its own limit is lower)


def _texts(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or len(value) > MAX_AXIS:
        raise ConfigError(field, f"expected a list of at most {MAX_AXIS} names (got {str(value)[:60]!r})")
    if len(set(value)) != len(value):
        raise ConfigError(field, "names a value twice")
    return list(value)


def _numbers(value: Any, field: str) -> list[float | int]:
    ok = isinstance(value, list) and len(value) <= MAX_AXIS and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise ConfigError(field, f"expected a list of at most {MAX_AXIS} numbers (got {str(value)[:60]!r})")
    if len(set(value)) != len(value):
        raise ConfigError(field, "names a value twice")
    return list(value)


def method_of(entry: str) -> Any:
    """The ``Method`` record of a study entry: a method's name or a preset's."""
    return methods.get(PRESETS[entry][0] if entry in PRESETS else entry)


def entry_config(entry: str, **overrides: Any) -> AdapterConfig:
    """The adapter of a study entry (a method with its defaults, or a preset), with ``overrides``."""
    if entry in PRESETS:
        return AdapterConfig.preset(entry, **overrides)
    return AdapterConfig.for_method(entry, **overrides)


def _lists_by_method(value: Any, field: str, items: Any) -> dict[str, list[Any]]:
    if not isinstance(value, dict):
        raise ConfigError(field, f"expected an object from method to a list (got {str(value)[:60]!r})")
    out = {}
    known = [*methods.names(), *PRESETS]
    for method, entries in value.items():
        if method not in known:
            raise ConfigError(field, f"unknown method or preset {str(method)[:40]!r}; known: {', '.join(known)}")
        out[method] = items(entries, f"{field}.{method}")
    return out


def _learning_rates(value: Any) -> dict[str, float]:
    """Entry -> learning rate; a number each (its range is checked with the cell's training settings)."""
    if not isinstance(value, dict) or len(value) > MAX_AXIS:
        raise ConfigError("learning_rates",
                          f"expected an object from method to a learning rate (got {str(value)[:60]!r})")
    for entry, lr in value.items():
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)):
            raise ConfigError(f"learning_rates.{str(entry)[:40]}", f"expected a number (got {str(lr)[:40]!r})")
    return {entry: float(lr) for entry, lr in value.items()}


def _seeds(value: Any) -> list[int]:
    ok = isinstance(value, list) and len(value) <= MAX_AXIS and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**63 - 1 for v in value)
    if not ok:
        raise ConfigError("seeds", f"expected a list of at most {MAX_AXIS} whole numbers >= 0 (got {str(value)[:60]!r})")
    if len(set(value)) != len(value):
        raise ConfigError("seeds", "names a seed twice")
    return list(value)


@dataclass
class Cell:
    """One grid point: its coordinates and the job spec that trains it. ``entry`` is the study's name
    for it (the method, or a preset of it), ``method`` the method it trains."""

    method: str
    placement: str | None
    setting: str | None  # None: the method has no value axis
    value: Any
    seed: int
    spec: JobSpec
    entry: str = ""

    def __post_init__(self) -> None:
        self.entry = self.entry or self.method

    @property
    def config_label(self) -> str:
        """The configuration without the seed (cells differing only in seed share it)."""
        place = f" @{self.placement}" if self.placement else ""
        return f"{self.entry}{place}" + (f" {self.setting}={self.value}" if self.setting else "")

    def coordinates(self) -> dict[str, Any]:
        return {"method": self.method, "entry": self.entry, "placement": self.placement, "setting": self.setting,
                "value": self.value, "seed": self.seed, "config": self.config_label}


def expand(study: StudySpec) -> list[Cell]:
    """Every cell of the grid, as a job spec built from the base."""
    cells = []
    for entry in study.methods:
        method = method_of(entry)
        setting, axis = method.value_setting, method.placements
        # A method's default placement; a preset keeps the placement of its own settings.
        places = study.placements.get(entry) or ([axis.default] if axis and entry not in PRESETS else [None])
        values = study.values.get(entry) or [None]
        for place in places:
            for value in values:
                for seed in study.seeds:
                    spec = copy.deepcopy(study.base)
                    overrides = {**({setting: value} if value is not None else {}),
                                 **(axis.options[place] if place else {})}
                    spec.adapter = entry_config(entry, **overrides)
                    same = study.base.adapter.method == method.name
                    spec.adapter.layers = study.base.adapter.layers if same else "all"
                    # the cell's own coordinates: its placement and value, given or the configuration's
                    place = place or (_placement_of(spec.adapter, axis) if axis else None)
                    value = getattr(spec.adapter.settings, setting) if setting else None
                    spec.train.seed = seed
                    if entry in study.learning_rates:
                        spec.train.learning_rate = study.learning_rates[entry]
                    shown = f" {setting}={value}" if setting else ""
                    spec.name = f"{study.name}: {entry}{' @' + place if place else ''}{shown} seed {seed}"
                    cells.append(Cell(method.name, place, setting, value, seed, spec, entry))
    return cells


def _placement_of(cfg: AdapterConfig, axis: Any) -> str | None:
    """The placement of ``axis`` an adapter's settings match; None for a preset placed its own way."""
    current = cfg.settings.to_dict()
    for name, overrides in axis.options.items():
        if all(current.get(k) == v for k, v in overrides.items()):
            return name
    return None


def placement_study(base: JobSpec, name: str = "placement study") -> StudySpec:
    """The paper's placement grid: every method with a placement axis at each of its placements (series /
    parallel after or beside attention, the MLP or both; LoRA on attention, MLP or both)."""
    placed = [m for m in methods.all() if m.paper and m.placements]
    return StudySpec(name=name, base=base, methods=[m.name for m in placed],
                     placements={m.name: list(m.placements.options) for m in placed})


def hyperparameter_study(base: JobSpec, hidden_size: int, name: str = "hyperparameter study") -> StudySpec:
    """The paper's value grid, scaled to the model, over the methods that declare a sweep (LoRA rank 4..32,
    bottleneck up to half the hidden size, virtual tokens 10..40)."""
    swept = [m for m in methods.all() if m.paper and m.sweep]
    return StudySpec(name=name, base=base, methods=[m.name for m in swept],
                     values={m.name: list(m.sweep(hidden_size)) for m in swept})


def estimate_seconds(num_cells: int, train_tokens: int, epochs: float, max_steps: int, batch_size: int,
                     mean_tokens_per_row: float, tokens_per_s: float) -> float:
    """Training time of the whole grid from a measured throughput (tokens/s)."""
    if max_steps:
        tokens = max_steps * batch_size * mean_tokens_per_row
    else:
        tokens = train_tokens * epochs
    return num_cells * tokens / max(tokens_per_s, 1e-9)


# --------------------------------------------------------------------------------------------------
# Analysis

@dataclass
class CellResult:
    """What one finished cell measured on one benchmark."""

    coordinates: dict[str, Any]
    benchmark: str
    accuracy: float
    trainable_params: int
    correct: list[bool]  # per question, in benchmark order


def mcnemar(a: list[bool], b: list[bool]) -> dict[str, Any]:
    """Exact McNemar test on paired per-question correctness: does ``a`` beat ``b`` beyond chance?

    Counts the discordant pairs (a right and b wrong: ``n10``; the reverse: ``n01``) and returns the
    two-sided exact binomial p-value of seeing a split at least this uneven if both were equally good.
    """
    if len(a) != len(b):
        raise ValueError("McNemar needs the same questions for both: lengths differ")
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    n = n10 + n01
    if n == 0:
        return {"n10": 0, "n01": 0, "p_value": 1.0}
    k = min(n10, n01)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return {"n10": n10, "n01": n01, "p_value": min(1.0, 2 * tail)}


def analyse(results: list[CellResult], alpha: float = 0.05) -> dict[str, Any]:
    """The study's tables, per benchmark: by placement, by value, by trainable parameters, seeds, best."""
    out: dict[str, Any] = {}
    for bench in sorted({r.benchmark for r in results}):
        rows = [r for r in results if r.benchmark == bench]
        configs: dict[str, list[CellResult]] = {}
        for r in rows:
            configs.setdefault(r.coordinates["config"], []).append(r)
        summary = []
        for label, runs in configs.items():
            accs = [r.accuracy for r in runs]
            c = runs[0].coordinates
            summary.append({"config": label, "method": c["method"], "placement": c["placement"],
                            "setting": c["setting"], "value": c["value"], "seeds": len(runs),
                            "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                            "trainable_params": runs[0].trainable_params})
        summary.sort(key=lambda s: -s["mean"])
        by_placement = [{k: s[k] for k in ("method", "placement", "mean", "std")} for s in summary if s["placement"]]
        by_value = [{k: s[k] for k in ("method", "setting", "value", "mean", "std")} for s in summary]
        best_per_method: dict[str, dict] = {}
        for s in summary:
            best_per_method.setdefault(s["method"], s)
        test = None
        if len(summary) >= 2:
            best, second = configs[summary[0]["config"]], configs[summary[1]["config"]]
            a = [x for r in sorted(best, key=lambda r: r.coordinates["seed"]) for x in r.correct]
            b = [x for r in sorted(second, key=lambda r: r.coordinates["seed"]) for x in r.correct]
            if len(a) == len(b):
                test = {"best": summary[0]["config"], "runner_up": summary[1]["config"], **mcnemar(a, b)}
                test["significant"] = test["p_value"] < alpha
        out[bench] = {"configs": summary, "by_placement": sorted(by_placement, key=lambda s: (s["method"], s["placement"])),
                      "by_value": sorted(by_value, key=lambda s: (s["method"], str(s["value"]))),
                      "best_per_method": list(best_per_method.values()), "mcnemar": test}
    return out


def tables_markdown(analysis: dict[str, Any]) -> str:
    """The analysis as Markdown tables (the study's report)."""
    lines = []
    for bench, a in analysis.items():
        lines += [f"## {bench}", "", "| configuration | seeds | accuracy (mean) | std | trainable params |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {s['config']} | {s['seeds']} | {100 * s['mean']:.1f} | {100 * s['std']:.1f} | "
                  f"{s['trainable_params']:,} |" for s in a["configs"]]
        t = a["mcnemar"]
        if t:
            verdict = "beyond chance" if t["significant"] else "not beyond chance"
            lines += ["", f"Best `{t['best']}` vs runner-up `{t['runner_up']}`: McNemar exact p = "
                          f"{t['p_value']:.3g} ({t['n10']} vs {t['n01']} discordant questions): {verdict}."]
        lines.append("")
    return "\n".join(lines)
