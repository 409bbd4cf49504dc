"""The Merge tab: combine finished LoRA-family adapters into a new one, as a merge job (``core.merge``).

Pick the parents (this user's finished training or merge jobs of a method that merges), their weights,
the merge method and its settings; the heat maps show ``||ΔW||`` per layer and module of each parent
(``JobService.adapter_norms``, read from the saved factors) and the plan its rank and size
(``plan_merge``): nothing is merged in the web process. Launch queues the job; afterwards the result's
heat map and retained energy show here, and "Compare with parents" opens the Compare tab on the merge
and its parents. "Search the weights" queues a weight-search job instead (``JobService.submit_weight_search``):
the same parents, method and settings, the weights above as its first point, each point scored on a benchmark
slice; its result shows here with the score of each point tried. Handlers are plain functions of the service
and widget values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from core import methods
from core.fields import ConfigError
from core.merge import MERGE_METHODS, USES_DENSITY, USES_DROP
from jobs.compare import job_key
from jobs.merges import ADAPTER_KINDS, MERGE_KINDS
from jobs.schema import ACTIVE

from .charts import delta_heatmaps, empty_figure, search_figure
from .common import error_text, error_update, guarded
from .train_tab import benchmark_choices


def parent_choices(service: Any) -> list[tuple[str, int]]:
    """(label, id) of this user's finished adapter jobs of a method that merges, newest first."""
    out = []
    for job in service.list_jobs():
        if job["kind"] not in ADAPTER_KINDS or job["status"] in ACTIVE:
            continue
        method = ((job.get("spec") or {}).get("adapter") or {}).get("method")
        if method in methods.names() and methods.get(method).merge_family:
            out.append((f"#{job['id']} {job.get('name') or ''} · {methods.label(method)}", job["id"]))
    return out


def merge_choices(service: Any) -> list[tuple[str, int]]:
    """(label, id) of this user's merge and weight-search jobs, newest first."""
    return [(f"#{j['id']} {j.get('name') or ''} · {j['status']}", j["id"]) for j in service.list_jobs()
            if j["kind"] in MERGE_KINDS]


def parse_weights(text: Any, n: int) -> list[float]:
    """``"0.5, 0.5"`` -> [0.5, 0.5]; empty -> equal weights summing to 1. ``ConfigError`` otherwise."""
    text = (text or "").strip() if isinstance(text, str) else text
    if not text:
        return [1.0 / n] * n if n else []
    try:
        return [float(part) for part in str(text).replace(";", ",").split(",")]
    except ValueError:
        raise ConfigError("weights", f"expected numbers separated by commas, got {str(text)[:60]!r}") from None


def settings_from_form(parents: list[Any], method: str, weights: Any, rank: Any, density: Any, drop: Any,
                       seed: Any) -> dict[str, Any]:
    """The merge settings (``core.merge.MergeSettings`` as a dict) of the form; the service validates them.
    A rank of 0 or empty means the largest parent rank."""
    rank_value = None if rank in (None, "", 0) else rank
    if isinstance(rank_value, float) and rank_value.is_integer():
        rank_value = int(rank_value)
    seed_value = int(seed) if isinstance(seed, float) and seed.is_integer() else seed
    return {"method": method, "weights": parse_weights(weights, len(parents or [])), "rank": rank_value,
            "density": density, "drop": drop, "seed": seed_value}


def _ids(parents: Any) -> list[int]:
    return [int(p) for p in (parents or [])]


def preview(service: Any, parents: Any, method: str, weights: Any, rank: Any, density: Any, drop: Any,
            seed: Any) -> tuple[Any, str, dict]:
    """(the parents' heat maps, the plan as Markdown, the error box) for the form as it stands."""
    ids = _ids(parents)
    try:
        figure = delta_heatmaps([(f"#{i}", service.adapter_norms(i)) for i in ids])
    except Exception as err:  # a parent of a method that cannot merge, or its files gone
        return gr.skip(), "", error_update(error_text(err))
    if not ids:
        return figure, "", error_update(None)
    try:
        plan = service.plan_merge(ids, settings_from_form(ids, method, weights, rank, density, drop, seed))
    except Exception as err:  # a bad setting or an incompatible parent: said in the box, the maps stay
        return figure, "", error_update(error_text(err))
    text = (f"**{MERGE_METHODS[method]}**: rank **{plan['rank']}**, {plan['params']:,} parameters "
            f"({plan['bytes'] / 2**20:.1f} MB in fp32)")
    return figure, text, error_update(None)


