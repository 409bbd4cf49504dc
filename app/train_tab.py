"""Train tab: base model, adapter (method, placement, layers), data, hyperparameters -> a job.

The adapter, data, training and evaluation widgets are generated from the settings dataclasses
(``app.forms``); the methods, their labels and settings groups come from the registry
(``core.methods``). Handlers are top-level functions of a plain ``form`` dict (field path -> widget
value), so they are tested without a browser; ``build_train_tab`` only draws and wires. The pure
conversions between that dict and a ``JobSpec`` are ``app.train_form``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gradio as gr

from core import data as data_mod
from core import methods
from core.config import BUILTIN_DATASET, DEFAULT_METHOD, DEFAULT_MODEL, PRESETS, ROLES, DataSettings, EvalSettings, JobSpec, ModelSettings, TrainSettings
from core.fields import ConfigError, fields_of
from core.estimate import estimate, human_bytes, human_count, model_config
from core.deployment import current as current_deployment
from core.sources import MATH_OPS
from jobs.errors import JobError

from .common import error_text, error_update, guarded, warn
from .diagram import available_roles, block_diagram
from .forms import Form, add_fields, collect
from .train_form import (DATA_KINDS, SOURCE_KINDS, adapter_config, cli_text, data_source, form_from_spec,
                         model_settings, preset_values, role_fields, spec_from_form)

UPLOAD_TYPES = (".json", ".jsonl", ".csv")
PREVIEW_ROWS = 5
STATS_ROWS = 2000
CUSTOM_PRESET = "(custom)"


# --------------------------------------------------------------------------------------------------
# Handlers.

def checked_spec(service: Any, form: dict[str, Any]) -> JobSpec:
    """The form's spec as the service would queue it (its sources resolved and allowed, its data's first
    rows read); ``ConfigError``/``JobError`` otherwise."""
    spec = spec_from_form(form)
    service.resolve_data(spec.data.source, kind=SOURCE_KINDS.get(form.get("data.kind")))  # the field's own kind
    return service.check_spec(spec)


def show_config(service: Any, form: dict[str, Any]) -> tuple[dict, str, str]:
    """(error box, spec JSON, CLI commands). Invalid settings: the error, nothing else changes."""
    try:
        spec = checked_spec(service, form)
    except (ConfigError, JobError) as err:
        return error_update(error_text(err)), gr.skip(), gr.skip()
    return error_update(None), spec.to_json(), cli_text(spec)


def launch(service: Any, form: dict[str, Any]) -> tuple[dict, Any]:
    """Submit the job the form describes: (error box, job id or None). Invalid: nothing is submitted."""
    try:
        spec = checked_spec(service, form)
        job_id = service.submit(spec)
    except (ConfigError, JobError) as err:
        text = error_text(err)
        warn(text)
        return error_update(text), None
    job_id = getattr(job_id, "id", job_id)
    gr.Info(f"Job {job_id} queued: {spec.name}")
    return error_update(None), job_id


def method_visibility(method: str) -> list[dict]:
    """One visibility update per method group, in the registry's order."""
    return [gr.update(visible=(m == method)) for m in methods.names()]


def _lenient_settings(form: dict[str, Any], method: str) -> dict[str, Any]:
    """The method's settings as far as they parse (for drawing while the user types)."""
    out = {}
    if method not in methods.names():
        return out
    for meta in fields_of(methods.get(method).settings):
        raw = form.get(f"adapter.{method}.{meta['name']}", meta["default"])
        out[meta["name"]] = raw if raw not in (None, "") else meta["default"]
    return out


