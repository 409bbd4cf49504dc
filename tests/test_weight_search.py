"""Weight search (core.weight_search, the ``weight-search`` job kind): the points tried, their scores on the
merge actually loaded, the best kept, seeded reproducibility; the job through the service, worker and CLI."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import core
from core import AdapterConfig
from core.config import EvalSettings, JobSpec, ModelSettings
from core.fields import ConfigError
from core.inject import adapters_of
from core.merge import MergeSettings, merge_blocks, read_parents
from core.weight_search import SearchSettings, best_trial, search_points, weight_search
from tests.test_merge import _items, deltas, trained
from tests.tiny import tiny_model


def _norm_score(model) -> float:
    """A score read from the adapter loaded in ``model``: its total ``||ΔW||``, squashed into (0, 1)."""
    with torch.no_grad():
        total = sum(float(m.lora_delta().norm()) for _, m in _items(model))
    return total / (1.0 + total)


@pytest.fixture
def fake_evaluate(monkeypatch):
    """``core.evaluate.evaluate`` scoring whatever adapter is loaded by ``_norm_score`` (no generation)."""
    calls = []

    def evaluate(model, tokenizer, benchmark, settings=None, **_):
        calls.append(benchmark)
        score = _norm_score(model)
        return SimpleNamespace(accuracy=score, correct=0, total=1, stopped=False)

    monkeypatch.setattr(importlib.import_module("core.evaluate"), "evaluate", evaluate)  # core.evaluate: the function
    return calls


def test_search_points_are_seeded_start_first_and_in_range():
    s = SearchSettings(budget=7, low=-0.5, high=1.5, seed=4).validate()
    points = search_points([0.5, 0.25, 0.25], s)
    assert len(points) == 7 and points[0] == [0.5, 0.25, 0.25]
    assert all(-0.5 <= w < 1.5 for p in points[1:] for w in p) and len({tuple(p) for p in points}) == 7
    assert search_points([0.5, 0.25, 0.25], s) == points
    assert search_points([0.5, 0.25, 0.25], SearchSettings(budget=7, low=-0.5, high=1.5, seed=5)) != points


@pytest.mark.parametrize("bad, field", [(dict(budget=0), "budget"), (dict(budget=501), "budget"),
                                        (dict(budget=2.5), "budget"), (dict(low=1.0, high=1.0), "high"),
                                        (dict(high=float("nan")), "high"), (dict(low=-11.0), "low"),
                                        (dict(seed=-1), "seed")])
def test_search_settings_are_checked(bad, field):
    with pytest.raises(ConfigError) as err:
        SearchSettings(**bad).validate()
    assert err.value.field == field


@pytest.mark.parametrize("method", ["linear", "dare_ties"])
def test_each_point_is_scored_on_its_own_merge_and_the_best_kept(tmp_path, fake_evaluate, method):
    parents = read_parents([trained(tmp_path, "a", seed=1), trained(tmp_path, "b", seed=2)])
    merge = MergeSettings(method, [0.5, 0.5], drop=0.3, seed=7)
    search = SearchSettings(budget=6, seed=3)
    model = tiny_model("llama")
    heard = []
    trials = weight_search(model, None, parents, merge, search, "bench", EvalSettings(), on_trial=heard.append)
    assert heard == trials and [t.index for t in trials] == [1, 2, 3, 4, 5, 6] and len(fake_evaluate) == 6
    assert [t.weights for t in trials] == search_points([0.5, 0.5], search)
    for t in trials:  # the score is that of the merge at the point's weights, loaded onto the model
        blocks, _ = merge_blocks(parents, MergeSettings(method, t.weights, drop=0.3, seed=7))
        total = sum(float((b.B @ b.A).norm()) for b in blocks.values())
        assert t.score == pytest.approx(total / (1 + total), rel=1e-5)
    assert len({round(t.score, 6) for t in trials}) == 6
    best = best_trial(trials)
    assert best.score == max(t.score for t in trials) and best is not trials[0]
    assert not adapters_of(model)  # the base model is handed back bare
    again = weight_search(tiny_model("llama"), None, parents, merge, search, "bench", EvalSettings())
    assert [(t.weights, t.score) for t in again] == [(t.weights, t.score) for t in trials]


def test_best_is_earliest_on_a_tie_and_a_stop_ends_the_search(tmp_path, fake_evaluate):
    from core.weight_search import Trial

    assert best_trial([Trial(1, [1.0], 0.5, 1, 2), Trial(2, [2.0], 0.5, 1, 2)]).index == 1
    with pytest.raises(ValueError, match="no point was scored"):
        best_trial([])
    parents = read_parents([trained(tmp_path, "a", seed=1), trained(tmp_path, "b", seed=2)])
    model = tiny_model("llama")
    trials: list = []
    weight_search(model, None, parents, MergeSettings("linear", [1, 0]), SearchSettings(budget=5), "bench",
                  EvalSettings(), on_trial=trials.append, should_stop=lambda: len(trials) >= 2)
    assert len(trials) == 2 and not adapters_of(model)
    dora = read_parents([trained(tmp_path, "d1", "dora", seed=1), trained(tmp_path, "d2", "dora", seed=2)])
    with pytest.raises(ConfigError, match=r"point 2 \(-0\.\d+, -0\.\d+\): magnitude vectors") as err:
        weight_search(model, None, dora, MergeSettings("linear", [1, 1]), SearchSettings(budget=2, low=-1, high=-0.5),
                      "bench", EvalSettings())  # DoRA refuses a mixture whose weights sum below 0
    assert err.value.field == "weights" and not adapters_of(model)


# --------------------------------------------------------------------------------------------------
# The job, on the tiny checkpoint, through the service, the worker and the CLI.

ANSWERED = [{"instruction": f"What is {a} plus {b}?", "input": "", "answer": str(a + b)}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


@pytest.fixture
def parent_jobs(service, tmp_path, tiny_model_dir):
    """Two finished LoRA jobs on the tiny checkpoint, their adapters (random, non-zero) saved directly."""
    ids = []
    for seed in (1, 2):
        spec = JobSpec(name=f"p{seed}")
        spec.model = ModelSettings(name=str(tiny_model_dir), precision="fp32", device="cpu")
        spec.adapter = AdapterConfig.for_method("lora", r=2, alpha=4.0, dropout=0.0)
        model = core.load_model(spec.model).model
        core.attach(model, spec.adapter)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in core.adapter_params(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        job_id = service._insert(spec, "train", name=spec.name)
        core.save_adapter(model, Path(service.get(job_id)["out_dir"]) / "adapter")
        service.finish(job_id, "succeeded", only_if=("queued",))
        ids.append(job_id)
    labelled = tmp_path / "answered.json"
    labelled.write_text(json.dumps(ANSWERED))
    return service, ids, str(labelled)


def test_weight_search_job_records_points_and_saves_the_best_mixture(parent_jobs, tmp_path):
    from core.merge import merge_adapters
    from jobs import Worker

    service, (a, b), labelled = parent_jobs
    submit = dict(parent_ids=[a, b], settings={"method": "linear", "weights": [0.5, 0.5]},
                  search={"budget": 3, "seed": 11}, benchmark=labelled,
                  eval_settings={"limit": 3, "max_new_tokens": 4, "batch_size": 4})
    first, second = service.submit_weight_search(**submit), service.submit_weight_search(**submit)
    job = service.get(first)
    assert (job["kind"], job["info"]["parents"], job["info"]["search"]) == (
        "weight-search", [a, b], {"budget": 3, "low": 0.0, "high": 1.0, "seed": 11})
    assert job["spec"]["eval"]["benchmarks"] == [labelled] and job["spec"]["eval"]["limit"] == 3
    Worker(service, poll_s=0.1).run(until_idle=True)
    jobs = [service.get(i) for i in (first, second)]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], [j["error"] for j in jobs]
    result = jobs[0]["result"]
    points = result["points"]
    assert [p["weights"] for p in points] == search_points([0.5, 0.5], SearchSettings(budget=3, seed=11))
    assert all(p["total"] == 3 for p in points)
    best = max(points, key=lambda p: (p["score"], -p["index"]))
    assert (result["weights"], result["score"], result["best_point"]) == (best["weights"], best["score"],
                                                                          best["index"])
    metric = [m for m in service.metrics(first) if m["type"] == "search"]
    assert [m["step"] for m in metric] == [1, 2, 3]
    assert [1 - m["loss"] for m in metric] == pytest.approx([p["score"] for p in points])
    assert jobs[1]["result"]["points"] == points  # seeded: the same points and scores
    adapter = Path(jobs[0]["out_dir"]) / "adapter"
    reference = merge_adapters([Path(service.get(i)["out_dir"]) / "adapter" for i in (a, b)], tmp_path / "ref",
                               MergeSettings("linear", best["weights"]))
    assert reference.rank == result["rank"]
    mine, theirs = deltas(adapter), deltas(tmp_path / "ref")
    for path in theirs:
        torch.testing.assert_close(mine[path], theirs[path])
    assert service.merge_report(first)["params"] == result["params"]
    assert service.adapter_norms(first)["rank"] == result["rank"]
    export_id = service.export(first, "peft")  # the best mixture is an adapter like a merge's
    Worker(service, poll_s=0.1).run(until_idle=True)
    assert service.get(export_id)["status"] == "succeeded"
    shutil.rmtree(tmp_path / "ref")


def test_weight_search_submissions_are_checked_as_their_owner(parent_jobs):
    from core.deployment import Actor
    from jobs.errors import JobError, JobNotFound

    service, (a, b), labelled = parent_jobs
    before = len(service.list_jobs())
    stranger = service.scoped(Actor("anon:stranger00000000"))
    with pytest.raises(JobNotFound):
        stranger.submit_weight_search([a, b], {"weights": [1, 1]}, {"budget": 2}, labelled)
    for search, benchmark, field in [({"budget": 0}, labelled, "search.budget"),
                                     ({"steps": 3}, labelled, "search.steps"),
                                     ({"low": 2.0, "high": 1.0}, labelled, "search.high"),
                                     ({}, "", "benchmark"),
                                     ({}, "builtin:math?ops=pow", "eval.benchmarks")]:
        with pytest.raises(ConfigError) as err:
            service.submit_weight_search([a, b], {"weights": [1, 1]}, search, benchmark)
        assert err.value.field == field, (search, benchmark, err.value)
    with pytest.raises(ConfigError, match="unknown operation 'pow' in ops; the operations are add, sub, mul, div"):
        service.submit_weight_search([a, b], {"weights": [1, 1]}, {}, "builtin:math?ops=add,pow")
    with pytest.raises(ConfigError, match="one weight per adapter"):
        service.submit_weight_search([a, b], {"weights": [1]}, {}, labelled)
    for kind in ("merge", "weight-search"):  # never through submit, which does not check or record parents
        with pytest.raises(JobError, match=f"{kind} jobs are queued with submit_merge or submit_weight_search"):
            service.submit(service.get(a)["spec"], kind=kind)
    assert len(service.list_jobs()) == before


def test_cli_weight_search_queues_a_job(parent_jobs):
    from tests.test_jobs_support import cli

    service, (a, b), labelled = parent_jobs
    out = cli(service, "weight-search", "--method", "ties", "--density", "0.5", "--benchmark",
              "builtin:math?ops=add,sub", "--budget", "5", "--high", "2", "--search-seed", "3", "--limit", "8",
              str(a), str(b))
    job = service.get(int(out.stdout.strip()))
    assert job["kind"] == "weight-search" and job["info"]["search"] == {"budget": 5, "low": 0.0, "high": 2.0,
                                                                         "seed": 3}
    assert job["info"]["merge"]["weights"] == [0.5, 0.5] and job["info"]["merge"]["density"] == 0.5
    assert job["spec"]["eval"]["benchmarks"] == ["builtin:math?ops=add,sub"] and job["spec"]["eval"]["limit"] == 8
    bad = cli(service, "weight-search", "--benchmark", labelled, "--budget", "0", str(a), str(b), check=False)
    assert bad.returncode == 2 and "--budget" in bad.stderr


def test_merge_and_jobs_tabs_launch_and_show_a_weight_search(parent_jobs):
    from app import job_text, jobs_tab, merge_tab
    from core.weight_search import Trial, search_record
    from jobs.run import Recorder

    service, (a, b), labelled = parent_jobs
    box, _, _ = merge_tab.launch_search(service, [a, b], "linear", "0.5, 0.5", 0, 0.2, 0.5, 0, labelled, 4.0, 0.0,
                                        0.0, 1.0, 0.0, "")
    assert box["visible"] and "budget" in box["value"]
    box, status, picked = merge_tab.launch_search(service, [a, b], "linear", "0.5, 0.5", 0, 0.2, 0.5, 0, labelled,
                                                  4.0, 3.0, -0.5, 1.5, 2.0, "")
    job_id = picked["value"]
    assert not box["visible"] and f"#{job_id}" in status and job_id in [v for _, v in merge_tab.merge_choices(service)]
    job = service.get(job_id)
    assert job["info"]["search"] == {"budget": 3, "low": -0.5, "high": 1.5, "seed": 2}
    assert job["spec"]["eval"]["limit"] == 4
    assert merge_tab.search_chart(service, a)["visible"] is False
    rec = Recorder(service, job_id)
    trials = [Trial(1, [0.5, 0.5], 0.25, 1, 4), Trial(2, [1.2, -0.3], 0.75, 3, 4)]
    for t in trials:
        rec.add(**search_record(t))
    rec.flush()
    service.finish(job_id, "succeeded", only_if=("queued",), result={"weights": [1.2, -0.3], "score": 0.75,
                                                                      "best_point": 2})
    figure = merge_tab.search_chart(service, job_id)["value"]
    assert [list(trace.y) for trace in figure.data] == [[25.0, 75.0], [25.0, 75.0]]
    job = service.get(job_id)
    assert job_text.job_rows([job])[0][3] == "lora · linear"
    text = job_text.status_markdown(job)
    assert "best **#2** (1.200, -0.300): accuracy **75.0%**" in text and f"#{a}, #{b}" in text
    chart = jobs_tab.chart(service, {job_id: job}, [job_id], 0.0, False)
    assert [trace.name for trace in chart.data] == [f"#{job_id} {job['name']} · point",
                                                    f"#{job_id} {job['name']} · best so far"]
