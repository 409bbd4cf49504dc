"""Experiment trackers: a training run reported to trackio, TensorBoard, MLflow or Weights & Biases too.

Each tracker is a ``Tracker``, a training callback (``core.callbacks.TrainCallbacks``) that also hears
each benchmark's result after training (``on_benchmark``) and the run's end (``finish``); the trainer
knows none of them. A tracker gets, in one vocabulary (``core.metrics``' names under ``train/``,
``eval/`` and ``benchmark/<name>/``):

- the job spec as its config, with the adapter's trainable parameter count (``trainable_params``, its
  share of the base ``trainable_percent``, the base's ``base_params``), when training starts;
- every step's metrics (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``,
  ``train/epoch``, ``train/elapsed_s``) and every validation (``eval/val_loss``) at their step;
- each benchmark's ``accuracy``, ``correct`` and ``total`` at the last step.

Where each one writes is the server's business, never a spec's: the environment of the process that
runs the job (a worker's, or ``python -m core train``'s) decides, and by default everything stays on
this machine:

- trackio: ``$TRACKIO_DIR`` (default ``$WORKBENCH_HOME/trackio``), or the Space of ``TRACKIO_SPACE_ID`` /
  the server of ``TRACKIO_SERVER_URL`` (trackio reads both itself);
- TensorBoard: event files in the run's folder, ``<run>/tensorboard``;
- MLflow: ``$MLFLOW_TRACKING_URI``, default the SQLite store ``$WORKBENCH_HOME/mlflow.db`` (its
  artifacts in ``$WORKBENCH_HOME/mlflow-artifacts``); experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``PROJECT``;
- W&B: ``WANDB_MODE`` if set, else online only with ``WANDB_API_KEY``, else offline, its files in the
  run's folder (``wandb sync`` uploads them later); project ``$WANDB_PROJECT`` or ``PROJECT``.

``WORKBENCH_REPORT_TO`` (comma-separated tracker names) is the server's list every training job reports
to, on top of the spec's ``train.report_to``; on a ``public`` workbench it is the only list, a visitor's
spec naming trackers being refused (``check_report_to``, run by the jobs service at submit). A tracker's
package missing is said at submit, naming ``requirements-trackers.txt``. A tracker failing during a run
(a network error, say) is told in the job's log and its link record, and the run goes on without it:
the workbench's own metrics hold everything it would have had.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping
from urllib.parse import urlsplit, urlunsplit

from .callbacks import EvalReport, StepReport, TrainCallbacks
from .config import TRACKERS
from .deployment import Deployment, DeploymentError
from .fields import ConfigError
from .metrics import EVAL_FIELDS, STEP_FIELDS, finite

REPORT_TO_ENV = "WORKBENCH_REPORT_TO"
REQUIREMENTS = "requirements-trackers.txt"
PROJECT = "adapter-workbench"  # trackio's project, W&B's project and MLflow's experiment unless the server says
SUCCEEDED = ("completed", "succeeded")  # the trainer's and the jobs' word for a run that ended as planned


@dataclass
class TrackerRun:
    """What every tracker of one run needs: its ``name`` (the job's folder, so two runs never share one), its
    ``config`` (the job spec as a dict), the run's folder ``out_dir`` and ``home`` ($WORKBENCH_HOME)."""

    name: str
    config: dict[str, Any]
    out_dir: Path
    home: Path


class Tracker(TrainCallbacks):
    """One tracker receiving one run. A subclass names itself (``name``, ``label``, the import names it
    ``needs``) and implements ``start`` (open the run with its config), ``log`` (scalars at a step) and
    ``end``; it sets ``url`` (a page showing the run, when there is one), ``where`` (the store) and ``view``
    (the command that shows it). What is logged, and under which names, is decided here once."""

    name: ClassVar[str]
    label: ClassVar[str]
    package: ClassVar[str]  # what pip installs

    def __init__(self, run: TrackerRun):
        self.run = run
        self.step = 0
        self.started = False
        self.url: str | None = None
        self.where: str | None = None
        self.view: str | None = None

    @classmethod
    def needs(cls) -> tuple[str, ...]:
        """The modules this tracker imports, as this server is configured."""
        return (cls.name,)

    # --- what a subclass implements
    def start(self, config: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def end(self, status: str) -> None:
        raise NotImplementedError

    # --- the callbacks, in the one vocabulary
    def on_start(self, info: dict[str, Any]) -> None:
        self.step = int(info.get("start_step") or 0)
        self.start({**self.run.config, "trainable_params": info.get("trainable"),
                    "trainable_percent": finite(info.get("percent")), "base_params": info.get("base"),
                    "train_examples": info.get("train_examples"), "val_examples": info.get("val_examples")})
        self.started = True

    def on_step(self, report: StepReport) -> None:
        self.step = int(report.step)
        self._log("train", STEP_FIELDS, report)

    def on_eval(self, report: EvalReport) -> None:
        self._log("eval", EVAL_FIELDS, report)

    def on_benchmark(self, name: str, accuracy: float, correct: int, total: int) -> None:
        """A benchmark's result after training, logged at the run's last step."""
        key = f"benchmark/{metric_name(name)}"
        self.log({f"{key}/accuracy": float(accuracy), f"{key}/correct": float(correct),
                  f"{key}/total": float(total)}, self.step)

    def finish(self, status: str) -> None:
        """End the run (``status``: the job's final status, or the trainer's)."""
        if self.started:
            self.started = False
            self.end(status)

    def _log(self, prefix: str, fields: tuple[str, ...], report: Any) -> None:
        values = {f"{prefix}/{name}": finite(getattr(report, name)) for name in fields if name != "step"}
        self.log({k: v for k, v in values.items() if v is not None}, int(report.step))

    def link(self) -> dict[str, Any]:
        """This tracker's record for the job: name, label, url, where, view."""
        return {"tracker": self.name, "label": self.label, "url": self.url, "where": self.where, "view": self.view}


def metric_name(text: str) -> str:
    """``text`` as one part of a metric name every tracker accepts (letters, digits, ``_ . -``)."""
    return re.sub(r"[^\w.\-]+", "_", str(text)).strip("_")[:100] or "unnamed"


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _public_url(url: str) -> str:
    """``url`` without credentials or query (a write token must not reach a page)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname
                       else parts.netloc, parts.path, "", ""))


# ------------------------------------------------------------------------------------------ trackers
class Trackio(Tracker):
    name, label, package = "trackio", "trackio", "trackio"

    def start(self, config: dict[str, Any]) -> None:
        store = Path(os.environ.setdefault("TRACKIO_DIR", str(self.run.home / "trackio")))
        import trackio
        import trackio.utils

        if Path(trackio.utils.TRACKIO_DIR) != store:  # trackio reads TRACKIO_DIR once, when imported
            raise RuntimeError(f"trackio was imported with TRACKIO_DIR={trackio.utils.TRACKIO_DIR}, not {store}")
        self.tracker = trackio.init(project=PROJECT, name=self.run.name, config=config, embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)
        space, server = os.environ.get("TRACKIO_SPACE_ID", "").strip(), os.environ.get("TRACKIO_SERVER_URL", "")
        if space:
            self.url = f"https://huggingface.co/spaces/{space}"
        elif server.strip():
            self.url = _public_url(server.strip())
        else:
            self.where = str(store)
            self.view = f'TRACKIO_DIR={store} trackio show --project "{PROJECT}"'

    def log(self, values: dict[str, float], step: int) -> None:
        self.tracker.log(values, step=step)

    def end(self, status: str) -> None:
        self.tracker.finish()


class TensorBoard(Tracker):
    name, label, package = "tensorboard", "TensorBoard", "tensorboard"

    def start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run.out_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=10)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", self.step)
        for key in ("trainable_params", "trainable_percent"):
            if config.get(key) is not None:
                self.writer.add_scalar(f"adapter/{key}", config[key], self.step)
        self.where = str(folder)
        self.view = f"tensorboard --logdir {folder}"

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def end(self, status: str) -> None:
        self.writer.add_text("status", status, self.step)
        self.writer.close()


class MLflow(Tracker):
    name, label, package = "mlflow", "MLflow", "mlflow-skinny"
    STATUS: ClassVar[dict[str, str]] = {"completed": "FINISHED", "succeeded": "FINISHED", "failed": "FAILED"}

    @classmethod
    def tracking_uri(cls, home: Path) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{home / 'mlflow.db'}"

    @classmethod
    def needs(cls) -> tuple[str, ...]:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        remote = uri.startswith(("http://", "https://", "databricks"))
        return ("mlflow",) if remote else ("mlflow", "alembic")  # a database store migrates with alembic

    def start(self, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        uri = self.tracking_uri(self.run.home)
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or PROJECT
        local = not uri.startswith(("http://", "https://", "databricks"))
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                ident = self.client.create_experiment(
                    name, artifact_location=(self.run.home / "mlflow-artifacts").as_uri() if local else None)
            except MlflowException:  # another job created it first
                ident = self.client.get_experiment_by_name(name).experiment_id
        else:
            ident = experiment.experiment_id
        run = self.client.create_run(ident, run_name=self.run.name, tags={"workbench.run": self.run.name})
        self.run_id = run.info.run_id
        params = [Param(key[:250], str(value)[:6000]) for key, value in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        if local:
            self.where = uri
            self.view = f"mlflow ui --backend-store-uri {uri}"
        else:
            self.url = f"{_public_url(uri).rstrip('/')}/#/experiments/{ident}/runs/{self.run_id}"

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "KILLED"))


class WandB(Tracker):
    name, label, package = "wandb", "W&B", "wandb"

    @staticmethod
    def mode() -> str:
        """The server's ``WANDB_MODE``; else online with an API key, offline without."""
        given = os.environ.get("WANDB_MODE", "").strip()
        return given or ("online" if os.environ.get("WANDB_API_KEY", "").strip() else "offline")

    def start(self, config: dict[str, Any]) -> None:
        import wandb

        self.tracker = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "").strip() or PROJECT, name=self.run.name, config=config,
            dir=str(self.run.out_dir), mode=self.mode(), reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                                    save_code=False))
        self.url = self.tracker.url  # None offline
        if not self.url:
            folder = Path(self.tracker.dir).parent  # files/ of the run's offline folder
            self.where = str(folder)
            self.view = f"wandb sync {folder}"

    def log(self, values: dict[str, float], step: int) -> None:
        self.tracker.log(values, step=step)

    def end(self, status: str) -> None:
        self.tracker.summary["status"] = status
        self.tracker.finish(exit_code=0 if status in SUCCEEDED else 1)