def plan(form: dict[str, Any]) -> tuple[str, str, str]:
    """(model line, estimate, diagram) for the current form; errors become messages in place."""
    method = form.get("adapter.method") or DEFAULT_METHOD
    layers = form.get("adapter.layers") or "all"
    model_line, facts = "", None
    try:
        cfg = model_config(model_settings(form))
        facts = {"model_type": cfg.model_type, "layers": getattr(cfg, "num_hidden_layers", None)}
    except ConfigError as err:
        model_line = error_text(err)
    try:
        data = DataSettings(cutoff_len=_int(form.get("data.cutoff_len"), 256))
        train = TrainSettings(micro_batch_size=_int(form.get("train.micro_batch_size"), 4))
        est = estimate(model_settings(form), adapter_config(form), data, train)
        model_line = (f"**{est['model_type']}** · {human_count(est['base'])} parameters · {est['layers']} layers · "
                      f"hidden {est['hidden_size']} · trains in {est['dtype']}")
        estimate_md = f"{estimate_markdown(est)}\n\n<small>{exports_note(method)}</small>"
    except ConfigError as err:
        estimate_md = error_text(err)
    diagram = block_diagram(method, _lenient_settings(form, method), layers,
                            facts and facts["model_type"], facts and facts["layers"])
    return model_line, estimate_md, diagram


def _int(value: Any, default: int) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return default


def estimate_markdown(est: dict[str, Any]) -> str:
    parts = est["memory_parts"]
    return (
        "| trainable parameters | % of base | adapter file | training memory (rough) |\n"
        "|---|---|---|---|\n"
        f"| **{est['trainable']:,}** ({human_count(est['trainable'])}) | **{est['percent']:.3f}%** | "
        f"**{human_bytes(est['adapter_bytes'])}** | **{human_bytes(est['memory_bytes'])}** |\n\n"
        f"<small>{est['modules']} adapter modules · memory = weights {human_bytes(parts['weights'])} + "
        f"adapter & AdamW {human_bytes(parts['adapter_and_optimizer'])} + activations "
        f"{human_bytes(parts['activations'])} + logits {human_bytes(parts['logits'])} + runtime "
        f"{human_bytes(parts['runtime'])} "
        f"(micro-batch {est['micro_batch_size']} × {est['seq_len']} tokens)</small>")


EXPORT_NAMES = {"peft": "Hugging Face PEFT layout", "merged": "merged full model"}


def exports_note(method: str) -> str:
    """What a trained adapter of ``method`` exports as, from its record: a method without a PEFT layout or
    a merge says it exports in our own format only."""
    m = methods.get(method)
    if not m.exports:
        return f"{m.label} exports in our own format only (no PEFT layout, no merge into the weights)"
    return "exports: our own format, " + ", ".join(EXPORT_NAMES[kind] for kind in m.exports)


def roles_update(form: dict[str, Any], path: str | None = None) -> dict:
    """The role choices of the field at ``path`` (the first of ``role_fields()`` when None) restricted to
    the roles the chosen architecture has."""
    path = path or role_fields()[0]
    try:
        model_type = model_config(model_settings(form)).model_type
    except ConfigError:
        return gr.skip()
    have = available_roles(model_type)
    choices = [r for r in ROLES if r in have]
    current = [r for r in (form.get(path) or []) if r in have]
    return gr.update(choices=choices, value=current)


def store_upload(service: Any, file_path: str | None, name: str | None = None) -> tuple[str | None, str]:
    """Keep an uploaded file (the service checks type, size and the owner's quota, and stores it under a
    content-hash name) and read its rows. Returns (stored path or None, status Markdown)."""
    if not file_path:
        return None, ""
    try:
        stored = service.store_upload(file_path, name)
    except (JobError, OSError) as err:
        return None, error_text(err)
    try:
        records = data_mod.load_records(stored["path"], uploads_dir=service.uploads_dir)
    except ConfigError as err:
        service.forget_upload(stored["path"])
        return None, error_text(ConfigError("data.source", err.message))
    skipped = getattr(records, "skipped", [])
    note = f" ({len(skipped)} rows with an empty response skipped)" if skipped else ""
    notes = "".join(f" {n}" for n in getattr(records, "notes", []))
    return stored["path"], f"{len(records):,} rows read from `{stored['name']}`{note}.{notes}"


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, trust_remote_code: bool) -> Any:
    from core.models import load_tokenizer

    return load_tokenizer(ModelSettings(name=name, trust_remote_code=trust_remote_code))


