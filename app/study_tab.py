"""Study tab: launch a grid of adapters (methods x placements x values x seeds) and read its tables.

The launch panel builds a ``core.study.StudySpec`` over a base job (the Train tab's form, an existing
job, or the default spec): a preset fills the grid widgets, "Plan" shows the number of jobs and the
estimated time before anything is queued, "Launch study" submits it. The results panel reads
``service.study_report`` back: per benchmark and protocol (``AddSub (generate)``), the configurations (mean ± std over seeds), charts by
placement, by hyperparameter value and by trainable parameters, the best configuration per method and
the McNemar verdict; exports as Markdown, CSV and HTML. Handlers are top-level functions of a plain
``inputs`` dict (see ``app.study_form.build_study``), tested without a browser.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

import gradio as gr
import plotly.io as pio

from core import methods as registry
from core.config import JobSpec
from core.fields import ConfigError
from core.study import StudySpec

from .charts import empty_figure, study_params_scatter, study_placement_bars, study_value_lines
from .common import download_file, error_text, error_update, fmt_duration, guarded, warn
from .study_form import (BASE_FORM, PRESET_CUSTOM, PRESET_PLACEMENT, PRESETS, base_choices, base_spec, build_study,
                         entry_choices, preset_inputs)
from .train_tab import benchmark_choices

POLL_SECONDS = 5.0
TABLE_HEADERS = ["#", "configuration", "method", "placement", "setting", "value", "seeds", "accuracy % (mean ± std)",
                 "trainable params"]
CSV_HEADERS = ["benchmark", "rank", "config", "method", "placement", "setting", "value", "seeds", "mean", "std",
               "trainable_params"]


# --------------------------------------------------------------------------------------------------
# Handlers: launch panel.

def _study_of(service: Any, inputs: dict[str, Any], train_form: dict[str, Any] | None) -> StudySpec:
    return build_study(base_spec(service, inputs.get("base"), train_form), inputs)


def plan(service: Any, inputs: dict[str, Any], train_form: dict[str, Any] | None = None) -> tuple[dict, str]:
    """(error box, plan summary): the grid size and estimated time. Nothing is submitted."""
    try:
        p = service.plan_study(_study_of(service, inputs, train_form))
    except ConfigError as err:
        return error_update(error_text(err)), ""
    return error_update(None), plan_markdown(p)


def plan_markdown(p: dict[str, Any]) -> str:
    study = p["study"]
    per_method = {}
    for c in p["cells"]:
        per_method[c.entry] = per_method.get(c.entry, 0) + 1
    split = " · ".join(f"{registry.label(m)} {n}" for m, n in per_method.items())
    return (f"**{p['num_jobs']} jobs** ({split}; {len(study.seeds)} seed(s) each) · estimated training time "
            f"**{fmt_duration(p['estimated_s']) or '?'}** · then {len(study.base.eval.benchmarks)} benchmark(s) per "
            f"job ({study.base.eval.protocol}) · base model `{study.base.model.name}`")


def launch(service: Any, inputs: dict[str, Any], train_form: dict[str, Any] | None = None) -> tuple[dict, str, Any]:
    """(error box, plan summary, study id or None). Invalid input: the error, nothing submitted."""
    try:
        study = _study_of(service, inputs, train_form)
        p = service.plan_study(study)
        study_id = service.submit_study(study)
    except ConfigError as err:
        text = error_text(err)
        warn(text)
        return error_update(text), gr.skip(), None
    gr.Info(f"Study {study_id} queued: {p['num_jobs']} jobs")
    return error_update(None), plan_markdown(p), study_id


# --------------------------------------------------------------------------------------------------
# Handlers: results panel.

def study_choices(service: Any) -> list[tuple[str, int]]:
    return [(f"study {s['id']} · {s['name']} ({s['status']}, {len(s['cells'])} jobs)", s["id"])
            for s in service.list_studies()]


def refresh_studies(service: Any, current: Any) -> dict:
    """The study dropdown: keep the selection, else the newest study."""
    choices = study_choices(service)
    ids = [v for _, v in choices]
    value = current if current in ids else (ids[0] if ids else None)
    return gr.update(choices=choices, value=value)


def status_markdown(study: dict[str, Any]) -> str:
    counts = " · ".join(f"{n} {status}" for status, n in sorted(study["counts"].items()))
    return (f"**{study['name']}** (study {study['id']}, created {study['created_at']}): **{study['status']}** — "
            f"{len(study['jobs'])} jobs: {counts or 'none'}")


def configs_table(configs: list[dict[str, Any]]) -> list[list[Any]]:
    return [[i + 1, c["config"], c["method"], c["placement"] or "", c["setting"], c["value"], c["seeds"],
             f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}", f"{c['trainable_params']:,}"]
            for i, c in enumerate(configs)]


def best_markdown(best: list[dict[str, Any]]) -> str:
    if not best:
        return ""
    lines = ["| method | best configuration | accuracy % | trainable params |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {registry.label(b['method'])} | {b['config']} | {100 * b['mean']:.1f} ± "
              f"{100 * b['std']:.1f} | {b['trainable_params']:,} |" for b in best]
    return "\n".join(lines)


def mcnemar_sentence(test: dict[str, Any] | None) -> str:
    if not test:
        return "McNemar test: needs at least two configurations evaluated on the same questions."
    verdict = ("the difference is beyond chance" if test["significant"]
               else "the difference is not beyond chance (could be luck)")
    return (f"Best `{test['best']}` vs runner-up `{test['runner_up']}`: {test['n10']} questions only the best got "
            f"right, {test['n01']} only the runner-up; McNemar exact p = {test['p_value']:.3g}: {verdict}.")


def figures(analysis_bench: dict[str, Any] | None) -> tuple:
    """(placement bars, value lines, params scatter) of one benchmark's analysis."""
    if not analysis_bench:
        return (empty_figure("No results yet: they appear as the study's jobs finish their evaluations"),
                empty_figure("No results yet"), empty_figure("No results yet"))
    configs = analysis_bench["configs"]
    return study_placement_bars(configs), study_value_lines(configs), study_params_scatter(configs)


