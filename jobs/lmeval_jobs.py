"""lm-eval jobs: lm-evaluation-harness tasks run on a workbench model, their results stored as ours.

``submit_lmeval`` queues an ``lmeval`` job on a base model or an adapter job's adapter (training, merge,
weight search): named lm-eval tasks, a custom task YAML, or both. Its child (``jobs.runners.run_lmeval``)
runs them through ``core.lmeval.WorkbenchLM`` and stores each task as an evaluation under the protocol
``lm-eval`` with lm-eval's per-sample logs (``record_evaluation``).

A task YAML can run code (``!function``, Jinja templates), so a custom YAML is refused in ``public``
mode and accepted from admins only in ``team`` mode; named tasks (lm-eval's own YAML) are fine
everywhere. The YAML's data files are checked like any data source (``resolve_data``: data roots,
uploads only their owner's) and stored as resolved paths; the job keeps the checked YAML text in its
``info["lmeval"]``, so what runs is what was checked. Part of the service API (``JobService`` inherits these).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from .access import ServiceBase
from .errors import row_id
from .merges import ADAPTER_KINDS

KIND = "lmeval"
MAX_TASKS = 32
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class LmEvalAPI(ServiceBase):
    """Mixin of ``JobService``: needs ``get``, ``_insert``, ``_adapter_dir``, ``check_spec`` and ``resolve_data``."""

    def submit_lmeval(self, tasks: Iterable[str] = (), *, task_yaml: str | None = None, job_id: int | None = None,
                      model: str | None = None, limit: int = 0, num_fewshot: int | None = None,
                      batch_size: int | None = None, name: str | None = None) -> int:
        """Queue lm-eval ``tasks`` (lm-eval task names) and/or the custom ``task_yaml`` (text) on the adapter of
        ``job_id`` or on the base model ``model`` (default: the default base model); return the job id.

        ``limit``: the first N documents of each task (0 = all; public mode caps it like benchmarks).
        Raises ``ConfigError`` naming the field (``tasks``, ``task_yaml``, ``task_yaml.dataset_kwargs...``,
        ``limit``...), ``JobError`` for a job without an adapter, ``JobNotFound`` for one not visible.
        """
        from core.fields import ConfigError

        names = _task_names(tasks)
        custom = None
        if task_yaml is not None and str(task_yaml).strip():
            custom = self._check_task_yaml(task_yaml)
        if not names and custom is None:
            raise ConfigError("tasks", "name at least one lm-eval task (e.g. arc_easy) or give a task YAML")
        allowed = self.deployment.lmeval_tasks
        if self.deployment.public and not self.actor.admin and any(n not in allowed for n in names):
            other = next(n for n in names if n not in allowed)
            raise ConfigError("tasks", f"this public workbench runs the lm-eval tasks {', '.join(allowed) or '(none)'}; "
                                       f"not {other[:80]!r}")
        if job_id is not None:
            self._adapter_dir(self.get(row_id(job_id)))  # an adapter job with its adapter here, or JobError why
        spec = self.evaluation_spec(None if job_id is None else row_id(job_id), model)
        spec.eval.benchmarks = []
        spec.eval.limit = _whole(limit, "limit", 0)
        if batch_size is not None:
            spec.eval.batch_size = _whole(batch_size, "batch_size", 1)
        fewshot = None if num_fewshot is None else _whole(num_fewshot, "num_fewshot", 0)
        cap = self.limits.eval_examples
        if cap and not self.actor.admin and not 0 < spec.eval.limit <= cap:
            raise ConfigError("limit", f"this workbench evaluates at most {cap:,} examples per task: "
                                       f"set limit between 1 and {cap:,}")
        spec = self.check_spec(spec, KIND)
        self._check_quota()
        shown = names + ([custom[0]] if custom else [])
        label = name or f"lm-eval {'job ' + str(job_id) if job_id is not None else spec.model.name}: {', '.join(shown)}"
        info = {"lmeval": {"tasks": names, "task_name": custom[0] if custom else None,
                           "task_yaml": custom[1] if custom else None, "num_fewshot": fewshot}}
        return self._insert(spec, KIND, name=label[:200], target_job_id=None if job_id is None else row_id(job_id),
                            info=info)

    def _check_task_yaml(self, text: Any) -> tuple[str, str]:
        """(task name, checked YAML) under this deployment's rules for this actor (module docstring)."""
        from core.fields import ConfigError
        from core.lmeval_tasks import LmEvalError, check_task_yaml

        if self.deployment.public:
            raise ConfigError("task_yaml", "a custom task YAML can run code, which this public workbench never "
                                           "does: run named lm-eval tasks")
        if self.deployment.mode == "team" and not self.actor.admin:
            raise ConfigError("task_yaml", "a custom task YAML can run code: only an admin may run one on this "
                                           "workbench (named lm-eval tasks are open to everyone)")
        if not isinstance(text, str):
            raise ConfigError("task_yaml", f"expected the YAML as text, not {type(text).__name__}")
        try:
            return check_task_yaml(text, lambda path, field: self.resolve_data(path, field=field))
        except LmEvalError as err:
            field, _, message = str(err).partition(": ")
            raise ConfigError(field, message) from None