def launch(service: Any, parents: Any, method: str, weights: Any, rank: Any, density: Any, drop: Any, seed: Any,
           benchmarks: list[str] | None, evaluate_parents: bool, name: str | None) -> tuple[dict, str, Any]:
    """Queue the merge: (error box, status Markdown, the new job id for the results dropdown, or skip)."""
    ids = _ids(parents)
    try:
        job_id = service.submit_merge(ids, settings_from_form(ids, method, weights, rank, density, drop, seed),
                                      name=(name or "").strip() or None, benchmarks=list(benchmarks or []),
                                      evaluate_parents=bool(evaluate_parents))
    except Exception as err:
        return error_update(error_text(err)), "", gr.skip()
    done = f"; evaluated on {', '.join(benchmarks)} when done" if benchmarks else ""
    return (error_update(None), f"Queued merge job **#{job_id}**{done}. Its progress is in the Jobs tab.",
            gr.update(choices=merge_choices(service), value=job_id))


def _whole(value: Any) -> Any:
    """A whole number from a ``gr.Number`` (which gives floats), anything else as it is (the service checks)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def launch_search(service: Any, parents: Any, method: str, weights: Any, rank: Any, density: Any, drop: Any,
                  seed: Any, benchmark: Any, limit: Any, budget: Any, low: Any, high: Any, search_seed: Any,
                  name: str | None) -> tuple[dict, str, Any]:
    """Queue a weight search: (error box, status Markdown, the new job id for the results dropdown, or skip)."""
    ids = _ids(parents)
    try:
        job_id = service.submit_weight_search(
            ids, settings_from_form(ids, method, weights, rank, density, drop, seed),
            {"budget": _whole(budget), "low": low, "high": high, "seed": _whole(search_seed)},
            benchmark if isinstance(benchmark, str) else "", eval_settings={"limit": _whole(limit)},
            name=(name or "").strip() or None)
    except Exception as err:
        return error_update(error_text(err)), "", gr.skip()
    return (error_update(None), f"Queued weight-search job **#{job_id}**: {_whole(budget)} points scored on "
                                f"`{benchmark}`. Each point's score shows below and in the Jobs tab as it comes.",
            gr.update(choices=merge_choices(service), value=job_id))


def search_chart(service: Any, job_id: Any) -> dict:
    """The chart of a weight search's scored points (hidden for a plain merge)."""
    if job_id in (None, ""):
        return gr.update(visible=False)
    job = service.get(int(job_id))
    if job["kind"] != "weight-search":
        return gr.update(visible=False)
    figure = search_figure([(f"#{job['id']}", service.metrics(job["id"]))]) if job["status"] != "queued" else \
        empty_figure("Queued: each point appears as soon as the search has scored it")
    return gr.update(value=figure, visible=True)


def result(service: Any, merge_id: Any) -> tuple[Any, str]:
    """(the result's heat map next to its parents', Markdown with its status and retained energy)."""
    if merge_id in (None, ""):
        return delta_heatmaps([]), "Choose a merge job."
    job = service.get(int(merge_id))
    info = job.get("info") or {}
    parents = info.get("parents") or []
    lines = [f"**#{job['id']}** " + " · ".join(merge_facts(job)) + f" — {job['status']}"]
    if job["status"] != "succeeded":
        if job.get("error"):
            lines.append(f"**Error:** {job['error']}")
        return delta_heatmaps([]), "\n\n".join(lines)
    report = service.merge_report(job["id"]) or {}
    energy = report.get("energy")
    if energy is not None:
        exact = " (exact)" if energy >= 1 - 1e-9 else ""
        lines.append(f"rank **{report['rank']}**, {report['params']:,} parameters, retained energy "
                     f"**{100 * energy:.2f}%**{exact}")
        worst = sorted(report.get("module_energy", {}).items(), key=lambda kv: kv[1])[:3]
        if worst and energy < 1 - 1e-9:
            lines.append("least kept: " + ", ".join(f"`{m}` {100 * e:.1f}%" for m, e in worst))
    tables = []
    for i in [job["id"], *parents]:
        try:
            tables.append((f"#{i}" + (" (merge)" if i == job["id"] else ""), service.adapter_norms(i)))
        except Exception as err:  # a parent deleted since: the merge still shows
            lines.append(f"#{i}: {error_text(err)}")
    return delta_heatmaps(tables), "\n\n".join(lines)


