"""Compare tab: evaluate adapters and base models on benchmarks; accuracy table, charts, disagreements.

Evaluations run as jobs (``kind="evaluate"``) in the worker, like training, and land in the database;
this tab reads them back: the latest result per (model, benchmark, protocol), as a table with a column
per benchmark and protocol (``piqa (loglik)``; acc_norm beside acc where the protocol gives one), a
grouped bar chart, a scatter of accuracy against trainable parameters, and for one column the examples
on which the models disagree with McNemar's test of its two best models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gradio as gr

from core.config import PROTOCOLS
from jobs.checks import loglikelihood_refusal
from jobs.compare import parse_model_key

from .charts import accuracy_bars, accuracy_scatter
from .chat_tab import model_options
from .common import download_file, error_text, error_update, guarded, warn
from .lmeval_panel import build_lmeval_panel
from .train_tab import benchmark_choices

POLL_SECONDS = 3.0
MAX_DISAGREEMENTS = 200
PROTOCOL_CHOICES = [("generate: the paper's (generate an answer, extract it)", "generate"),
                    ("loglikelihood: lm-eval's multiple choice (options' log-probabilities)", "loglikelihood")]


def result_cell(res: dict[str, Any]) -> str:
    """A matrix cell: accuracy % (correct/total), and acc_norm % where the protocol gives one."""
    text = f"{100 * res['accuracy']:.1f} ({res['correct']}/{res['total']})"
    return text if res.get("accuracy_norm") is None else f"{text}, norm {100 * res['accuracy_norm']:.1f}"


def results_table(matrix: dict[str, Any]):
    """(headers, rows, long rows for the bar chart, points for the scatter) from the service's matrix."""
    labels = [c["label"] for c in matrix["columns"]]
    headers = ["model", "method", "trainable params", *labels, "mean"]
    rows, long_rows, points = [], [], []
    for r in matrix["rows"]:
        cells, accs = [], []
        for label in labels:
            res = r["results"].get(label)
            cells.append(result_cell(res) if res else "")
            if res:
                accs.append(res["accuracy"])
                long_rows.append({"model": r["label"], "benchmark": label, "accuracy": res["accuracy"],
                                  "accuracy_norm": res.get("accuracy_norm")})
        mean = sum(accs) / len(accs) if accs else None
        trainable = r["trainable_params"] or 0
        rows.append([r["label"], r["method"], f"{trainable:,}", *cells, f"{100 * mean:.1f}" if mean is not None else ""])
        points.append({"model": r["label"], "method": r["method"], "trainable": trainable, "accuracy": mean})
    long_rows.sort(key=lambda x: labels.index(x["benchmark"]))  # the chart's groups in the table's column order
    return headers, rows, long_rows, points


def column_evaluations(matrix: dict[str, Any], column: str | None) -> dict[str, int]:
    """``{model label: evaluation id}`` of one column (one benchmark under one protocol)."""
    return {r["label"]: r["results"][column]["evaluation_id"] for r in matrix["rows"]
            if column and column in r["results"]}


def disagreement_table(service: Any, matrix: dict[str, Any], column: str | None, only_disagreeing: bool = True):
    """(headers, rows): per example of ``column``, the question, the gold answer and each model's answer."""
    evs = column_evaluations(matrix, column)
    rows = service.disagreements(evs, only_disagreeing, limit=MAX_DISAGREEMENTS) if evs else []
    cells = [[r["question"], r["gold"] or "",
              *[f"{'✓' if a['correct'] else '✗'} {a['extracted'] or '(none)'}" for a in r["answers"].values()]]
             for r in rows]
    return ["question", "gold", *evs], cells


def mcnemar_markdown(service: Any, matrix: dict[str, Any], column: str | None) -> str:
    """McNemar's exact test of the column's two most accurate models (ties in table order) on the questions
    both answered."""
    ranked = sorted(((r["results"][column]["accuracy"], r["label"]) for r in matrix["rows"]
                     if column and column in r["results"]), key=lambda x: -x[0])
    if len(ranked) < 2:
        return "McNemar test: needs two models evaluated on this benchmark under this protocol."
    evs = column_evaluations(matrix, column)
    t = service.mcnemar({ranked[0][1]: evs[ranked[0][1]], ranked[1][1]: evs[ranked[1][1]]})
    verdict = "beyond chance" if t["p_value"] < 0.05 else "not beyond chance"
    return (f"McNemar test on {column}, **{t['a']}** against **{t['b']}** over {t['questions']} questions: "
            f"{t['n10']} only the first got right, {t['n01']} only the second; exact p = {t['p_value']:.3g}: "
            f"{verdict}.")


