"""Compare tab: evaluate adapters and base models on benchmarks; accuracy table, charts, disagreements.

Evaluations run as jobs (``kind="evaluate"``) in the worker, like training, and land in the database;
this tab reads them back: the latest result per (model, benchmark), as a table, a grouped bar chart, a
scatter of accuracy against trainable parameters, and the examples on which the models disagree.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from .charts import accuracy_bars, accuracy_scatter
from .chat_tab import BASE_PREFIX, JOB_PREFIX, model_options
from .common import error_text, error_update, guarded, warn
from .train_tab import benchmark_choices

POLL_SECONDS = 3.0
MAX_DISAGREEMENTS = 200


def eval_key(ev: dict[str, Any]) -> str:
    """Which model an evaluation belongs to: ``job:<id>`` for an adapter, ``base:<name>`` for a base model."""
    return f"{JOB_PREFIX}{ev['job_id']}" if ev.get("job_id") is not None else f"{BASE_PREFIX}{ev['base_model']}"


def model_facts(key: str, jobs_by_id: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Label, method and trainable parameters of a model key."""
    if key.startswith(JOB_PREFIX):
        job = jobs_by_id.get(int(key[len(JOB_PREFIX):])) or {}
        info = job.get("info") or {}
        result = job.get("result") or {}
        spec = job.get("spec") or {}
        trainable = info.get("trainable") or result.get("trainable_params")
        return {"label": f"#{job.get('id', key[len(JOB_PREFIX):])} {job.get('name') or ''}".strip(),
                "method": (spec.get("adapter") or {}).get("method", ""), "trainable": trainable}
    name = key[len(BASE_PREFIX):]
    return {"label": f"base: {Path(name).name if Path(name).is_absolute() else name}", "method": "base",
            "trainable": 0}


def latest_results(evaluations: list[dict[str, Any]], keys: list[str] | None = None) -> dict[tuple[str, str], dict]:
    """The newest evaluation per (model key, benchmark), restricted to ``keys`` when given."""
    out: dict[tuple[str, str], dict] = {}
    for ev in sorted(evaluations, key=lambda e: e["id"]):
        key = eval_key(ev)
        if keys and key not in keys:
            continue
        out[(key, ev["benchmark"])] = ev
    return out


def results_table(latest: dict[tuple[str, str], dict], jobs_by_id: dict[int, dict[str, Any]]):
    """(headers, rows, long rows for the charts). Accuracy in % with correct/total; a mean column."""
    benchmarks = sorted({b for _, b in latest})
    keys = list(dict.fromkeys(k for k, _ in sorted(latest, key=lambda kb: (not kb[0].startswith(BASE_PREFIX), kb))))
    headers = ["model", "method", "trainable params", *benchmarks, "mean"]
    rows, long_rows, points = [], [], []
    for key in keys:
        facts = model_facts(key, jobs_by_id)
        accs, cells = [], []
        for b in benchmarks:
            ev = latest.get((key, b))
            if ev is None:
                cells.append("")
                continue
            accs.append(ev["accuracy"])
            cells.append(f"{100 * ev['accuracy']:.1f} ({ev['correct']}/{ev['total']})")
            long_rows.append({"model": facts["label"], "benchmark": b, "accuracy": ev["accuracy"]})
        mean = sum(accs) / len(accs) if accs else None
        trainable = facts["trainable"]
        rows.append([facts["label"], facts["method"], f"{trainable:,}" if trainable else "0",
                     *cells, f"{100 * mean:.1f}" if mean is not None else ""])
        points.append({"model": facts["label"], "method": facts["method"], "trainable": trainable or 0,
                       "accuracy": mean})
    return headers, rows, long_rows, points


def disagreements(service: Any, latest: dict[tuple[str, str], dict], benchmark: str | None,
                  jobs_by_id: dict[int, dict[str, Any]], only_disagreeing: bool = True):
    """(headers, rows): per example of ``benchmark``, the question, the gold answer and each model's answer.

    ``only_disagreeing`` keeps the examples whose answers (or correctness) differ between models; with a
    single model there is nothing to disagree with, and every example is listed.
    """
    if not benchmark:
        return ["question", "gold"], []
    evs = [(k, ev) for (k, b), ev in latest.items() if b == benchmark]
    if not evs:
        return ["question", "gold"], []
    labels = [model_facts(k, jobs_by_id)["label"] for k, _ in evs]
    by_model = [{s["index"]: s for s in service.eval_samples(ev["id"])} for _, ev in evs]
    indices = sorted(set().union(*[set(m) for m in by_model]))
    rows = []
    for i in indices:
        samples = [m.get(i) for m in by_model]
        first = next(s for s in samples if s is not None)
        answers = [None if s is None else (s.get("extracted") or "", bool(s.get("correct"))) for s in samples]
        present = [a for a in answers if a is not None]
        differ = len({a[0] for a in present}) > 1 or len({a[1] for a in present}) > 1
        if only_disagreeing and len(evs) > 1 and (len(present) < 2 or not differ):
            continue
        cells = ["" if a is None else f"{'✓' if a[1] else '✗'} {a[0] or '(none)'}" for a in answers]
        rows.append([first.get("question", ""), first.get("gold") or "", *cells])
        if len(rows) >= MAX_DISAGREEMENTS:
            break
    return ["question", "gold", *labels], rows