def merge_facts(job: dict[str, Any]) -> list[str]:
    """What a merge or weight-search job combines, and the best mixture a finished search found."""
    info, result = job.get("info") or {}, job.get("result") or {}
    parents = ", ".join(f"#{p}" for p in info.get("parents") or [])
    facts = [f"{info.get('method_label') or (info.get('merge') or {}).get('method', '')} of {parents}"]
    if job.get("kind") == "weight-search":
        search = info.get("search") or {}
        bench = ", ".join((job.get("spec") or {}).get("eval", {}).get("benchmarks") or [])
        facts.append(f"{search.get('budget')} points in [{search.get('low')}, {search.get('high')}] "
                     f"scored on `{bench}`")
        if result.get("weights") is not None:
            weights = ", ".join(f"{w:.3f}" for w in result["weights"])
            facts.append(f"best **#{result.get('best_point')}** ({weights}): accuracy "
                         f"**{100 * result.get('score', 0):.1f}%**")
    elif (info.get("merge") or {}).get("weights") is not None:
        facts.append(f"weights {info['merge']['weights']}")
    return facts


def compare_keys(service: Any, merge_id: Any) -> list[str]:
    """The Compare tab's model keys for a merge job and its parents (empty when none is chosen)."""
    if merge_id in (None, ""):
        return []
    job = service.get(int(merge_id))
    return [job_key(i) for i in [*((job.get("info") or {}).get("parents") or []), job["id"]]]


def setting_visibility(method: str) -> tuple[dict, dict, dict, dict]:
    """Show density for TIES and magnitude prune, drop and seed for DARE, rank for all but cat."""
    return (gr.update(visible=method in USES_DENSITY), gr.update(visible=method in USES_DROP),
            gr.update(visible=method in USES_DROP), gr.update(visible=method != "cat"))


# --------------------------------------------------------------------------------------------------
# Layout.

@dataclass
class MergeTab:
    parents: Any
    refresh_button: Any
    weights: Any
    method: Any
    rank: Any
    density: Any
    drop: Any
    seed: Any
    benchmarks: Any
    evaluate_parents: Any
    name: Any
    plan: Any
    message: Any
    heatmap: Any
    launch_button: Any
    status: Any
    search_benchmark: Any
    search_limit: Any
    search_budget: Any
    search_low: Any
    search_high: Any
    search_seed: Any
    search_button: Any
    merge_job: Any
    search_plot: Any
    result_text: Any
    result_map: Any
    compare_button: Any
    compare_event: Any  # the Compare button's event: the page then opens the Compare tab
    compare_models: Any  # gr.State: the model keys it opens with

    @property
    def form(self) -> list[Any]:
        return [self.parents, self.method, self.weights, self.rank, self.density, self.drop, self.seed]


