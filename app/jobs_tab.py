"""Jobs tab: every job in the database, refreshed by a timer; the selected job's curves, spec and log;
the workers sharing the queue and where each job ran.

The page keeps nothing but the selection (per browser session); jobs live in the database and run
in worker processes, so a reload or a second browser finds them again. The timer polls one cheap
query (``list_jobs``) and redraws the chart and log only when the selected jobs moved on; the
workers' table (``list_workers``) is redrawn only when a worker comes, goes, turns stale or changes jobs.
Hosts and tags of workers come from the service, which leaves them out for public visitors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from core import methods as registry
from jobs.artifacts import ARTIFACT_LABELS
from jobs.errors import JobError

from .charts import empty_figure, loss_figure, search_figure
from .common import error_text, error_update, guarded, warn
from .job_text import job_choices, job_rows, ran_on, status_markdown
from .workers_panel import build_workers_panel, refresh_workers

POLL_SECONDS = 2.0
MAX_LISTED = 500  # newest jobs in the table
LOG_LINES = 200
TABLE_HEADERS = ["id", "name", "kind", "method", "status", "progress", "ETA", "best val loss", "created", "worker"]
ARTIFACTS = ARTIFACT_LABELS


def chart_signature(jobs_by_id: dict[int, dict[str, Any]], ids: list[int], smoothing: float, log_scale: bool):
    """What the chart depends on: each drawn job's step, status and best val loss, and the options."""
    parts = []
    for i in ids:
        j = jobs_by_id.get(i)
        if j:
            parts.append((i, (j.get("progress") or {}).get("step"), j["status"], j.get("best_val_loss")))
    return json.dumps([parts, smoothing, bool(log_scale)])


def _ids(selected: Any, overlay: Any) -> list[int]:
    ids = []
    for value in [selected, *(overlay or [])]:
        try:
            i = int(value)
        except (TypeError, ValueError):
            continue
        if i not in ids:
            ids.append(i)
    return ids


def chart(service: Any, jobs_by_id: dict[int, dict[str, Any]], ids: list[int], smoothing: float,
          log_scale: bool):
    """Loss curves of the training jobs among ``ids``; with none, the scored points of the weight searches."""
    if not ids:
        return empty_figure("Select a job to see its loss curves")
    series: dict[str, list] = {"train": [], "weight-search": []}
    for i in ids:
        job = jobs_by_id.get(i)
        if job is not None and job.get("kind") in series:
            series[job["kind"]].append((f"#{i} {job.get('name') or ''}".strip(), service.metrics(i, history=True)))
    if series["train"]:
        return loss_figure(series["train"], smoothing=smoothing or 0.0, log_scale=bool(log_scale))
    if series["weight-search"]:
        return search_figure(series["weight-search"])
    return empty_figure("Only training jobs have loss curves and weight searches score charts: select one")


# --------------------------------------------------------------------------------------------------
# Handlers (plain functions of the service and widget values).

def log_text(service: Any, job_id: int) -> str:
    """The end of the job's log, or why it cannot be read here (it ran on another host and the runs
    directory is not shared: the service's message names the worker to those who may see it)."""
    try:
        return service.logs(job_id, LOG_LINES)
    except JobError as err:
        return f"[{err}]"