def preview(service: Any, form: dict[str, Any]) -> tuple[dict, list[list[str]], str]:
    """(error box, first rows as the model sees them [prompt, response], token-length statistics).

    The source goes through the service first: the same rules as a job's data (data roots, the
    public allowlist, one's own uploads only)."""
    try:
        settings = collect(DataSettings, "data", form, skip=("source",))
        source = service.resolve_data(data_source(form), kind=SOURCE_KINDS.get(form.get("data.kind")))
        records = data_mod.load_records(source, settings.get("columns") or {}, settings.get("limit") or 0,
                                        uploads_dir=service.uploads_dir)
        ms = model_settings(form)
        try:
            tok = _tokenizer(ms.name, ms.trust_remote_code)
        except ConfigError:  # not allowed here, needs remote code, cannot be found: it names model.name
            raise
        except Exception as err:  # a model that cannot be loaded: say so where the preview would be
            raise ConfigError("model.name", str(err)) from None
        template = settings.get("template", "alpaca")
        try:
            rows = data_mod.preview_rows(records, tok, template, n=PREVIEW_ROWS,
                                         cutoff_len=int(settings.get("cutoff_len", 256)),
                                         train_on_inputs=bool(settings.get("train_on_inputs", False)))
        except ValueError as err:  # e.g. a chat template that refuses the conversation
            raise ConfigError("data.template", str(err)) from None
        tokenized = data_mod.tokenize_records(records[:STATS_ROWS], tok, template,
                                              int(settings.get("cutoff_len", 256)),
                                              bool(settings.get("train_on_inputs", False)))
    except ConfigError as err:
        return error_update(error_text(err)), [], ""
    stats = data_mod.length_stats(tokenized)
    sample = f" (first {STATS_ROWS:,})" if len(records) > STATS_ROWS else ""
    stats_md = (f"**{len(records):,} rows**{sample} · tokens per example: min {stats.get('min')}, mean "
                f"{stats.get('mean')}, median {stats.get('median')}, p95 {stats.get('p95')}, max {stats.get('max')} · "
                f"**{stats.get('num_truncated', 0)} truncated** at {settings.get('cutoff_len')} · "
                f"{stats.get('num_dropped', 0)} dropped (no response token left)"
                + "".join(f" · {n}" for n in getattr(records, "notes", []))
                + "".join(f" · {n}" for n in _chat_notes(records, tok, template)))
    return error_update(None), [[r["prompt"], r["response"]] for r in rows], stats_md


def _chat_notes(records: list[dict], tok: Any, template: str) -> list[str]:
    """The preview's notes on chat rendering: ChatML standing in for a missing template; the marks."""
    from core.chat_data import TRAIN_OPEN, TRAIN_CLOSE
    from core.templates import template_note

    notes = [n for n in [template_note(tok, template)] if n]
    if records and "messages" in records[0]:
        notes.append(f"conversations: the loss is taken on the tokens between {TRAIN_OPEN} and {TRAIN_CLOSE} "
                     "(every assistant turn)")
    return notes


def benchmark_choices() -> list[tuple[str, str]]:
    """(label, name) of the benchmarks whose data is on this machine (unavailable ones would only fail)."""
    from core.benchmarks import list_benchmarks

    out = []
    for b in list_benchmarks():
        if isinstance(b, str):
            out.append((b, b))
        elif b.get("available", True):
            count = f" ({b['count']:,})" if b.get("count") else ""
            out.append((f"{b['name']}{count}", b["name"]))
    return out


def model_choices() -> list[str]:
    from core.models import catalogue

    return [row["name"] for row in catalogue()]