def build_merge_tab(service: Any) -> MergeTab:
    with gr.Row(equal_height=True):
        parents = gr.Dropdown(choices=[], value=[], multiselect=True, label="adapters to merge", scale=4,
                              info="your finished LoRA-family jobs (LoRA, rsLoRA, PiSSA/OLoRA, DoRA) on one base")
        refresh_button = gr.Button("↻", size="sm", scale=0, min_width=50)
    with gr.Row(equal_height=True):
        method = gr.Dropdown(choices=[(label, key) for key, label in MERGE_METHODS.items()], value="ties",
                             label="method", scale=2)
        weights = gr.Textbox(label="weights", placeholder="0.5, 0.5 (empty = equal)", scale=2)
        rank = gr.Number(value=0, precision=0, label="rank r′", info="0 = the largest parent rank", scale=1)
        density = gr.Slider(0.01, 1.0, value=0.2, step=0.01, label="density (kept fraction)", scale=2)
        drop = gr.Slider(0.0, 0.99, value=0.5, step=0.01, label="DARE drop p", visible=False, scale=2)
        seed = gr.Number(value=0, precision=0, label="seed", visible=False, scale=1)
    with gr.Row(equal_height=True):
        benchmarks = gr.CheckboxGroup(choices=benchmark_choices(), value=[], label="evaluate the result on", scale=3)
        evaluate_parents = gr.Checkbox(value=True, label="evaluate parents lacking these too", scale=1)
        name = gr.Textbox(label="name", placeholder="merge ties of #1, #2", scale=1)
    plan = gr.Markdown("")
    message = gr.Markdown("", visible=False, elem_classes="error-box")
    heatmap = gr.Plot(delta_heatmaps([]), show_label=False)
    launch_button = gr.Button("Merge", variant="primary")
    with gr.Accordion("Search the weights (a job scoring mixtures on a benchmark slice)", open=False):
        with gr.Row(equal_height=True):
            search_benchmark = gr.Dropdown(choices=benchmark_choices(), value="builtin:math", allow_custom_value=True,
                                           label="score on", scale=3,
                                           info="a benchmark, builtin:math?ops=add,sub, or a file of labelled examples")
            search_limit = gr.Number(value=20, precision=0, label="examples", info="0 = all", scale=1)
            search_budget = gr.Number(value=12, precision=0, label="points", info="the weights above first", scale=1)
            search_low = gr.Number(value=0.0, label="lowest weight", scale=1)
            search_high = gr.Number(value=1.0, label="highest weight", scale=1)
            search_seed = gr.Number(value=0, precision=0, label="search seed", scale=1)
        search_button = gr.Button("Search the weights")
    status = gr.Markdown("")
    gr.Markdown("### Results", elem_classes="section-title")
    with gr.Row(equal_height=True):
        merge_job = gr.Dropdown(choices=[], value=None, label="merge job", scale=3)
        compare_button = gr.Button("Compare with parents", scale=1)
    result_text = gr.Markdown("")
    search_plot = gr.Plot(empty_figure(), show_label=False, visible=False)
    result_map = gr.Plot(delta_heatmaps([]), show_label=False)
    tab = MergeTab(parents=parents, refresh_button=refresh_button, weights=weights, method=method, rank=rank,
                   density=density, drop=drop, seed=seed, benchmarks=benchmarks, evaluate_parents=evaluate_parents,
                   name=name, plan=plan, message=message, heatmap=heatmap, launch_button=launch_button,
                   status=status, search_benchmark=search_benchmark, search_limit=search_limit,
                   search_budget=search_budget, search_low=search_low, search_high=search_high,
                   search_seed=search_seed, search_button=search_button, merge_job=merge_job,
                   search_plot=search_plot, result_text=result_text, result_map=result_map,
                   compare_button=compare_button, compare_event=None, compare_models=gr.State([]))
    _wire(tab, service)
    return tab


def refresh(service: Any, parents: Any, merge_id: Any) -> tuple[dict, dict]:
    """Fresh choices for the parents and merge-job dropdowns, keeping what is still there."""
    options = parent_choices(service)
    have = {v for _, v in options}
    merges = merge_choices(service)
    return (gr.update(choices=options, value=[p for p in _ids(parents) if p in have]),
            gr.update(choices=merges, value=merge_id if merge_id in {v for _, v in merges} else None))


def _wire(tab: MergeTab, service: Any) -> None:
    show_plan = guarded(3)(lambda *v: preview(service, *v))
    plan_out = [tab.heatmap, tab.plan, tab.message]
    tab.refresh_button.click(guarded(2)(lambda p, m: refresh(service, p, m)), [tab.parents, tab.merge_job],
                             [tab.parents, tab.merge_job])
    for widget in tab.form:
        widget.change(show_plan, tab.form, plan_out, trigger_mode="always_last", show_progress="hidden")
    tab.method.change(setting_visibility, tab.method, [tab.density, tab.drop, tab.seed, tab.rank])
    tab.launch_button.click(guarded(3, 0)(lambda *v: launch(service, *v)),
                            [*tab.form, tab.benchmarks, tab.evaluate_parents, tab.name],
                            [tab.message, tab.status, tab.merge_job])
    tab.search_button.click(guarded(3, 0)(lambda *v: launch_search(service, *v)),
                            [*tab.form, tab.search_benchmark, tab.search_limit, tab.search_budget, tab.search_low,
                             tab.search_high, tab.search_seed, tab.name], [tab.message, tab.status, tab.merge_job])
    tab.merge_job.change(guarded(2)(lambda m: result(service, m)), tab.merge_job, [tab.result_map, tab.result_text])
    tab.merge_job.change(guarded(1)(lambda m: search_chart(service, m)), tab.merge_job, tab.search_plot)
    tab.compare_event = tab.compare_button.click(guarded(1)(lambda m: compare_keys(service, m)), tab.merge_job,
                                                 tab.compare_models)
