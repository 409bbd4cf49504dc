"""The Jobs tab's words for a job: its table row (method, progress, worker), its choice label and the
few lines shown about the selected one (facts, trackers, error). Pure views of the service's job dicts."""

from __future__ import annotations

from typing import Any

from core.deployment import current as current_deployment
from jobs.devices import GiB
from jobs.merges import MERGE_KINDS

from .common import fmt_duration, fmt_float
from .merge_tab import merge_facts

STATUS_ICONS = {"queued": "○", "running": "▶", "succeeded": "✓", "failed": "✗", "cancelled": "■",
                "interrupted": "!"}
DONE_WHEN_FINISHED = ("evaluate", "export", "merge", "lmeval")  # kinds whose finished row reads done


def method_of(job: dict[str, Any]) -> str:
    return ((job.get("spec") or {}).get("adapter") or {}).get("method", "")


def method_text(job: dict[str, Any]) -> str:
    """The method column: the adapter method, and for a merge or weight search the merge method too."""
    merge = (job.get("info") or {}).get("merge") or {}
    if job.get("kind") in MERGE_KINDS and merge.get("method"):
        return f"{method_of(job)} · {merge['method']}"
    return method_of(job)


def progress_text(job: dict[str, Any]) -> str:
    """The table's progress cell: the fraction done of the current step, named while it is not training
    (converting the model, evaluating a benchmark, exporting, merging: ``core.progress`` reports)."""
    p = job.get("progress") or {}
    step, total, phase = p.get("step") or 0, p.get("total"), p.get("phase")
    running = job.get("status") == "running"
    if not running and job.get("kind") in DONE_WHEN_FINISHED:
        return phase or ("done" if job["status"] == "succeeded" else "")
    if total:
        fraction = f"{step}/{total} ({100 * step / total:.0f}%)"
        return f"{phase}: {fraction}" if running and phase and phase != "training" else fraction
    if running:
        return phase or "starting"
    return ""


def ran_on(job: dict[str, Any]) -> str:
    """The worker a job ran (or runs) on: its tag, or the ``host:pid`` it recorded; '' when not shown."""
    where = job.get("ran_on") or {}
    return where.get("tag") or job.get("worker") or ""


def needs_text(job: dict[str, Any]) -> str:
    """What a job needs of a worker, e.g. ``cuda ×2, 40 GiB each``; '' for one process on any device."""
    needs = job.get("needs") or {}
    device, n, memory = needs.get("device") or "auto", needs.get("processes") or 1, needs.get("gpu_memory")
    if device == "auto" and n == 1 and not memory:
        return ""
    text = f"{device} ×{n}" if n > 1 else device
    return text + (f", {memory / GiB:g} GiB each" if memory and device != "cpu" else "")


def job_rows(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    """The table: one row per job, newest first."""
    rows = []
    for j in jobs:
        p = j.get("progress") or {}
        eta = fmt_duration(p.get("eta_s")) if j["status"] == "running" else ""
        rows.append([j["id"], j.get("name") or "", j.get("kind") or "", method_text(j),
                     f"{STATUS_ICONS.get(j['status'], '')} {j['status']}", progress_text(j), eta,
                     fmt_float(j.get("best_val_loss")), (j.get("created_at") or "")[:16].replace("T", " "),
                     ran_on(j)])
    return rows


def job_label(job: dict[str, Any]) -> str:
    return f"#{job['id']} {job.get('name') or ''} · {job['status']}"


def job_choices(jobs: list[dict[str, Any]], kind: str | None = "train") -> list[tuple[str, int]]:
    return [(job_label(j), j["id"]) for j in jobs if kind is None or j.get("kind") == kind]


def status_markdown(job: dict[str, Any] | None) -> str:
    """A few lines about one job: status, progress, losses, trainable parameters, the error if it failed."""
    if not job:
        return "Select a job in the table (or launch one from the Train tab)."
    p = job.get("progress") or {}
    info = job.get("info") or {}
    lines = [f"### {STATUS_ICONS.get(job['status'], '')} #{job['id']} {job.get('name') or ''} — {job['status']}"]
    facts = []
    if job.get("kind") == "train":
        facts.append(f"method **{method_of(job)}**")
        model = ((job.get("spec") or {}).get("model") or {}).get("name")
        if model:
            facts.append(f"base `{model}`")
    elif job.get("kind") in MERGE_KINDS:
        facts.extend(merge_facts(job))
    if p.get("total"):
        facts.append(f"step **{p.get('step') or 0}/{p['total']}**")
    if job["status"] == "running" and p.get("phase"):
        facts.append(f"phase {p['phase']}")
    if job["status"] == "running" and p.get("eta_s") is not None:
        facts.append(f"ETA **{fmt_duration(p['eta_s'])}**")
    if p.get("loss") is not None:
        facts.append(f"loss {fmt_float(p['loss'])}")
    if job.get("best_val_loss") is not None:
        facts.append(f"best val loss **{fmt_float(job['best_val_loss'])}**")
    if info.get("trainable"):
        facts.append(f"{info['trainable']:,} trainable ({info.get('percent', 0):.3f}%)")
    if job.get("duration_s"):
        facts.append(f"ran {fmt_duration(job['duration_s'])}")
    if job.get("resumes_job_id"):
        facts.append(f"resumes #{job['resumes_job_id']}")
    if job.get("target_job_id"):
        facts.append(f"evaluates #{job['target_job_id']}")
    if needs_text(job):
        facts.append(f"needs {needs_text(job)}")
    where = job.get("ran_on") or {}
    if where.get("tag"):
        facts.append(f"worker **{where['tag']}**" + (f" on {where['host']}" if where.get("host") else ""))
    elif job.get("worker"):
        facts.append(f"worker {job['worker']}")
    lines.append(" · ".join(facts))
    trackers = tracker_markdown(job, public=current_deployment().public)
    if trackers:
        lines.append(trackers)
    if job.get("cancel_requested") and job["status"] == "running":
        lines.append("_Cancel requested: the job stops at its next step and saves its adapter._")
    if job.get("error"):
        lines.append(f"\n**Error:** {job['error']}")
    return "\n\n".join(lines)


def tracker_markdown(job: dict[str, Any], public: bool) -> str:
    """Where the job's experiment trackers (``core.trackers``) show its run: a link where the tracker has a
    page (W&B online, an MLflow server, a trackio Space or server), else the command that shows the local
    store; not for public visitors, to whom the server's paths and commands are no use."""
    parts = []
    for link in (job.get("result") or {}).get("trackers") or []:
        label = link.get("label") or link.get("tracker")
        if link.get("error"):
            parts.append(f"{label} failed" + ("" if public else f": {link['error']}"))
        elif link.get("url"):
            parts.append(f"[{label} run ↗]({link['url']})")
        elif not public and link.get("view"):
            parts.append(f"{label}: `{link['view']}`")
    return "**Trackers:** " + " · ".join(parts) if parts else ""
