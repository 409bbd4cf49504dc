"""Arena tab: two anonymous models of a pool answer the same prompt; the person votes; the leaderboard moves.

The server draws the pair, generates both answers and keeps which model is which (``jobs.arena``); the
page only holds the battle's id (``gr.State``, server-side) until the vote reveals the models and, for
a benchmark prompt, the correct answer. Generation settings and prompt length are chat's
(``chat_tab.generation_settings``, ``limits.prompt_chars``); the service checks them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from app import charts
from app.chat_tab import ADAPTER_STATUSES, generation_settings, model_options
from jobs.compare import job_key

from .common import download_file, error_text, warn

VOTE_BUTTONS = (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both bad"))
TYPED, FROM_BENCHMARK = "my prompt", "a benchmark problem"
TABLE_HEADERS = ["rank", "model", "rating", "interval", "votes", "wins", "ties", "losses"]


def model_choices(service: Any) -> list[tuple[str, str]]:
    """(label, key) of every model a pool may hold: chat's list (base models, training jobs' adapters)
    and the adapters of finished merge jobs."""
    options = model_options(service)
    listed = {key for _, key in options}
    for j in service.list_jobs(kind="merge", status=list(ADAPTER_STATUSES)):
        if job_key(j["id"]) not in listed and j.get("out_dir") and \
                (Path(j["out_dir"]) / "adapter" / "adapter_config.json").is_file():
            options.append((f"#{j['id']} {j.get('name') or ''} (merge)", job_key(j["id"])))
    return options


def pool_choices(service: Any) -> list[tuple[str, int]]:
    """(label, id) of the pools this visitor may battle in."""
    return [(f"{p['name']} · {len(p['models'])} models · {p['votes']} votes{' · shared' if p['shared'] else ''}",
             p["id"]) for p in service.list_arena_pools()]


def refresh(service: Any, pool: Any, models: list[str] | None) -> tuple:
    """(pool dropdown, new-pool models dropdown, benchmark dropdown), keeping current choices still listed."""
    pools = pool_choices(service)
    ids = [v for _, v in pools]
    options = model_choices(service)
    keys = {v for _, v in options}
    benchmarks = service.arena_benchmarks()
    return (gr.update(choices=pools, value=pool if pool in ids else (ids[0] if ids else None)),
            gr.update(choices=options, value=[m for m in (models or []) if m in keys]),
            gr.update(choices=benchmarks, value=benchmarks[0] if benchmarks else None))


def create_pool(service: Any, name: Any, models: Any, shared: Any) -> tuple:
    """(pool dropdown with the new pool selected, message)."""
    try:
        pool_id = service.create_arena_pool(name, list(models or []), shared=bool(shared))
    except Exception as err:
        warn(error_text(err))
        return gr.skip(), error_text(err)
    return gr.update(choices=pool_choices(service), value=pool_id), f"Pool {pool_id} created."


def delete_pool(service: Any, pool: Any) -> tuple:
    """(pool dropdown without the pool, message); ``pool`` None = the person did not confirm."""
    if pool is None:
        return gr.skip(), ""
    try:
        name = service.get_arena_pool(pool)["name"]
        service.delete_arena_pool(pool)
    except Exception as err:
        warn(error_text(err))
        return gr.skip(), error_text(err)
    pools = pool_choices(service)
    return gr.update(choices=pools, value=pools[0][1] if pools else None), f"Pool {name!r} and its votes deleted."


def _vote_buttons(active: bool) -> list[dict]:
    return [gr.update(interactive=active) for _ in VOTE_BUTTONS]


def battle(service: Any, pool: Any, source: Any, prompt: Any, benchmark: Any, max_new_tokens: Any,
           temperature: Any, top_p: Any) -> Iterator[tuple]:
    """Start a battle and stream both answers. Yields (battle id, prompt shown, answer A, answer B,
    *vote buttons, reveal); the vote buttons come alive once both answers are in."""
    idle = (None, gr.skip(), gr.skip(), gr.skip(), *_vote_buttons(False), gr.skip())
    if pool in (None, ""):
        warn("Pick a pool first (or create one under “new pool”).")
        yield idle
        return
    typed = source != FROM_BENCHMARK
    text = (prompt if isinstance(prompt, str) else "").strip()
    most = service.deployment.limits.prompt_chars
    if typed and len(text) > most:
        warn(f"The prompt is {len(text):,} characters long; ask in at most {most:,}.")
        yield idle
        return
    try:
        settings = generation_settings(max_new_tokens, temperature, top_p)
        started = service.start_battle(pool, text if typed else None, None if typed else benchmark,
                                       settings=vars(settings))
    except Exception as err:  # bad settings, a pool not theirs, the rate limit
        warn(error_text(err))
        yield idle
        return
    shown = f"**Prompt** ({started['source'] or 'typed'}):\n\n{started['prompt']}"
    waiting = "_waiting for model A…_"
    yield (started["id"], shown, "_loading model A…_", waiting.replace("A", "B"), *_vote_buttons(False),
           "Both answer blind; vote once both are in, then see who was who.")
    a = b = ""
    try:
        for a, b in service.battle_answers(started["id"]):
            yield started["id"], gr.skip(), a or "…", b or waiting, *_vote_buttons(False), gr.skip()
    except Exception as err:  # a model that cannot answer (named only after a vote, never here)
        warn(error_text(err))
        yield None, gr.skip(), a, b, *_vote_buttons(False), error_text(err)
        return
    yield started["id"], gr.skip(), a or "_(empty answer)_", b or "_(empty answer)_", *_vote_buttons(True), \
        "Which answer is better?"


def reveal_text(result: dict[str, Any]) -> str:
    """The reveal after a vote: who was A and B, the vote, and for a benchmark the correct answer."""
    verdict = {"a": "you preferred **A**", "b": "you preferred **B**", "tie": "a **tie**",
               "both_bad": "**both bad**"}[result["vote"]]
    lines = [f"**A** was {result['label_a']} · **B** was {result['label_b']} — {verdict}."]
    if result.get("gold") is not None:
        marks = {True: "right", False: "wrong", None: "not scored"}
        lines.append(f"Correct answer: **{result['gold']}** (A {marks[result['correct_a']]}, "
                     f"B {marks[result['correct_b']]}).")
    return "\n\n".join(lines)


def cast_vote(service: Any, battle_id: Any, vote: str) -> tuple:
    """(battle id cleared, reveal, *vote buttons off); a refused vote keeps the battle."""
    if battle_id in (None, ""):
        warn("Start a battle first.")
        return (None, gr.skip(), *_vote_buttons(False))
    try:
        result = service.vote_battle(battle_id, vote)
    except Exception as err:
        warn(error_text(err))
        return (battle_id, error_text(err), *[gr.skip() for _ in VOTE_BUTTONS])
    return (None, reveal_text(result), *_vote_buttons(False))


def leaderboard(service: Any, pool: Any) -> tuple:
    """(table, ratings chart, win-rate chart, summary) of a pool; empty ones when none is picked."""
    if pool in (None, ""):
        return (gr.update(value={"headers": TABLE_HEADERS, "data": []}), charts.empty_figure("Pick a pool"),
                charts.empty_figure("Pick a pool"), "")
    board = service.arena_leaderboard(pool)
    data = [[r["rank"], r["label"], round(r["rating"]), f"{r['lower']:.0f} – {r['upper']:.0f}", r["votes"],
             r["wins"], r["ties"], r["losses"]] for r in board["rows"]]
    summary = (f"{board['n_votes']} votes in pool “{board['pool']['name']}” · Bradley-Terry ratings, pool mean "
               f"1000, {100 * board['level']:.0f}% intervals from {board['bootstrap']} bootstrap resamples")
    return (gr.update(value={"headers": TABLE_HEADERS, "data": data}),
            charts.arena_ratings_figure(board["rows"], board["level"]),
            charts.arena_win_rate_figure(board["labels"], board["win_rate"], board["games"]), summary)


def export(service: Any, pool: Any, fmt: str) -> dict:
    """The pool's votes as a CSV or JSONL download."""
    if pool in (None, ""):
        warn("Pick a pool first.")
        return gr.skip()
    text = service.arena_votes_csv(pool) if fmt == "csv" else service.arena_votes_jsonl(pool)
    return download_file(text, f"arena-pool-{int(pool)}-votes.{'csv' if fmt == 'csv' else 'jsonl'}")