def results(service: Any, study_id: Any, benchmark: str | None) -> tuple:
    """(status, benchmark choices, table, placement chart, value chart, scatter, best per method, McNemar)."""
    if study_id in (None, ""):
        return ("No study yet: plan and launch one above.", gr.update(choices=[], value=None),
                gr.update(value={"headers": TABLE_HEADERS, "data": []}), *figures(None), "", "")
    study = service.get_study(int(study_id))
    analysis = service.study_report(int(study_id))["analysis"]
    benchmarks = list(analysis)
    if benchmark not in benchmarks:
        benchmark = benchmarks[0] if benchmarks else None
    a = analysis.get(benchmark) if benchmark else None
    table = gr.update(value={"headers": TABLE_HEADERS, "data": configs_table(a["configs"]) if a else []})
    return (status_markdown(study), gr.update(choices=benchmarks, value=benchmark), table, *figures(a),
            best_markdown(a["best_per_method"]) if a else "", mcnemar_sentence(a["mcnemar"]) if a else "")


def results_signature(service: Any, study_id: Any) -> str:
    """Changes when a job of the study changes status or an evaluation lands (what the timer polls)."""
    if study_id in (None, ""):
        return ""
    study = service.get_study(int(study_id))
    return json.dumps([[(j["id"], j["status"]) for j in study["jobs"]], [e["id"] for e in service.list_evaluations()]])


def cancel(service: Any, study_id: Any) -> int | None:
    """Cancel every queued or running job of the study: how many (None when no study is picked)."""
    if study_id in (None, ""):
        warn("Pick a study first.")
        return None
    n = service.cancel_study(int(study_id))
    gr.Info(f"Cancelled {n} job(s) of study {study_id}")
    return n