def to_csv(headers: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(headers)
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Handlers.

def run_evaluations(service: Any, models: list[str] | None, benchmarks: list[str] | None, limit: Any,
                    max_new_tokens: Any) -> dict:
    """Queue one evaluation job per model: (message box). Nothing is queued when the choice is invalid."""
    from core.config import ConfigError, EvalSettings

    try:
        if not models:
            raise ConfigError("models", "pick at least one adapter or base model")
        if not benchmarks:
            raise ConfigError("eval.benchmarks", "pick at least one benchmark")
        settings = EvalSettings(benchmarks=list(benchmarks), limit=int(limit or 0),
                                max_new_tokens=int(max_new_tokens or 256))
        settings.validate()
    except (ConfigError, TypeError, ValueError) as err:
        return error_update(error_text(err if isinstance(err, ConfigError) else ConfigError("eval", str(err))))
    queued, errors = [], []
    for m in models:
        try:
            if m.startswith(JOB_PREFIX):
                queued.append(service.submit_evaluation(benchmarks, job_id=int(m[len(JOB_PREFIX):]),
                                                        settings=settings.to_dict()))
            else:
                queued.append(service.submit_evaluation(benchmarks, model=m[len(BASE_PREFIX):],
                                                        settings=settings.to_dict()))
        except Exception as err:
            errors.append(error_text(err))
    if queued:
        gr.Info(f"Queued evaluation job(s) {', '.join(map(str, queued))}; results appear here as they finish")
    return error_update("\n\n".join(errors) if errors else None)


def results(service: Any, models: list[str] | None, benchmark: str | None, only_disagreeing: bool) -> tuple:
    """(table, bar chart, scatter, benchmark choices, disagreement table, state for export)."""
    jobs_by_id = {j["id"]: j for j in service.list_jobs(kind="train")}
    latest = latest_results(service.list_evaluations(), models or None)
    headers, rows, long_rows, points = results_table(latest, jobs_by_id)
    benchmarks = sorted({b for _, b in latest})
    if benchmark not in benchmarks:
        benchmark = benchmarks[0] if benchmarks else None
    d_headers, d_rows = disagreements(service, latest, benchmark, jobs_by_id, only_disagreeing)
    table = gr.update(value={"headers": headers, "data": rows} if rows else {"headers": headers, "data": []})
    dis = gr.update(value={"headers": d_headers, "data": d_rows})
    return (table, accuracy_bars(long_rows), accuracy_scatter(points),
            gr.update(choices=benchmarks, value=benchmark), dis, {"headers": headers, "rows": rows})


def results_signature(service: Any) -> str:
    evs = service.list_evaluations()
    active = service.list_jobs(status=("queued", "running"), kind="evaluate")
    return json.dumps([[e["id"] for e in evs], [(j["id"], j["status"]) for j in active]])


def export(table: dict | None, fmt: str) -> dict:
    """A file of the accuracy table, CSV or Markdown."""
    if not table or not table.get("rows"):
        warn("Nothing to export yet: run some evaluations first.")
        return gr.skip()
    text = to_csv(table["headers"], table["rows"]) if fmt == "csv" else to_markdown(table["headers"], table["rows"])
    folder = Path(tempfile.mkdtemp(prefix="workbench-export-"))
    path = folder / f"accuracy.{'csv' if fmt == 'csv' else 'md'}"
    path.write_text(text)
    return gr.update(value=str(path), visible=True)


# --------------------------------------------------------------------------------------------------
# Layout.

@dataclass
class CompareTab:
    models: Any
    benchmarks: Any
    limit: Any
    max_new_tokens: Any
    run_button: Any
    refresh_button: Any
    message: Any
    table: Any
    bars: Any
    scatter: Any
    benchmark: Any
    only_disagreeing: Any
    disagreement: Any
    csv_button: Any
    md_button: Any
    export_file: Any
    exported: Any  # gr.State: the table behind the export buttons
    timer: Any
    seen: Any

    @property
    def result_outputs(self) -> list[Any]:
        return [self.table, self.bars, self.scatter, self.benchmark, self.disagreement, self.exported]


def build_compare_tab(service: Any) -> CompareTab:
    with gr.Row(equal_height=True):
        models = gr.Dropdown(choices=[], value=[], multiselect=True, label="models",
                             info="adapters and base models to compare (empty = every evaluated model)", scale=3)
        refresh_button = gr.Button("↻", size="sm", scale=0, min_width=50)
    with gr.Row(equal_height=True):
        benchmarks = gr.CheckboxGroup(choices=benchmark_choices(), value=[], label="benchmarks", scale=3)
        limit = gr.Number(value=50, precision=0, label="examples per benchmark", info="0 = all", scale=1)
        max_new_tokens = gr.Number(value=256, precision=0, label="max new tokens", scale=1)
        run_button = gr.Button("Run evaluations", variant="primary", scale=1)
    message = gr.Markdown("", visible=False, elem_classes="error-box")
    table = gr.Dataframe(value={"headers": ["model", "method", "trainable params", "mean"], "data": []},
                         interactive=False, wrap=True, max_height=320, label="accuracy (%)")
    with gr.Row():
        csv_button = gr.Button("Export CSV", size="sm")
        md_button = gr.Button("Export Markdown", size="sm")
        export_file = gr.File(label="export", interactive=False, visible=False, height=60)
    with gr.Row(equal_height=True):
        bars = gr.Plot(accuracy_bars([]), show_label=False)
        scatter = gr.Plot(accuracy_scatter([]), show_label=False)
    gr.Markdown("### Where the models disagree", elem_classes="section-title")
    with gr.Row(equal_height=True):
        benchmark = gr.Dropdown(choices=[], value=None, label="benchmark", scale=2)
        only_disagreeing = gr.Checkbox(value=True, label="only examples where the answers differ", scale=2)
    disagreement = gr.Dataframe(value={"headers": ["question", "gold"], "data": []}, interactive=False, wrap=True,
                                max_height=420)
    tab = CompareTab(models=models, benchmarks=benchmarks, limit=limit, max_new_tokens=max_new_tokens,
                     run_button=run_button, refresh_button=refresh_button, message=message, table=table, bars=bars,
                     scatter=scatter, benchmark=benchmark, only_disagreeing=only_disagreeing,
                     disagreement=disagreement, csv_button=csv_button, md_button=md_button, export_file=export_file,
                     exported=gr.State(None), timer=gr.Timer(POLL_SECONDS, active=False), seen=gr.State(""))
    _wire(tab, service)
    return tab


def refresh_models(service: Any, current: list[str] | None) -> dict:
    options = model_options(service)
    values = {v for _, v in options}
    return gr.update(choices=options, value=[c for c in (current or []) if c in values])


def _wire(tab: CompareTab, service: Any) -> None:
    show = guarded(6)(lambda m, b, o: results(service, m, b, o))
    inputs = [tab.models, tab.benchmark, tab.only_disagreeing]
    tab.refresh_button.click(guarded(1)(lambda m: refresh_models(service, m)), tab.models, tab.models).then(
        show, inputs, tab.result_outputs)
    tab.models.change(show, inputs, tab.result_outputs, trigger_mode="always_last", show_progress="hidden")
    tab.benchmark.input(show, inputs, tab.result_outputs, show_progress="hidden")
    tab.only_disagreeing.change(show, inputs, tab.result_outputs, show_progress="hidden")
    tab.run_button.click(guarded(1, 0)(lambda m, b, l, t: run_evaluations(service, m, b, l, t)),
                         [tab.models, tab.benchmarks, tab.limit, tab.max_new_tokens], tab.message)

    def poll(models, benchmark, only, seen):
        sig = results_signature(service)
        if sig == seen:
            return (*[gr.skip()] * 6, seen)
        return (*results(service, models, benchmark, only), sig)

    tab.timer.tick(guarded(7)(poll), [*inputs, tab.seen], [*tab.result_outputs, tab.seen], show_progress="hidden")
    tab.csv_button.click(lambda t: export(t, "csv"), tab.exported, tab.export_file)
    tab.md_button.click(lambda t: export(t, "md"), tab.exported, tab.export_file)