# --------------------------------------------------------------------------------------------------
# Layout.

@dataclass
class ArenaTab:
    pool: Any
    refresh_button: Any
    new_name: Any
    new_models: Any
    new_shared: Any
    create_button: Any
    delete_button: Any
    create_message: Any
    source: Any
    prompt: Any
    benchmark: Any
    start_button: Any
    shown_prompt: Any
    answer_a: Any
    answer_b: Any
    vote_buttons: list[Any]
    reveal: Any
    max_new_tokens: Any
    temperature: Any
    top_p: Any
    table: Any
    ratings_plot: Any
    win_rate_plot: Any
    summary: Any
    export_csv: Any
    export_jsonl: Any
    export_file: Any
    battle: Any  # gr.State: the id of the battle awaiting a vote

    @property
    def refresh_outputs(self) -> list[Any]:
        return [self.pool, self.new_models, self.benchmark]

    @property
    def board_outputs(self) -> list[Any]:
        return [self.table, self.ratings_plot, self.win_rate_plot, self.summary]


def build_arena_tab(service: Any) -> ArenaTab:
    with gr.Row(equal_height=True):
        pool = gr.Dropdown(choices=[], value=None, label="pool", info="the models that battle (anonymously)",
                           scale=4)
        refresh_button = gr.Button("↻", size="sm", scale=0, min_width=50)
    with gr.Accordion("new pool", open=False):
        with gr.Row(equal_height=True):
            new_name = gr.Textbox(label="pool name", max_lines=1, scale=2)
            new_models = gr.Dropdown(choices=[], value=[], multiselect=True, allow_custom_value=True, scale=5,
                                     label="models", info="adapters of finished jobs, merges, base models (2-16)")
            new_shared = gr.Checkbox(value=False, label="share with everyone", info="admins only", scale=1)
            create_button = gr.Button("Create pool", scale=1)
        with gr.Row(equal_height=True):
            delete_button = gr.Button("Delete the selected pool and its votes", size="sm", variant="stop", scale=0)
        create_message = gr.Markdown("", elem_classes=["muted"])
    with gr.Row(equal_height=True):
        source = gr.Radio([TYPED, FROM_BENCHMARK], value=TYPED, label="prompt", scale=2)
        benchmark = gr.Dropdown(choices=[], value=None, label="benchmark", scale=2)
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(placeholder="A prompt both models answer, e.g. a math word problem…", show_label=False,
                            scale=6, lines=1, max_lines=6)
        start_button = gr.Button("Battle", variant="primary", scale=1, min_width=100)
    shown_prompt = gr.Markdown("")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown("**Model A**")
            answer_a = gr.Markdown("", container=True, min_height=160, elem_id="arena-answer-a")
        with gr.Column():
            gr.Markdown("**Model B**")
            answer_b = gr.Markdown("", container=True, min_height=160, elem_id="arena-answer-b")
    with gr.Row():
        vote_buttons = [gr.Button(label, interactive=False) for _, label in VOTE_BUTTONS]
    reveal = gr.Markdown("", elem_id="arena-reveal")
    with gr.Accordion("generation settings (the same for both)", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(8, 1024, value=192, step=8, label="max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature", info="0 = greedy")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p", info="used when temperature > 0")
    gr.Markdown("### Leaderboard", elem_classes=["section-title"])
    summary = gr.Markdown("", elem_classes=["muted"], elem_id="arena-summary")
    table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, wrap=True, elem_id="arena-table")
    with gr.Row():
        ratings_plot = gr.Plot(charts.empty_figure("Pick a pool"), show_label=False)
        win_rate_plot = gr.Plot(charts.empty_figure("Pick a pool"), show_label=False)
    with gr.Row():
        export_csv = gr.Button("Export votes (CSV)", size="sm")
        export_jsonl = gr.Button("Export votes (JSONL)", size="sm")
        export_file = gr.File(label="votes", visible=False, interactive=False)
    tab = ArenaTab(pool=pool, refresh_button=refresh_button, new_name=new_name, new_models=new_models,
                   new_shared=new_shared, create_button=create_button, delete_button=delete_button,
                   create_message=create_message,
                   source=source, prompt=prompt, benchmark=benchmark, start_button=start_button,
                   shown_prompt=shown_prompt, answer_a=answer_a, answer_b=answer_b, vote_buttons=vote_buttons,
                   reveal=reveal, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, table=table,
                   ratings_plot=ratings_plot, win_rate_plot=win_rate_plot, summary=summary, export_csv=export_csv,
                   export_jsonl=export_jsonl, export_file=export_file, battle=gr.State(None))
    _wire(tab, service)
    return tab


