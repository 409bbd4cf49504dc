"""The page: five tabs (Train, Jobs, Chat, Compare, Study) wired to one ``JobService``.

``build_demo(service)`` draws the tabs and the few links between them (Launch jumps to the job;
Clone fills the Train tab); ``launch_options()`` gives what ``demo.launch`` needs (theme, CSS, upload
limit, the optional login from ``WORKBENCH_USER`` / ``WORKBENCH_PASSWORD``).
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from . import chat_tab, compare_tab, jobs_tab, study_tab, train_tab
from .common import CSS, error_text, warn

TRAIN, JOBS, CHAT, COMPARE, STUDY = "train", "jobs", "chat", "compare", "study"
TITLE = "Adapter Workbench"
MAX_UPLOAD = "50mb"


def timers_for(tab: str) -> tuple:
    """The Jobs and Compare timers, each running only while its tab is shown (a hidden page polls nothing)."""
    return gr.update(active=(tab == JOBS)), gr.update(active=(tab == COMPARE))


def goto_job(service: Any, job_id: Any) -> tuple:
    """After Launch: show the Jobs tab with the new job selected (nothing when nothing was submitted).

    Returns (tabs, job dropdown, jobs timer, compare timer).
    """
    if job_id in (None, ""):
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    choices = jobs_tab.job_choices(service.list_jobs(), kind=None)
    return (gr.Tabs(selected=JOBS), gr.update(choices=choices, value=int(job_id)), *timers_for(JOBS))


def initial_job(service: Any, current: Any) -> dict:
    """On page load: keep the session's selection, else the newest running job, else the newest job."""
    jobs = service.list_jobs()
    choices = jobs_tab.job_choices(jobs, kind=None)
    ids = {j["id"] for j in jobs}
    if current in ids:
        value = current
    else:
        running = [j for j in jobs if j["status"] == "running"]
        value = (running or jobs or [{"id": None}])[0]["id"]
    return gr.update(choices=choices, value=value)


def auth_from_env() -> list[tuple[str, str]] | None:
    """The login from ``WORKBENCH_USER`` / ``WORKBENCH_PASSWORD`` (both set), else None (no login)."""
    user, password = os.environ.get("WORKBENCH_USER"), os.environ.get("WORKBENCH_PASSWORD")
    if user and password:
        return [(user, password)]
    return None


def launch_options() -> dict[str, Any]:
    """Keyword arguments for ``demo.launch``."""
    opts: dict[str, Any] = {"theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="amber"), "css": CSS,
                            "max_file_size": MAX_UPLOAD, "footer_links": []}
    auth = auth_from_env()
    if auth:
        opts["auth"] = auth
        opts["auth_message"] = "Adapter Workbench: sign in with the user and password set for this workbench."
    return opts


def build_demo(service: Any) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE} <small style='color:#64748b;font-weight:400'>— parameter-efficient "
                    "fine-tuning of language models (LoRA, series and parallel adapters, prefix and prompt "
                    "tuning), after LLM-Adapters</small>")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id=TRAIN) as train_item:
                train = train_tab.build_train_tab(service)
            with gr.Tab("Jobs", id=JOBS) as jobs_item:
                jobs = jobs_tab.build_jobs_tab(service)
            with gr.Tab("Chat", id=CHAT) as chat_item:
                chat = chat_tab.build_chat_tab(service)
            with gr.Tab("Compare", id=COMPARE) as compare_item:
                compare = compare_tab.build_compare_tab(service)
            with gr.Tab("Study", id=STUDY) as study_item:
                study = study_tab.build_study_tab(service, train)

        timers = [jobs.timer, compare.timer]
        tab_items = [(train_item, TRAIN), (jobs_item, JOBS), (chat_item, CHAT), (compare_item, COMPARE),
                     (study_item, STUDY)]
        for item, name in tab_items:
            item.select(lambda name=name: timers_for(name), None, timers, queue=False, show_progress="hidden")
            # the Study timer polls only while its tab is shown (kept apart: ``timers_for`` is the Jobs/Compare pair)
            item.select(lambda name=name: gr.update(active=(name == STUDY)), None, study.timer, queue=False,
                        show_progress="hidden")
        train.launch_event.then(lambda j: goto_job(service, j), train.launched_job, [tabs, jobs.job, *timers])
        jobs.clone_event.then(lambda s: train_tab.fill_from_spec(train, s), jobs.clone_spec,
                              train_tab.fill_outputs(train)).then(
            lambda s: (gr.Tabs(selected=TRAIN), *timers_for(TRAIN)) if s else (gr.skip(),) * 3, jobs.clone_spec,
            [tabs, *timers])

        def safe(fn, n):
            def inner(*args):
                try:
                    return fn(*args)
                except Exception as err:  # a broken database or model must not blank the page
                    warn(error_text(err))
                    return gr.skip() if n == 1 else tuple(gr.skip() for _ in range(n))
            return inner

        chat_refresh = safe(lambda p, o: chat_tab.refresh_options(service, p, o), 3)
        compare_models = safe(lambda m: compare_tab.refresh_models(service, m), 1)
        compare_results = safe(lambda m, b, o: compare_tab.results(service, m, b, o), 6)
        compare_inputs = [compare.models, compare.benchmark, compare.only_disagreeing]

        chat_item.select(chat_refresh, [chat.primary, chat.others], chat.option_outputs, show_progress="hidden")
        compare_item.select(compare_models, compare.models, compare.models, show_progress="hidden").then(
            compare_results, compare_inputs, compare.result_outputs, show_progress="hidden")
        jobs_item.select(lambda *v: jobs_tab.refresh(service, *v[:-1], {}),
                         [jobs.job, jobs.overlay, jobs.smoothing, jobs.log_scale, jobs.seen],
                         jobs.refresh_outputs, show_progress="hidden")

        plan = safe(lambda *v: train_tab.plan(train.form.as_dict(v)), 3)
        demo.load(plan, train.form.components, train.plan_outputs)
        demo.load(safe(lambda j: initial_job(service, j), 1), jobs.job, jobs.job)
        demo.load(chat_refresh, [chat.primary, chat.others], chat.option_outputs)
        study_refresh = safe(lambda s: study_tab.refresh_studies(service, s), 1)
        study_results = safe(lambda s, b: study_tab.results(service, s, b), len(study.result_outputs))
        study_base = safe(lambda b: gr.update(choices=study_tab.base_choices(service), value=b), 1)
        study_item.select(study_refresh, study.study, study.study, show_progress="hidden").then(
            study_base, study.base, study.base, show_progress="hidden")
        demo.load(study_refresh, study.study, study.study).then(
            study_results, [study.study, study.benchmark], study.result_outputs)
        demo.load(compare_models, compare.models, compare.models).then(
            compare_results, compare_inputs, compare.result_outputs)
    demo.queue(default_concurrency_limit=4)
    demo.workbench = {"train": train, "jobs": jobs, "chat": chat, "compare": compare, "study": study,
                      "tabs": tabs}
    return demo