# --------------------------------------------------------------------------------------------------
# Handlers.

def run_evaluations(service: Any, models: list[str] | None, benchmarks: list[str] | None, limit: Any,
                    max_new_tokens: Any, protocol: Any = "generate") -> dict:
    """Queue one evaluation job per model: (message box). Nothing is queued when the choice is invalid."""
    from core.config import EvalSettings
    from core.fields import ConfigError

    try:
        if not models:
            raise ConfigError("models", "pick at least one adapter or base model")
        if not benchmarks:
            raise ConfigError("eval.benchmarks", "pick at least one benchmark")
        settings = EvalSettings(benchmarks=list(benchmarks), limit=int(limit or 0),
                                max_new_tokens=int(max_new_tokens or 256), protocol=protocol or "generate")
        settings.validate()
        refusal = loglikelihood_refusal(settings.benchmarks) if settings.protocol == "loglikelihood" else None
        if refusal:  # said once, before any model's job is queued (the service says it again for each)
            raise ConfigError("eval.protocol", refusal)
    except (ConfigError, TypeError, ValueError) as err:
        return error_update(error_text(err if isinstance(err, ConfigError) else ConfigError("eval", str(err))))
    queued, errors = [], []
    for m in models:
        try:
            kind, ref = parse_model_key(m)
            which = {"job_id": ref} if kind == "job" else {"model": ref}
            queued.append(service.submit_evaluation(benchmarks, settings=settings.to_dict(), **which))
        except Exception as err:
            errors.append(error_text(err))
    if queued:
        gr.Info(f"Queued evaluation job(s) {', '.join(map(str, queued))}; results appear here as they finish")
    return error_update("\n\n".join(errors) if errors else None)


def results(service: Any, models: list[str] | None, column: str | None, only_disagreeing: bool) -> tuple:
    """(table, bar chart, scatter, column choices, disagreement table, McNemar, the matrix for export);
    ``column`` is a matrix column's label (a benchmark under a protocol)."""
    matrix = service.comparison(models or None)
    headers, rows, long_rows, points = results_table(matrix)
    columns = [c["label"] for c in matrix["columns"]]
    if column not in columns:
        column = columns[0] if columns else None
    d_headers, d_rows = disagreement_table(service, matrix, column, only_disagreeing)
    table = gr.update(value={"headers": headers, "data": rows})
    dis = gr.update(value={"headers": d_headers, "data": d_rows})
    test = mcnemar_markdown(service, matrix, column) if column else ""
    return (table, accuracy_bars(long_rows), accuracy_scatter(points),
            gr.update(choices=columns, value=column), dis, test, matrix)


def results_signature(service: Any) -> str:
    evs = service.list_evaluations()
    active = service.list_jobs(status=("queued", "running"), kind="evaluate")
    return json.dumps([[e["id"] for e in evs], [(j["id"], j["status"]) for j in active]])


def export(service: Any, matrix: dict | None, fmt: str) -> dict:
    """A file of the accuracy matrix, CSV or Markdown (written by the service)."""
    if not matrix or not matrix.get("rows"):
        warn("Nothing to export yet: run some evaluations first.")
        return gr.skip()
    text = service.comparison_csv(matrix) if fmt == "csv" else service.comparison_markdown(matrix)
    return download_file(text, f"accuracy.{'csv' if fmt == 'csv' else 'md'}")


# --------------------------------------------------------------------------------------------------
# Layout.

@dataclass
class CompareTab:
    models: Any
    benchmarks: Any
    limit: Any
    max_new_tokens: Any
    protocol: Any
    run_button: Any
    refresh_button: Any
    message: Any
    table: Any
    bars: Any
    scatter: Any
    benchmark: Any
    only_disagreeing: Any
    disagreement: Any
    mcnemar: Any
    csv_button: Any
    md_button: Any
    export_file: Any
    exported: Any  # gr.State: the matrix behind the export buttons
    timer: Any
    seen: Any

    @property
    def result_outputs(self) -> list[Any]:
        return [self.table, self.bars, self.scatter, self.benchmark, self.disagreement, self.mcnemar, self.exported]


