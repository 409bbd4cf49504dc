"""The Jobs tab's workers panel: the workers taking jobs from this queue, live or stale, their devices
and running jobs. Plain views of ``JobService.list_workers``, which leaves hosts and tags out for a
public visitor and lists only the visitor's own jobs on each worker (the others as a count)."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from .common import fmt_duration

WORKER_HEADERS = ["worker", "state", "devices", "running jobs", "host"]


def worker_state(worker: dict[str, Any]) -> str:
    """``live``, or ``stale`` with the age of its last heartbeat in whole minutes (stable between polls)."""
    if worker["live"]:
        return "● live"
    minutes = int(worker["heartbeat_age_s"] // 60)
    return f"○ stale, silent {fmt_duration(60 * minutes)}" if minutes else \
        f"○ stale, silent over its {worker['lease_s']:g}s lease"


def worker_rows(workers: list[dict[str, Any]]) -> list[list[Any]]:
    """The workers' table: live ones first; host and tag blank where the service left them out."""
    rows = []
    for w in workers:
        jobs = ", ".join(f"#{i}" for i in w["jobs"])
        others = w["running"] - len(w["jobs"])
        if others:
            jobs = ", ".join(filter(None, [jobs, f"{others} other{'s' if others > 1 else ''}"]))
        rows.append([w["tag"] or f"worker {w['id']}", worker_state(w), w["summary"], jobs or "idle",
                     w["host"] or ""])
    return rows


def refresh_workers(service: Any, seen: str | None) -> tuple[Any, str | None]:
    """The timer's poll of the workers: (table, seen), the table skipped when nothing shown changed."""
    rows = worker_rows(service.list_workers())
    sig = json.dumps(rows)
    return (gr.skip(), seen) if sig == seen else (rows, sig)


def build_workers_panel() -> Any:
    """The panel (a closed accordion under the jobs table); returns its table."""
    with gr.Accordion("Workers", open=False):
        gr.Markdown("The workers taking jobs from this queue, on this machine or on others sharing the database "
                    "and the runs directory. A worker is stale when it has not been heard from for longer than its "
                    "lease; any live worker then marks its running jobs interrupted (Resume continues them).",
                    elem_classes="muted")
        return gr.Dataframe(headers=WORKER_HEADERS, value=[], interactive=False, max_height=200, wrap=False)
