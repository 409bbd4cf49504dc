"""lm-evaluation-harness tasks for the workbench: checking a custom task YAML, running named and custom
tasks on a ``core.lmeval.WorkbenchLM``, and turning lm-eval's results into ours.

A custom task is one lm-eval task YAML (``task``, ``dataset_path``, ``doc_to_text``...). ``read_task_yaml``
parses it without running anything (``!function`` tags are kept as ``FunctionRef``s, never imported)
and ``check_task_yaml`` applies the server's rules before a job is queued: one task per file, no
``include`` (the whole task in the one YAML the job keeps), data from files (``dataset_path: json``
or ``csv`` with ``dataset_kwargs.data_files``) each resolved by the caller's data-source rules and
replaced by its checked path, or a hub dataset id. Whether code may run at all (``!function``, Jinja
templates) is the caller's decision: the jobs service refuses custom YAML in public mode and allows
it to admins only in team mode.

``run_tasks`` loads each task first (so a failure names its task; a task whose dataset is on the hub
fails at once with an "offline" message when the hub cannot be reached), then runs lm-eval's
``simple_evaluate`` with per-sample logs; ``task_results`` reads each task's metrics and samples into
``TaskResult`` (accuracy: ``acc``, else the task's first metric; samples in ``eval_samples``' shape).

Public API: ``FunctionRef``, ``LOCAL_BUILDERS``, ``read_task_yaml``, ``check_task_yaml``, ``TaskResult``,
``run_tasks``, ``task_results``, ``LmEvalError``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

LOCAL_BUILDERS = ("json", "csv")  # dataset_path values that read dataset_kwargs.data_files from disk
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MAX_YAML_CHARS = 200_000


class LmEvalError(ValueError):
    """A task that cannot be run (unknown, unreadable, offline), or a custom task YAML that breaks a rule."""


@dataclass(frozen=True)
class FunctionRef:
    """A ``!function module.name`` tag, kept as text: reading a YAML never imports anything."""

    target: str


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_Dumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", ref.target))


def read_task_yaml(text: str) -> dict[str, Any]:
    """The task YAML as data (``!function`` tags as ``FunctionRef``); ``LmEvalError`` saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise LmEvalError("task_yaml: empty; give an lm-eval task YAML (task, dataset_path, doc_to_text, ...)")
    if len(text) > MAX_YAML_CHARS:
        raise LmEvalError(f"task_yaml: {len(text):,} characters; a task YAML may have at most {MAX_YAML_CHARS:,}")
    try:
        config = yaml.load(text, Loader=_Loader)  # noqa: S506  # a SafeLoader with one inert tag added
    except yaml.YAMLError as err:
        raise LmEvalError(f"task_yaml: not valid YAML ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(config, dict):
        raise LmEvalError("task_yaml: expected a mapping (task: ..., dataset_path: ...)")
    return config


def has_code(value: Any) -> bool:
    """Whether a parsed YAML names Python code (a ``!function`` tag or a task ``class``)."""
    if isinstance(value, FunctionRef):
        return True
    if isinstance(value, dict):
        return "class" in value or any(has_code(v) for v in value.values())
    if isinstance(value, list):
        return any(has_code(v) for v in value)
    return False


def check_task_yaml(text: str, resolve: Callable[[str, str], str]) -> tuple[str, str]:
    """``(task name, YAML text to run)`` after the rules in the module docstring; ``resolve(path, field)``
    is the caller's data-source check (it returns the checked path or hub id, or raises naming the field).
    ``LmEvalError`` names the key at fault."""
    config = read_task_yaml(text)
    name = config.get("task")
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise LmEvalError("task_yaml.task: give the task a name (letters, digits, _ . -; up to 100 characters)")
    if "group" in config or isinstance(config.get("task"), list):
        raise LmEvalError("task_yaml: one task per YAML (no group)")
    if "include" in config:
        raise LmEvalError("task_yaml.include: not allowed here; put the whole task in this one YAML")
    source = config.get("dataset_path")
    if not isinstance(source, str) or not source.strip():
        raise LmEvalError("task_yaml.dataset_path: name where the data comes from (json or csv with "
                          "dataset_kwargs.data_files, or a hub dataset id)")
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise LmEvalError("task_yaml.dataset_kwargs: expected a mapping")
    if "data_dir" in kwargs:
        raise LmEvalError("task_yaml.dataset_kwargs.data_dir: not allowed here; list the files in data_files")
    if source in LOCAL_BUILDERS:
        if "data_files" not in kwargs:
            raise LmEvalError(f"task_yaml.dataset_kwargs.data_files: dataset_path {source} reads local files; "
                              "list them (a file, a list, or split: file)")
        kwargs["data_files"] = _checked_files(kwargs["data_files"], resolve, "task_yaml.dataset_kwargs.data_files")
        config["dataset_kwargs"] = kwargs
    else:
        if "data_files" in kwargs:
            raise LmEvalError("task_yaml.dataset_kwargs.data_files: local files are read with dataset_path json or csv")
        config["dataset_path"] = resolve(source, "task_yaml.dataset_path")
    return name, yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _checked_files(value: Any, resolve: Callable[[str, str], str], where: str) -> Any:
    if isinstance(value, str):
        return resolve(value, where)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [resolve(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        return {k: _checked_files(v, resolve, f"{where}.{k}") for k, v in value.items()}
    raise LmEvalError(f"{where}: expected a file path, a list of paths, or split: path(s)")


# --------------------------------------------------------------------------------------------------
# Running tasks.

@contextlib.contextmanager
def _hub_mode(offline: bool) -> Iterator[None]:
    """``datasets`` and the hub client in offline mode for the block when the hub cannot be reached, so an
    uncached hub dataset fails at once instead of after retries (as ``core.hub.read_hub_dataset``)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


@functools.lru_cache(maxsize=2)
def _manager(defaults: bool) -> Any:
    """lm-eval's task index, with its own tasks or without (building it reads ~15,000 YAML names: seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=defaults)


def load_tasks(names: list[str], yaml_paths: list[Path]) -> tuple[Any, list[Any]]:
    """(lm-eval ``TaskManager``, the loaded tasks), each named task or YAML loaded on its own so an error
    names it; ``LmEvalError`` for an unknown name or data that cannot be read (offline said so)."""
    from .hub import hub_reachable

    manager = _manager(bool(names))
    offline = not hub_reachable()
    loaded: list[Any] = []
    specs = [(n, n) for n in names] + [(str(p), f"custom task {Path(p).stem!r}") for p in yaml_paths]
    for spec, shown in specs:
        if spec in names and spec not in manager.all_tasks:
            raise LmEvalError(f"unknown lm-eval task {spec!r}: see `lm-eval ls tasks` for the names")
        try:
            with _hub_mode(offline):
                tasks = manager.load([spec])
        except Exception as err:  # lm-eval and datasets raise many kinds; say which task and why
            if offline:
                raise LmEvalError(f"{shown}: its data could not be loaded, and the Hugging Face hub cannot be "
                                  f"reached (offline), so a hub dataset must already be in the local cache "
                                  f"({type(err).__name__}: {_first_line(err)}). Offline, run a custom task YAML "
                                  "over local files (dataset_path: json, dataset_kwargs.data_files)") from None
            raise LmEvalError(f"{shown} could not be loaded ({type(err).__name__}: {_first_line(err)})") from None
        children = {c for kids in tasks.get("group_map", {}).values() for c in kids}
        loaded += [g for n, g in tasks.get("groups", {}).items() if n not in children]
        loaded += [t for n, t in tasks["tasks"].items() if n not in children]
    return manager, loaded


def run_tasks(lm: Any, names: list[str], yaml_paths: list[Path] = (), *, limit: int | None = None,
              num_fewshot: int | None = None, bootstrap_iters: int = 1000) -> dict[str, Any]:
    """lm-eval's results (``simple_evaluate`` with per-sample logs) of ``lm`` on the named tasks and the
    custom task YAML files. ``limit``: the first N documents of each task."""
    from lm_eval import simple_evaluate

    if not names and not yaml_paths:
        raise LmEvalError("tasks: name at least one lm-eval task or give a task YAML")
    manager, tasks = load_tasks(list(names), [Path(p) for p in yaml_paths])
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit or None,
                              num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=bootstrap_iters)
    if results is None:
        raise LmEvalError("lm-eval returned no results (not the first process of a distributed run)")
    return results


@dataclass
class TaskResult:
    """One task's score in our terms: ``accuracy`` is ``metric`` (``acc`` where the task has it)."""

    task: str
    metric: str
    accuracy: float
    accuracy_norm: float | None
    correct: int
    total: int
    output_type: str
    num_fewshot: int | None
    metrics: dict[str, float] = field(default_factory=dict)  # every metric (and stderr) of the task
    samples: list[dict[str, Any]] = field(default_factory=list)  # eval_samples' shape

    def settings(self, **extra: Any) -> dict[str, Any]:
        """What the evaluation row's settings JSON keeps: the metric, every metric, the run's settings."""
        d = asdict(self)
        for key in ("samples", "accuracy", "accuracy_norm", "correct", "total"):
            d.pop(key)
        return {**d, **extra}


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name, _, filt = key.partition(",")
        if math.isfinite(float(value)):
            out[name if filt in ("", "none") else key] = float(value)
    return out


def _main_metric(metrics: dict[str, float], task: str) -> str:
    if "acc" in metrics:
        return "acc"
    names = [k for k in metrics if "_stderr" not in k]
    if not names:
        raise LmEvalError(f"lm-eval task {task!r} reported no metric")
    return names[0]


def task_results(results: dict[str, Any]) -> list[TaskResult]:
    """Each task of an lm-eval run (groups' own rows left out: their tasks are stored one by one)."""
    out = []
    samples = results.get("samples") or {}
    for task, row in results["results"].items():
        if task not in samples:
            continue  # a group's aggregate
        metrics = _metrics(row)
        metric = _main_metric(metrics, task)
        config = (results.get("configs") or {}).get(task) or {}
        output_type = str(config.get("output_type", ""))
        rows = [_sample(s, metric.split(",")[0], output_type) for s in samples[task]]
        rows.sort(key=lambda r: r["index"])
        n_shot = (results.get("n-shot") or {}).get(task)
        out.append(TaskResult(task=task, metric=metric, accuracy=metrics[metric], accuracy_norm=metrics.get("acc_norm"),
                              correct=sum(r["correct"] for r in rows), total=len(rows), output_type=output_type,
                              num_fewshot=n_shot if isinstance(n_shot, int) else None, metrics=metrics, samples=rows))
    return out


def _sample(s: dict[str, Any], metric: str, output_type: str) -> dict[str, Any]:
    """One of lm-eval's logged samples as an ``eval_samples`` row: the prompt, gold, chosen answer, whether it
    scored 1 on the task's metric, and each choice's summed log-probability for multiple choice."""
    args = s.get("arguments") or [()]
    question = str(args[0][0]) if args and args[0] else ""
    value = s.get(metric)
    correct = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) >= 1.0 or value is True
    target = s.get("target")
    row: dict[str, Any] = {"index": int(s["doc_id"]), "question": question, "correct": bool(correct)}
    if output_type == "multiple_choice":
        choices = [str(a[1]).lstrip() for a in args]
        scores = [float(r[0]) for r in s["filtered_resps"]]
        chosen = max(range(len(scores)), key=lambda i: (scores[i], -i))
        gold = choices[target] if isinstance(target, int) and 0 <= target < len(choices) else target
        row.update(gold=str(gold), response=choices[chosen], extracted=str(chosen), scores=scores)
    else:
        resp = s.get("filtered_resps") or [""]
        answer = resp[0] if isinstance(resp, list) and resp else resp
        answer = answer[0] if isinstance(answer, (list, tuple)) and answer else answer
        row.update(gold=str(target), response=str(answer), extracted=str(answer))
    return row