def refresh(service: Any, selected: Any, overlay: Any, smoothing: float, log_scale: bool,
            seen: dict | None) -> tuple:
    """The timer's poll: (table, job choices, overlay choices, status, chart, log, seen).

    Everything unchanged since the last poll of this session is skipped, so a quiet page costs one query.
    """
    seen = dict(seen or {})
    jobs = service.list_jobs(limit=MAX_LISTED)
    by_id = {j["id"]: j for j in jobs}
    table_sig = json.dumps([[j["id"], j["status"], (j.get("progress") or {}).get("step"), j.get("best_val_loss"),
                             (j.get("progress") or {}).get("phase"), j.get("name"), ran_on(j)] for j in jobs])
    choices_sig = json.dumps([[j["id"], j.get("name"), j["status"]] for j in jobs])
    out_table = gr.skip()
    out_choices = out_overlay = gr.skip()
    if table_sig != seen.get("table"):
        out_table = job_rows(jobs)
        seen["table"] = table_sig
    if choices_sig != seen.get("choices"):
        choices = job_choices(jobs, kind=None)
        out_choices = gr.update(choices=choices)
        out_overlay = gr.update(choices=job_choices(jobs))
        seen["choices"] = choices_sig
    try:
        job_id = int(selected) if selected is not None else None
    except (TypeError, ValueError):
        job_id = None
    job = by_id.get(job_id) if job_id is not None else None
    status_sig = json.dumps(job, default=str) if job else ""
    out_status = out_log = gr.skip()
    if status_sig != seen.get("status"):
        out_status = status_markdown(job)
        seen["status"] = status_sig
        if job is not None:
            out_log = log_text(service, job["id"])
    elif job is not None and job["status"] == "running":
        out_log = log_text(service, job["id"])
    ids = _ids(selected, overlay)
    sig = chart_signature(by_id, ids, smoothing, log_scale)
    out_chart = gr.skip()
    if sig != seen.get("chart"):
        out_chart = chart(service, by_id, ids, smoothing, log_scale)
        seen["chart"] = sig
    return out_table, out_choices, out_overlay, out_status, out_chart, out_log, seen


def select_job(service: Any, selected: Any, overlay: Any, smoothing: float, log_scale: bool) -> tuple:
    """A new selection: (status, chart, spec JSON, log, seen) drawn at once."""
    jobs = service.list_jobs()
    by_id = {j["id"]: j for j in jobs}
    try:
        job = by_id.get(int(selected)) if selected is not None else None
    except (TypeError, ValueError):
        job = None
    ids = _ids(selected, overlay)
    spec = json.dumps(job["spec"], indent=2) if job else ""
    log = log_text(service, job["id"]) if job else ""
    seen = {"chart": chart_signature(by_id, ids, smoothing, log_scale),
            "status": json.dumps(job, default=str) if job else ""}
    return status_markdown(job), chart(service, by_id, ids, smoothing, log_scale), spec, log, seen


def pick_from_table(rows: Any, evt: gr.SelectData) -> Any:
    """The job id of the clicked table row."""
    try:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        data = rows.values.tolist() if hasattr(rows, "values") else rows
        return int(data[row][0])
    except (TypeError, ValueError, IndexError, KeyError):
        return gr.skip()


def _need(job_id: Any) -> int:
    if job_id in (None, ""):
        raise ValueError("select a job first")
    return int(job_id)


def cancel_job(service: Any, job_id: Any) -> dict:
    """(message box). A running job stops at its next step with its adapter saved."""
    try:
        status = service.cancel(_need(job_id))
    except Exception as err:
        return error_update(error_text(err))
    note = "stopping at its next step" if status == "running" else status
    gr.Info(f"Job {job_id}: {note}")
    return error_update(None)


def resume_job(service: Any, job_id: Any) -> tuple[dict, Any]:
    """(message box, the job dropdown selecting the new job)."""
    try:
        new_id = service.resume(_need(job_id))
    except Exception as err:
        return error_update(error_text(err)), gr.skip()
    gr.Info(f"Job {new_id} queued: it continues job {job_id} from its last checkpoint")
    return error_update(None), gr.update(choices=job_choices(service.list_jobs(limit=MAX_LISTED), kind=None),
                                         value=new_id)


def delete_job(service: Any, job_id: Any) -> tuple[dict, Any]:
    """(message box, cleared selection)."""
    try:
        service.delete(_need(job_id))
    except Exception as err:
        return error_update(error_text(err)), gr.skip()
    gr.Info(f"Job {job_id} deleted")
    return error_update(None), None


def artifact(service: Any, job_id: Any, kind: str) -> tuple[dict, Any]:
    """(message box, path of the zip to download). A zip not built yet is queued as an export job (the
    web server never exports); the same button downloads it once that job has finished."""
    try:
        path = service.artifact(_need(job_id), kind)
        if path is None:
            export_id = service.export(_need(job_id), kind)
            gr.Info(f"Preparing the {ARTIFACTS.get(kind, kind)} as job {export_id}: click again when it has "
                    "finished")
            return error_update(None), gr.skip()
    except Exception as err:
        return error_update(error_text(err)), gr.skip()
    return error_update(None), str(servable(Path(path)))


DOWNLOAD_TTL_S = 3600.0


