"""The Compare tab's lm-eval panel: run lm-evaluation-harness tasks on a base model or an adapter as a job.

Named lm-eval tasks (``arc_easy, hellaswag``...) or a custom task YAML over local data files; each
task's result lands in the Compare tab's table as a column ``<task> (lm-eval)``, with lm-eval's
per-sample logs in the disagreement view. The service decides what may run (``submit_lmeval``: no
custom YAML in public mode, admins only in team mode, data files checked); the panel only hides the
YAML box where it could never be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from jobs.compare import parse_model_key

from .chat_tab import model_options
from .common import error_text, error_update, guarded

YAML_EXAMPLE = """task: my_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: /path/to/rows.json      # a file under the workbench's data folders
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer           # the gold option's index
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _whole(value: Any, field: str, default: int | None) -> int | None:
    """A number box's value as a whole number (blank: ``default``); ``ValueError`` naming the box."""
    if value is None or value == "":
        return default
    number = float(value)
    if number != int(number):
        raise ValueError(f"{field}: expected a whole number, got {value}")
    return int(number)


def run_lmeval(service: Any, model: str | None, tasks: str | None, task_yaml: str | None, limit: Any,
               num_fewshot: Any, batch_size: Any) -> dict:
    """Queue one lmeval job: (message box). Nothing is queued when the choice is invalid."""
    try:
        if not model:
            raise ValueError("model: pick an adapter or a base model")
        kind, ref = parse_model_key(model)
        which = {"job_id": ref} if kind == "job" else {"model": ref}
        job_id = service.submit_lmeval(tasks or "", task_yaml=task_yaml or None,
                                       limit=_whole(limit, "examples per task", 0),
                                       num_fewshot=_whole(num_fewshot, "few-shot examples", None),
                                       batch_size=_whole(batch_size, "batch size", None), **which)
    except Exception as err:  # ConfigError (naming the field), JobError, JobNotFound: all said in the box
        return error_update(error_text(err))
    gr.Info(f"Queued lm-eval job {job_id}; each task's result appears in the table as '<task> (lm-eval)'")
    return error_update(None)


@dataclass
class LmEvalPanel:
    model: Any
    refresh_button: Any
    tasks: Any
    task_yaml: Any
    limit: Any
    num_fewshot: Any
    batch_size: Any
    run_button: Any
    message: Any


def build_lmeval_panel(service: Any) -> LmEvalPanel:
    public = service.deployment.public
    with gr.Accordion("lm-evaluation-harness (lm-eval): its tasks on our models", open=False) as accordion:
        gr.Markdown("Runs lm-eval's own tasks (their prompts, metrics and few-shot rules) through the workbench's "
                    "model, with the adapter loaded, as a job. Needs `requirements-lmeval.txt` on the worker; "
                    "tasks whose data is on the Hugging Face hub need the hub (or its local cache)."
                    + ("" if public else " A custom task YAML can run code: admins only on a team workbench."))
        with gr.Row(equal_height=True):
            model = gr.Dropdown(choices=[], value=None, label="model", scale=3)  # filled per visitor on opening
            refresh_button = gr.Button("↻", size="sm", scale=0, min_width=50)
            tasks = gr.Textbox(label="lm-eval tasks", placeholder="arc_easy, hellaswag", scale=3,
                               info="names from `lm-eval ls tasks`, comma-separated")
        task_yaml = gr.Code(value="", language="yaml", label="custom task YAML (optional)", visible=not public, lines=8)
        gr.Markdown(f"A custom task, for example:\n```yaml\n{YAML_EXAMPLE}```", visible=not public)
        with gr.Row(equal_height=True):
            limit = gr.Number(value=50 if public else 0, precision=0, label="examples per task", info="0 = all")
            num_fewshot = gr.Number(value=None, precision=0, label="few-shot examples", info="blank = the task's own")
            batch_size = gr.Number(value=8, precision=0, label="batch size", info="requests scored together")
            run_button = gr.Button("Run lm-eval", variant="primary")
        message = gr.Markdown("", visible=False, elem_classes="error-box")
    panel = LmEvalPanel(model=model, refresh_button=refresh_button, tasks=tasks, task_yaml=task_yaml, limit=limit,
                        num_fewshot=num_fewshot, batch_size=batch_size, run_button=run_button, message=message)
    refresh = guarded(1)(lambda m: gr.update(choices=model_options(service), value=m))
    panel.refresh_button.click(refresh, model, model)
    accordion.expand(refresh, model, model)
    panel.run_button.click(lambda *a: run_lmeval(service, *a),
                           [model, tasks, task_yaml, limit, num_fewshot, batch_size], message)
    return panel