def resume(service: Any, study_id: Any) -> list[int] | None:
    """Continue the study's unfinished jobs: the new job ids (None when no study is picked)."""
    if study_id in (None, ""):
        warn("Pick a study first.")
        return None
    ids = service.resume_study(int(study_id))
    gr.Info(f"Resumed {len(ids)} job(s) of study {study_id}" if ids else "Nothing to resume: every job is done or running")
    return ids


def csv_text(analysis: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_HEADERS)
    for bench, a in analysis.items():
        for i, c in enumerate(a["configs"]):
            w.writerow([bench, i + 1, c["config"], c["method"], c["placement"] or "", c["setting"], c["value"],
                        c["seeds"], f"{c['mean']:.6f}", f"{c['std']:.6f}", c["trainable_params"]])
    return buf.getvalue()


def html_text(name: str, analysis: dict[str, Any]) -> str:
    parts, first = [f"<html><head><meta charset='utf-8'><title>{name}</title></head><body>", f"<h1>{name}</h1>"], True
    for bench, a in analysis.items():
        parts.append(f"<h2>{bench}</h2>")
        for fig in figures(a):
            parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=True if first else False))
            first = False
        parts.append(f"<p>{mcnemar_sentence(a['mcnemar'])}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def export(service: Any, study_id: Any, fmt: str) -> dict:
    """A file of the study's report: ``md`` (tables), ``csv`` (tables) or ``html`` (charts)."""
    if study_id in (None, ""):
        warn("Pick a study first.")
        return gr.skip()
    report = service.study_report(int(study_id))
    if not report["analysis"]:
        warn("Nothing to export yet: no job of this study has been evaluated.")
        return gr.skip()
    name = service.get_study(int(study_id))["name"]
    text = {"md": lambda: f"# {name}\n\n{report['markdown']}", "csv": lambda: csv_text(report["analysis"]),
            "html": lambda: html_text(name, report["analysis"])}[fmt]()
    return download_file(text, f"study{int(study_id)}.{fmt}")


# --------------------------------------------------------------------------------------------------
# Layout.

@dataclass
class StudyTab:
    base: Any
    name: Any
    preset: Any
    methods: Any
    placements: dict[str, Any]
    values: dict[str, Any]
    seeds: Any
    learning_rates: Any
    benchmarks: Any
    plan_button: Any
    launch_button: Any
    error: Any
    plan_info: Any
    study: Any
    refresh_button: Any
    cancel_button: Any
    resume_button: Any
    status: Any
    benchmark: Any
    table: Any
    placement_chart: Any
    value_chart: Any
    scatter: Any
    best: Any
    verdict: Any
    md_button: Any
    csv_button: Any
    html_button: Any
    export_file: Any
    timer: Any
    seen: Any
    launched: Any  # gr.State: the id of the study this session launched last

    @property
    def input_paths(self) -> list[str]:
        return ["base", "name", "methods", "seeds", "learning_rates", "benchmarks",
                *[f"placements.{m}" for m in self.placements],
                *[f"values.{m}" for m in self.values]]

    @property
    def input_components(self) -> list[Any]:
        return [self.base, self.name, self.methods, self.seeds, self.learning_rates, self.benchmarks,
                *self.placements.values(),
                *self.values.values()]

    def as_inputs(self, values: list[Any]) -> dict[str, Any]:
        return dict(zip(self.input_paths, values))

    @property
    def preset_outputs(self) -> list[Any]:
        return [self.name, self.methods, *self.placements.values(), *self.values.values()]

    @property
    def result_outputs(self) -> list[Any]:
        return [self.status, self.benchmark, self.table, self.placement_chart, self.value_chart, self.scatter,
                self.best, self.verdict]


def build_study_tab(service: Any, train: Any = None) -> StudyTab:
    """Draw the tab; ``train`` (the Train tab) lets the study start from the Train form's current job."""
    start = preset_inputs(PRESET_PLACEMENT)
    gr.Markdown("### Launch a study", elem_classes="section-title")
    with gr.Row(equal_height=True):
        base = gr.Dropdown(choices=base_choices(service), value=BASE_FORM, label="base job", scale=3,
                           info="model, data, training and evaluation settings every cell starts from")
        base_refresh = gr.Button("↻", size="sm", scale=0, min_width=50)
        name = gr.Textbox(value=start["name"], label="study name", scale=2)
        preset = gr.Dropdown(choices=list(PRESETS), value=PRESET_PLACEMENT, label="preset", scale=2,
                             info="the paper's grids; edit them freely")
    methods = gr.CheckboxGroup(choices=entry_choices(), value=start["methods"], label="methods and presets",
                               info="a preset trains its method with the preset's own settings and placement")
    placements, values = {}, {}
    with gr.Group():
        for m in registry.all():
            with gr.Row(equal_height=True):
                if m.placements:
                    placements[m.name] = gr.CheckboxGroup(choices=list(m.placements.options), scale=2,
                                                          value=start[f"placements.{m.name}"],
                                                          label=f"{m.label} placements")
                if m.value_setting:
                    values[m.name] = gr.Textbox(value=start[f"values.{m.name}"], label=f"{m.label} values "
                                                f"({m.value_setting})", info="e.g. 4,8,16,32", scale=2)
    with gr.Row(equal_height=True):
        seeds = gr.Textbox(value="42", label="seeds", info="42 or 1,2,3: each configuration trains once per seed",
                           scale=1)
        learning_rates = gr.Textbox(value="", label="learning rates", scale=1,
                                    info="per method or preset, e.g. ia3=3e-3 vera=1e-2; others: the base job's")
        benchmarks = gr.CheckboxGroup(choices=benchmark_choices(), value=[], label="benchmarks",
                                      info="empty = the base job's evaluation benchmarks", scale=3)
    with gr.Row():
        plan_button = gr.Button("Plan", scale=1)
        launch_button = gr.Button("Launch study", variant="primary", scale=1)
    error = gr.Markdown("", visible=False, elem_classes="error-box")
    plan_info = gr.Markdown("", elem_classes="estimate-box")

    gr.Markdown("### Results", elem_classes="section-title")
    with gr.Row(equal_height=True):
        study = gr.Dropdown(choices=study_choices(service), value=None, label="study", scale=4)
        refresh_button = gr.Button("↻", size="sm", scale=0, min_width=50)
        cancel_button = gr.Button("Cancel study", size="sm", variant="stop", scale=1)
        resume_button = gr.Button("Resume study", size="sm", scale=1)
    status = gr.Markdown("")
    benchmark = gr.Dropdown(choices=[], value=None, label="benchmark (protocol)")
    table = gr.Dataframe(value={"headers": TABLE_HEADERS, "data": []}, interactive=False, wrap=True, max_height=360,
                         label="configurations, best first")
    with gr.Row():
        md_button = gr.Button("Export Markdown", size="sm")
        csv_button = gr.Button("Export CSV", size="sm")
        html_button = gr.Button("Export charts (HTML)", size="sm")
        export_file = gr.File(label="export", interactive=False, visible=False, height=60)
    placement_fig, value_fig, scatter_fig = figures(None)
    with gr.Row(equal_height=True):
        placement_chart = gr.Plot(placement_fig, show_label=False)
        value_chart = gr.Plot(value_fig, show_label=False)
    with gr.Row(equal_height=True):
        scatter = gr.Plot(scatter_fig, show_label=False)
        with gr.Column():
            best = gr.Markdown("")
            verdict = gr.Markdown("")
    tab = StudyTab(base=base, name=name, preset=preset, methods=methods, placements=placements, values=values,
                   seeds=seeds, learning_rates=learning_rates, benchmarks=benchmarks, plan_button=plan_button, launch_button=launch_button,
                   error=error, plan_info=plan_info, study=study, refresh_button=refresh_button,
                   cancel_button=cancel_button, resume_button=resume_button, status=status, benchmark=benchmark,
                   table=table, placement_chart=placement_chart, value_chart=value_chart, scatter=scatter, best=best,
                   verdict=verdict, md_button=md_button, csv_button=csv_button, html_button=html_button,
                   export_file=export_file, timer=gr.Timer(POLL_SECONDS, active=False), seen=gr.State(""),
                   launched=gr.State(None))
    _wire(tab, service, train, base_refresh)
    return tab


def _wire(tab: StudyTab, service: Any, train: Any, base_refresh: Any) -> None:
    train_components = list(train.form.components) if train is not None else []
    n_in = len(tab.input_components)

    def split(values):
        inputs = tab.as_inputs(list(values[:n_in]))
        train_form = train.form.as_dict(values[n_in:]) if train is not None else None
        return inputs, train_form

    all_inputs = [*tab.input_components, *train_components]

    def on_preset(preset, *values):
        if preset == PRESET_CUSTOM:
            return [gr.skip()] * len(tab.preset_outputs)
        inputs, train_form = split(values)
        try:
            b = base_spec(service, inputs.get("base"), train_form)
        except ConfigError:
            b = JobSpec()
        p = preset_inputs(preset, b)
        return [p["name"], p["methods"], *[p[f"placements.{m}"] for m in tab.placements],
                *[p[f"values.{m}"] for m in tab.values]]

    tab.preset.input(guarded(len(tab.preset_outputs))(on_preset), [tab.preset, *all_inputs], tab.preset_outputs,
                     show_progress="hidden")
    for component in [tab.methods, *tab.placements.values(), *tab.values.values()]:
        component.input(lambda: PRESET_CUSTOM, None, tab.preset, show_progress="hidden", queue=False)
    base_refresh.click(guarded(1)(lambda b: gr.update(choices=base_choices(service), value=b)), tab.base, tab.base)

    tab.plan_button.click(guarded(2, 0)(lambda *v: plan(service, *split(v))), all_inputs, [tab.error, tab.plan_info])

    show = guarded(len(tab.result_outputs))(lambda s, b: results(service, s, b))
    refresh = guarded(1)(lambda s: refresh_studies(service, s))
    tab.launch_button.click(guarded(3, 0)(lambda *v: launch(service, *split(v))), all_inputs,
                            [tab.error, tab.plan_info, tab.launched]).then(
        lambda sid: gr.update(choices=study_choices(service), value=sid) if sid is not None else gr.skip(),
        tab.launched, tab.study)
    tab.refresh_button.click(refresh, tab.study, tab.study).then(show, [tab.study, tab.benchmark], tab.result_outputs)
    tab.study.change(show, [tab.study, tab.benchmark], tab.result_outputs, trigger_mode="always_last",
                     show_progress="hidden")
    tab.benchmark.input(show, [tab.study, tab.benchmark], tab.result_outputs, show_progress="hidden")
    tab.cancel_button.click(guarded(1)(lambda s: (cancel(service, s), gr.skip())[1]), tab.study, tab.status).then(
        show, [tab.study, tab.benchmark], tab.result_outputs)
    tab.resume_button.click(guarded(1)(lambda s: (resume(service, s), gr.skip())[1]), tab.study, tab.status).then(
        show, [tab.study, tab.benchmark], tab.result_outputs)

    def poll(study_id, benchmark, seen):
        sig = results_signature(service, study_id)
        if sig == seen:
            return (*[gr.skip()] * len(tab.result_outputs), seen)
        return (*results(service, study_id, benchmark), sig)

    tab.timer.tick(guarded(len(tab.result_outputs) + 1)(poll), [tab.study, tab.benchmark, tab.seen],
                   [*tab.result_outputs, tab.seen], show_progress="hidden")
    tab.md_button.click(lambda s: export(service, s, "md"), tab.study, tab.export_file)
    tab.csv_button.click(lambda s: export(service, s, "csv"), tab.study, tab.export_file)
    tab.html_button.click(lambda s: export(service, s, "html"), tab.study, tab.export_file)