# in core.config.TRACKERS' order (a test holds them equal)
TRACKER_CLASSES: dict[str, type[Tracker]] = {cls.name: cls for cls in (Trackio, TensorBoard, MLflow, WandB)}


# ---------------------------------------------------------------------------------- choosing, checks
def server_trackers(env: Mapping[str, str] | None = None) -> list[str]:
    """``WORKBENCH_REPORT_TO``: the trackers every training job of this server reports to."""
    env = os.environ if env is None else env
    names = [part.strip().lower() for part in env.get(REPORT_TO_ENV, "").split(",") if part.strip()]
    for name in names:
        if name not in TRACKERS:
            raise DeploymentError(f"{REPORT_TO_ENV}: unknown tracker {name!r}; use {', '.join(TRACKERS)}")
    return names


def job_trackers(spec: Any, env: Mapping[str, str] | None = None) -> list[str]:
    """The trackers a training job reports to: its spec's ``train.report_to`` and the server's, once each."""
    wanted = set(spec.train.report_to) | set(server_trackers(env))
    return [name for name in TRACKERS if name in wanted]


def missing_packages(names: list[str]) -> list[str]:
    """The pip packages of ``names``' trackers that are not installed here."""
    missing = []
    for name in names:
        cls = TRACKER_CLASSES[name]
        for module in cls.needs():
            if importlib.util.find_spec(module) is None:
                missing.append(cls.package if module == cls.name else module)
    return list(dict.fromkeys(missing))


