"""Experiment trackers (``core.trackers``): which trackers a job reports to and who may choose them, and one
real tiny training job reporting to trackio, TensorBoard, MLflow and W&B (offline) in temporary stores,
each read back with the tracker's own reader (each test skips when its package is missing)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import trackers as tr
from core.config import TRACKERS
from core.deployment import Actor, Deployment, DeploymentError
from core.fields import ConfigError
from tests.test_jobs_support import make_service, tiny_spec, write_data

# What the server may set: each test starts without any of it, so the defaults (local stores) are tested.
SERVER_ENV = ("WORKBENCH_REPORT_TO", "TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "MLFLOW_TRACKING_URI",
              "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT")
INSTALLED = [name for name in TRACKERS if not tr.missing_packages([name])]
STEPS = 4


@pytest.fixture(autouse=True)
def _no_server_trackers(monkeypatch):
    for name in SERVER_ENV:
        monkeypatch.delenv(name, raising=False)


def installed(name: str) -> None:
    if name not in INSTALLED:
        pytest.skip(f"{name} is not installed (pip install -r requirements-trackers.txt)")


# ---------------------------------------------------------------------------------- choosing, checks
def test_tracker_classes_are_the_configs_choices():
    assert tuple(tr.TRACKER_CLASSES) == TRACKERS


def test_a_job_reports_to_its_specs_and_the_servers_trackers_once_each():
    spec = tiny_spec("m", "d.json", report_to=["wandb", "tensorboard"])
    assert tr.job_trackers(spec, env={}) == ["tensorboard", "wandb"]
    assert tr.job_trackers(spec, env={"WORKBENCH_REPORT_TO": " MLflow, wandb "}) == ["tensorboard", "mlflow", "wandb"]
    with pytest.raises(DeploymentError, match="WORKBENCH_REPORT_TO: unknown tracker 'comet'"):
        tr.server_trackers({"WORKBENCH_REPORT_TO": "tensorboard,comet"})


def test_a_public_visitor_may_not_choose_trackers(tmp_path):
    """Server-side, in the submit path: the visitor's spec is refused before anything is written."""
    service = make_service(tmp_path).scoped(Actor("anon:visitor00000000"))
    service.deployment = Deployment.for_mode("public")
    spec = tiny_spec("HuggingFaceTB/SmolLM2-135M-Instruct", "builtin:math", report_to=["tensorboard"])
    with pytest.raises(ConfigError, match="set by this workbench's server") as err:
        service.submit(spec)
    assert err.value.field == "train.report_to"
    assert service.list_jobs() == []
    public = Deployment.for_mode("public")
    tr.check_report_to(spec, "train", public, admin=True, env={})  # an admin may
    spec.train.report_to = []
    tr.check_report_to(spec, "train", public, admin=False, env={})  # the server's own list is no visitor's doing