def servable(path: Path) -> Path:
    """``path``, or a link/copy of it in the temp directory when Gradio may not hand it out as is.

    Gradio gives a browser only files under the working directory or the temp directory; we do not
    add WORKBENCH_HOME to its allowed paths, which would expose the database and uploads too. The
    copies live in ``<tmp>/workbench-downloads/`` and are removed an hour later (at the next download).
    """
    path = path.resolve()
    roots = [Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()]
    if any(path.is_relative_to(r) for r in roots):
        return path
    downloads = Path(tempfile.gettempdir()) / "workbench-downloads"
    downloads.mkdir(exist_ok=True)
    now = time.time()
    for old in downloads.iterdir():
        try:
            if now - old.stat().st_mtime > DOWNLOAD_TTL_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed by another request meanwhile
            pass
    target = Path(tempfile.mkdtemp(dir=downloads)) / path.name
    try:
        os.link(path, target)
    except OSError:  # another filesystem
        shutil.copyfile(path, target)
    return target


def spec_of(service: Any, job_id: Any) -> str | None:
    """The job's spec JSON (to clone it into the Train tab)."""
    try:
        return json.dumps(service.get(_need(job_id))["spec"])
    except Exception as err:
        warn(error_text(err))
        return None


def exports_sentence() -> str:
    """Which methods have which export, from the registry (the others export in our own format only)."""
    peft = [m.label for m in registry.all() if "peft" in m.exports]
    merged = [m.label for m in registry.all() if "merged" in m.exports]
    return (f"The PEFT layout exists for {', '.join(peft) or 'no method'}; the merged model for "
            f"{', '.join(merged) or 'no method'}; other methods export in this workbench's own format only. "
            "GGUF files (llama.cpp) and the Ollama bundle (Q8_0 GGUF + Modelfile in the prompt format the job "
            "trained with) are for LLaMA-family bases; the GGUF LoRA adapter for plain LoRA.")


# --------------------------------------------------------------------------------------------------
# Layout.

@dataclass
class JobsTab:
    table: Any
    job: Any  # dropdown: the selected job id
    overlay: Any
    smoothing: Any
    log_scale: Any
    status: Any
    message: Any
    plot: Any
    spec: Any
    log: Any
    cancel_button: Any
    resume_button: Any
    delete_button: Any
    confirm_row: Any
    confirm_delete: Any
    keep_button: Any
    clone_button: Any
    download_buttons: dict[str, Any]
    download_file: Any
    refresh_button: Any
    timer: Any
    seen: Any
    workers: Any  # the workers' table
    workers_seen: Any  # gr.State: what the workers' table last showed
    clone_spec: Any  # gr.State: spec JSON handed to the Train tab
    clone_event: Any = None  # the Clone click, for the app to chain "fill the Train tab" onto

    @property
    def refresh_outputs(self) -> list[Any]:
        return [self.table, self.job, self.overlay, self.status, self.plot, self.log, self.seen]

    @property
    def select_outputs(self) -> list[Any]:
        return [self.status, self.plot, self.spec, self.log, self.seen]