def check_report_to(spec: Any, kind: str, deployment: Deployment, admin: bool,
                    env: Mapping[str, str] | None = None) -> None:
    """What a spec may ask of trackers here (``ConfigError`` on ``train.report_to``): on a public workbench
    nothing (the server sets them, ``WORKBENCH_REPORT_TO``), unless the actor is an admin; and a training
    job's trackers must be installed."""
    if spec.train.report_to and deployment.public and not admin:
        raise ConfigError("train.report_to", "experiment trackers are set by this workbench's server, not by a job "
                                             "spec: leave report_to empty")
    if kind != "train":
        return
    try:
        names = job_trackers(spec, env)
    except DeploymentError as err:
        raise ConfigError("train.report_to", f"the server's setting is wrong: {err}") from None
    missing = missing_packages(names)
    if missing:
        whose = "" if set(names) <= set(spec.train.report_to) else f" (the server's {REPORT_TO_ENV} included)"
        raise ConfigError("train.report_to", f"the trackers {', '.join(names)}{whose} need {', '.join(missing)}, "
                                             f"not installed here: pip install -r {REQUIREMENTS}")


# ------------------------------------------------------------------------------------- several as one
class Trackers(TrainCallbacks):
    """A run's trackers as one callback. A tracker that raises is told on stdout (the job's log) and in its
    link record, then left out; ``on_links`` hears the records whenever they change (a run's page is known
    once its tracker has started). Used as a context manager, the trackers are finished on the way out
    (``failed`` if an exception leaves the block before ``finish``)."""

    def __init__(self, trackers: list[Tracker], on_links: Callable[[list[dict[str, Any]]], None] | None = None):
        self.trackers = trackers
        self.errors: dict[str, str] = {}
        self.on_links = on_links
        self.finished = False

    def _each(self, action: Callable[[Tracker], None]) -> None:
        for tracker in self.trackers:
            if tracker.name in self.errors:
                continue
            try:
                action(tracker)
            except Exception as err:  # noqa: BLE001 - a tracker's failure must not end the training run
                self.errors[tracker.name] = f"{type(err).__name__}: {err}"[:500]
                print(f"== tracker {tracker.label} failed, the run goes on without it: "
                      f"{self.errors[tracker.name]}", flush=True)
                self._tell()

    def _tell(self) -> None:
        if self.on_links is not None and self.trackers:
            self.on_links(self.links())

    def links(self) -> list[dict[str, Any]]:
        """One record per tracker: ``tracker``, ``label``, ``url``, ``where``, ``view``, ``error``."""
        return [{**t.link(), "error": self.errors.get(t.name)} for t in self.trackers]

    def on_start(self, info: dict[str, Any]) -> None:
        self._each(lambda t: t.on_start(info))
        self._tell()

    def on_step(self, report: StepReport) -> None:
        self._each(lambda t: t.on_step(report))

    def on_eval(self, report: EvalReport) -> None:
        self._each(lambda t: t.on_eval(report))

    def on_benchmark(self, name: str, accuracy: float, correct: int, total: int) -> None:
        self._each(lambda t: t.on_benchmark(name, accuracy, correct, total))

    def finish(self, status: str) -> None:
        if not self.finished:
            self.finished = True
            self._each(lambda t: t.finish(status))

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.finish("failed" if kind is not None else "completed")


def open_trackers(names: list[str], run: TrackerRun,
                  on_links: Callable[[list[dict[str, Any]]], None] | None = None) -> Trackers:
    """The trackers ``names`` for ``run`` (each opens its run when training starts). A missing package is
    a ``ConfigError`` naming it and ``requirements-trackers.txt``, before anything runs."""
    missing = missing_packages(names)
    if missing:
        raise ConfigError("train.report_to", f"{', '.join(missing)} not installed: pip install -r {REQUIREMENTS}")
    return Trackers([TRACKER_CLASSES[name](run) for name in names], on_links)
