"""The page: seven tabs (Train, Jobs, Chat, Compare, Merge, Study, Arena) wired to one ``JobService``.

``build_demo(service, deployment)`` draws the header (the mode and who you are) and the tabs and the
few links between them (Launch jumps to the job; Clone fills the Train tab). The tabs never see the
service itself: they hold an ``app.auth.ScopedService``, and every event function is wrapped by
``app.auth.protect`` so that each call runs as the caller it resolved on the server.
``launch_options(deployment, logins)`` gives what ``demo.launch`` needs; ``serve`` launches a page with
the middlewares of its mode (visitor cookie, login rate limit) and ``start_app`` does it all on a free
port for tests.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import gradio as gr

from core.deployment import LOCAL_USER, Deployment
from core.deployment import current as current_deployment
from core.deployment import using

from . import arena_tab, chat_tab, compare_tab, job_text, jobs_tab, merge_tab, study_tab, train_tab
from .auth import BUILD_ACTOR, Identify, ScopedService, acting_as, current_actor, identity_line, protect
from .logins import Logins, load_logins
from .visitors import LOGIN_FAILURES, LOGIN_WINDOW_S, LoginRateLimiter, middleware_for
from .common import CSS, error_text, warn

TRAIN, JOBS, CHAT, COMPARE, STUDY, ARENA = "train", "jobs", "chat", "compare", "study", "arena"
MERGE = "merge"
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
    choices = job_text.job_choices(service.list_jobs(), kind=None)
    return (gr.Tabs(selected=JOBS), gr.update(choices=choices, value=int(job_id)), *timers_for(JOBS))


def initial_job(service: Any, current: Any) -> dict:
    """On page load: keep the session's selection, else the newest running job, else the newest job."""
    jobs = service.list_jobs()
    choices = job_text.job_choices(jobs, kind=None)
    ids = {j["id"] for j in jobs}
    if current in ids:
        value = current
    else:
        running = [j for j in jobs if j["status"] == "running"]
        value = (running or jobs or [{"id": None}])[0]["id"]
    return gr.update(choices=choices, value=value)


_FROM_ENV: Any = object()


def launch_options(deployment: Deployment | None = None, logins: Logins | None = _FROM_ENV) -> dict[str, Any]:
    """Keyword arguments for ``demo.launch`` in ``deployment``'s mode (default: this process's).

    ``logins`` (default: from the environment, ``app.auth.load_logins``) turn on the login page. Local
    mode listens on 127.0.0.1, team and public on 0.0.0.0 (``GRADIO_SERVER_NAME`` overrides both);
    outside local mode Gradio's monitoring page and server-side rendering are off (the middlewares
    must see the browser's own requests).
    """
    deployment = deployment or current_deployment()
    if logins is _FROM_ENV:
        logins = load_logins()
    opts: dict[str, Any] = {"theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="amber"), "css": CSS,
                            "max_file_size": int(deployment.limits.upload_file_bytes) or MAX_UPLOAD,
                            "footer_links": [],
                            "server_name": os.environ.get("GRADIO_SERVER_NAME")
                            or ("127.0.0.1" if deployment.local else "0.0.0.0")}
    if not deployment.local:
        opts["enable_monitoring"] = False
        opts["ssr_mode"] = False
    if logins is not None:
        opts["auth"] = logins.auth()
        opts["auth_message"] = (("Adapter Workbench: sign in with your user name and password."
                                 if deployment.mode == "team" else
                                 "Adapter Workbench: sign in with the user and password set for this workbench.")
                                + f" After {LOGIN_FAILURES} failed attempts, sign-ins from your address pause for "
                                  f"{LOGIN_WINDOW_S / 60:g} minutes.")
    return opts


def serve(demo: gr.Blocks, deployment: Deployment | None = None, logins: Logins | None = _FROM_ENV, *,
          host: str | None = None, port: int | None = None, block: bool = False, quiet: bool = False,
          limiter: LoginRateLimiter | None = None) -> str:
    """Launch ``demo`` with its mode's middlewares (visitor cookie, login rate limit); return its URL.

    Every event function is protected again first (``app.auth.protect``), so handlers registered after
    ``build_demo`` resolve their caller too. ``block``: serve until interrupted (``app.py``);
    otherwise the server runs in a thread until ``demo.close()``.
    """
    deployment = deployment or getattr(demo, "_workbench_identity", (None,))[0] or current_deployment()
    if logins is _FROM_ENV:
        logins = load_logins()
    if getattr(demo, "_workbench_identity", None):
        protect(demo)
    else:
        protect(demo, deployment)
    opts = launch_options(deployment, logins)
    if host is not None:
        opts["server_name"] = host
    if port is not None:
        opts["server_port"] = port
    opts["app_kwargs"] = {"middleware": middleware_for(deployment, logins, limiter)}
    _, url, _ = demo.launch(prevent_thread_lock=not block, quiet=quiet, **opts)
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(service: Any, deployment: Deployment | None = None, identify: Identify | None = None,
              logins: Logins | None = None, *, limiter: LoginRateLimiter | None = None
              ) -> tuple[str, Callable[[], None]]:
    """Build the whole page on ``service`` and serve it on 127.0.0.1 on a free port, in this process.

    Returns ``(url, close)``. For tests: ``identify`` injects identities (``app.auth.default_identify``
    by default), ``logins`` turns on the login page (none by default: the environment is not read).
    """
    demo = build_demo(service, deployment, identify)
    url = serve(demo, None, logins, host="127.0.0.1", port=free_port(), quiet=True,
                limiter=limiter)
    return url, demo.close


