"""The Study tab's handlers as plain functions, against a temporary database (no worker, no browser).

Results come from rigged evaluations recorded on each cell's job, so the tables and charts are
checked without training anything.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import gradio as gr
import pytest

from app import charts, study_form, study_tab, ui
from core.config import JobSpec
from jobs.service import JobService
from tests.test_jobs_support import tiny_spec, write_data

QUESTIONS = [{"instruction": f"What is {a} plus 2?", "input": "", "output": "", "answer": str(a + 2)}
             for a in range(3)]


@pytest.fixture
def service(tmp_path):
    svc = JobService(f"sqlite:///{tmp_path / 'j.db'}", home=tmp_path / "home")
    yield svc
    svc.close()


@pytest.fixture
def base_job(service, tiny_model_dir, tmp_path):
    """A job on the tiny model (never run) whose spec the study starts from; its benchmark is a tiny file."""
    spec = tiny_spec(tiny_model_dir, write_data(tmp_path / "rows.json"), max_steps=2, eval_every=0, save_every=0)
    bench = tmp_path / "tiny_bench.json"
    bench.write_text(json.dumps(QUESTIONS))
    spec.eval.benchmarks = [str(bench)]
    return service.submit(spec)


def inputs(base_job, **over):
    values = {"base": f"job:{base_job}", "name": "grid", "methods": ["lora", "series"], "seeds": "1,2",
              "benchmarks": [], "placements.lora": ["attn", "both"], "placements.series": ["mlp"],
              "values.lora": "2,4", "values.series": "4"}
    values.update(over)
    return values


def _error(update) -> str:
    assert isinstance(update, dict) and update.get("__type__") == "update"
    return update["value"] if update.get("visible") else ""


def _num_jobs(service) -> int:
    return len(service.list_jobs())


def test_plan_shows_the_grid_size_and_submits_nothing(service, base_job):
    before = _num_jobs(service)
    err, info = study_tab.plan(service, inputs(base_job))
    assert _error(err) == ""
    # lora: 2 placements x 2 values x 2 seeds = 8; series: 1 x 1 x 2 = 2
    assert "**10 jobs**" in info and "estimated training time" in info
    assert _num_jobs(service) == before and service.list_studies() == []


@pytest.mark.parametrize("over, field", [
    ({"values.lora": "abc"}, "values.lora"),
    ({"values.lora": "0,4"}, "values.lora"),
    ({"values.series": ""}, "values.series"),
    ({"seeds": ""}, "seeds"),
    ({"seeds": "1,x"}, "seeds"),
    ({"methods": []}, "methods"),
    ({"placements.lora": []}, "placements.lora"),
    ({"learning_rates": "lora"}, "learning_rates"),
    ({"learning_rates": "lora=fast"}, "learning_rates"),
    ({"learning_rates": "lora=1e-3 lora=2e-3"}, "learning_rates"),
    ({"learning_rates": "ia3=1e-3"}, "learning_rates.ia3"),  # not among the chosen methods
])
def test_invalid_input_names_the_field_and_submits_nothing(service, base_job, over, field):
    before = _num_jobs(service)
    err, _ = study_tab.plan(service, inputs(base_job, **over))
    assert f"**{field}**" in _error(err)
    with pytest.warns(UserWarning):  # the toast, outside a Gradio event
        err, _, study_id = study_tab.launch(service, inputs(base_job, **over))
    assert f"**{field}**" in _error(err) and study_id is None
    assert _num_jobs(service) == before and service.list_studies() == []


def test_presets_and_learning_rates_from_the_widgets(service, base_job):
    """A preset is chosen like a method (it keeps its own settings); a learning rate per entry."""
    assert ("AdapterH (Series adapter preset)", "AdapterH") in study_form.entry_choices()
    chosen = inputs(base_job, methods=["lora", "AdapterH"], learning_rates="AdapterH=1e-3, lora=2e-4")
    study = study_form.build_study(study_form.base_spec(service, chosen["base"]), chosen)
    assert study.learning_rates == {"AdapterH": 1e-3, "lora": 2e-4}
    err, info = study_tab.plan(service, chosen)
    assert _error(err) == "" and "**10 jobs**" in info  # lora 2 x 2 x 2 seeds, AdapterH 1 x 1 x 2 seeds
    assert "AdapterH 2" in info


def test_a_study_needs_benchmarks(service):
    err, _ = study_tab.plan(service, {"base": "default", "methods": ["lora"], "placements.lora": ["both"],
                                      "values.lora": "4", "seeds": "42", "benchmarks": []})
    assert "**eval.benchmarks**" in _error(err)  # StudySpec.validate's own field name: one study validation


def test_presets_fill_the_grid(tiny_model_dir):
    p = study_form.preset_inputs(study_form.PRESET_PLACEMENT)
    assert p["methods"] == ["lora", "series", "parallel"] and p["placements.lora"] == ["attn", "mlp", "both"]
    base = JobSpec()
    base.model.name = str(tiny_model_dir)
    h = study_form.preset_inputs(study_form.PRESET_HYPER, base)
    assert h["values.lora"] == "4,8,16,32" and "prefix" in h["methods"]
    assert h["values.series"] == "4,8,16"  # bottlenecks scale with the tiny model's hidden size (32)
    assert study_form.preset_inputs(study_form.PRESET_CUSTOM) == {}


def test_base_from_the_train_form(service, tiny_model_dir):
    from app import train_form

    form = train_form.default_form()
    form.update({"model.name": str(tiny_model_dir), "eval.benchmarks": ["builtin:math"]})
    spec = study_form.base_spec(service, study_form.BASE_FORM, form)
    assert spec.model.name == str(tiny_model_dir) and spec.eval.benchmarks == ["builtin:math"]
    assert study_form.base_spec(service, study_form.BASE_DEFAULT).model.name == JobSpec().model.name


def rig(service, study_id: int, truth: dict[str, float], n: int = 30) -> None:
    """Record an evaluation on every cell with ``truth[config]`` of ``n`` questions right (the first ones)."""
    for cell in service.get_study(study_id)["cells"]:
        acc = truth[cell["coordinates"]["config"]]
        correct = [i < acc * n for i in range(n)]
        service.record_evaluation(benchmark="rigged", base_model="tiny", accuracy=sum(correct) / n,
                                  correct=sum(correct), total=n, job_id=cell["job_id"],
                                  samples=[{"index": i, "question": f"q{i}", "gold": "1", "response": "",
                                            "extracted": "1" if c else "0", "correct": c}
                                           for i, c in enumerate(correct)])


def test_launch_results_and_exports(service, base_job):
    before = _num_jobs(service)
    err, info, study_id = study_tab.launch(service, inputs(base_job, seeds="7", **{"placements.lora": ["both"]}))
    assert _error(err) == "" and study_id is not None and "**3 jobs**" in info
    study = service.get_study(study_id)
    assert len(study["cells"]) == 3 and _num_jobs(service) == before + 3 and study["counts"] == {"queued": 3}
    assert [v for _, v in study_tab.study_choices(service)] == [study_id]
    assert study_tab.refresh_studies(service, None)["value"] == study_id

    # before any evaluation: the status, empty figures, no table rows
    status, bench, table, *_ = study_tab.results(service, study_id, None)
    assert "3 queued" in status and table["value"]["data"] == [] and bench["choices"] == []

    truth = {"lora @both r=2": 0.3, "lora @both r=4": 0.9, "series @mlp bottleneck=4": 0.5}
    rig(service, study_id, truth)
    status, bench, table, bars, lines, scatter, best, verdict = study_tab.results(service, study_id, None)
    assert bench["value"] == "rigged (generate)"
    rows = table["value"]["data"]
    assert [r[1] for r in rows] == ["lora @both r=4", "series @mlp bottleneck=4", "lora @both r=2"]
    assert rows[0][7] == "90.0 ± 0.0"
    for fig in (bars, lines, scatter):
        assert fig.data and all(len(t.y) for t in fig.data)
    assert {t.name for t in bars.data} == {"both", "mlp"}
    assert sorted(lines.data[0].x) == [2, 4] or sorted(lines.data[1].x) == [2, 4]
    assert "lora @both r=4" in best and "series @mlp bottleneck=4" in best
    assert "McNemar" in verdict and "`lora @both r=4`" in verdict and "beyond chance" in verdict
    assert study_tab.results_signature(service, study_id) != ""

    paths = {fmt: Path(study_tab.export(service, study_id, fmt)["value"]) for fmt in ("md", "csv", "html")}
    assert "| lora @both r=4 | 1 | 90.0 |" in paths["md"].read_text()
    parsed = list(csv.DictReader(paths["csv"].read_text().splitlines()))
    assert parsed[0]["config"] == "lora @both r=4" and float(parsed[0]["mean"]) == pytest.approx(0.9)
    html = paths["html"].read_text()
    assert html.count("plotly-graph-div") >= 3 and "McNemar" in html

    # cancel the study: every queued job is cancelled
    with pytest.warns(UserWarning):
        assert study_tab.cancel(service, None) is None
    assert study_tab.cancel(service, study_id) == 3
    assert "queued" not in service.get_study(study_id)["counts"]


def test_empty_results_and_export_without_study(service):
    status, bench, table, bars, lines, scatter, best, verdict = study_tab.results(service, None, None)
    assert "No study" in status and table["value"]["data"] == [] and not bars.data
    with pytest.warns(UserWarning):
        assert study_tab.export(service, None, "csv") == gr.skip()


def test_study_charts_on_plain_rows():
    configs = [{"config": "lora @attn r=4", "method": "lora", "placement": "attn", "setting": "r", "value": 4,
                "mean": 0.5, "std": 0.1, "trainable_params": 1000},
               {"config": "prefix num_virtual_tokens=10", "method": "prefix", "placement": None,
                "setting": "num_virtual_tokens", "value": 10, "mean": 0.4, "std": 0.0, "trainable_params": 500}]
    assert [t.name for t in charts.study_placement_bars(configs).data] == ["attn"]
    assert len(charts.study_value_lines(configs).data) == 2
    assert len(charts.study_params_scatter(configs).data) == 2
    assert not charts.study_placement_bars([]).data


def test_the_page_builds_with_the_study_tab(service):
    demo = ui.build_demo(service)
    assert isinstance(demo.workbench["study"], study_tab.StudyTab)
