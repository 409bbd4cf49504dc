"""Comparison of models on benchmarks: the matrix, its CSV/Markdown export, where models disagree, and
McNemar's test of two. Like is compared with like: the matrix has a column per (benchmark, protocol), and
the disagreement view and McNemar refuse results of different benchmarks or protocols.

Part of the service API (``JobService`` inherits these methods); reads only the database. Also the
one definition of a *model key*, how the UI, the CLI and the matrix name a model: ``job:<id>`` for a
training job's adapter, ``base:<name>`` for a bare base model.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .errors import JobError
from .evaluations import PROTOCOLS, result_label

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
    """Mixin of ``JobService``: needs ``list_evaluations``, ``get``, ``get_evaluation`` and ``eval_samples``."""

    def comparison(self, models: list[str] | None = None, benchmarks: list[str] | None = None,
                   protocols: list[str] | None = None) -> dict[str, Any]:
        """Models (``job:<id>`` / ``base:<name>``; None = every evaluated one) x results, one column per
        (benchmark, protocol) evaluated (``benchmarks`` / ``protocols`` keep only those).

        Returns ``{"columns", "rows"}``: each column ``{"label", "benchmark", "protocol"}`` (the label,
        ``result_label``, keys the rows' results); each row the model's label, method, trainable
        parameters, training time, peak memory, and per column the newest evaluation's accuracy,
        ``accuracy_norm`` (None for generate), counts and evaluation id.
        """
        latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        for ev in sorted(self.list_evaluations(), key=lambda e: e["id"]):
            key = model_key(ev)
            if ((models and key not in models) or (benchmarks and ev["benchmark"] not in benchmarks)
                    or (protocols and ev["protocol"] not in protocols)):
                continue
            latest[(key, ev["benchmark"], ev["protocol"])] = ev
        # base models first, then jobs by id (unless the caller chose an order); benchmarks likewise
        keys = list(dict.fromkeys(models or sorted({k for k, _, _ in latest}, key=_base_first)))
        order = {b: i for i, b in enumerate(benchmarks or [])}
        pairs = sorted({(b, p) for _, b, p in latest}, key=lambda bp: (order.get(bp[0], len(order)), bp[0],
                                                                        _protocol_rank(bp[1])))
        columns = [{"label": result_label(b, p), "benchmark": b, "protocol": p} for b, p in pairs]
        rows = []
        for key in keys:
            row = self._model_facts(key)
            row["results"] = {}
            for col in columns:
                ev = latest.get((key, col["benchmark"], col["protocol"]))
                if ev is not None:
                    row["results"][col["label"]] = {
                        "accuracy": ev["accuracy"], "accuracy_norm": ev["accuracy_norm"], "evaluation_id": ev["id"],
                        "correct": ev["correct"], "total": ev["total"], "benchmark": ev["benchmark"],
                        "protocol": ev["protocol"]}
            rows.append(row)
        return {"columns": columns, "rows": rows}

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
        """The matrix as CSV: per column ``<label> accuracy``, and ``<label> acc_norm`` where it has one."""
        columns = _metric_columns(matrix)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["model", "method", "trainable_params", "train_time_s", "peak_memory_mb",
                         *[f"{label} {name}" for label, name, _ in columns]])
        for row in matrix["rows"]:
            writer.writerow([row["label"], row["method"], row["trainable_params"], _num(row["train_time_s"]),
                             _num(row["peak_memory_mb"]),
                             *[_num(row["results"].get(label, {}).get(field)) for label, _, field in columns]])
        return out.getvalue()

    def comparison_markdown(self, matrix: dict[str, Any]) -> str:
        """The matrix as a Markdown table (percentages), with an acc_norm column where a result has one."""
        columns = _metric_columns(matrix)
        head = ["model", "method", "trainable params", "train time (s)", "peak MB",
                *[label if name == "accuracy" else f"{label} {name}" for label, name, _ in columns]]
        lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
        for row in matrix["rows"]:
            values = [row["results"].get(label, {}).get(field) for label, _, field in columns]
            cells = [row["label"], row["method"], f"{row['trainable_params'] or 0:,}",
                     _num(row["train_time_s"], "{:.0f}"), _num(row["peak_memory_mb"], "{:.0f}"),
                     *["" if v is None else f"{100 * v:.1f}" for v in values]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def _like_with_like(self, evaluation_ids: dict[str, int], what: str) -> None:
        """Refuse (``JobError``, saying which is which) evaluations that are not of one benchmark under one
        protocol: their questions or their scoring differ, so pairing them would compare unlike things."""
        seen = {label: self.get_evaluation(ev_id) for label, ev_id in evaluation_ids.items()}
        kinds = {(e["benchmark"], e["protocol"]) for e in seen.values()}
        if len(kinds) > 1:
            which = "; ".join(f"{str(label)[:60]}: {result_label(e['benchmark'], e['protocol'])}"
                              for label, e in seen.items())
            raise JobError(f"{what} pairs results of one benchmark under one protocol, and these differ ({which}); "
                           f"pick results of the same benchmark and protocol")

    def disagreements(self, evaluation_ids: dict[str, int], only_disagreeing: bool = True,
                      limit: int | None = 200) -> list[dict[str, Any]]:
        """Per question: the gold answer and each model's answer (from ``{label: evaluation id}``, all of one
        benchmark and protocol, else ``JobError``).

        With ``only_disagreeing`` (the default) only questions the models answer differently are kept;
        a single model has nothing to disagree with, and all its questions are listed.
        """
        self._like_with_like(evaluation_ids, "the disagreement view")
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

    def mcnemar(self, evaluation_ids: dict[str, int]) -> dict[str, Any]:
        """Exact McNemar test (``core.study.mcnemar``) of two results (``{label: evaluation id}``) on the
        questions both answered: ``{"a", "b", "questions", "n10", "n01", "p_value"}``, ``n10`` counting
        questions only ``a`` got right. Both must be of one benchmark under one protocol (else ``JobError``)."""
        from core.study import mcnemar

        if len(evaluation_ids) != 2:
            raise JobError(f"McNemar compares two results, got {len(evaluation_ids)}")
        self._like_with_like(evaluation_ids, "McNemar")
        (a, a_id), (b, b_id) = evaluation_ids.items()
        right_a = {s["index"]: s["correct"] for s in self.eval_samples(a_id)}
        right_b = {s["index"]: s["correct"] for s in self.eval_samples(b_id)}
        common = sorted(set(right_a) & set(right_b))
        return {"a": a, "b": b, "questions": len(common),
                **mcnemar([right_a[i] for i in common], [right_b[i] for i in common])}


def _protocol_rank(protocol: str) -> int:
    return PROTOCOLS.index(protocol) if protocol in PROTOCOLS else len(PROTOCOLS)


def _metric_columns(matrix: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(column label, metric name, result field) of an export: each column's accuracy, then its acc_norm
    where any model has one."""
    out = []
    for col in matrix["columns"]:
        out.append((col["label"], "accuracy", "accuracy"))
        if any(r["results"].get(col["label"], {}).get("accuracy_norm") is not None for r in matrix["rows"]):
            out.append((col["label"], "acc_norm", "accuracy_norm"))
    return out


def _base_first(key: str) -> tuple[bool, int, str]:
    kind, ref = parse_model_key(key)
    return kind == "job", ref if kind == "job" else -1, key


def _num(value: Any, fmt: str = "{:.4g}") -> str:
    return "" if value is None else fmt.format(value)