# --------------------------------------------------------------------------------------------------
# Layout.

@dataclass
class TrainTab:
    form: Form
    method_groups: list[Any]
    preset: Any
    model_info: Any
    estimate: Any
    diagram: Any
    upload_file: Any
    upload_status: Any
    data_groups: dict[str, Any]
    preview_button: Any
    preview_table: Any
    preview_stats: Any
    error: Any
    show_config_button: Any
    launch_button: Any
    config_json: Any
    config_cli: Any
    launched_job: Any  # gr.State: the id of the job this session launched last
    launch_event: Any = None  # the Launch click, for the app to chain "jump to the job" onto

    @property
    def plan_outputs(self) -> list[Any]:
        return [self.model_info, self.estimate, self.diagram]


def build_train_tab(service: Any) -> TrainTab:
    form = Form()
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            gr.Markdown("### 1 · Base model", elem_classes="section-title")
            form.add("model.name", gr.Dropdown(choices=model_choices(), value=DEFAULT_MODEL, allow_custom_value=True,
                                               label="base model", info="the catalogue (embedded default), a "
                                               "Hugging Face hub id or a local checkpoint directory"))
            model_info = gr.Markdown("", elem_classes="muted")
            with gr.Accordion("precision and device", open=False):
                with gr.Row():
                    add_fields(form, ModelSettings, "model", skip=("name",))

            gr.Markdown("### 2 · Adapter", elem_classes="section-title")
            with gr.Row():
                preset = gr.Dropdown(choices=[CUSTOM_PRESET, *PRESETS], value="LoRA", label="paper preset",
                                     info="the configurations named in LLM-Adapters", scale=1)
                form.add("adapter.method", gr.Radio(
                    choices=[(m.label, m.name) for m in methods.all()], value=DEFAULT_METHOD, label="method",
                    scale=3))
            groups = []
            for m in methods.all():
                choice_fields = [f["name"] for f in fields_of(m.settings) if f.get("choices")]
                other_fields = [f["name"] for f in fields_of(m.settings) if not f.get("choices")]
                with gr.Group(visible=(m.name == DEFAULT_METHOD)) as group:
                    with gr.Row():
                        add_fields(form, m.settings, f"adapter.{m.name}", skip=choice_fields)
                    if choice_fields:
                        with gr.Row():
                            add_fields(form, m.settings, f"adapter.{m.name}", skip=other_fields)
                groups.append(group)
            form.add("adapter.layers", gr.Textbox(
                value="all", label="layers", info="which decoder layers get adapters: all, 0-11, 0,2,4 or 0-3,8 "
                "(prefix / prompt methods act on every layer)"))
        with gr.Column(scale=4, min_width=380):
            gr.Markdown("### Estimate", elem_classes="section-title")
            estimate_md = gr.Markdown("computing…", elem_classes="estimate-box")
            diagram = gr.HTML(block_diagram(DEFAULT_METHOD, methods.get(DEFAULT_METHOD).settings().to_dict()))

    gr.Markdown("### 3 · Data", elem_classes="section-title")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            form.add("data.kind", gr.Radio(choices=list(DATA_KINDS), value="built-in", label="source"))
            with gr.Group(visible=True) as g_builtin:
                form.add("data.builtin", gr.Dropdown(choices=list(data_mod.BUILTIN_FILES), value=BUILTIN_DATASET,
                                                     label="built-in dataset",
                                                     info="arithmetic word problems with worked answers (offline)"))
                form.add("data.builtin_ops", gr.CheckboxGroup(
                    choices=list(MATH_OPS), value=[], label="only the problems using these operations",
                    info="none ticked = every problem; e.g. add + sub trains an addition/subtraction specialist "
                         "(its source becomes builtin:math?ops=add,sub)"))
            with gr.Group(visible=False) as g_upload:
                upload_file = gr.File(label="upload JSON / JSONL / CSV "
                                            f"(≤ {human_bytes(current_deployment().limits.upload_file_bytes)})",
                                      file_types=list(UPLOAD_TYPES), type="filepath", height=120)
                upload_status = gr.Markdown("")
            form.add("data.upload", gr.State(None))
            with gr.Group(visible=False) as g_server:
                form.add("data.server_path", gr.Textbox(label="file on the server",
                                                        placeholder="/data/my_set.json"))
            with gr.Group(visible=False) as g_hub:
                form.add("data.hub_id", gr.Textbox(label="hub dataset id", placeholder="user/dataset"))
        with gr.Column(scale=3):
            with gr.Row():
                add_fields(form, DataSettings, "data", skip=("source", "columns", "train_on_inputs"))
            with gr.Accordion("column mapping and prompt loss", open=False):
                with gr.Row():
                    add_fields(form, DataSettings, "data", skip=("source", "template", "cutoff_len", "val_size",
                                                                 "limit"))
    with gr.Row():
        preview_button = gr.Button("Preview data", size="sm", scale=0, min_width=160)
        preview_stats = gr.Markdown("")
    preview_table = gr.Dataframe(headers=["prompt (as the model sees it)", "response"], value=[], wrap=True,
                                 interactive=False, max_height=320, column_widths=["60%", "40%"])

    gr.Markdown("### 4 · Training and evaluation", elem_classes="section-title")
    train_fields = [m["name"] for m in fields_of(TrainSettings)]
    main_fields = ["epochs", "max_steps", "batch_size", "micro_batch_size", "learning_rate", "warmup_steps"]
    with gr.Row():
        add_fields(form, TrainSettings, "train", skip=[f for f in train_fields if f not in main_fields])
    with gr.Accordion("more training settings", open=False):
        with gr.Row():
            # trackers are the server's choice on a public workbench (the service refuses a visitor's)
            add_fields(form, TrainSettings, "train", skip=main_fields,
                       overrides={"report_to": {"visible": not current_deployment().public}})
    with gr.Row():
        form.add("eval.benchmarks", gr.CheckboxGroup(choices=benchmark_choices(), value=[],
                                                     label="benchmarks to run when training ends", scale=3))
        add_fields(form, EvalSettings, "eval", skip=("benchmarks", "sample_seed", "batch_size"))
    with gr.Accordion("more evaluation settings", open=False):
        with gr.Row():
            add_fields(form, EvalSettings, "eval", skip=("benchmarks", "limit", "max_new_tokens", "protocol"))

    gr.Markdown("### 5 · Launch", elem_classes="section-title")
    error = gr.Markdown("", visible=False, elem_classes="error-box")
    with gr.Row(equal_height=True):
        form.add("name", gr.Textbox(label="job name", placeholder="optional, e.g. lora-r32-math", scale=3))
        show_config_button = gr.Button("Show config", variant="secondary", scale=1)
        launch_button = gr.Button("Launch", variant="primary", scale=1)
    with gr.Accordion("config", open=False) as config_acc:
        config_json = gr.Code(language="json", label="spec.json", interactive=False, max_lines=24)
        config_cli = gr.Code(language="shell", label="equivalent command line", interactive=False)
    launched_job = gr.State(None)

    tab = TrainTab(form=form, method_groups=groups, preset=preset, model_info=model_info, estimate=estimate_md,
                   diagram=diagram, upload_file=upload_file, upload_status=upload_status,
                   data_groups={"built-in": g_builtin, "upload": g_upload, "server path": g_server,
                                "hub id": g_hub},
                   preview_button=preview_button, preview_table=preview_table, preview_stats=preview_stats,
                   error=error, show_config_button=show_config_button, launch_button=launch_button,
                   config_json=config_json, config_cli=config_cli, launched_job=launched_job)
    _wire(tab, service, config_acc)
    return tab