def build_compare_tab(service: Any) -> CompareTab:
    with gr.Row(equal_height=True):
        models = gr.Dropdown(choices=[], value=[], multiselect=True, label="models",
                             info="adapters and base models to compare (empty = every evaluated model)", scale=3)
        refresh_button = gr.Button("↻", size="sm", scale=0, min_width=50)
    with gr.Row(equal_height=True):
        benchmarks = gr.CheckboxGroup(choices=benchmark_choices(), value=[], label="benchmarks", scale=3)
        limit = gr.Number(value=50, precision=0, label="examples per benchmark", info="0 = all", scale=1)
        max_new_tokens = gr.Number(value=256, precision=0, label="max new tokens", scale=1)
        protocol = gr.Dropdown(choices=PROTOCOL_CHOICES, value=PROTOCOLS[0], label="protocol", scale=2,
                               info="loglikelihood: multiple-choice benchmarks only")
        run_button = gr.Button("Run evaluations", variant="primary", scale=1)
    message = gr.Markdown("", visible=False, elem_classes="error-box")
    build_lmeval_panel(service)  # lm-evaluation-harness tasks as jobs: app/lmeval_panel.py
    table = gr.Dataframe(value={"headers": ["model", "method", "trainable params", "mean"], "data": []},
                         interactive=False, wrap=True, max_height=320,
                         label="accuracy (%), a column per benchmark and protocol (generate: the paper's; loglik: "
                               "log-likelihood multiple choice, with acc_norm; lm-eval: lm-evaluation-harness)")
    with gr.Row():
        csv_button = gr.Button("Export CSV", size="sm")
        md_button = gr.Button("Export Markdown", size="sm")
        export_file = gr.File(label="export", interactive=False, visible=False, height=60)
    with gr.Row(equal_height=True):
        bars = gr.Plot(accuracy_bars([]), show_label=False)
        scatter = gr.Plot(accuracy_scatter([]), show_label=False)
    gr.Markdown("### Where the models disagree", elem_classes="section-title")
    with gr.Row(equal_height=True):
        benchmark = gr.Dropdown(choices=[], value=None, label="benchmark (protocol)", scale=2)
        only_disagreeing = gr.Checkbox(value=True, label="only examples where the answers differ", scale=2)
    disagreement = gr.Dataframe(value={"headers": ["question", "gold"], "data": []}, interactive=False, wrap=True,
                                max_height=420)
    mcnemar = gr.Markdown("")
    tab = CompareTab(models=models, benchmarks=benchmarks, limit=limit, max_new_tokens=max_new_tokens,
                     protocol=protocol, run_button=run_button, refresh_button=refresh_button, message=message, table=table, bars=bars,
                     scatter=scatter, benchmark=benchmark, only_disagreeing=only_disagreeing,
                     disagreement=disagreement, mcnemar=mcnemar, csv_button=csv_button, md_button=md_button, export_file=export_file,
                     exported=gr.State(None), timer=gr.Timer(POLL_SECONDS, active=False), seen=gr.State(""))
    _wire(tab, service)
    return tab


def refresh_models(service: Any, current: list[str] | None) -> dict:
    options = model_options(service)
    values = {v for _, v in options}
    return gr.update(choices=options, value=[c for c in (current or []) if c in values])


def _wire(tab: CompareTab, service: Any) -> None:
    show = guarded(len(tab.result_outputs))(lambda m, b, o: results(service, m, b, o))
    inputs = [tab.models, tab.benchmark, tab.only_disagreeing]
    tab.refresh_button.click(guarded(1)(lambda m: refresh_models(service, m)), tab.models, tab.models).then(
        show, inputs, tab.result_outputs)
    tab.models.change(show, inputs, tab.result_outputs, trigger_mode="always_last", show_progress="hidden")
    tab.benchmark.input(show, inputs, tab.result_outputs, show_progress="hidden")
    tab.only_disagreeing.change(show, inputs, tab.result_outputs, show_progress="hidden")
    tab.run_button.click(guarded(1, 0)(lambda m, b, l, t, p: run_evaluations(service, m, b, l, t, p)),
                         [tab.models, tab.benchmarks, tab.limit, tab.max_new_tokens, tab.protocol], tab.message)

    def poll(models, benchmark, only, seen):
        sig = results_signature(service)
        if sig == seen:
            return (*[gr.skip()] * len(tab.result_outputs), seen)
        return (*results(service, models, benchmark, only), sig)

    tab.timer.tick(guarded(len(tab.result_outputs) + 1)(poll), [*inputs, tab.seen], [*tab.result_outputs, tab.seen], show_progress="hidden")
    tab.csv_button.click(lambda m: export(service, m, "csv"), tab.exported, tab.export_file)
    tab.md_button.click(lambda m: export(service, m, "md"), tab.exported, tab.export_file)