def test_a_missing_package_is_said_at_submit_naming_the_requirements_file(tmp_path, monkeypatch, tiny_model_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    service = make_service(tmp_path)
    spec = tiny_spec(tiny_model_dir, write_data(tmp_path / "rows.json"), report_to=["wandb"])
    with pytest.raises(ConfigError, match=r"need wandb, not installed here: pip install -r requirements-trackers.txt"):
        service.submit(spec)
    spec.train.report_to = []
    monkeypatch.setenv("WORKBENCH_REPORT_TO", "wandb")
    with pytest.raises(ConfigError, match="the server's WORKBENCH_REPORT_TO included"):
        service.submit(spec)
    monkeypatch.setenv("WORKBENCH_REPORT_TO", "tensorboard,nope")
    with pytest.raises(ConfigError, match="the server's setting is wrong: WORKBENCH_REPORT_TO: unknown tracker"):
        service.submit(spec)
    assert service.list_jobs() == []


def test_the_cli_says_a_missing_tracker_before_training(tmp_path, monkeypatch, capsys):
    from core.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    (tmp_path / "spec.json").write_text(json.dumps({"train": {"report_to": ["trackio"]}}))
    assert main(["train", "--config", str(tmp_path / "spec.json"), "--out", str(tmp_path / "out")]) == 2
    assert "trackio not installed: pip install -r requirements-trackers.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failing_tracker_is_left_out_and_said(tmp_path, capsys):
    """A tracker that raises mid-run (a network error, say) does not end the training run: the others go on,
    the job's log and link record say why."""
    from core.callbacks import StepReport

    class Flaky(tr.Tracker):
        name, label, package = "flaky", "Flaky", "flaky"

        def start(self, config):
            self.logged = []

        def log(self, values, step):
            if step == 2:
                raise ConnectionError("tracker server went away")
            self.logged.append((step, values))

        def end(self, status):
            self.ended = status

    run = tr.TrackerRun("job-1", {"name": "x"}, tmp_path, tmp_path)
    first, second = Flaky(run), Flaky(run)
    second.name = "steady"
    second.log = lambda values, step: second.logged.append((step, values))
    heard = []
    with tr.Trackers([first, second], on_links=heard.append) as trackers:
        trackers.on_start({"start_step": 0, "trainable": 10, "percent": 1.0, "base": 1000})
        for step in (1, 2, 3):
            trackers.on_step(StepReport(step=step, total_steps=3, epoch=step / 3, loss=1.0 / step, lr=1e-3,
                                        grad_norm=1.0, tokens_per_s=100.0, elapsed_s=step, eta_s=0.0))
    assert [s for s, _ in first.logged] == [1] and [s for s, _ in second.logged] == [1, 2, 3]
    assert second.ended == "completed" and not hasattr(first, "ended")
    assert heard[-1][0]["error"] == "ConnectionError: tracker server went away" and heard[-1][1]["error"] is None
    assert "tracker Flaky failed, the run goes on without it" in capsys.readouterr().out


def test_a_trackers_page_never_shows_credentials_or_a_write_token():
    assert tr._public_url("https://user:secret@mlflow.example.org:5000/base?token=abc") == \
        "https://mlflow.example.org:5000/base"
    assert tr.metric_name("builtin:math?ops=add,sub") == "builtin_math_ops_add_sub"


# ------------------------------------------------------------------------------ one real tiny job
@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_model_dir):
    """One training job (4 steps, validation every 2, a 2-question benchmark after) run by a worker's child
    process, reporting to every installed tracker with the default local stores."""
    if not INSTALLED:
        pytest.skip("no tracker installed (pip install -r requirements-trackers.txt)")
    from jobs import Worker

    tmp = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        for name in SERVER_ENV:
            mp.delenv(name, raising=False)
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing in the user's home
            mp.setenv(name, str(tmp / "wandb-home"))
        service = make_service(tmp)
        spec = tiny_spec(tiny_model_dir, write_data(tmp / "rows.json"), max_steps=STEPS, eval_every=2,
                         save_every=0, report_to=INSTALLED)
        spec.eval.benchmarks, spec.eval.limit, spec.eval.max_new_tokens = ["builtin:math"], 2, 4
        job_id = service.submit(spec)
        Worker(service, poll_s=0.1).run(until_idle=True)
        job = service.get(job_id)
        assert job["status"] == "succeeded", (job["error"], service.logs(job_id, 40))
        points = service.metrics(job_id)
        evaluation = service.list_evaluations(job_id=job_id)[0]
        yield {"job": job, "home": service.home, "log": service.logs(job_id),
               "loss": {p["step"]: p["loss"] for p in points if p["type"] == "step"},
               "lr": {p["step"]: p["lr"] for p in points if p["type"] == "step"},
               "val": {p["step"]: p["val_loss"] for p in points if p["type"] == "eval"},
               "accuracy": evaluation["accuracy"], "total": evaluation["total"]}
        service.close()


def _link(reported, name):
    return next(link for link in reported["job"]["result"]["trackers"] if link["tracker"] == name)