def build_demo(service: Any, deployment: Deployment | None = None, identify: Identify | None = None) -> gr.Blocks:
    """The page on ``service`` in ``deployment``'s mode (default: the service's, else this process's).

    ``identify(request, deployment) -> Actor`` resolves the caller of every event (default
    ``app.auth.default_identify``; tests inject identities here, e.g. an OAuth-like ``hf:bob``).
    """
    if isinstance(service, ScopedService):
        deployment = deployment or service.deployment
        service = service._base
    own = getattr(service, "deployment", None)
    deployment = deployment or own or current_deployment()
    if own is not None and own != deployment:
        raise ValueError(f"the service runs in {own.mode} mode with other rules than the page ({deployment.mode})")
    service = ScopedService(service, deployment)
    # While the page is built there is no caller: in local mode it is the local user, elsewhere an actor
    # that owns nothing, so no one's jobs end up in the page every visitor receives.
    with acting_as(LOCAL_USER if deployment.local else BUILD_ACTOR), using(deployment), \
            gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## {TITLE} <small style='color:#64748b;font-weight:400'>— parameter-efficient "
                    "fine-tuning of language models: LLM-Adapters' series, parallel, LoRA and prompt methods, "
                    "with DoRA, rsLoRA, PiSSA, (IA)³, VeRA, LoReFT and QLoRA; merges and a blind arena</small>")
        with gr.Row(equal_height=True):
            who = gr.Markdown(identity_line(deployment, None), elem_id="workbench-identity",
                              elem_classes=["muted"])
            if deployment.oauth:  # off a Space, Gradio would sign every visitor in as this machine's account
                gr.LoginButton(size="sm", scale=0)
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id=TRAIN) as train_item:
                train = train_tab.build_train_tab(service)
            with gr.Tab("Jobs", id=JOBS) as jobs_item:
                jobs = jobs_tab.build_jobs_tab(service)
            with gr.Tab("Chat", id=CHAT) as chat_item:
                chat = chat_tab.build_chat_tab(service)
            with gr.Tab("Compare", id=COMPARE) as compare_item:
                compare = compare_tab.build_compare_tab(service)
            with gr.Tab("Merge", id=MERGE) as merge_item:
                merge = merge_tab.build_merge_tab(service)
            with gr.Tab("Study", id=STUDY) as study_item:
                study = study_tab.build_study_tab(service, train)
            with gr.Tab("Arena", id=ARENA) as arena_item:
                arena = arena_tab.build_arena_tab(service)

        timers = [jobs.timer, compare.timer]
        tab_items = [(train_item, TRAIN), (jobs_item, JOBS), (chat_item, CHAT), (compare_item, COMPARE),
                     (study_item, STUDY), (arena_item, ARENA), (merge_item, MERGE)]
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
        compare_results = safe(lambda m, b, o: compare_tab.results(service, m, b, o), len(compare.result_outputs))
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
        demo.load(lambda: whoami(deployment), None, who, show_progress="hidden")
        merge_refresh = safe(lambda p, m: merge_tab.refresh(service, p, m), 2)
        merge_item.select(merge_refresh, [merge.parents, merge.merge_job], [merge.parents, merge.merge_job],
                          show_progress="hidden")
        merge.compare_event.then(safe(lambda k: (compare_tab.refresh_models(service, k), gr.Tabs(selected=COMPARE),
                                                 *timers_for(COMPARE)) if k else (gr.skip(),) * 4, 4),
                                 merge.compare_models, [compare.models, tabs, *timers]).then(
            compare_results, compare_inputs, compare.result_outputs)
        arena_refresh = safe(lambda p, m: arena_tab.refresh(service, p, m), 3)
        arena_board = safe(lambda p: arena_tab.leaderboard(service, p), 4)
        arena_item.select(arena_refresh, [arena.pool, arena.new_models], arena.refresh_outputs,
                          show_progress="hidden").then(arena_board, arena.pool, arena.board_outputs)
        demo.load(arena_refresh, [arena.pool, arena.new_models], arena.refresh_outputs).then(
            arena_board, arena.pool, arena.board_outputs)
    demo.queue(default_concurrency_limit=4)
    demo.workbench = {"train": train, "jobs": jobs, "chat": chat, "compare": compare, "study": study,
                      "arena": arena, "merge": merge, "tabs": tabs, "who": who}
    protect(demo, deployment, identify)
    return demo


def whoami(deployment: Deployment) -> str:
    """The header line for the caller (a sign-out link in team mode)."""
    line = identity_line(deployment, current_actor(deployment))
    return f"{line} · [sign out](logout)" if deployment.mode == "team" else line