def _task_names(tasks: Iterable[str] | str) -> list[str]:
    from core.fields import ConfigError

    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [str(t).strip() for t in tasks if str(t).strip()]
    for i, t in enumerate(names):
        if not _TASK_NAME.fullmatch(t):
            raise ConfigError(f"tasks[{i}]", f"{t[:40]!r} is not an lm-eval task name (letters, digits, _ . -)")
    if len(names) > MAX_TASKS:
        raise ConfigError("tasks", f"{len(names)} tasks; one job runs at most {MAX_TASKS}")
    if len(set(names)) != len(names):
        raise ConfigError("tasks", "each task may be named once")
    return names


def _whole(value: Any, field: str, low: int) -> int:
    from core.fields import ConfigError

    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(field, f"expected a whole number >= {low} (got {value!r})")
    return value


def job_model_args(job_id: Any, url: str | None = None) -> dict[str, Any]:
    """``python -m core.lmeval --job N``: lm-eval model_args for job N's adapter (``{"adapter": dir}``),
    read as the server's own CLI (every job visible). ``JobError`` for a job without an adapter."""
    from .service import JobService

    service = JobService(url)
    try:
        job = service.get(row_id(job_id))
        if job["kind"] not in ADAPTER_KINDS:
            from .errors import JobError

            raise JobError(f"job {job['id']} is an {job['kind']} job; give a training, merge or weight-search "
                           "job (or --base MODEL for a base model)")
        return {"adapter": str(service._adapter_dir(job))}
    finally:
        service.close()


def run_lmeval(service: Any, job: dict[str, Any], rec: Any, stop: Any, budget: Any) -> tuple[str, dict[str, Any]]:
    """The ``lmeval`` job's child (``jobs.runners.RUNNERS``): the job's model, with the adapter of
    ``target_job_id`` if set, through lm-eval on its tasks; each task stored as an ``lm-eval`` evaluation
    with its per-sample logs. A cancel, a signal or the budget stops it at the next batch of requests."""
    import importlib.metadata
    import time
    from pathlib import Path

    import core
    from core.config import JobSpec
    from core.lmeval_tasks import run_tasks, task_results

    try:
        from core.lmeval import WorkbenchLM
    except ModuleNotFoundError as err:
        if err.name != "lm_eval":
            raise
        raise RuntimeError("lm-eval is not installed where this job ran: install requirements-lmeval.txt "
                           "on the worker's machine") from None

    from .evaluations import LMEVAL_PROTOCOL
    from .run import Cancelled
    from .runners import _load_base

    spec = JobSpec.from_dict(job["spec"])
    info = (job.get("info") or {})["lmeval"]
    target = job["target_job_id"]
    rec.update(phase="loading model for lm-eval")
    rec.flush()
    loaded, reduced = _load_base(spec)
    if target is not None:
        core.load_adapter(loaded.model, service._adapter_dir(service.get(target)), tokenizer=loaded.tokenizer)
    loaded.model.eval()
    yaml_paths = []
    if info.get("task_yaml"):
        folder = Path(job["out_dir"]) / "lmeval"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{info['task_name']}.yaml"
        path.write_text(info["task_yaml"], encoding="utf-8")
        yaml_paths.append(path)
    started = time.monotonic()

    def on_batch(done: int, total: int) -> None:
        eta = (time.monotonic() - started) / done * (total - done) if total and done else None
        rec.update(phase="lm-eval: scoring requests", step=int(done), total_steps=int(total) or None, eta_s=eta)
        if rec.due():
            rec.flush()
        if stop.requested() or rec.cancel_requested() or budget.spent():
            raise Cancelled()

    lm = WorkbenchLM(loaded.model, loaded.tokenizer, dtype=reduced, batch_size=spec.eval.batch_size, on_batch=on_batch)
    shown = ", ".join(info["tasks"] + [str(p) for p in yaml_paths])
    print(f"== lm-eval {importlib.metadata.version('lm_eval')}: {shown}", flush=True)
    results = run_tasks(lm, info["tasks"], yaml_paths, limit=spec.eval.limit or None,
                        num_fewshot=info.get("num_fewshot"))
    seconds = time.monotonic() - started
    rec.update(phase="storing lm-eval results")
    rec.flush()
    ids, metrics = [], {}
    scored = task_results(results)
    for r in scored:
        settings = r.settings(limit=spec.eval.limit, batch_size=spec.eval.batch_size,
                              custom_task=r.task == info.get("task_name"),
                              lm_eval_version=importlib.metadata.version("lm_eval"))
        ids.append(service.record_evaluation(
            benchmark=r.task, base_model=spec.model.name, accuracy=r.accuracy, accuracy_norm=r.accuracy_norm,
            correct=r.correct, total=r.total, seconds=seconds / len(scored), samples=r.samples, job_id=target,
            run_job_id=job["id"], settings=settings, protocol=LMEVAL_PROTOCOL))
        metrics[r.task] = r.metrics
        print(f"== {r.task}: {r.metric} {r.accuracy:.4f} ({r.correct}/{r.total} scored 1)", flush=True)
    return "succeeded", {"phase": None, "result": {"evaluations": ids, "metrics": metrics, "seconds": seconds}}
