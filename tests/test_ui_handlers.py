"""The tabs' callbacks as plain functions: valid and invalid input, against a temporary database.

No browser: each handler is called with what Gradio would pass (widget values) and its outputs are
checked, including that invalid settings submit nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gradio as gr
import pytest

from app import charts, chat_tab, compare_tab, jobs_tab, train_form, train_tab, ui
from app.diagram import available_roles, block_diagram, describe
from app.forms import kind_of, parse_value
from core import AdapterConfig, ConfigError, JobSpec, attach, save_adapter
from core.config import METHOD_SETTINGS, PRESETS, DataSettings, EvalSettings, ModelSettings, TrainSettings
from core.fields import fields_of
from jobs.service import JobService


@pytest.fixture
def service(tmp_path):
    svc = JobService(url=f"sqlite:///{tmp_path / 'test.db'}", home=tmp_path / "home")
    yield svc
    svc.close()


@pytest.fixture
def form(tiny_model_dir):
    """The default form with the tiny local model and a quick run."""
    values = train_form.default_form()
    values.update({"model.name": str(tiny_model_dir), "train.max_steps": 2, "train.batch_size": 4,
                   "train.micro_batch_size": 2, "data.limit": 20, "data.val_size": 4})
    return values


def _error(update) -> str:
    assert isinstance(update, dict) and update.get("__type__") == "update"
    return update["value"] if update.get("visible") else ""


# ------------------------------------------------------------------------------------------------
# Train tab.

def test_every_setting_has_a_widget(service):
    """The form is generated from the dataclasses: every field of every section and method has a path."""
    with gr.Blocks():
        tab = train_tab.build_train_tab(service)
    paths = set(tab.form.paths)
    for method, cls in METHOD_SETTINGS.items():
        assert {f"adapter.{method}.{m['name']}" for m in fields_of(cls)} <= paths
    for prefix, cls in [("model", ModelSettings), ("train", TrainSettings), ("eval", EvalSettings)]:
        assert {f"{prefix}.{m['name']}" for m in fields_of(cls)} <= paths
    assert {f"data.{m['name']}" for m in fields_of(DataSettings) if m["name"] != "source"} <= paths
    assert set(train_form.default_form()) <= paths  # and the default form fills only real widgets


def test_trackers_are_not_offered_to_public_visitors(service):
    from core.deployment import Deployment, using

    for mode, shown in [("local", True), ("public", False)]:
        with using(Deployment.for_mode(mode)), gr.Blocks():
            tab = train_tab.build_train_tab(service)
        assert tab.form["train.report_to"].visible is shown


def test_spec_from_form_round_trips(form, tiny_model_dir):
    spec = train_tab.spec_from_form(form)
    assert spec.model.name == str(tiny_model_dir) and spec.train.max_steps == 2
    assert JobSpec.from_json(spec.to_json()).to_dict() == spec.to_dict()
    again = train_tab.spec_from_form({**form, **train_tab.form_from_spec(spec)})
    assert {**again.to_dict(), "name": ""} == {**spec.to_dict(), "name": ""}
    assert spec.name  # a default name is made up when none is given


def test_builtin_operations_filter_round_trips(form):
    """Ticking operations trains on that part of the built-in set; all four or none is the whole set."""
    spec = train_tab.spec_from_form({**form, "data.kind": "built-in", "data.builtin_ops": ["sub", "add"]})
    assert spec.data.source == "builtin:math?ops=add,sub"
    values = train_tab.form_from_spec(spec)
    assert values["data.kind"] == "built-in" and values["data.builtin"] == "builtin:math"
    assert values["data.builtin_ops"] == ["add", "sub"]
    for ops in ([], ["add", "sub", "mul", "div"]):
        assert train_tab.spec_from_form({**form, "data.kind": "built-in", "data.builtin_ops": ops}).data.source \
            == "builtin:math"


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_each_method_round_trips_through_the_form(form, method):
    form = {**form, "adapter.method": method}
    spec = train_tab.spec_from_form(form)
    assert spec.adapter.method == method
    assert spec.adapter.settings.to_dict() == METHOD_SETTINGS[method]().to_dict()
    values = train_tab.form_from_spec(spec)
    assert train_tab.spec_from_form({**form, **values}).adapter.to_dict() == spec.adapter.to_dict()


@pytest.mark.parametrize("changes, field", [
    ({"train.learning_rate": -1.0}, "train.learning_rate"),
    ({"train.learning_rate": None}, "train.learning_rate"),
    ({"train.micro_batch_size": 3}, "train.micro_batch_size"),
    ({"adapter.lora.r": "abc"}, "adapter.lora.r"),
    ({"adapter.lora.r": 0}, "adapter.r"),
    ({"adapter.lora.targets": []}, "adapter.targets"),
    ({"adapter.layers": "0-40"}, "adapter.layers"),
    ({"adapter.method": "prefix", "adapter.layers": "0"}, "adapter.layers"),
    ({"adapter.method": "parallel", "adapter.parallel.scale": "big"}, "adapter.parallel.scale"),
    ({"data.kind": "server path", "data.server_path": "/nowhere/x.json"}, "data.source"),
    ({"data.kind": "upload", "data.upload": None}, "data.source"),
    ({"data.columns": "{not json"}, "data.columns"),
    ({"model.name": "/no/such/model"}, "model.name"),
])
def test_invalid_settings_show_an_error_and_submit_nothing(service, form, changes, field):
    bad = {**form, **changes}
    box, spec_json, cli = train_tab.show_config(service, bad)
    assert f"**{field}**" in _error(box)
    assert spec_json == gr.skip() and cli == gr.skip()
    box, job_id = train_tab.launch(service, bad)
    assert f"**{field}**" in _error(box) and job_id is None
    assert service.list_jobs() == []


def test_show_config_gives_json_and_cli(form, service):
    box, spec_json, cli = train_tab.show_config(service, form)
    assert _error(box) == ""
    assert JobSpec.from_json(spec_json).train.max_steps == 2
    assert "python -m jobs submit spec.json" in cli and "python -m core train --config spec.json" in cli


def test_launch_queues_the_job(service, form):
    box, job_id = train_tab.launch(service, {**form, "name": "my run"})
    assert _error(box) == "" and isinstance(job_id, int)
    job = service.get(job_id)
    assert job["status"] == "queued" and job["name"] == "my run"
    assert JobSpec.from_dict(job["spec"]).to_dict() == {**train_tab.spec_from_form(form).to_dict(), "name": "my run"}
    tabs, dropdown, jobs_timer, compare_timer = ui.goto_job(service, job_id)
    assert dropdown["value"] == job_id and tabs.selected == ui.JOBS
    assert jobs_timer["active"] and not compare_timer["active"]


def test_plan_shows_estimate_and_diagram(form):
    model_line, estimate_md, diagram = train_tab.plan(form)
    assert "llama" in model_line and "trainable parameters" in estimate_md
    assert "<svg" in diagram and "+BA" in diagram
    model_line, estimate_md, diagram = train_tab.plan({**form, "adapter.lora.r": -3})
    assert "**adapter.r**" in estimate_md and "<svg" in diagram  # the drawing survives a bad value


def test_presets_set_method_and_settings():
    values = train_tab.preset_values("AdapterH")
    assert values["adapter.method"] == "series" and values["adapter.series.placement"] == "both"
    assert train_tab.preset_values("Scaled_Parallel")["adapter.parallel.scale"] == "learned"
    assert set(PRESETS) and train_tab.preset_values("(custom)") == {}
    vis = train_tab.method_visibility("prefix")
    assert [v["visible"] for v in vis] == [m == "prefix" for m in METHOD_SETTINGS]


def test_roles_follow_the_architecture(form):
    update = train_tab.roles_update(form)
    assert update["choices"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert "gate" not in available_roles("gpt2") and {"q", "k", "v"} <= available_roles("gpt2")


def test_upload_refuses_bad_type_and_size(tmp_path):
    from core.deployment import Deployment

    service = JobService(url=f"sqlite:///{tmp_path / 'up.db'}", home=tmp_path / "home",
                         deployment=Deployment.for_mode("local").with_limits(upload_file_bytes=1000))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    stored, message = train_tab.store_upload(service, str(text))
    assert stored is None and "unsupported file type" in message
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"instruction": "q", "output": "a"}] * 50))
    stored, message = train_tab.store_upload(service, str(big))
    assert stored is None and "up to 1,000 bytes" in message and "big.json" in message
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    stored, message = train_tab.store_upload(service, str(broken))
    assert stored is None and "not valid JSON" in message and "broken.json" in message
    assert not service.uploads_dir.is_dir() or list(service.uploads_dir.iterdir()) == []


def test_upload_is_stored_under_a_content_name(tmp_path, form, service):
    evil = tmp_path / "..%2f..%2fevil name.jsonl"
    evil.write_text("\n".join(json.dumps({"instruction": f"What is {i} + 1?", "output": f"The answer is {i + 1}."})
                              for i in range(12)))
    stored, message = train_tab.store_upload(service, str(evil))
    assert stored and "12 rows" in message
    path = Path(stored)
    assert path.parent == service.uploads_dir and "evil" not in path.name and path.suffix == ".jsonl"
    spec = train_tab.spec_from_form({**form, "data.kind": "upload", "data.upload": stored})
    assert spec.data.source == stored
    assert train_tab.form_from_spec(spec, service.uploads_dir)["data.kind"] == "upload"


def test_preview_renders_prompts_and_length_stats(form, service):
    box, rows, stats = train_tab.preview(service, form)
    assert _error(box) == ""
    assert len(rows) == train_tab.PREVIEW_ROWS and "### Response:" in rows[0][0] and rows[0][1]
    assert "20 rows" in stats and "truncated" in stats
    box, rows, stats = train_tab.preview(service, {**form, "data.kind": "hub id", "data.hub_id": ""})
    assert "**data.source**" in _error(box) and rows == []


def test_clone_fills_the_form(service, form):
    with gr.Blocks():
        tab = train_tab.build_train_tab(service)
    spec = train_tab.spec_from_form({**form, "adapter.method": "series", "name": "orig"})
    updates = train_tab.fill_from_spec(tab, spec.to_json())
    assert len(updates) == len(train_tab.fill_outputs(tab))
    by_path = dict(zip(tab.form.paths, updates))
    assert by_path["adapter.method"] == "series" and by_path["name"] == "orig (copy)"
    assert by_path["model.name"] == spec.model.name
    assert all(u == gr.skip() for u in train_tab.fill_from_spec(tab, None))


# ------------------------------------------------------------------------------------------------
# Jobs tab.

def _queue(service, form, **changes) -> int:
    return service.submit(train_tab.spec_from_form({**form, **changes}))


def test_jobs_table_refresh_and_polling_skips_unchanged(service, form):
    job_id = _queue(service, form, name="first")
    outs = jobs_tab.refresh(service, job_id, [], 0.0, False, {})
    table, choices, overlay, status, fig, log, seen = outs
    assert table[0][0] == job_id and "queued" in table[0][4] and table[0][3] == "lora"
    assert choices["choices"][0][1] == job_id and "first" in status
    again = jobs_tab.refresh(service, job_id, [], 0.0, False, seen)
    assert all(o == gr.skip() for o in again[:6])  # nothing changed: nothing redrawn


def test_job_actions(service, form):
    job_id = _queue(service, form)
    assert "**" not in _error(jobs_tab.cancel_job(service, job_id))
    assert service.get(job_id)["status"] == "cancelled"
    box, new = jobs_tab.resume_job(service, job_id)
    assert "no checkpoint" in _error(box) and new == gr.skip()
    box, path = jobs_tab.artifact(service, job_id, "adapter")
    assert "no adapter" in _error(box)
    assert json.loads(jobs_tab.spec_of(service, job_id))["train"]["max_steps"] == 2
    box, selection = jobs_tab.delete_job(service, job_id)
    assert _error(box) == "" and selection is None and service.list_jobs() == []
    assert "select a job" in _error(jobs_tab.cancel_job(service, None))


def test_select_job_draws_the_chart(service, form):
    job_id = _queue(service, form)
    status, fig, spec, log, seen = jobs_tab.select_job(service, job_id, [], 0.5, True)
    assert "#%d" % job_id in status and json.loads(spec)["adapter"]["method"] == "lora"
    assert fig.layout.annotations  # no metrics yet: a message instead of curves


# ------------------------------------------------------------------------------------------------
# Charts and diagram.

def _points(n=20):
    pts = [{"type": "step", "step": s, "loss": 2.0 / s, "lr": 1e-3 * s / n} for s in range(1, n + 1)]
    pts += [{"type": "eval", "step": s, "val_loss": 2.2 / s} for s in (10, 20)]
    return pts


def test_loss_chart_has_train_val_and_lr_on_a_second_axis():
    fig = charts.loss_figure([("a", _points()), ("b", _points(10))], smoothing=0.6, log_scale=True)
    names = [t.name for t in fig.data]
    assert "a · train loss" in names and "a · val loss" in names and "b · lr" in names
    assert any(t.yaxis == "y2" for t in fig.data) and fig.layout.yaxis.type == "log"
    smoothed = charts.smooth([1.0, 0.0, 0.0], 0.5)
    assert smoothed[0] == 1.0 and 0 < smoothed[2] < smoothed[1] < 1.0
    assert charts.loss_figure([("a", [])]).layout.annotations


def test_accuracy_charts():
    rows = [{"model": "base", "benchmark": "x", "accuracy": 0.2}, {"model": "lora", "benchmark": "x", "accuracy": 0.5}]
    assert len(charts.accuracy_bars(rows).data) == 2
    fig = charts.accuracy_scatter([{"model": "lora", "method": "lora", "trainable": 1000, "accuracy": 0.5}])
    assert fig.layout.xaxis.type == "log" and list(fig.data[0].y) == [50.0]


@pytest.mark.parametrize("method, mark", [("lora", "+BA"), ("series", "series adapter"),
                                          ("parallel", "parallel adapter"), ("prefix", "prefix keys/values"),
                                          ("prompt", "soft-prompt"), ("ptuning", "virtual tokens")])
def test_diagram_marks_where_the_adapter_sits(method, mark):
    settings = METHOD_SETTINGS[method]().to_dict()
    svg = block_diagram(method, settings, "all", "llama", 30)
    assert mark in svg and "<svg" in svg
    assert describe(method, settings, "all", 30)
    others = {"+BA", "series adapter", "parallel adapter", "prefix keys/values"} - {mark}
    assert not any(o in svg for o in others)


# ------------------------------------------------------------------------------------------------
# Chat and compare.

def _finished_job_with_adapter(service, form, tiny_model_dir) -> int:
    """A succeeded training job whose adapter is on disk (made directly, without training)."""
    from transformers import AutoModelForCausalLM

    job_id = _queue(service, form, name="done")
    assert service.claim(job_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    attach(model, AdapterConfig.for_method("lora", r=4))
    spec = JobSpec.from_dict(service.get(job_id)["spec"])
    save_adapter(model, Path(service.get(job_id)["out_dir"]) / "adapter",
                 extra={"training": {"status": "completed", "spec": spec.to_dict()}})
    service.finish(job_id, "succeeded", info={"trainable": 1234, "percent": 1.0})
    return job_id


def test_chat_lists_models_and_streams_answers(service, form, tiny_model_dir):
    job_id = _finished_job_with_adapter(service, form, tiny_model_dir)
    options = chat_tab.model_options(service)
    values = [v for _, v in options]
    assert f"job:{job_id}" in values and f"base:{tiny_model_dir}" in values
    models = chat_tab.selected_models(f"job:{job_id}", True, [f"base:{tiny_model_dir}", f"job:{job_id}"])
    assert models == [f"job:{job_id}", f"base:{tiny_model_dir}"]
    assert chat_tab.selected_models("a", False, ["b"]) == ["a"]
    steps = list(chat_tab.respond(service, "What is 2 + 3?", models, [], 6, 0.0, 1.0, options))
    final = steps[-1]
    assert len(final) == 2 and all(h[0] == {"role": "user", "content": "What is 2 + 3?"} for h in final)
    assert all(h[1]["role"] == "assistant" and h[1]["content"] for h in final)
    broken = list(chat_tab.respond(service, "hi", ["job:999"], [], 4, 0.0, 1.0, options))[-1]
    assert "no job 999" in broken[0][1]["content"]  # an error message, not an exception
    assert list(chat_tab.respond(service, "  ", models, [], 4, 0.0, 1.0))[-1] == [[], []]


def test_compare_matrix_disagreements_and_export(service, form, tiny_model_dir):
    job_id = _finished_job_with_adapter(service, form, tiny_model_dir)
    samples_base = [{"index": i, "question": f"q{i}", "gold": str(i), "extracted": "0", "correct": i == 0}
                    for i in range(3)]
    samples_job = [{"index": i, "question": f"q{i}", "gold": str(i), "extracted": str(i), "correct": True}
                   for i in range(3)]
    service.record_evaluation(benchmark="toy", base_model=str(tiny_model_dir), accuracy=1 / 3, correct=1, total=3,
                              samples=samples_base)
    service.record_evaluation(benchmark="toy", base_model=str(tiny_model_dir), accuracy=1.0, correct=3, total=3,
                              samples=samples_job, job_id=job_id)
    table, bars, scatter, bench, dis, test, exported = compare_tab.results(service, None, None, True)
    headers, rows = table["value"]["headers"], table["value"]["data"]
    assert headers == ["model", "method", "trainable params", "toy (generate)", "mean"]
    assert rows[0][0].startswith("base:") and rows[1][2] == "1,234" and rows[1][3].startswith("100.0")
    assert bench["value"] == "toy (generate)" and len(bars.data) == 2
    assert [r[0] for r in dis["value"]["data"]] == ["q1", "q2"]  # q0: both right, no disagreement
    assert "over 3 questions: 2 only the first got right, 0 only the second" in test
    assert "| toy (generate) |" in service.comparison_markdown(exported).splitlines()[0]
    path = compare_tab.export(service, exported, "csv")["value"]
    assert Path(path).read_text().startswith("model,method")
    assert "| 100.0 |" in Path(compare_tab.export(service, exported, "md")["value"]).read_text()


def test_compare_run_evaluations_validates_first(service, form, tiny_model_dir):
    job_id = _finished_job_with_adapter(service, form, tiny_model_dir)
    assert "**models**" in _error(compare_tab.run_evaluations(service, [], ["toy"], 5, 32))
    assert "**eval.benchmarks**" in _error(compare_tab.run_evaluations(service, [f"job:{job_id}"], [], 5, 32))
    assert "**limit**" in _error(compare_tab.run_evaluations(service, [f"job:{job_id}"], ["toy"], -1, 32))
    assert service.list_jobs(kind="evaluate") == []
    assert "unknown benchmark 'toy'" in _error(
        compare_tab.run_evaluations(service, [f"job:{job_id}"], ["toy"], 5, 32))  # refused at submit
    assert service.list_jobs(kind="evaluate") == []
    box = compare_tab.run_evaluations(service, [f"job:{job_id}", f"base:{tiny_model_dir}"], ["builtin:math"], 5, 32)
    assert _error(box) == ""
    queued = service.list_jobs(kind="evaluate")
    assert len(queued) == 2 and {j["target_job_id"] for j in queued} == {job_id, None}


def test_form_value_parsing():
    meta = {m["name"]: m for m in fields_of(TrainSettings)}
    assert kind_of(meta["learning_rate"]) == "float" and parse_value(meta["learning_rate"], "0.001", "x") == 0.001
    assert parse_value(meta["batch_size"], 8.0, "x") == 8
    with pytest.raises(ConfigError):
        parse_value(meta["batch_size"], 2.5, "train.batch_size")


def test_the_whole_page_builds(service):
    demo = ui.build_demo(service)
    assert isinstance(demo, gr.Blocks)


def test_downloads_outside_the_served_folders_are_linked_into_temp(tmp_path, monkeypatch):
    served, cwd, home = tmp_path / "tmp", tmp_path / "cwd", tmp_path / "home-elsewhere"
    for d in (served, cwd, home):
        d.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(jobs_tab.tempfile, "gettempdir", lambda: str(served))
    zipped = home / "job1-adapter.zip"
    zipped.write_bytes(b"PK")
    stale = served / "workbench-downloads" / "old"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    out = jobs_tab.servable(zipped)
    assert out.is_relative_to(served) and out.name == zipped.name and out.read_bytes() == b"PK"
    assert not stale.exists()  # an hour-old copy is cleaned up by the next download
    inside = cwd / "x.zip"
    inside.write_bytes(b"PK")
    assert jobs_tab.servable(inside) == inside.resolve()


def test_the_download_panel_names_the_methods_of_each_export():
    from app.jobs_tab import exports_sentence

    peft, merged = exports_sentence().split(";")[:2]
    assert "LoRA" in peft and "VeRA" in peft and "LoReFT" not in peft and "Series adapter" not in peft
    assert "DoRA" in merged and "LoReFT" not in merged
