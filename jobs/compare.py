"""Comparison of models on benchmarks: the matrix, its CSV/Markdown export, and where models disagree.

Part of the service API (``JobService`` inherits these methods); reads only the database. Also the
one definition of a *model key*, how the UI, the CLI and the matrix name a model: ``job:<id>`` for a
training job's adapter, ``base:<name>`` for a bare base model.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

JOB_KEY, BASE_KEY = "job:", "base:"


def job_key(job_id: int | str) -> str:
    """The key of training job ``job_id``'s adapter: ``job:<id>``."""
    return f"{JOB_KEY}{job_id}"


def base_key(name: str) -> str:
    """The key of the bare base model ``name``: ``base:<name>``."""
    return f"{BASE_KEY}{name}"


def model_key(evaluation: dict[str, Any]) -> str:
    """The key of the model an evaluation scored: its adapter's job, else its base model."""
    if evaluation.get("job_id") is not None:
        return job_key(evaluation["job_id"])
    return base_key(evaluation["base_model"])


def parse_model_key(key: Any) -> tuple[str, int | str]:
    """``("job", id)`` for ``job:<id>``, ``("base", name)`` for ``base:<name>``; ``ValueError`` otherwise."""
    kind, _, ref = (key if isinstance(key, str) else "").partition(":")
    if kind == "job" and ref.isascii() and ref.isdigit():
        return "job", int(ref)
    if kind == "base" and ref.strip():
        return "base", ref
    raise ValueError(f"unknown model {str(key)[:60]!r}: expected {JOB_KEY}<job id> or {BASE_KEY}<model name>")


class ComparisonAPI:
    """Mixin of ``JobService``: needs ``list_evaluations``, ``get`` and ``eval_samples``."""

    def comparison(self, models: list[str] | None = None, benchmarks: list[str] | None = None) -> dict[str, Any]:
        """Models (``job:<id>`` / ``base:<name>``; None = every evaluated one) x benchmarks.

        Each row: label, method, trainable parameters, training time, peak memory, and per benchmark
        the newest evaluation's accuracy and evaluation id. Returns ``{"benchmarks", "rows"}``.
        """
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for ev in sorted(self.list_evaluations(), key=lambda e: e["id"]):
            key = model_key(ev)
            if (models and key not in models) or (benchmarks and ev["benchmark"] not in benchmarks):
                continue
            latest[(key, ev["benchmark"])] = ev
        # base models first, then jobs by id (unless the caller chose an order)
        keys = list(dict.fromkeys(models or sorted({k for k, _ in latest}, key=_base_first)))
        names = list(dict.fromkeys(benchmarks or sorted({b for _, b in latest})))
        rows = []
        for key in keys:
            row = self._model_facts(key)
            row["results"] = {b: {"accuracy": latest[(key, b)]["accuracy"], "evaluation_id": latest[(key, b)]["id"],
                                  "correct": latest[(key, b)]["correct"], "total": latest[(key, b)]["total"]}
                              for b in names if (key, b) in latest}
            rows.append(row)
        return {"benchmarks": names, "rows": rows}

    def _model_facts(self, key: str) -> dict[str, Any]:
        kind, ref = parse_model_key(key)
        if kind == "job":
            job = self.get(ref)
            info, result = job.get("info") or {}, job.get("result") or {}
            return {"key": key, "label": f"#{job['id']} {job['name']}", "method": job["spec"]["adapter"]["method"],
                    "trainable_params": info.get("trainable") or result.get("trainable_params"),
                    "train_time_s": result.get("elapsed_s"), "peak_memory_mb": result.get("peak_memory_mb")}
        label = Path(ref).name if Path(ref).is_absolute() else ref
        return {"key": key, "label": f"base: {label}", "method": "base", "trainable_params": 0,
                "train_time_s": None, "peak_memory_mb": None}

    def comparison_csv(self, matrix: dict[str, Any]) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["model", "method", "trainable_params", "train_time_s", "peak_memory_mb",
                         *[f"{b} accuracy" for b in matrix["benchmarks"]]])
        for row in matrix["rows"]:
            writer.writerow([row["label"], row["method"], row["trainable_params"], _num(row["train_time_s"]),
                             _num(row["peak_memory_mb"]),
                             *[_num(row["results"].get(b, {}).get("accuracy")) for b in matrix["benchmarks"]]])
        return out.getvalue()

    def comparison_markdown(self, matrix: dict[str, Any]) -> str:
        head = ["model", "method", "trainable params", "train time (s)", "peak MB", *matrix["benchmarks"]]
        lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
        for row in matrix["rows"]:
            accs = [row["results"].get(b) for b in matrix["benchmarks"]]
            cells = [row["label"], row["method"], f"{row['trainable_params'] or 0:,}",
                     _num(row["train_time_s"], "{:.0f}"), _num(row["peak_memory_mb"], "{:.0f}"),
                     *[f"{100 * a['accuracy']:.1f}" if a else "" for a in accs]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def disagreements(self, evaluation_ids: dict[str, int], only_disagreeing: bool = True,
                      limit: int | None = 200) -> list[dict[str, Any]]:
        """Per question: the gold answer and each model's answer (from ``{label: evaluation id}``).

        With ``only_disagreeing`` (the default) only questions the models answer differently are kept;
        a single model has nothing to disagree with, and all its questions are listed.
        """
        samples = {label: {s["index"]: s for s in self.eval_samples(ev_id)} for label, ev_id in evaluation_ids.items()}
        if not samples:
            return []
        common = set.intersection(*(set(s) for s in samples.values()))
        rows = []
        for index in sorted(common):
            first = next(iter(samples.values()))[index]
            answers = {label: s[index] for label, s in samples.items()}
            extracted = {a["extracted"] for a in answers.values()}
            verdicts = {a["correct"] for a in answers.values()}
            if only_disagreeing and len(samples) > 1 and len(extracted) <= 1 and len(verdicts) <= 1:
                continue
            rows.append({"index": index, "question": first["question"], "gold": first["gold"],
                         "answers": {label: {"extracted": a["extracted"], "correct": a["correct"],
                                             "response": a["response"]} for label, a in answers.items()}})
            if limit and len(rows) >= limit:
                break
        return rows


def _base_first(key: str) -> tuple[bool, int, str]:
    kind, ref = parse_model_key(key)
    return kind == "job", ref if kind == "job" else -1, key


def _num(value: Any, fmt: str = "{:.4g}") -> str:
    return "" if value is None else fmt.format(value)