@pytest.mark.slow
def test_the_job_records_each_trackers_link(reported):
    job = reported["job"]
    assert [link["tracker"] for link in job["result"]["trackers"]] == INSTALLED
    assert all(link["error"] is None and link["url"] is None for link in job["result"]["trackers"])
    assert "failed" not in reported["log"].split("== training")[-1].lower()
    assert sorted(reported["loss"]) == list(range(1, STEPS + 1)) and sorted(reported["val"]) == [2, 4]


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_run(reported):
    installed("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    link, job = _link(reported, "tensorboard"), reported["job"]
    assert link["where"] == str(Path(job["out_dir"]) / "tensorboard") and link["view"].startswith("tensorboard --logdir")
    events = EventAccumulator(link["where"], size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert scalars["train/loss"] == pytest.approx(reported["loss"], rel=1e-6)
    assert scalars["train/lr"] == pytest.approx(reported["lr"], rel=1e-6)
    assert scalars["eval/val_loss"] == pytest.approx(reported["val"], rel=1e-6)
    assert scalars["benchmark/builtin_math/accuracy"] == {STEPS: pytest.approx(reported["accuracy"])}
    assert scalars["adapter/trainable_params"] == {0: job["info"]["trainable"]}
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"learning_rate": 0.01' in config and f'"job_id": {job["id"]}' in config


@pytest.mark.slow
def test_mlflow_local_store_holds_the_run(reported):
    installed("mlflow")
    from mlflow import MlflowClient

    link, job = _link(reported, "mlflow"), reported["job"]
    assert link["where"] == f"sqlite:///{reported['home'] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=link["where"])
    experiment = client.get_experiment_by_name(tr.PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"job-{job['id']}" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.learning_rate"] == "0.01" and params["adapter.method"] == "lora"
    assert params["trainable_params"] == str(job["info"]["trainable"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(reported["loss"], rel=1e-9)
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/val_loss")} == \
        pytest.approx(reported["val"], rel=1e-9)
    assert run.data.metrics["benchmark/builtin_math/accuracy"] == pytest.approx(reported["accuracy"])
    assert run.data.metrics["benchmark/builtin_math/total"] == reported["total"]


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``): after a 7-byte header, LevelDB-log chunks of
    a 4-byte checksum, a 2-byte length, a 1-byte type (1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_files_hold_the_run(reported):
    installed("wandb")
    link, job = _link(reported, "wandb"), reported["job"]
    folder = Path(link["where"])
    assert folder.parent == Path(job["out_dir"]) / "wandb" and folder.name.startswith("offline-run-")
    assert link["view"] == f"wandb sync {folder}"
    records = wandb_records(next(folder.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "run":
            assert r.run.display_name == f"job-{job['id']}"
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["trainable_params"] == job["info"]["trainable"] and config["train"]["learning_rate"] == 0.01
    history: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for key, value in items.items():
                history.setdefault(key, {})[int(items["_step"])] = value
    assert history["train/loss"] == pytest.approx(reported["loss"], rel=1e-9)
    assert history["eval/val_loss"] == pytest.approx(reported["val"], rel=1e-9)
    assert history["benchmark/builtin_math/accuracy"] == {STEPS: pytest.approx(reported["accuracy"])}
    assert "exit" in kinds


TRACKIO_READER = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
project, run = sys.argv[1:]
print(json.dumps({"runs": SQLiteStorage.get_runs(project), "config": SQLiteStorage.get_run_config(project, run),
                  "logs": SQLiteStorage.get_logs(project, run)}, default=str))
"""


@pytest.mark.slow
def test_trackio_local_store_holds_the_run(reported):
    """Read back by trackio itself, in a process of its own: trackio fixes its store when imported."""
    installed("trackio")
    link, job = _link(reported, "trackio"), reported["job"]
    store = reported["home"] / "trackio"
    assert link["where"] == str(store) and link["view"] == f'TRACKIO_DIR={store} trackio show --project "{tr.PROJECT}"'
    env = {**os.environ, "TRACKIO_DIR": str(store)}
    out = subprocess.run([sys.executable, "-c", TRACKIO_READER, tr.PROJECT, f"job-{job['id']}"], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["runs"] == [f"job-{job['id']}"]
    assert found["config"]["trainable_params"] == job["info"]["trainable"]
    assert found["config"]["train"]["learning_rate"] == 0.01
    by_step: dict[str, dict[int, float]] = {}
    for row in found["logs"]:
        for key, value in row.items():
            if "/" in key:
                by_step.setdefault(key, {})[row["step"]] = value
    assert by_step["train/loss"] == pytest.approx(reported["loss"], rel=1e-9)
    assert by_step["eval/val_loss"] == pytest.approx(reported["val"], rel=1e-9)
    assert by_step["benchmark/builtin_math/accuracy"] == {STEPS: pytest.approx(reported["accuracy"])}


@pytest.mark.slow
def test_the_cli_reports_to_tensorboard(tmp_path, tiny_model_dir, capsys):
    """``python -m core train`` composes the trackers too; stdout keeps only the adapter's folder."""
    installed("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from core.__main__ import main

    spec = tiny_spec(tiny_model_dir, write_data(tmp_path / "rows.json"), max_steps=2, save_every=0,
                     report_to=["tensorboard"])
    (tmp_path / "spec.json").write_text(spec.to_json())
    out = tmp_path / "run"
    code = main(["train", "--config", str(tmp_path / "spec.json"), "--out", str(out)])
    said = capsys.readouterr()
    assert code == 0, said.err[-2000:]
    assert said.out.strip() == str(out / "adapter")
    assert f"TensorBoard: view with: tensorboard --logdir {out / 'tensorboard'}" in said.err
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {e.step: e.value for e in events.Scalars("train/loss")} == \
        pytest.approx({x["step"]: x["loss"] for x in lines if x["type"] == "step"}, rel=1e-6)


def test_the_jobs_tab_links_to_a_trackers_page_and_tells_public_visitors_no_server_paths():
    from app.job_text import status_markdown, tracker_markdown
    from core.deployment import using

    job = {"id": 7, "name": "x", "kind": "train", "status": "running", "spec": {}, "result": {"trackers": [
        {"tracker": "wandb", "label": "W&B", "url": "https://wandb.ai/me/p/runs/abc", "where": None, "view": None,
         "error": None},
        {"tracker": "tensorboard", "label": "TensorBoard", "url": None, "where": "/srv/runs/7/tensorboard",
         "view": "tensorboard --logdir /srv/runs/7/tensorboard", "error": None},
        {"tracker": "mlflow", "label": "MLflow", "url": None, "where": None, "view": None,
         "error": "OSError: /srv/mlflow.db is read-only"}]}}
    assert tracker_markdown(job, public=False) == (
        "**Trackers:** [W&B run ↗](https://wandb.ai/me/p/runs/abc) · TensorBoard: "
        "`tensorboard --logdir /srv/runs/7/tensorboard` · MLflow failed: OSError: /srv/mlflow.db is read-only")
    with using(Deployment.for_mode("public")):
        shown = status_markdown(job)
    assert "[W&B run ↗](https://wandb.ai/me/p/runs/abc)" in shown and "MLflow failed" in shown
    assert "/srv" not in shown
    assert tracker_markdown({"result": None}, public=False) == ""
