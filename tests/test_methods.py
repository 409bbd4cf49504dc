"""The method registry, and the proof of its design: a toy method declared in this file alone (settings,
module, builder, drawing, record) appears in the Train form, the study grid, the block diagram and
save/load, with no edit anywhere else.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
from core import AdapterConfig, ConfigError, JobSpec, methods
from core.adapters.base import AdapterModule, sites
from core.arch import in_out_features
from core.config import ROLES
from core.fields import Settings, setting
from core.methods import Drawing, Method, Placements
from tests.tiny import tiny_model, toy_batch

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# The toy method: everything it takes, in one place.

@dataclass
class ToySettings(Settings):
    """Toy shift: a learned vector, zero at start, added to the first ``width`` outputs of some roles."""

    width: int = setting(4, "how many leading output features get a learned shift", min=1, max=4096, integer=True)
    roles: list[str] = setting(["o"], "roles whose output is shifted", choices=ROLES)


class ToyShift(AdapterModule):
    """``base(x) + [shift, 0, ..., 0]``."""

    def __init__(self, base: nn.Module, width: int):
        super().__init__()
        self.base = base
        self.shift = nn.Parameter(torch.zeros(min(width, in_out_features(base)[1])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.pad(self.shift, (0, y.shape[-1] - self.shift.shape[0])).to(y.dtype)


def build_toy(model, cfg, spec, layers, tokenizer):
    s: ToySettings = cfg.settings
    return {site.path: ToyShift(model.get_submodule(site.path), s.width)
            for site in sites(model, spec, list(s.roles), layers)}


def draw_toy(s) -> Drawing:
    roles = list(s.get("roles") or [])
    return Drawing(caption=f"Toy shift (width {s.get('width')}) on {', '.join(roles)}",
                   marks={r: "+shift" for r in roles})


TOY = Method(name="toy", label="Toy shift", settings=ToySettings, build=build_toy, draw=draw_toy,
             value_setting="width", placements=Placements({"attn": {"roles": ["o"]}, "mlp": {"roles": ["down"]}},
                                                          default="attn"),
             sweep=lambda hidden: [1, 2], presets={"ToyPreset": {"width": 2}},
             paper=True)  # as if the paper had it: its placement and hyperparameter grids take it


@pytest.fixture
def toy():
    methods.register(TOY)
    yield TOY
    methods.unregister(TOY.name)


def study_base() -> JobSpec:
    spec = JobSpec()
    spec.eval.benchmarks = ["builtin:math"]
    return spec


# --------------------------------------------------------------------------------------------------
# The toy everywhere.

def test_the_toy_is_configured_like_any_method(toy):
    assert methods.get("toy") is toy and methods.names()[-1] == "toy"
    cfg = AdapterConfig(method="toy")
    assert cfg.settings == ToySettings() and cfg.validate() is cfg
    assert AdapterConfig.preset("ToyPreset").settings.width == 2
    assert core.config.METHOD_SETTINGS["toy"] is ToySettings
    spec = study_base()
    spec.adapter = AdapterConfig.for_method("toy", width=3, roles=["o", "down"])
    assert JobSpec.from_json(spec.to_json()).validate().adapter == spec.adapter
    with pytest.raises(ConfigError) as err:
        AdapterConfig.for_method("toy", width=0).validate()
    assert err.value.field == "width"


def test_the_toy_appears_in_the_train_form(toy, service, tiny_model_dir):
    from app import train_form, train_tab

    with gr.Blocks():
        tab = train_tab.build_train_tab(service)
    radio = tab.form["adapter.method"]
    assert ("Toy shift", "toy") in [tuple(c) for c in radio.choices]
    assert {"adapter.toy.width", "adapter.toy.roles"} <= set(tab.form.paths)
    assert len(tab.method_groups) == len(methods.names())
    assert [v["visible"] for v in train_tab.method_visibility("toy")] == [m == "toy" for m in methods.names()]
    assert train_tab.preset_values("ToyPreset") == {"adapter.method": "toy", "adapter.toy.width": 2,
                                                   "adapter.toy.roles": ["o"]}
    form = {**train_form.default_form(), "model.name": str(tiny_model_dir), "adapter.method": "toy",
            "adapter.toy.width": 3}
    spec = train_tab.spec_from_form(form)  # validated, and estimated on the tiny model
    assert spec.adapter.method == "toy" and spec.adapter.settings == ToySettings(width=3)
    assert train_tab.spec_from_form({**form, **train_tab.form_from_spec(spec)}).adapter == spec.adapter
    _, estimate_md, diagram = train_tab.plan(form)
    assert "trainable parameters" in estimate_md and "o +shift" in diagram


def test_the_toy_appears_in_the_study_grid(toy):
    from app import study_form
    from core.study import StudySpec, expand, hyperparameter_study, placement_study

    study = StudySpec(base=study_base(), methods=["toy", "lora"], placements={"toy": ["attn", "mlp"]},
                      values={"toy": [2, 4]}).validate()
    cells = [c for c in expand(study) if c.method == "toy"]
    assert sorted((c.placement, c.value) for c in cells) == [("attn", 2), ("attn", 4), ("mlp", 2), ("mlp", 4)]
    assert {tuple(c.spec.adapter.settings.roles) for c in cells} == {("o",), ("down",)}
    assert [c.config_label for c in expand(StudySpec(base=study_base(), methods=["toy"]))] == ["toy @attn width=4"]
    assert "toy" in placement_study(study_base()).methods
    assert "dora" not in placement_study(study_base()).methods  # not the paper's: named studies only
    assert hyperparameter_study(study_base(), 64).values["toy"] == [1, 2]
    with pytest.raises(ConfigError) as err:
        StudySpec(base=study_base(), methods=["toy"], placements={"toy": ["both"]}).validate()
    assert err.value.field == "placements.toy"
    inputs = {"methods": ["toy"], "placements.toy": ["mlp"], "values.toy": "8,2", "seeds": "1"}
    built = study_form.build_study(study_base(), inputs)
    assert built.placements == {"toy": ["mlp"]} and built.values == {"toy": [2, 8]}
    assert study_form.preset_inputs(study_form.PRESET_PLACEMENT)["placements.toy"] == ["attn", "mlp"]


def test_the_toy_appears_in_the_diagram(toy):
    from app.diagram import block_diagram, describe

    svg = block_diagram("toy", {"width": 4, "roles": ["o", "down"]}, "all", "llama", 2)
    assert "<svg" in svg and "o +shift" in svg and "down +shift" in svg
    assert describe("toy", {"width": 4, "roles": ["o"]}, "0", 2) == "Toy shift (width 4) on o in layers 0 of 2"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_toy_saves_and_loads(toy, arch, tmp_path):
    batch = toy_batch()
    model = core.attach(tiny_model(arch), AdapterConfig.for_method("toy", roles=["o", "down"]))
    with torch.no_grad():
        base = model(**batch).logits
        for p in core.adapter_params(model):
            p.normal_()
        expected = model(**batch).logits
    assert not torch.allclose(base, expected)
    assert core.trainable_report(model)["per_kind"] == {"ToyShift": 2 * 2 * 4}  # 2 layers x 2 roles x width
    core.save_adapter(model, tmp_path)
    fresh = core.load_adapter(tiny_model(arch), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="Toy shift cannot merge"):
        core.merge_adapter(fresh)


# --------------------------------------------------------------------------------------------------
# The registry itself.

def test_registry_order_and_lookup():
    assert methods.names()[:6] == ["lora", "series", "parallel", "prefix", "prompt", "ptuning"]
    assert [m.name for m in methods.all()] == methods.names()
    assert methods.label("series") == "Series adapter" and methods.label("gone") == "gone"
    with pytest.raises(ConfigError) as err:
        methods.get("magic")
    assert err.value.field == "method" and "known: lora" in err.value.message
    assert set(core.config.PRESETS) == {p for m in methods.all() for p in m.presets}


@pytest.mark.parametrize("change, words", [
    ({"name": "Bad.Name"}, "lower-case"),
    ({"name": "lora"}, "already registered"),
    ({"value_setting": "depth"}, "not a field"),
    ({"placements": Placements({"attn": {"roles": ["o"]}}, default="mlp")}, "not an option"),
    ({"placements": Placements({"attn": {"depth": 1}}, default="attn")}, "unknown settings"),
    ({"presets": {"LoRA": {}}}, "taken"),
    ({"settings": dict}, "Settings dataclass"),
])
def test_a_bad_record_is_refused_when_registered(change, words):
    import dataclasses

    with pytest.raises(ValueError, match=words):
        methods.register(dataclasses.replace(TOY, **change))
    assert "toy" not in methods.names()


def test_config_stays_free_of_torch():
    code = ("import sys, core.config, core.methods; assert 'torch' not in sys.modules; "
            "core.methods.names(); assert 'torch' in sys.modules")  # the families load on first use
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