def _wire(tab: TrainTab, service: Any, config_acc: Any) -> None:
    form = tab.form
    inputs = form.components

    def as_form(*values):
        return form.as_dict(values)

    plan_fn = guarded(3)(lambda *v: plan(as_form(*v)))
    events = dict(fn=plan_fn, inputs=inputs, outputs=tab.plan_outputs, trigger_mode="always_last",
                  show_progress="hidden")
    plan_paths = [p for p in form.paths if p.startswith("adapter.") and p != "adapter.method"]
    plan_paths += ["data.cutoff_len", "train.micro_batch_size", "model.precision", "model.device"]
    for path in plan_paths:
        form[path].input(**events)
        if path.startswith("adapter.") and path != "adapter.layers":  # edited by hand: no longer a preset
            form[path].input(lambda: CUSTOM_PRESET, None, tab.preset, show_progress="hidden", queue=False)
    form["adapter.method"].change(lambda m: method_visibility(m), form["adapter.method"], tab.method_groups,
                                  show_progress="hidden").then(**events)
    form["adapter.method"].input(lambda m: CUSTOM_PRESET, form["adapter.method"], tab.preset,
                                 show_progress="hidden")

    role_paths = role_fields()  # restricted to the roles of the chosen model, then the plan is redrawn
    form["model.name"].change(lambda *v: [roles_update(as_form(*v), p) for p in role_paths], inputs,
                              [form[p] for p in role_paths], show_progress="hidden").then(
        fn=plan_fn, inputs=inputs, outputs=tab.plan_outputs, trigger_mode="always_last", show_progress="minimal")

    def on_preset(preset):
        return form.values_in_order(preset_values(preset))

    tab.preset.input(on_preset, tab.preset, inputs, show_progress="hidden").then(**events)

    def show_kind(kind):
        return [gr.update(visible=(k == kind)) for k in DATA_KINDS]

    form["data.kind"].change(show_kind, form["data.kind"], [tab.data_groups[k] for k in DATA_KINDS],
                             show_progress="hidden")
    tab.upload_file.upload(guarded(2)(lambda f: store_upload(service, f)), tab.upload_file,
                           [form["data.upload"], tab.upload_status])
    tab.upload_file.clear(lambda: (None, ""), None, [form["data.upload"], tab.upload_status])

    tab.preview_button.click(guarded(3, 0)(lambda *v: preview(service, as_form(*v))), inputs,
                             [tab.error, tab.preview_table, tab.preview_stats])

    def on_show(*v):
        err, spec_json, cli = show_config(service, as_form(*v))
        return err, spec_json, cli, gr.update(open=not isinstance(spec_json, dict))

    tab.show_config_button.click(guarded(4, 0)(on_show), inputs,
                                 [tab.error, tab.config_json, tab.config_cli, config_acc])
    tab.launch_event = tab.launch_button.click(guarded(2, 0)(lambda *v: launch(service, as_form(*v))), inputs,
                                               [tab.error, tab.launched_job])


def fill_outputs(tab: TrainTab) -> list[Any]:
    """Outputs for filling the form from a spec (clone): every widget, the method groups and the preset."""
    return [*tab.form.components, *tab.method_groups, tab.preset, *tab.data_groups.values()]


def fill_from_spec(tab: TrainTab, spec_json: str | None) -> list[Any]:
    """Updates for ``fill_outputs`` from a job's spec JSON (skip everything when there is none)."""
    n = len(fill_outputs(tab))
    if not spec_json:
        return [gr.skip()] * n
    try:
        spec = JobSpec.from_json(spec_json) if isinstance(spec_json, str) else JobSpec.from_dict(spec_json)
    except ConfigError as err:
        warn(error_text(err))
        return [gr.skip()] * n
    values = form_from_spec(spec)
    kind = values.get("data.kind")
    return [*tab.form.values_in_order(values), *method_visibility(spec.adapter.method), CUSTOM_PRESET,
            *[gr.update(visible=(k == kind)) for k in DATA_KINDS]]
