"""Owners, quotas and the deployment's rules in the service layer: every check on every call.

Two visitors of a public workbench (and two users of a team one) share one database; neither can see
or act on the other's jobs, evaluations, studies or uploads, whatever id they send. The jobs are
only queued here (no worker runs), so these tests are fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import JobSpec
from core.fields import ConfigError
from core.deployment import SYSTEM, Actor, Deployment
from jobs.schema import Job
from jobs.errors import JobError, JobNotFound, QuotaError
from jobs.service import JobService

ALICE, BOB = Actor("anon:alice0000000000"), Actor("anon:bob000000000000")


def public_spec(**train) -> JobSpec:
    """A job a public visitor may launch: the catalogue model, the built-in data, a few steps."""
    spec = JobSpec(name="visitor job")
    spec.train.max_steps = 5
    spec.eval.limit = 10
    for key, value in train.items():
        setattr(spec.train, key, value)
    return spec


@pytest.fixture
def public(tmp_path) -> JobService:
    svc = JobService(f"sqlite:///{tmp_path / 'jobs.db'}", home=tmp_path / "home",
                     deployment=Deployment.for_mode("public"))
    yield svc
    svc.close()


def finish(service: JobService, job_id: int, status: str = "succeeded") -> None:
    service.finish(job_id, status, only_if=None)


def test_a_visitor_sees_and_acts_on_their_own_jobs_only(public):
    alice, bob = public.scoped(ALICE), public.scoped(BOB)
    job = alice.submit(public_spec())
    assert [j["id"] for j in alice.list_jobs()] == [job]
    assert alice.get(job)["owner"] == ALICE.name
    assert bob.list_jobs() == []
    for action in (bob.get, bob.metrics, bob.logs, bob.files, bob.cancel, bob.delete, bob.resume,
                   bob.output_dir, bob.resume_point, lambda j: bob.artifact(j, "adapter"),
                   lambda j: bob.export(j, "adapter"), lambda j: bob.submit_evaluation(["builtin:math"], job_id=j),
                   lambda j: bob.list_evaluations(job_id=j) or bob.get(j)):
        with pytest.raises(JobNotFound, match=f"no job {job}"):
            action(job)
    # the refusal reads as for an id that does not exist: no oracle of others' jobs
    with pytest.raises(JobNotFound) as missing:
        bob.get(999)
    assert str(missing.value) == "no job 999"
    assert alice.cancel(job) == "cancelled"
    alice.delete(job)
    assert public.list_jobs() == []


@pytest.mark.parametrize("bad_id", ["abc", "", None, -1, 0, 2**80, "1; DROP TABLE jobs", 1.5, True, [1], {"id": 1},
                                    float("nan"), "0x10"])
def test_hostile_job_ids_are_not_found(public, bad_id):
    public.scoped(ALICE).submit(public_spec())
    with pytest.raises(JobNotFound):
        public.scoped(ALICE).get(bad_id)
    with pytest.raises(JobNotFound):
        public.scoped(ALICE).cancel(bad_id)


def test_admins_and_the_system_see_every_owner(public):
    job = public.scoped(ALICE).submit(public_spec())
    assert public.scoped(Actor("hf:root", admin=True)).get(job)["owner"] == ALICE.name
    assert [j["id"] for j in public.list_jobs()] == [job]  # the worker's service


def test_worker_side_operations_are_refused_to_visitors(public):
    alice = public.scoped(ALICE)
    job = alice.submit(public_spec())
    for action in (lambda: alice.claim(job), lambda: alice.queued_ids(), lambda: alice.set_pid(job, 1),
                   lambda: alice.finish(job, "succeeded"), lambda: alice.set_fields(job, status="succeeded"),
                   lambda: alice.build_artifact(job, "adapter"),
                   lambda: alice.record_evaluation(benchmark="x", base_model="m", accuracy=1, correct=1, total=1,
                                                   run_job_id=job)):
        with pytest.raises(PermissionError):
            action()
    assert alice.get(job)["status"] == "queued"


def test_the_fourth_launch_hits_the_quota_and_frees_up_after_a_cancel(public):
    alice, bob = public.scoped(ALICE), public.scoped(BOB)
    ids = [alice.submit(public_spec()) for _ in range(3)]
    with pytest.raises(QuotaError, match="3 queued or running jobs"):
        alice.submit(public_spec())
    assert len(alice.list_jobs()) == 3  # nothing written by the refused launch
    bob.submit(public_spec())  # a per-owner limit: the other visitor is not affected
    alice.cancel(ids[0])
    alice.submit(public_spec())


def test_the_server_wide_limit_counts_every_owner(tmp_path):
    svc = JobService(f"sqlite:///{tmp_path / 'jobs.db'}", home=tmp_path / "home",
                     deployment=Deployment.for_mode("public").with_limits(active_jobs_total=2))
    svc.scoped(ALICE).submit(public_spec())
    svc.scoped(BOB).submit(public_spec())
    with pytest.raises(QuotaError, match="busy"):
        svc.scoped(Actor("anon:carol")).submit(public_spec())


@pytest.mark.parametrize("field,value,message", [
    ("max_steps", 2001, "at most 2,000 steps"),
    ("epochs", 11.0, "at most 10 epochs"),
])
def test_per_job_limits_name_the_setting(public, field, value, message):
    spec = public_spec(**{field: value, **({"max_steps": 0} if field == "epochs" else {})})
    with pytest.raises(ConfigError, match=message) as err:
        public.scoped(ALICE).submit(spec)
    assert err.value.field == f"train.{field}"


def test_public_evaluations_need_a_bounded_example_count(public):
    spec = public_spec()
    spec.eval.benchmarks, spec.eval.limit = ["builtin:math"], 0
    with pytest.raises(ConfigError) as err:
        public.scoped(ALICE).submit(spec)
    assert err.value.field == "eval.limit"
    spec.eval.limit = 20
    public.scoped(ALICE).submit(spec)


def test_unknown_benchmarks_are_refused_at_submit(public):
    spec = public_spec()
    spec.eval.benchmarks = ["no-such-benchmark"]
    with pytest.raises(ConfigError, match="unknown benchmark") as err:
        public.scoped(ALICE).submit(spec)
    assert err.value.field == "eval.benchmarks"


def test_remote_code_is_refused_in_public_mode_and_needs_the_switch_and_an_admin_in_team(tmp_path, tiny_model_dir):
    public = JobService(f"sqlite:///{tmp_path / 'p.db'}", home=tmp_path / "p",
                        deployment=Deployment.for_mode("public", allow_remote_code=True))
    spec = public_spec()
    spec.model.trust_remote_code = True
    with pytest.raises(ConfigError, match="never runs") as err:
        public.scoped(ALICE).submit(spec)
    assert err.value.field == "model.trust_remote_code"

    spec.model.name = str(tiny_model_dir)
    team_off = JobService(f"sqlite:///{tmp_path / 't.db'}", home=tmp_path / "t",
                          deployment=Deployment.for_mode("team", data_dirs=(tiny_model_dir.parent,)))
    with pytest.raises(ConfigError, match="WORKBENCH_ALLOW_REMOTE_CODE"):
        team_off.scoped(Actor("root", admin=True)).submit(spec)
    team_on = JobService(f"sqlite:///{tmp_path / 't2.db'}", home=tmp_path / "t2",
                         deployment=Deployment.for_mode("team", allow_remote_code=True,
                                                        data_dirs=(tiny_model_dir.parent,)))
    with pytest.raises(ConfigError, match="only an admin"):
        team_on.scoped(Actor("alice")).submit(spec)
    assert team_on.scoped(Actor("root", admin=True)).submit(spec) > 0


def test_studies_are_owned_and_bounded(public):
    alice, bob = public.scoped(ALICE), public.scoped(BOB)
    base = public_spec()
    base.eval.benchmarks = ["builtin:math"]
    study = {"name": "ranks", "base": base.to_dict(), "methods": ["lora"], "values": {"lora": [4, 8]}, "seeds": [1]}
    study_id = alice.submit_study(study)
    assert [s["id"] for s in alice.list_studies()] == [study_id]
    assert bob.list_studies() == []
    for action in (bob.get_study, bob.cancel_study, bob.resume_study, bob.study_report):
        with pytest.raises(JobNotFound):
            action(study_id)
    too_big = {**study, "values": {"lora": [2, 4, 8, 16]}, "seeds": [1, 2, 3, 4]}
    with pytest.raises(QuotaError, match="at most"):
        bob.plan_study(too_big)


def test_evaluations_belong_to_the_owner_of_the_job_that_ran_them(public):
    alice, bob = public.scoped(ALICE), public.scoped(BOB)
    job = alice.submit(public_spec())
    finish(public, job)
    ev = public.record_evaluation(benchmark="builtin:math", base_model="m", accuracy=0.5, correct=1, total=2,
                                  samples=[{"question": "q", "correct": True}], job_id=job, run_job_id=job)
    assert [e["id"] for e in alice.list_evaluations()] == [ev]
    assert bob.list_evaluations() == [] and bob.comparison()["rows"] == []
    for action in (bob.get_evaluation, bob.eval_samples, bob.delete_evaluation):
        with pytest.raises(JobNotFound, match="no evaluation"):
            action(ev)
    with pytest.raises(JobNotFound):
        bob.disagreements({"x": ev})
    assert alice.eval_samples(ev)[0]["question"] == "q"


def test_uploads_are_counted_per_owner_and_only_the_owner_may_use_them(tmp_path):
    svc = JobService(f"sqlite:///{tmp_path / 'jobs.db'}", home=tmp_path / "home",
                     deployment=Deployment.for_mode("public").with_limits(upload_bytes_per_owner=4000))
    alice, bob = svc.scoped(ALICE), svc.scoped(BOB)
    rows = [{"instruction": f"What is {i} + 1?", "output": f"{i + 1}"} for i in range(30)]
    first = tmp_path / "my data.json"
    first.write_text(json.dumps(rows))
    stored = alice.store_upload(first)
    assert stored["name"] == "my data.json" and Path(stored["path"]).parent == svc.uploads_dir
    assert "my data" not in Path(stored["path"]).name
    assert alice.store_upload(first)["path"] == stored["path"]  # the same file again costs nothing
    second = tmp_path / "more.json"
    second.write_text(json.dumps(rows * 2))
    with pytest.raises(QuotaError, match="your uploads"):
        alice.store_upload(second)
    assert bob.store_upload(second)["name"] == "more.json"
    with pytest.raises(JobError, match="unsupported file type"):
        alice.store_upload(tmp_path / "x.exe")
    spec = public_spec()
    spec.data.source = stored["path"]
    assert alice.submit(spec) > 0
    with pytest.raises(ConfigError) as err:
        bob.submit(spec)  # the same content hash, but not bob's upload
    assert err.value.field == "data.source"


def test_export_is_a_job_of_the_owner_not_work_in_the_web_process(public):
    alice, bob = public.scoped(ALICE), public.scoped(BOB)
    job = alice.submit(public_spec())
    with pytest.raises(JobError, match="no adapter yet"):
        alice.export(job, "adapter")
    finish(public, job)
    adapter = Path(alice.get(job)["out_dir"]) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert alice.artifact(job, "adapter") is None
    export = alice.export(job, "adapter")
    assert alice.export(job, "adapter") == export  # one export of an artifact at a time
    got = alice.get(export)
    assert (got["kind"], got["owner"], got["target_job_id"], got["info"]) == ("export", ALICE.name, job,
                                                                              {"artifact": "adapter"})
    with pytest.raises(JobError, match="unknown artifact"):
        alice.export(job, "../../etc/passwd")
    path = public.build_artifact(job, "adapter")
    assert alice.artifact(job, "adapter") == path
    with pytest.raises(JobNotFound):
        bob.artifact(job, "adapter")


def test_jobs_made_before_owners_existed_belong_to_local(public):
    with public.db.write() as s:
        s.add(Job(name="old", kind="train", status="succeeded", spec={}, step=0, cancel_requested=False))
    assert public.scoped(ALICE).list_jobs() == []
    assert [j["owner"] for j in public.scoped(SYSTEM).list_jobs()] == ["local"]
