"""A model folder carrying its own configuration code: the web process never runs it (whatever the
switches), and a job child runs it only when both the server's switch and the spec ask for it.

The code writes a marker file when imported, so "ran" and "did not run" are facts on disk.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from app import train_form, train_tab
from core.fields import ConfigError
from core.deployment import Deployment, configure
from jobs.service import JobService
from tests.test_jobs_support import REPO, child_env, tiny_spec, write_data
from tests.test_sources import make_evil_model


@pytest.fixture
def evil(tmp_path, tiny_model_dir):
    marker = tmp_path / "MARKER"
    return make_evil_model(tmp_path / "evil-model", tiny_model_dir, marker), marker


def service_for(tmp_path, **deployment) -> JobService:
    d = Deployment.for_mode("local", **deployment)
    configure(d)  # this process's deployment: the UI handlers ask it too
    return JobService(f"sqlite:///{tmp_path / 'jobs.db'}", home=tmp_path / "home", deployment=d)


def run_child(service: JobService, job_id: int, **env: str) -> dict:
    subprocess.run([sys.executable, "-m", "jobs.run", str(job_id)], cwd=REPO, env=child_env(service, **env),
                   capture_output=True, text=True, timeout=300)
    return service.get(job_id)


def evil_spec(folder, tmp_path, trust: bool):
    spec = tiny_spec(folder, write_data(tmp_path / "rows.json"), max_steps=2, eval_every=0, save_every=0)
    spec.model.trust_remote_code = trust
    return spec


def test_the_web_process_never_runs_it_even_with_every_switch_on(evil, tmp_path):
    folder, marker = evil
    service = service_for(tmp_path, allow_remote_code=True)
    form = {**train_form.default_form(), "model.name": str(folder), "model.trust_remote_code": True,
            "train.max_steps": 2, "train.batch_size": 4, "train.micro_batch_size": 2}
    model_line, estimate_md, _ = train_tab.plan(form)
    assert "needs remote code; runs inside the job" in model_line + estimate_md
    box, rows, _ = train_tab.preview(service, form)
    assert "needs remote code" in box["value"] and rows == []
    box, _, _ = train_tab.show_config(service, form)  # checks the spec without loading the model
    assert not marker.exists()


@pytest.mark.slow
def test_a_job_runs_it_only_when_the_server_and_the_spec_both_ask(evil, tmp_path):
    folder, marker = evil
    service = service_for(tmp_path, allow_remote_code=True)
    # the spec does not ask: refused at submit, and a job that got in anyway fails without running it
    with pytest.raises(ConfigError, match="trust_remote_code"):
        service.submit(evil_spec(folder, tmp_path, trust=False))
    unasked = service._insert(evil_spec(folder, tmp_path, trust=False), "train")
    job = run_child(service, unasked, WORKBENCH_ALLOW_REMOTE_CODE="1")
    assert job["status"] == "failed" and "needs remote code" in job["error"] and not marker.exists()
    # the spec asks but the server's switch is off where the job runs
    asked = service.submit(evil_spec(folder, tmp_path, trust=True))
    job = run_child(service, asked, WORKBENCH_ALLOW_REMOTE_CODE="0")
    assert job["status"] == "failed" and "WORKBENCH_ALLOW_REMOTE_CODE" in job["error"] and not marker.exists()
    # both: the child runs the model's code, and trains
    both = service.submit(evil_spec(folder, tmp_path, trust=True))
    job = run_child(service, both, WORKBENCH_ALLOW_REMOTE_CODE="1")
    assert job["status"] == "succeeded", job["error"]
    assert marker.read_text() == "model code ran"
