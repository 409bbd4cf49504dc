"""The method registry: one ``Method`` record per adapter method, declared in its family's file.

Each family file under ``core/adapters/`` declares its records and registers them (``lora.py``: lora;
``bottleneck.py``: series, parallel; ``prompt.py``: prefix, prompt, ptuning; ``ia3.py``: ia3;
``vera.py``: vera; ``dora.py``: dora; ``reft.py``: loreft). Everything else that needs to know about methods reads this registry and nothing else: ``core.config`` (settings classes,
the paper's presets, the all-layers rule), ``core.inject`` (builders, merging, PEFT export),
``core.study`` (placements, the value axis, the paper's sweeps), ``app.diagram`` (what to draw) and the
Train and Study tabs (labels, settings groups). So a new method is one record in one file, and a
test-only method can be registered from the test itself (``tests/test_methods.py``).

The family files import torch; this module and ``core.config`` do not. The registry imports
``core.adapters`` (hence every family, in the order its ``__init__`` lists them) on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .fields import ConfigError, Settings, show


@dataclass(frozen=True)
class Placements:
    """A study's placement axis: placement name -> the settings it overrides, and the default placement.

    E.g. series adapters: ``{"attn": {"placement": "attn"}, "mlp": {...}, "both": {...}}``, default ``mlp``;
    LoRA's placements are sets of target roles.
    """

    options: Mapping[str, Mapping[str, Any]]
    default: str


@dataclass(frozen=True)
class Box:
    """A trainable box the diagram draws beside a block.

    Attributes:
        block: ``"attn"`` or ``"mlp"``.
        joins: ``"series"`` (on the main path after the block's output, before the residual add) or
            ``"parallel"`` (a branch from the block's input summed into its output).
        label: the text in the box.
        scale: for a parallel branch, the factor printed where it joins (``"1.0"``, ``"learned"``).
    """

    block: str
    joins: str
    label: str
    scale: str | None = None


@dataclass(frozen=True)
class Drawing:
    """What the block diagram shows for one method's settings. ``app.diagram`` renders it knowing no
    method by name.

    Attributes:
        caption: one line saying what trains and where, e.g. ``"LoRA (r=32, alpha=64) on q, k, v"``
            (the diagram adds the layers unless the method acts on every layer).
        marks: role -> a badge on that (trained) projection, e.g. ``{"q": "+BA"}``.
        boxes: bottleneck boxes after or beside the attention and MLP blocks.
        kv_tokens: the label of trainable key/value positions joining k and v in every attention
            layer ("" = none).
        input_tokens: the label of trainable vectors prepended to the input embeddings ("" = none).
        input_note: a line under them (e.g. where they come from).
    """

    caption: str
    marks: Mapping[str, str] = field(default_factory=dict)
    boxes: tuple[Box, ...] = ()
    kv_tokens: str = ""
    input_tokens: str = ""
    input_note: str = ""


# (model, AdapterConfig, ArchSpec, layers or None for all, tokenizer or None) -> {module path: adapter}.
# A path of "" is a model-level adapter: attach() keeps it on the model and calls its install(backbone).
Builder = Callable[[Any, Any, Any, "list[int] | None", Any], "dict[str, Any]"]
# ([(module path, adapter module)], AdapterConfig) -> (tensors keyed as PEFT names them, adapter_config.json).
PeftMapping = Callable[[list, Any], "tuple[dict[str, Any], dict[str, Any]]"]


@dataclass(frozen=True)
class Method:
    """One adapter method, as every layer of the workbench sees it.

    Attributes:
        name: the id in specs, files and form paths (``adapter.<name>.<field>``): lower case, no dots.
        label: what the UI calls it.
        settings: its ``core.config.Settings`` dataclass; the Train form draws one widget per field.
        build: makes the adapter modules without putting them in place (see ``Builder``); ``attach``
            validates the config, freezes the model and installs what ``build`` returns.
        draw: settings as a dict (possibly half-filled, from a form being typed in) -> ``Drawing``.
        value_setting: the numeric setting a study's value axis varies (LoRA: ``r``); None for a method
            with nothing numeric to vary ((IA)³): its study cells differ by placement and seed only.
        placements: the study's placement axis, or None when the method has none.
        sweep: hidden size -> the values the paper's hyperparameter study tries; None: not in it.
        presets: the paper's names for configurations of this method -> settings overrides.
        all_layers_only: acts on every layer at once (virtual tokens): ``layers`` must be ``all``.
        identity_at_init: a freshly attached adapter leaves the model's outputs unchanged (the output
            side is zero-initialised); virtual tokens change them from the start.
        merges: its modules implement the merge protocol of ``AdapterModule`` (``merge``, ``unmerge``,
            ``fold``, ``delta_weight``): ``merge_adapter`` and the merged export work.
        peft: its mapping to the Hugging Face PEFT layout (see ``PeftMapping``), or None.
        shape_settings: overrides that leave every parameter's shape as it is but need no tokenizer
            or data, for estimates built on the ``meta`` device (prompt tuning: ``init="random"``).
        paper: one of the LLM-Adapters paper's methods: the paper's placement and hyperparameter
            studies, and a study that names no methods, compare these (and only these).
        quantized_base: trains on a 4-bit base (QLoRA, ``model.quantization``): its modules read the
            frozen weight only through the base layer or its dequantised copy (``core.quant``).
        merge_family: the method a merge of its adapters is saved as (``core.merge``): its saved update
            is a low-rank ``B A`` (``lora_A``, ``lora_B.<i>``, optionally ``lora_A0``/``lora_B0`` and
            DoRA's ``lora_magnitude.<i>``) linear in its factors, and adapters merge only within one
            family. None: the merge lab refuses it (VeRA, (IA)³, bottleneck, prompt methods, LoReFT).
    """

    name: str
    label: str
    settings: type
    build: Builder
    draw: Callable[[Mapping[str, Any]], Drawing]
    value_setting: str | None
    placements: Placements | None = None
    sweep: Callable[[int], list[int]] | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    all_layers_only: bool = False
    identity_at_init: bool = True
    merges: bool = False
    peft: PeftMapping | None = None
    shape_settings: Mapping[str, Any] = field(default_factory=dict)
    paper: bool = False
    quantized_base: bool = False
    merge_family: str | None = None

    @property
    def exports(self) -> tuple[str, ...]:
        """The exports beyond the adapter directory itself: ``peft`` and/or ``merged``."""
        return (("peft",) if self.peft else ()) + (("merged",) if self.merges else ())


_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_registry: dict[str, Method] = {}
_registry_lock = threading.Lock()  # guards _registry (held only for a moment)
_load_lock = threading.RLock()  # held while the families are imported; register() never waits on it
_state = {"loaded": False, "loading": False}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its family file calls this on import). Returns it.

    The record is checked here, so a mistake fails when its file is imported, not when a page is
    built: ``ValueError`` for a bad name, a name or preset taken, a value setting, placement, preset
    or shape override that is not a field of its settings.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method, got {type(method).__name__}")
    if not (isinstance(method.name, str) and _NAME.fullmatch(method.name)):
        raise ValueError(f"method name {method.name!r}: lower-case letters, digits and _, at most 32")
    if not (isinstance(method.settings, type) and issubclass(method.settings, Settings)
            and dataclasses.is_dataclass(method.settings)):
        raise ValueError(f"{method.name}: settings must be a core.config.Settings dataclass")
    fields = {f.name for f in dataclasses.fields(method.settings)}
    if method.value_setting is not None and method.value_setting not in fields:
        raise ValueError(f"{method.name}: value_setting {method.value_setting!r} is not a field of "
                         f"{method.settings.__name__}")
    places = method.placements.options if method.placements else {}
    if method.placements and method.placements.default not in places:
        raise ValueError(f"{method.name}: default placement {method.placements.default!r} is not an option")
    for what, overrides in [*((f"placement {p!r}", v) for p, v in places.items()),
                            *((f"preset {p!r}", v) for p, v in method.presets.items()),
                            ("shape_settings", method.shape_settings)]:
        if set(overrides) - fields:
            raise ValueError(f"{method.name}: {what} sets unknown settings {sorted(set(overrides) - fields)}")
    with _registry_lock:
        old = _registry.get(method.name)
        if old is not None and old is not method:
            raise ValueError(f"a method named {method.name!r} is already registered ({old.label})")
        taken = {p for m in _registry.values() if m is not old for p in m.presets}
        if taken & set(method.presets):
            raise ValueError(f"{method.name}: preset {sorted(taken & set(method.presets))[0]!r} is taken")
        _registry[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    with _registry_lock:
        _registry.pop(name, None)


def _load() -> None:
    """Import the adapter families once; each registers its methods as it is imported."""
    if _state["loaded"]:
        return
    with _load_lock:
        if _state["loaded"] or _state["loading"]:  # loading: a family asks while being imported
            return
        _state["loading"] = True
        try:
            importlib.import_module(f"{__package__}.adapters")
            _state["loaded"] = True
        finally:
            _state["loading"] = False


def get(name: Any) -> Method:
    """The method called ``name``; ``ConfigError('method', ...)`` naming the known ones otherwise."""
    _load()
    method = _registry.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError("method", f"unknown method {show(name)}; known: {', '.join(names())}")
    return method


def label(name: str) -> str:
    """What the UI calls method ``name``; the name itself for one not (or no longer) registered."""
    _load()
    method = _registry.get(name) if isinstance(name, str) else None
    return method.label if method else str(name)


def names() -> list[str]:
    """Every method's name, in registration order (the order of the UI's choices)."""
    _load()
    return list(_registry)


def all() -> list[Method]:  # noqa: A001 - the registry's own vocabulary: methods.all()
    """Every method, in registration order."""
    _load()
    return list(_registry.values())