def _safe(fn: Any, n: int) -> Any:
    def inner(*args):
        try:
            return fn(*args)
        except Exception as err:  # a broken database must not blank the tab
            warn(error_text(err))
            return tuple(gr.skip() for _ in range(n))
    return inner


def _wire(tab: ArenaTab, service: Any) -> None:
    board = _safe(lambda p: leaderboard(service, p), 4)
    tab.refresh_button.click(_safe(lambda p, m: refresh(service, p, m), 3), [tab.pool, tab.new_models],
                             tab.refresh_outputs).then(board, tab.pool, tab.board_outputs)
    tab.pool.change(board, tab.pool, tab.board_outputs, show_progress="hidden")
    tab.create_button.click(lambda n, m, s: create_pool(service, n, m, s),
                            [tab.new_name, tab.new_models, tab.new_shared], [tab.pool, tab.create_message])
    tab.delete_button.click(lambda p: delete_pool(service, p), tab.pool, [tab.pool, tab.create_message],
                            js="(p) => (p !== null && confirm('Delete this pool and all its votes?')) ? p : null"
                            ).then(board, tab.pool, tab.board_outputs)

    def run(pool, source, prompt, benchmark, max_new_tokens, temperature, top_p):
        yield from battle(service, pool, source, prompt, benchmark, max_new_tokens, temperature, top_p)

    outputs = [tab.battle, tab.shown_prompt, tab.answer_a, tab.answer_b, *tab.vote_buttons, tab.reveal]
    inputs = [tab.pool, tab.source, tab.prompt, tab.benchmark, tab.max_new_tokens, tab.temperature, tab.top_p]
    tab.start_button.click(run, inputs, outputs, concurrency_limit=2)
    tab.prompt.submit(run, inputs, outputs, concurrency_limit=2)
    for (value, _), button in zip(VOTE_BUTTONS, tab.vote_buttons):
        button.click(lambda b, value=value: cast_vote(service, b, value), tab.battle,
                     [tab.battle, tab.reveal, *tab.vote_buttons]).then(board, tab.pool, tab.board_outputs)
    tab.export_csv.click(lambda p: export(service, p, "csv"), tab.pool, tab.export_file)
    tab.export_jsonl.click(lambda p: export(service, p, "jsonl"), tab.pool, tab.export_file)
