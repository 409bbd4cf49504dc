"""Strict job specs: what a stranger can send is either a valid spec or a ``ConfigError`` naming the field.

Three layers: a table of hand-picked bad inputs (each must name exactly its field), the cases quoted in
issue 12, and property tests placing any JSON value in any one field of a valid spec. Settings of an
adapter method are named under ``adapter`` directly (``adapter.r``), as everywhere else.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import methods
from core.config import METHOD_SETTINGS, AdapterConfig, DataSettings, EvalSettings, JobSpec, ModelSettings, TrainSettings
from core.fields import INT64_MAX, ConfigError, fields_of

NAN, INF = float("nan"), float("inf")


def base(method: str = "lora") -> dict:
    """A valid spec as JSON data, with the adapter of ``method``."""
    return JobSpec(adapter=AdapterConfig(method=method)).to_dict()


def field_name(path: tuple[str, ...]) -> str:
    """The ``ConfigError.field`` of a place in the spec dict: method settings are named under ``adapter``."""
    if path[:2] == ("adapter", "settings") and len(path) > 2:
        path = ("adapter",) + path[2:]
    return ".".join(path)


def put(spec: dict, path: tuple[str, ...], value) -> dict:
    spec = copy.deepcopy(spec)
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return spec


# --------------------------------------------------------------------------------------------------
# Every field of a spec, as a path into its JSON form, with the method whose settings hold it.

SECTION_CLASSES = {"model": ModelSettings, "data": DataSettings, "train": TrainSettings, "eval": EvalSettings}


def all_paths() -> list[tuple[str, tuple[str, ...]]]:
    paths = [("lora", ("name",))] + [("lora", (s,)) for s in JobSpec.SECTIONS]
    for section, cls in SECTION_CLASSES.items():
        paths += [("lora", (section, f.name)) for f in dataclasses.fields(cls)]
    paths += [("lora", ("adapter", key)) for key in ("method", "layers", "settings", "arch")]
    for method, cls in METHOD_SETTINGS.items():
        paths += [(method, ("adapter", "settings", f.name)) for f in dataclasses.fields(cls)]
    return paths


PATHS = all_paths()




def _meta(method: str, path: tuple[str, ...]) -> dict | None:
    cls = METHOD_SETTINGS[method] if path[:2] == ("adapter", "settings") else SECTION_CLASSES.get(path[0])
    if cls is None or len(path) < 2:
        return None
    return {m["name"]: m for m in fields_of(cls)}.get(path[-1])


def _is_float_field(meta: dict | None) -> bool:
    if meta is None or meta.get("integer"):
        return False
    default = meta["default"]
    return bool(meta.get("number_ok")) or (isinstance(default, (int, float)) and not isinstance(default, bool))


# every numeric field of every registered method's settings and of the other sections, from the dataclasses
INT_FIELDS = [(m, p) for m, p in PATHS if (_meta(m, p) or {}).get("integer")]
FLOAT_FIELDS = [(m, p) for m, p in PATHS if _is_float_field(_meta(m, p))]


def test_the_field_lists_cover_the_dataclasses():
    """The numeric fields the bad-input table fills are found (the lists are not empty by mistake)."""
    assert ("lora", ("adapter", "settings", "r")) in INT_FIELDS and ("lora", ("train", "seed")) in INT_FIELDS
    assert ("lora", ("train", "learning_rate")) in FLOAT_FIELDS
    assert ("parallel", ("adapter", "settings", "scale")) in FLOAT_FIELDS


# --------------------------------------------------------------------------------------------------
# 1. A table of bad inputs, each naming exactly its field.

S = ("adapter", "settings")
BAD: list[tuple[str, tuple[str, ...], object, str]] = [
    # booleans are JSON booleans
    ("lora", ("model", "trust_remote_code"), "false", "model.trust_remote_code"),
    ("lora", ("model", "trust_remote_code"), "true", "model.trust_remote_code"),
    ("lora", ("model", "trust_remote_code"), 0, "model.trust_remote_code"),
    ("lora", ("model", "trust_remote_code"), 1, "model.trust_remote_code"),
    ("lora", ("model", "trust_remote_code"), None, "model.trust_remote_code"),
    ("lora", ("data", "train_on_inputs"), "no", "data.train_on_inputs"),
    ("lora", ("data", "train_on_inputs"), 1.0, "data.train_on_inputs"),
    # numbers: never booleans or strings; integral floats only for integers
    ("lora", S + ("r",), True, "adapter.r"),
    ("lora", ("train", "seed"), False, "train.seed"),
    ("lora", ("train", "epochs"), "3", "train.epochs"),
    ("lora", ("train", "learning_rate"), None, "train.learning_rate"),
    ("lora", ("train", "learning_rate"), 0, "train.learning_rate"),
    ("lora", ("train", "learning_rate"), 5e-324 * -1, "train.learning_rate"),
    ("lora", ("train", "batch_size"), [16], "train.batch_size"),
    ("lora", ("train", "epochs"), 1e300, "train.epochs"),
    ("lora", ("train", "epochs"), 10**400, "train.epochs"),
    ("lora", ("train", "max_grad_norm"), -1.0, "train.max_grad_norm"),
    ("lora", ("data", "val_size"), 1e12, "data.val_size"),
    ("lora", ("eval", "sample_seed"), -2, "eval.sample_seed"),
    # mappings
    ("lora", ("data", "columns"), None, "data.columns"),
    ("lora", ("data", "columns"), [], "data.columns"),
    ("lora", ("data", "columns"), "output=answer", "data.columns"),
    ("lora", ("data", "columns"), 5, "data.columns"),
    ("lora", ("data", "columns"), {"output": ""}, "data.columns"),
    ("lora", ("data", "columns"), {"output": 5}, "data.columns"),
    ("lora", ("data", "columns"), {"output": None}, "data.columns"),
    ("lora", ("data", "columns"), {"bogus": "x"}, "data.columns"),
    ("lora", ("data", "columns"), {"output": "a\x00b"}, "data.columns"),
    # lists
    ("lora", S + ("targets",), "q", "adapter.targets"),
    ("lora", S + ("targets",), "qkv", "adapter.targets"),
    ("lora", S + ("targets",), ["q", "q"], "adapter.targets"),
    ("lora", S + ("targets",), ["x"], "adapter.targets"),
    ("lora", S + ("targets",), [1], "adapter.targets"),
    ("lora", S + ("targets",), None, "adapter.targets"),
    ("lora", S + ("targets",), {"q": True}, "adapter.targets"),
    ("lora", S + ("targets",), [], "adapter.targets"),
    ("lora", ("eval", "benchmarks"), "gsm8k", "eval.benchmarks"),
    ("lora", ("eval", "benchmarks"), [""], "eval.benchmarks"),
    ("lora", ("eval", "benchmarks"), ["  "], "eval.benchmarks"),
    ("lora", ("eval", "benchmarks"), [5], "eval.benchmarks"),
    ("lora", ("eval", "benchmarks"), [None], "eval.benchmarks"),
    ("lora", ("eval", "benchmarks"), [f"b{i}" for i in range(51)], "eval.benchmarks"),
    ("lora", ("eval", "benchmarks"), ["gsm8k", "gsm8k"], "eval.benchmarks"),
    ("lora", ("eval", "benchmarks"), None, "eval.benchmarks"),
    ("lora", ("eval", "benchmarks"), {"gsm8k": 1}, "eval.benchmarks"),
    # sections are objects
    ("lora", ("model",), [], "model"),
    ("lora", ("model",), None, "model"),
    ("lora", ("model",), 5, "model"),
    ("lora", ("model",), True, "model"),
    ("lora", ("adapter",), "lora", "adapter"),
    ("lora", ("adapter",), [], "adapter"),
    ("lora", ("data",), "builtin:math", "data"),
    ("lora", ("train",), 5, "train"),
    ("lora", ("eval",), None, "eval"),
    ("lora", S, [], "adapter.settings"),
    ("lora", S, "r=8", "adapter.settings"),
    ("lora", S, None, "adapter.settings"),
    ("lora", S, 5, "adapter.settings"),
    # unknown names and choices
    ("lora", ("adapter", "method"), "magic", "adapter.method"),
    ("lora", ("adapter", "method"), "", "adapter.method"),
    ("lora", ("adapter", "method"), ["lora"], "adapter.method"),
    ("lora", ("adapter", "method"), None, "adapter.method"),
    ("lora", ("model", "precision"), "fp8", "model.precision"),
    ("lora", ("model", "device"), "tpu", "model.device"),
    ("lora", ("model", "device"), ["cpu"], "model.device"),
    ("lora", ("data", "template"), "llama", "data.template"),
    ("lora", ("train", "schedule"), "step", "train.schedule"),
    ("lora", ("train", "schedule"), None, "train.schedule"),
    ("series", S + ("non_linearity",), "cubic", "adapter.non_linearity"),
    ("series", S + ("placement",), "sideways", "adapter.placement"),
    ("prompt", S + ("init",), "zeros", "adapter.init"),
    ("ptuning", S + ("encoder",), "gru", "adapter.encoder"),
    ("parallel", S + ("scale",), "big", "adapter.scale"),
    ("parallel", S + ("scale",), True, "adapter.scale"),
    ("parallel", S + ("scale",), 1e6, "adapter.scale"),
    ("lora", ("model", "bogus"), 1, "model.bogus"),
    ("lora", ("bogus",), 1, "bogus"),
    ("lora", S + ("bogus",), 1, "adapter.bogus"),
    ("series", S + ("r",), 8, "adapter.r"),  # a LoRA setting on a series adapter
    ("lora", ("adapter", "extra"), 1, "adapter.extra"),
    # strings: strings, not empty where a name is needed, no NUL, not overlong, valid Unicode
    ("lora", ("name",), 5, "name"),
    ("lora", ("name",), ["a"], "name"),
    ("lora", ("name",), None, "name"),
    ("lora", ("name",), "a\x00b", "name"),
    ("lora", ("name",), "x" * 5000, "name"),
    ("lora", ("name",), "\ud800", "name"),
    ("lora", ("model", "name"), "", "model.name"),
    ("lora", ("model", "name"), "   ", "model.name"),
    ("lora", ("model", "name"), 5, "model.name"),
    ("lora", ("model", "name"), "gpt2\x00", "model.name"),
    ("lora", ("model", "name"), "m" * 4097, "model.name"),
    ("lora", ("data", "source"), "", "data.source"),
    ("lora", ("data", "source"), None, "data.source"),
    ("lora", ("data", "source"), "x" * 5000, "data.source"),
    ("lora", ("data", "source"), "data\x00.json", "data.source"),
    ("prompt", S + ("init_text",), "x" * 2001, "adapter.init_text"),
    ("prompt", S + ("init_text",), "a\x00", "adapter.init_text"),
    ("prompt", S + ("init_text",), 42, "adapter.init_text"),
    # layers
    ("lora", ("adapter", "layers"), "0-99999999999", "adapter.layers"),
    ("lora", ("adapter", "layers"), "9" * 5000, "adapter.layers"),
    ("lora", ("adapter", "layers"), "1.5", "adapter.layers"),
    ("lora", ("adapter", "layers"), "0-3,x", "adapter.layers"),
    ("lora", ("adapter", "layers"), "3-1", "adapter.layers"),
    ("lora", ("adapter", "layers"), "0,,1", "adapter.layers"),
    ("lora", ("adapter", "layers"), "\u0661", "adapter.layers"),  # an Arabic-Indic digit one
    ("lora", ("adapter", "layers"), "0" * 5000, "adapter.layers"),
    ("lora", ("adapter", "layers"), [1.5], "adapter.layers"),
    ("lora", ("adapter", "layers"), [1.0], "adapter.layers"),
    ("lora", ("adapter", "layers"), [True], "adapter.layers"),
    ("lora", ("adapter", "layers"), [2**70], "adapter.layers"),
    ("lora", ("adapter", "layers"), ["0"], "adapter.layers"),
    ("lora", ("adapter", "layers"), [], "adapter.layers"),
    ("lora", ("adapter", "layers"), None, "adapter.layers"),
    ("lora", ("adapter", "layers"), 5, "adapter.layers"),
    ("lora", ("adapter", "layers"), {"0": 1}, "adapter.layers"),
    ("prompt", ("adapter", "layers"), "0", "adapter.layers"),
    # a hand-written architecture row
    ("lora", ("adapter", "arch"), "llama", "adapter.arch"),
    ("lora", ("adapter", "arch"), [], "adapter.arch"),
    ("lora", ("adapter", "arch"), {"roles": {"q": "q_proj"}}, "adapter.arch.layers"),
    ("lora", ("adapter", "arch"), {"layers": 5, "roles": {"q": "q_proj"}}, "adapter.arch.layers"),
    ("lora", ("adapter", "arch"), {"layers": "model.layers", "roles": []}, "adapter.arch.roles"),
    ("lora", ("adapter", "arch"), {"layers": "model.layers", "roles": {"q": 5}}, "adapter.arch.roles"),
    ("lora", ("adapter", "arch"), {"layers": "l", "roles": {"q": "q"}, "extra": 1}, "adapter.arch.extra"),
    ("lora", ("adapter", "arch"), {"layers": "l", "roles": {"qkv": "c"}, "fused_layout": "odd"},
     "adapter.arch.fused_layout"),
    ("lora", ("adapter", "arch"), {"layers": "l", "roles": {"q": "q"}, "backbone": 5}, "adapter.arch.backbone"),
]
BAD += [(m, p, v, field_name(p)) for m, p in FLOAT_FIELDS for v in (NAN, INF, -INF)]
BAD += [(m, p, v, field_name(p)) for m, p in INT_FIELDS for v in (2**70, 2.5, INT64_MAX + 1, -(2**64), "8")]


def test_the_table_is_big_and_distinct():
    keys = {(m, p, repr(v)) for m, p, v, _ in BAD}
    assert len(keys) == len(BAD) >= 60


@pytest.mark.parametrize("method,path,value,field", BAD, ids=[f"{f}={v!r:.30}" for _, _, v, f in BAD])
def test_bad_input_names_its_field(method, path, value, field):
    spec = put(base(method), path, value)
    with pytest.raises(ConfigError) as err:
        JobSpec.from_dict(spec).validate()
    assert err.value.field == field
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    # the same through JSON text, where JSON can carry the value
    try:
        text = json.dumps(spec, allow_nan=False)
    except (ValueError, TypeError):
        return
    with pytest.raises(ConfigError) as err:
        JobSpec.from_json(text).validate()
    assert err.value.field == field


@pytest.mark.parametrize("data", [None, [], "spec", 5, True, [{"name": "x"}]])
def test_a_spec_is_an_object(data):
    with pytest.raises(ConfigError) as err:
        JobSpec.from_dict(data)
    assert err.value.field == "spec"


# --------------------------------------------------------------------------------------------------
# 3. The cases quoted in the issue.

def test_string_false_is_not_trust():
    spec = put(base(), ("model", "trust_remote_code"), "false")
    with pytest.raises(ConfigError, match="true or false") as err:
        JobSpec.from_dict(spec).validate()
    assert err.value.field == "model.trust_remote_code"


def test_nan_dropout_is_refused_and_never_written():
    spec = put(base(), S + ("dropout",), NAN)
    with pytest.raises(ConfigError, match="finite") as err:
        JobSpec.from_dict(spec).validate()
    assert err.value.field == "adapter.dropout"
    with pytest.raises(ConfigError):
        JobSpec.from_dict(spec).to_json()  # never emits NaN, even unvalidated
    with pytest.raises(ConfigError) as err:
        JobSpec.from_json('{"adapter": {"settings": {"dropout": NaN}}}')
    assert err.value.field == "spec"


def test_huge_epochs_and_seed_are_refused():
    for path, value in [(("train", "epochs"), 1e300), (("train", "seed"), 2**70)]:
        with pytest.raises(ConfigError) as err:
            JobSpec.from_dict(put(base(), path, value)).validate()
        assert err.value.field == ".".join(path)
    assert JobSpec.from_dict(put(base(), ("train", "seed"), INT64_MAX)).validate().train.seed == INT64_MAX


def test_null_columns_is_an_error_and_absent_columns_the_default():
    with pytest.raises(ConfigError, match="JSON object") as err:
        JobSpec.from_dict(put(base(), ("data", "columns"), None)).validate()
    assert err.value.field == "data.columns"
    spec = base()
    del spec["data"]["columns"]
    assert JobSpec.from_dict(spec).validate().data.columns == {}


# --------------------------------------------------------------------------------------------------
# What stays accepted: form values, round trips, defaults that follow the method.

def test_integral_floats_from_form_widgets_become_ints():
    spec = base()
    spec["train"].update(batch_size=16.0, micro_batch_size=4.0, seed=7.0, max_steps=3.0, epochs=2)
    spec["adapter"]["settings"].update(r=8.0, alpha=16)
    spec["eval"].update(sample_seed=-1.0)
    job = JobSpec.from_dict(spec).validate()
    assert (job.train.batch_size, job.train.seed, job.adapter.settings.r, job.eval.sample_seed) == (16, 7, 8, -1)
    assert all(type(v) is int for v in (job.train.batch_size, job.train.seed, job.adapter.settings.r))
    assert JobSpec.from_json(job.to_json()).to_dict() == job.to_dict()


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_valid_specs_round_trip_exactly(method):
    spec = base(method)
    spec["name"] = "run ✓ \u00e9"
    spec["data"]["columns"] = {"instruction": "question", "output": "answer"}
    spec["eval"]["benchmarks"] = ["gsm8k", "data/my bench.jsonl"]
    if not methods.get(method).all_layers_only:
        spec["adapter"]["layers"] = [0, -1, 3]
    spec["adapter"]["arch"] = {"layers": "model.layers", "roles": {"q": "self_attn.q_proj"}}
    job = JobSpec.from_dict(spec).validate()
    assert job.to_dict() == spec
    assert JobSpec.from_dict(job.to_dict()).to_dict() == spec
    assert JobSpec.from_json(job.to_json()) == job
    assert "NaN" not in job.to_json()


def test_default_settings_follow_the_method():
    for method, cls in METHOD_SETTINGS.items():
        cfg = AdapterConfig(method=method)
        assert isinstance(cfg.settings, cls) and cfg.validate() is cfg
        assert AdapterConfig.from_dict({"method": method}).settings == cls()
    with pytest.raises(ConfigError) as err:
        AdapterConfig(method="magic").validate()
    assert err.value.field == "method"


def test_layer_strings_still_parse():
    from core.config import parse_layers
    assert parse_layers("all") is None and parse_layers(" ALL ") is None and parse_layers("") is None
    assert parse_layers("0-3, 8") == [0, 1, 2, 3, 8]
    assert parse_layers("-2--1", 12) == [10, 11]
    assert parse_layers([0, 2], 4) == [0, 2]
    assert parse_layers("4095") == [4095]


def test_from_json_text_forms():
    assert JobSpec.from_json("\ufeff" + JobSpec().to_json()) == JobSpec()  # a UTF-8 BOM is skipped
    assert JobSpec.from_json(b"\xef\xbb\xbf{}") == JobSpec()
    assert JobSpec.from_json(JobSpec().to_json().encode()) == JobSpec()
    for text in ["", "{", "{'a': 1}", "[" * 100_000, '{"a":' * 50_000, "1" * 5000, "NaN", "-Infinity",
                 '{"train": {"epochs": Infinity}}', b"\xff\xfe", "[]", "null", '"spec"', "x" * 2_000_000]:
        with pytest.raises(ConfigError) as err:
            JobSpec.from_json(text)
        assert err.value.field == "spec"
    with pytest.raises(ConfigError) as err:
        JobSpec.from_json(None)
    assert err.value.field == "spec"
    with pytest.raises(ConfigError) as err:
        AdapterConfig.from_json("[1")
    assert err.value.field == "adapter"


def test_python_values_json_cannot_carry_are_refused_not_dumped():
    job = JobSpec()
    job.train.epochs = INF
    with pytest.raises(ConfigError):
        job.to_json()
    with pytest.raises(ConfigError) as err:
        job.validate()
    assert err.value.field == "train.epochs"
    job = JobSpec()
    job.model = "gpt2"
    with pytest.raises(ConfigError) as err:
        job.validate()
    assert err.value.field == "model"


# --------------------------------------------------------------------------------------------------
# 2. Properties: any JSON value in any one field.

INTERESTING = sorted({*METHOD_SETTINGS, "all", "0-3,8", "0", "-1", "learned", "false", "true", "NaN", "", " ",
                      "\x00", "x" * 5000, "q", "k", "v", "o", "up", "down", "gate", "fp16", "cpu", "cosine",
                      "chat", "mlp", "attn", "relu", "text", "lstm", "gsm8k", "instruction", "output"})
KEYS = st.sampled_from(["r", "layers", "roles", "q", "output", "instruction", "method", "settings"]) | st.text(max_size=6)
SCALARS = (st.none() | st.booleans() | st.integers(-5, 70) | st.integers(-2**80, 2**80)
           | st.sampled_from([0, 1, -1, 3.0, 2.5, 2**63 - 1, 2**63, -2**63 - 1, 1e300, -0.0, 5e-324,
                             NAN, INF, -INF])
           | st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 1) | st.text(max_size=12)
           | st.sampled_from(INTERESTING))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(KEYS, inner, max_size=4), max_leaves=10)
FIELD_VALUES = st.one_of(SCALARS, SCALARS, JSON_VALUES)  # st.recursive alone gives mostly containers

# A value placed in one field may fault a field it is checked against.
COUPLED = {"train.batch_size": {"train.micro_batch_size"}}
ANYWHERE_IN_ADAPTER = {"adapter.method", "adapter.settings"}  # settings are named adapter.<setting>


def related(err_field: str, placed: str) -> bool:
    if err_field == placed or err_field.startswith(placed + ".") or placed.startswith(err_field + "."):
        return True
    if placed in ANYWHERE_IN_ADAPTER and err_field.startswith("adapter."):
        return True
    return err_field in COUPLED.get(placed, ())


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {int: "number", float: "number", str: "string", list: "array", dict: "object"}[type(value)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(PATHS), value=FIELD_VALUES)
def test_any_value_in_any_field_is_valid_or_names_that_field(where, value):
    check_placed(*where, value)


@settings(max_examples=150, deadline=None)
@given(where=st.sampled_from(INT_FIELDS + FLOAT_FIELDS),
       value=st.sampled_from([NAN, INF, -INF, True, False, None, "1", 0, -1, 2.5, 3.0, 2**63, -0.0, 1e300]) | SCALARS)
def test_any_scalar_in_a_numeric_field_is_valid_or_names_that_field(where, value):
    check_placed(*where, value)


def check_placed(method: str, path: tuple[str, ...], value) -> None:
    """``value`` at ``path`` of a valid spec: a valid spec that round-trips, or an error naming the field."""
    spec = put(base(method), path, value)
    try:
        job = JobSpec.from_dict(spec).validate()
    except ConfigError as err:
        assert related(err.field, field_name(path)), (err.field, path, value)
        assert "\n" not in str(err)
        return
    text = job.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))
    again = JobSpec.from_json(text)
    assert again.to_dict() == job.to_dict()
    assert again.validate().to_dict() == job.to_dict()
    if len(path) >= 2 and path[-1] not in ("settings", "arch"):  # a leaf keeps what was given
        kept = job.to_dict()
        for key in path:
            kept = kept[key]
        assert kept == value
        meta = _meta(method, path)
        if meta is not None:  # and has the field's JSON type: no "false" for a bool, no true for a number
            assert _json_type(kept) == _json_type(meta["default"]) or (meta.get("number_ok") and isinstance(kept, str))


@settings(max_examples=200, deadline=None)
@given(st.one_of(JSON_VALUES.map(json.dumps),
                 st.builds(lambda s: json.dumps(s), st.dictionaries(st.sampled_from(["name", *JobSpec.SECTIONS]),
                                                                     JSON_VALUES, max_size=3)),
                 st.text(max_size=40),
                 st.binary(max_size=20)))
def test_any_json_text_gives_a_spec_or_a_config_error(text):
    try:
        job = JobSpec.from_json(text)
        job.validate()
    except ConfigError:
        return
    assert JobSpec.from_json(job.to_json()) == job
