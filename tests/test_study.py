"""Study grids, the McNemar test and the paper-style tables, on rigged results."""

from __future__ import annotations

import pytest

from core import ConfigError, JobSpec
from core.study import (CellResult, StudySpec, analyse, expand, hyperparameter_study, mcnemar, placement_study,
                        tables_markdown)


def base() -> JobSpec:
    spec = JobSpec()
    spec.eval.benchmarks = ["builtin:math"]
    return spec


def test_grid_expands_methods_placements_values_and_seeds():
    study = StudySpec(base=base(), methods=["lora", "series"], placements={"series": ["attn", "mlp"]},
                      values={"lora": [4, 8]}, seeds=[1, 2])
    cells = expand(study.validate())
    assert len(cells) == (2 * 1 + 1 * 2) * 2
    lora = [c for c in cells if c.method == "lora"]
    assert sorted({c.spec.adapter.settings.r for c in lora}) == [4, 8]
    series = [c for c in cells if c.method == "series"]
    assert sorted({c.spec.adapter.settings.placement for c in series}) == ["attn", "mlp"]
    assert {c.spec.train.seed for c in cells} == {1, 2}
    assert len({c.config_label for c in cells}) == 4


def test_presets_scale_to_the_model():
    assert len(expand(placement_study(base()))) == 9
    hp = hyperparameter_study(base(), hidden_size=576)
    assert hp.values["series"] == [64, 128, 256]
    assert hyperparameter_study(base(), hidden_size=64).values["series"] == [8, 16, 32]


@pytest.mark.parametrize("change,field", [
    ({"methods": ["magic"]}, "methods"),
    ({"placements": {"series": ["sideways"]}}, "placements.series"),
    ({"placements": {"series": []}}, "placements.series"),  # empty is not "the default": leave it out
    ({"methods": ["prefix"], "placements": {"prefix": ["attn"]}}, "placements.prefix"),  # it has none
    ({"values": {"lora": []}}, "values.lora"),
    ({"values": {"lora": [0, 4]}}, "values.lora"),  # r=0: the cell's error, named by its axis
    ({"seeds": []}, "seeds"),
])
def test_invalid_studies_name_the_field(change, field):
    study = StudySpec(base=base(), **change)
    with pytest.raises(ConfigError) as err:
        study.validate()
    assert err.value.field == field


def test_study_needs_a_benchmark():
    with pytest.raises(ConfigError) as err:
        StudySpec(base=JobSpec()).validate()
    assert err.value.field == "eval.benchmarks"


def test_mcnemar_exact():
    a = [True] * 10 + [True] * 5
    b = [False] * 10 + [True] * 5
    result = mcnemar(a, b)
    assert (result["n10"], result["n01"]) == (10, 0)
    assert result["p_value"] == pytest.approx(2 / 2 ** 10)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_analysis_tables_for_rigged_results():
    study = StudySpec(base=base(), methods=["lora", "series"], values={"lora": [4, 8]}, seeds=[1, 2])
    cells = expand(study)
    results = []
    for c in cells:
        acc = {"lora @both r=4": 0.5, "lora @both r=8": 0.9, "series @mlp bottleneck=256": 0.2}[c.config_label]
        n = 40
        correct = [i < acc * n for i in range(n)]
        results.append(CellResult(c.coordinates(), "builtin:math", acc + (0.01 if c.seed == 2 else 0), 1000, correct))
    a = analyse(results)["builtin:math"]
    assert a["configs"][0]["config"] == "lora @both r=8"
    assert a["configs"][0]["mean"] == pytest.approx(0.905)
    assert a["configs"][0]["std"] > 0
    assert [b["config"] for b in a["best_per_method"]] == ["lora @both r=8", "series @mlp bottleneck=256"]
    assert a["mcnemar"]["runner_up"] == "lora @both r=4"
    assert a["mcnemar"]["n10"] == 2 * (36 - 20) and a["mcnemar"]["significant"]
    md = tables_markdown(analyse(results))
    assert "| lora @both r=8 | 2 | 90.5 |" in md and "beyond chance" in md


def test_study_json_roundtrip():
    study = placement_study(base())
    again = StudySpec.from_json(study.to_json())
    assert again.to_dict() == study.to_dict()


def test_a_method_without_a_value_axis_varies_by_seed_only():
    """(IA)³ has nothing numeric to vary: its cells differ by seed, and giving it values is an error."""
    base = JobSpec()
    base.eval.benchmarks = ["builtin:math"]
    study = StudySpec(name="ia3", base=base, methods=["ia3"], seeds=[1, 2]).validate()
    cells = expand(study)
    assert [(c.setting, c.value, c.seed) for c in cells] == [(None, None, 1), (None, None, 2)]
    assert cells[0].config_label == "ia3" and cells[0].spec.adapter.method == "ia3"
    with pytest.raises(ConfigError, match="no value to vary") as err:
        StudySpec(name="ia3", base=base, methods=["ia3"], values={"ia3": [4]}).validate()
    assert err.value.field == "values.ia3"


def test_presets_and_learning_rates_are_study_entries():
    """A preset is an entry of its own (its settings, its label); learning_rates gives an entry its own."""
    study = StudySpec(base=base(), methods=["lora", "AdapterH", "series"], seeds=[3],
                      learning_rates={"AdapterH": 1e-3}).validate()
    cells = {c.config_label: c for c in expand(study)}
    adapter_h, series = cells["AdapterH @both bottleneck=256"], cells["series @mlp bottleneck=256"]
    assert adapter_h.method == series.method == "series" and adapter_h.entry == "AdapterH"
    assert adapter_h.spec.adapter.settings.placement == "both" and series.spec.adapter.settings.placement == "mlp"
    assert adapter_h.spec.train.learning_rate == 1e-3
    assert series.spec.train.learning_rate == cells["lora @both r=32"].spec.train.learning_rate == base().train.learning_rate
    assert adapter_h.coordinates()["entry"] == "AdapterH"
    again = StudySpec.from_json(study.to_json())
    assert again.learning_rates == {"AdapterH": 1e-3} and again.methods == study.methods


@pytest.mark.parametrize("change,field", [
    ({"learning_rates": {"series": 1e-3}}, "learning_rates.series"),  # not among the methods
    ({"learning_rates": {"lora": -1.0}}, "learning_rates.lora"),  # out of the training range
    ({"learning_rates": {"Magic": 1e-3}}, "learning_rates"),
])
def test_bad_learning_rates_name_the_entry(change, field):
    with pytest.raises(ConfigError) as err:
        StudySpec(base=base(), methods=["lora"], **change).validate()
    assert err.value.field == field


def test_study_json_refuses_a_learning_rate_that_is_not_a_number():
    with pytest.raises(ConfigError) as err:
        StudySpec.from_dict({"methods": ["lora"], "learning_rates": {"lora": "fast"}})
    assert err.value.field == "learning_rates.lora"