def build_jobs_tab(service: Any) -> JobsTab:
    with gr.Row():
        gr.Markdown("Every job on this workbench, newest first. Click a row to follow it; the page refreshes "
                    f"itself every {POLL_SECONDS:g} s.", elem_classes="muted")
        refresh_button = gr.Button("↻ Refresh", size="sm", scale=0, min_width=110)
    table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, max_height=300, wrap=False,
                         column_widths=["5%", "19%", "7%", "7%", "11%", "12%", "7%", "9%", "12%", "11%"])
    workers = build_workers_panel()
    with gr.Row(equal_height=True):
        job = gr.Dropdown(choices=[], value=None, label="job", scale=2, allow_custom_value=False)
        overlay = gr.Dropdown(choices=[], value=[], multiselect=True, label="overlay other jobs for comparison",
                              scale=3)
    status = gr.Markdown(status_markdown(None))
    message = gr.Markdown("", visible=False, elem_classes="error-box")
    with gr.Row():
        cancel_button = gr.Button("Cancel", size="sm")
        resume_button = gr.Button("Resume", size="sm")
        clone_button = gr.Button("Clone into Train tab", size="sm")
        delete_button = gr.Button("Delete", size="sm", variant="stop")
    with gr.Row(visible=False) as confirm_row:
        gr.Markdown("**Delete this job, its metrics, evaluations and files?**")
        confirm_delete = gr.Button("Yes, delete", size="sm", variant="stop")
        keep_button = gr.Button("Keep it", size="sm")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            plot = gr.Plot(empty_figure("Select a job to see its loss curves"), label="loss and learning rate",
                           show_label=False)
            with gr.Row():
                smoothing = gr.Slider(0.0, 0.99, value=0.0, step=0.01, label="smoothing (EMA)")
                log_scale = gr.Checkbox(value=False, label="log-scale loss")
        with gr.Column(scale=2):
            with gr.Tab("Log"):
                log = gr.Textbox(value="", label="log (tail)", interactive=False, lines=16, max_lines=22,
                                 autoscroll=True, elem_classes="log-box")
            with gr.Tab("Spec"):
                spec = gr.Code(value="", language="json", label="spec.json", interactive=False, max_lines=22)
            with gr.Tab("Download"):
                gr.Markdown("Zip files of the trained adapter. " + exports_sentence(), elem_classes="muted")
                download_buttons = {k: gr.Button(label, size="sm") for k, label in ARTIFACTS.items()}
                download_file = gr.File(label="download", interactive=False, height=80)
    timer = gr.Timer(POLL_SECONDS, active=False)  # the app turns it on while this tab is shown
    seen = gr.State({})
    clone_spec = gr.State(None)
    tab = JobsTab(table=table, job=job, overlay=overlay, smoothing=smoothing, log_scale=log_scale, status=status,
                  message=message, plot=plot, spec=spec, log=log, cancel_button=cancel_button,
                  resume_button=resume_button, delete_button=delete_button, confirm_row=confirm_row,
                  confirm_delete=confirm_delete, keep_button=keep_button, clone_button=clone_button,
                  download_buttons=download_buttons, download_file=download_file, refresh_button=refresh_button,
                  timer=timer, seen=seen, workers=workers, workers_seen=gr.State(None), clone_spec=clone_spec)
    _wire(tab, service)
    return tab


def _wire(tab: JobsTab, service: Any) -> None:
    poll_inputs = [tab.job, tab.overlay, tab.smoothing, tab.log_scale, tab.seen]
    poll = guarded(7)(lambda *v: refresh(service, *v))
    tab.timer.tick(poll, poll_inputs, tab.refresh_outputs, show_progress="hidden", queue=False)
    tab.refresh_button.click(lambda *v: refresh(service, *v[:-1], {}), poll_inputs, tab.refresh_outputs)
    poll_workers = guarded(2)(lambda seen: refresh_workers(service, seen))  # its own event: refresh's outputs stay
    tab.timer.tick(poll_workers, tab.workers_seen, [tab.workers, tab.workers_seen], show_progress="hidden",
                   queue=False)
    tab.refresh_button.click(lambda: refresh_workers(service, None), None, [tab.workers, tab.workers_seen],
                             show_progress="hidden")
    select = guarded(5)(lambda *v: select_job(service, *v))
    select_inputs = [tab.job, tab.overlay, tab.smoothing, tab.log_scale]
    tab.job.change(select, select_inputs, tab.select_outputs, show_progress="hidden")
    for widget in (tab.overlay, tab.smoothing, tab.log_scale):
        widget.change(select, select_inputs, tab.select_outputs, show_progress="hidden", trigger_mode="always_last")
    tab.table.select(pick_from_table, tab.table, tab.job, show_progress="hidden")

    tab.cancel_button.click(lambda j: cancel_job(service, j), tab.job, tab.message)
    tab.resume_button.click(lambda j: resume_job(service, j), tab.job, [tab.message, tab.job])
    tab.delete_button.click(lambda: gr.update(visible=True), None, tab.confirm_row)
    tab.keep_button.click(lambda: gr.update(visible=False), None, tab.confirm_row)
    tab.confirm_delete.click(lambda j: (*delete_job(service, j), gr.update(visible=False)), tab.job,
                             [tab.message, tab.job, tab.confirm_row])
    for kind, button in tab.download_buttons.items():
        button.click(lambda j, kind=kind: artifact(service, j, kind), tab.job, [tab.message, tab.download_file])
    tab.clone_event = tab.clone_button.click(lambda j: spec_of(service, j), tab.job, tab.clone_spec)
