"""Merge lab: each merge method against a direct implementation of its formula on tiny models, cat
against running the parents at once, DoRA magnitudes, refusals; the merge job, the CLI and the tab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import core
from core import AdapterConfig
from core.fields import ConfigError
from core.inject import adapters_of
from core.merge import MergeSettings, delta_norms, estimate, mask_generator, merge_adapters
from tests.tiny import tiny_model, toy_batch

DENSE = ["linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def trained(tmp: Path, name: str, method: str = "lora", arch: str = "llama", seed: int = 0, **settings) -> Path:
    """An adapter with random non-zero factors (as if trained), saved under ``tmp/name``."""
    model = tiny_model(arch)
    family = {"r": 2, "alpha": 4.0, "dropout": 0.0} if method in ("lora", "dora") else {}
    core.attach(model, AdapterConfig.for_method(method, **{**family, **settings}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in core.adapter_params(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return core.save_adapter(model, tmp / name)


def deltas(directory: Path, arch: str = "llama") -> dict[str, torch.Tensor]:
    """The dense update of every module, read by loading the adapter on the tiny model (LoRA's own code)."""
    model = core.load_adapter(tiny_model(arch), directory)
    return {path: a.lora_delta().detach() for path, a in _items(model)}


def _items(model):
    return [(n, m) for n, m in model.named_modules() if m in adapters_of(model)]


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def reference(method: str, ds: list[torch.Tensor], w: list[float], path: str, density=0.3, drop=0.4, seed=7):
    """Each method's formula written out on whole tensors, one line of maths at a time."""
    if method in ("linear", "svd"):
        return sum(wi * d for wi, d in zip(w, ds))
    if method in ("ties", "magnitude_prune"):
        tasks = []
        for d in ds:
            k = int(density * d.numel())
            threshold = d.abs().flatten().sort(descending=True).values[k - 1]
            tasks.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    else:
        tasks = [d * (torch.rand(d.shape, generator=mask_generator(seed, path, 0, i)) >= drop) / (1 - drop)
                 for i, d in enumerate(ds)]
    weighted = [wi * t for wi, t in zip(w, tasks)]
    if method in ("dare_linear", "magnitude_prune"):
        return sum(weighted)
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    total, count = torch.zeros_like(ds[0]), torch.zeros_like(ds[0])
    for t in weighted:
        agree = (torch.sign(t) == elected).float()
        total += t * agree
        count += agree
    return total / count.clamp_min(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parents")
    return [trained(tmp, "a", seed=1), trained(tmp, "b", seed=2, rslora=True)]


@pytest.mark.parametrize("method", DENSE)
def test_dense_methods_equal_their_formula(pair, tmp_path, method):
    w = [0.7, -0.4] if method in ("linear", "svd", "dare_linear") else [0.7, 0.4]
    full = 32  # every tiny module has min(out, in) = 32: rank 32 is exact
    settings = MergeSettings(method=method, weights=w, rank=full, density=0.3, drop=0.4, seed=7)
    result = merge_adapters(pair, tmp_path / "m", settings)
    assert result.rank == full and result.energy == pytest.approx(1.0, abs=1e-6)
    parents = [deltas(p) for p in pair]
    merged = deltas(tmp_path / "m")
    assert set(merged) == set(parents[0])
    for path, got in merged.items():
        want = reference(method, [p[path] for p in parents], w, path)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_truncation_is_the_best_rank_r_approximation_and_reports_its_energy(pair, tmp_path):
    result = merge_adapters(pair, tmp_path / "m", MergeSettings(method="ties", weights=[1.0, 1.0], rank=3,
                                                                density=0.5))
    parents = [deltas(p) for p in pair]
    merged = deltas(tmp_path / "m")
    kept = total = 0.0
    for path, got in merged.items():
        m = reference("ties", [p[path] for p in parents], [1.0, 1.0], path, density=0.5)
        torch.testing.assert_close(got, best_rank(m, 3), rtol=1e-4, atol=1e-5)
        s = torch.linalg.svdvals(m).double() ** 2
        kept, total = kept + float(s[:3].sum()), total + float(s.sum())
        assert result.module_energy[path] == pytest.approx(float(s[:3].sum() / s.sum()), rel=1e-5)
    assert result.energy == pytest.approx(kept / total, rel=1e-5) and result.energy < 0.99
    assert core.read_adapter_config(tmp_path / "m")["adapter"]["settings"]["r"] == 3


def test_dare_masks_are_seeded_and_drop_about_p(pair, tmp_path):
    runs = {}
    for name, seed in [("x", 3), ("y", 3), ("z", 4)]:
        merge_adapters(pair, tmp_path / name, MergeSettings(method="dare_linear", weights=[1.0, 0.0], rank=32,
                                                            drop=0.5, seed=seed))
        runs[name] = deltas(tmp_path / name)
    path = "model.layers.0.mlp.up_proj"
    assert torch.equal(runs["x"][path], runs["y"][path]) and not torch.equal(runs["x"][path], runs["z"][path])
    parent = deltas(pair[0])[path]
    kept = runs["x"][path].abs() > 1e-4  # the rank-32 SVD leaves dropped entries at rounding level
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(runs["x"][path], torch.where(kept, 2 * parent, 0.0), rtol=1e-3, atol=1e-4)


def test_cat_runs_as_both_adapters_at_once(pair, tmp_path):
    result = merge_adapters(pair, tmp_path / "cat", MergeSettings(method="cat", weights=[1.0, 1.0]))
    assert result.rank == 4 and result.energy == 1.0
    both = core.load_adapter(tiny_model("llama"), pair[0])
    for path, a in _items(both):  # fold the first adapter into the base for good, then add the second
        parent, _, name = path.rpartition(".")
        setattr(both.get_submodule(parent), name, a.fold())
    del both.adapter_config
    core.load_adapter(both, pair[1])
    merged = core.load_adapter(tiny_model("llama"), tmp_path / "cat")
    batch = toy_batch()
    with torch.no_grad():
        want = both(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cat_weights_scale_each_update_and_fused_pissa_parents_merge(tmp_path):
    parents = [trained(tmp_path, "g1", arch="gpt2", seed=1, targets=["q", "v", "up"]),
               trained(tmp_path, "g2", arch="gpt2", seed=2, targets=["q", "v", "up"], init="pissa")]
    for method in ("cat", "linear"):
        rank = None if method == "cat" else 32
        merge_adapters(parents, tmp_path / method, MergeSettings(method=method, weights=[0.5, 2.0], rank=rank))
        ds = [deltas(p, "gpt2") for p in parents]
        for path, got in deltas(tmp_path / method, "gpt2").items():
            torch.testing.assert_close(got, 0.5 * ds[0][path] + 2.0 * ds[1][path], rtol=1e-4, atol=1e-5)
    assert core.read_adapter_config(tmp_path / "cat")["adapter"]["settings"]["r"] == 2 + 4  # PiSSA: rank 2r


def test_dora_magnitudes_are_averaged_by_the_weights(tmp_path):
    parents = [trained(tmp_path, "d1", "dora", seed=1), trained(tmp_path, "d2", "dora", seed=2)]
    merge_adapters(parents, tmp_path / "m", MergeSettings(method="linear", weights=[3.0, 1.0], rank=32))
    models = [core.load_adapter(tiny_model("llama"), d) for d in [*parents, tmp_path / "m"]]
    assert core.read_adapter_config(tmp_path / "m")["adapter"]["method"] == "dora"
    for (path, a), (_, b), (_, m) in zip(*(_items(x) for x in models)):
        torch.testing.assert_close(m.magnitude_vector(), (3 * a.magnitude_vector() + b.magnitude_vector()) / 4)
        torch.testing.assert_close(m.lora_delta(), 3 * a.lora_delta() + b.lora_delta(), rtol=1e-4, atol=1e-5)


def test_the_result_loads_exports_and_merges_again(pair, tmp_path):
    merge_adapters(pair, tmp_path / "m", MergeSettings(method="ties", weights=[0.5, 0.5], rank=4))
    model = core.load_adapter(tiny_model("llama"), tmp_path / "m")
    peft_dir = core.export_peft(model, tmp_path / "peft")
    assert json.loads((peft_dir / "adapter_config.json").read_text())["r"] == 4
    again = merge_adapters([tmp_path / "m", pair[0]], tmp_path / "m2", MergeSettings(method="cat", weights=[1, 1]))
    assert again.rank == 4 + 2
    ds = [deltas(tmp_path / "m"), deltas(pair[0])]
    for path, got in deltas(tmp_path / "m2").items():
        torch.testing.assert_close(got, ds[0][path] + ds[1][path], rtol=1e-4, atol=1e-5)


def test_ties_and_magnitude_prune_match_peft_with_equal_weights(pair, tmp_path):
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    parents = [deltas(p) for p in pair]
    w = torch.tensor([0.5, 0.5])
    for method, peft_fn in [("ties", merge_utils.ties), ("magnitude_prune", merge_utils.magnitude_prune)]:
        merge_adapters(pair, tmp_path / method, MergeSettings(method=method, weights=[0.5, 0.5], rank=32,
                                                              density=0.3))
        for path, got in deltas(tmp_path / method).items():
            want = peft_fn([p[path] for p in parents], w, 0.3)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_delta_norms_and_estimate_come_from_the_files(pair):
    table = delta_norms(pair[0])
    ds = deltas(pair[0])
    assert table["layers"] == [0, 1] and "self_attn.q_proj" in table["modules"] and table["rank"] == 2
    for layer in table["layers"]:
        for module, norm in zip(table["modules"], table["norms"][layer]):
            assert norm == pytest.approx(float(ds[f"model.layers.{layer}.{module}"].norm()), rel=1e-4)
    est = estimate(pair, MergeSettings("ties", [1, 1], rank=8))
    assert est["rank"] == 8 and est["params"] == sum(8 * sum(d.shape) for d in ds.values())
    assert estimate(pair, MergeSettings("cat", [1, 1]))["rank"] == 4


def test_refusals_name_the_adapter_and_the_reason(pair, tmp_path):
    vera = trained(tmp_path, "vera", "vera", r=4)
    with pytest.raises(ConfigError, match=r"job 9 is a VeRA adapter, which cannot be merged"):
        merge_adapters([pair[0], vera], tmp_path / "x", MergeSettings("linear", [1, 1]), names=["job 8", "job 9"])
    other = trained(tmp_path, "other", targets=["q", "v"])
    with pytest.raises(ConfigError, match=r"cannot merge job 2: it adapts other modules"):
        merge_adapters([pair[0], other], tmp_path / "x", MergeSettings("linear", [1, 1]), names=["job 1", "job 2"])
    dora = trained(tmp_path, "dora", "dora")
    with pytest.raises(ConfigError, match=r"cannot merge .*dora: it is DoRA, .* is LoRA"):
        merge_adapters([pair[0], dora], tmp_path / "x", MergeSettings("linear", [1, 1]))
    moved = tmp_path / "moved"
    moved.mkdir()
    meta = core.read_adapter_config(pair[1])
    (moved / "adapter_config.json").write_text(json.dumps({**meta, "base_model": "someone/else"}))
    (moved / "adapter.safetensors").write_bytes((pair[1] / "adapter.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"trained on base model 'someone/else'"):
        merge_adapters([pair[0], moved], tmp_path / "x", MergeSettings("linear", [1, 1]))
    for bad, field in [(dict(weights=[1.0]), "weights"), (dict(weights=[1, float("nan")]), "weights"),
                       (dict(weights=[0, 0]), "weights"), (dict(density=0.0), "density"),
                       (dict(drop=1.0), "drop"), (dict(method="cat", rank=4), "rank"),
                       (dict(method="mean"), "method"), (dict(rank=0), "rank")]:
        settings = MergeSettings(**{"method": "ties", "weights": [1, 1], **bad})
        with pytest.raises(ConfigError) as err:
            merge_adapters(pair, tmp_path / "x", settings)
        assert err.value.field == field
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# The merge job, through the service, the worker and the CLI.

@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory, tiny_model_dir):
    """Two finished tiny LoRA training jobs on one service (and the service)."""
    from jobs import Worker
    from tests.test_jobs_support import ROWS, make_service, tiny_spec, write_data

    tmp = tmp_path_factory.mktemp("merge-jobs")
    service = make_service(tmp)
    halves = [write_data(tmp / "add.json", ROWS[:12]), write_data(tmp / "more.json", ROWS[12:])]
    ids = [service.submit(tiny_spec(tiny_model_dir, data, dropout=0.0, max_steps=2, eval_every=2, save_every=2))
           for data in halves]
    Worker(service, poll_s=0.1).run(until_idle=True)
    assert [service.get(i)["status"] for i in ids] == ["succeeded", "succeeded"]
    yield service, ids
    service.close()


def _adapter(service, job_id: int) -> Path:
    return Path(service.get(job_id)["out_dir"]) / "adapter"


def test_merge_job_writes_an_adapter_that_chats_evaluates_and_exports(two_jobs, tiny_model_dir):
    from app.chat_tab import model_options
    from jobs import Worker

    service, (a, b) = two_jobs
    plan = service.plan_merge([a, b], {"method": "cat", "weights": [0.5, 0.5]})
    assert plan["rank"] == 8
    merge_id = service.submit_merge([a, b], {"method": "cat", "weights": [0.5, 0.5]}, benchmarks=["AddSub"],
                                    evaluate_parents=True)
    job = service.get(merge_id)
    assert (job["kind"], job["status"], job["info"]["parents"]) == ("merge", "queued", [a, b])
    assert job["spec"]["adapter"]["settings"]["r"] == 8 and job["spec"]["eval"]["benchmarks"] == ["AddSub"]
    queued_evals = service.list_jobs(kind="evaluate")
    assert sorted(j["target_job_id"] for j in queued_evals) == [a, b]
    for j in queued_evals:  # the tiny model cannot answer AddSub: the merge is what is checked here
        service.cancel(j["id"])
    with service.db.write() as s:  # the merge's own evaluation is run_benchmarks, tested with training jobs
        from jobs.schema import Job

        row = s.get(Job, merge_id)
        row.spec = {**row.spec, "eval": {**row.spec["eval"], "benchmarks": []}}
    Worker(service, poll_s=0.1).run(until_idle=True)
    job = service.get(merge_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["rank"] == 8 and job["result"]["energy"] == 1.0
    assert service.merge_report(merge_id)["params"] == job["result"]["params"]
    parents = [deltas(_adapter(service, i)) for i in (a, b)]
    model = core.load_adapter(core.load_model(_model_settings(tiny_model_dir)).model, _adapter(service, merge_id))
    for path, m in _items(model):
        torch.testing.assert_close(m.lora_delta(), 0.5 * parents[0][path] + 0.5 * parents[1][path],
                                   rtol=1e-4, atol=1e-6)
    assert any(value == f"job:{merge_id}" for _, value in model_options(service))
    assert service.get(service.submit_evaluation(["AddSub"], job_id=merge_id))["target_job_id"] == merge_id
    export_id = service.export(merge_id, "peft")
    Worker(service, poll_s=0.1).run(until_idle=True)
    assert service.get(export_id)["status"] == "succeeded" and service.artifact(merge_id, "peft")
    norms = service.adapter_norms(merge_id)
    assert norms["rank"] == 8 and len(norms["layers"]) == 2


def _model_settings(model_dir):
    from core.config import ModelSettings

    return ModelSettings(name=str(model_dir), precision="fp32", device="cpu")


def test_merge_submissions_are_checked_as_their_owner(two_jobs, tmp_path):
    from core.deployment import Actor
    from jobs.errors import JobError, JobNotFound

    service, (a, b) = two_jobs
    before = len(service.list_jobs())
    stranger = service.scoped(Actor("anon:stranger00000000"))
    with pytest.raises(JobNotFound):
        stranger.submit_merge([a, b], {"method": "ties", "weights": [1, 1]})
    for parents, settings, error, text in [
            ([a, a], {"weights": [1, 1]}, ConfigError, "each adapter may be chosen once"),
            ([a, b], {"weights": [1]}, ConfigError, "one weight per adapter"),
            ([a, b], {"weights": [1, 1], "p": 0.3}, ConfigError, "unknown merge setting"),
            ([a, b], {"method": "cat", "weights": [1, 1], "rank": 3}, ConfigError, "leave rank unset")]:
        with pytest.raises(error, match=text):
            service.submit_merge(parents, settings)
    evaluation = service.submit_evaluation(["AddSub"], job_id=a)
    with pytest.raises(JobError, match=f"job {evaluation} is still queued"):
        service.submit_merge([a, evaluation], {"weights": [1, 1]})
    service.cancel(evaluation)
    with pytest.raises(JobError, match=f"job {evaluation} is an evaluate job"):
        service.submit_merge([a, evaluation], {"weights": [1, 1]})
    assert len(service.list_jobs()) == before + 1  # the evaluation only


def test_cli_merge_queues_a_job_and_reports_bad_input(two_jobs):
    from tests.test_jobs_support import cli

    service, (a, b) = two_jobs
    out = cli(service, "merge", "--method", "ties", "--weights", "0.7,0.3", "--rank", "4", "--density", "0.5",
              str(a), str(b))
    job = service.get(int(out.stdout.strip()))
    assert job["kind"] == "merge" and job["info"]["parents"] == [a, b]
    assert job["spec"]["eval"]["benchmarks"] == []
    assert job["info"]["merge"] == {"method": "ties", "weights": [0.7, 0.3], "rank": 4, "density": 0.5,
                                    "drop": 0.5, "seed": 0}
    service.cancel(job["id"])
    # a built-in part keeps its commas in the comma-separated list
    out = cli(service, "merge", "--benchmarks", "builtin:math?ops=add,sub,builtin:math,builtin:math?ops=mul,div",
              str(a), str(b))
    assert service.get(int(out.stdout.strip()))["spec"]["eval"]["benchmarks"] == \
        ["builtin:math?ops=add,sub", "builtin:math", "builtin:math?ops=mul,div"]
    service.cancel(int(out.stdout.strip()))
    bad = cli(service, "merge", "--weights", "0.5,x", str(a), str(b), check=False)
    assert bad.returncode == 2 and "weights: expected numbers" in bad.stderr
    bad = cli(service, "merge", "--method", "average", str(a), str(b), check=False)
    assert bad.returncode == 2 and "unknown merge method 'average'" in bad.stderr


# --------------------------------------------------------------------------------------------------
# The Merge tab's handlers, without a browser, on jobs whose adapters are written directly.

@pytest.fixture
def adapter_jobs(service, tmp_path):
    """Two finished LoRA jobs and a VeRA one, their adapters saved where training would put them."""
    import shutil

    from core.config import JobSpec

    ids = []
    for name, method, seed in [("a", "lora", 1), ("b", "lora", 2), ("v", "vera", 3)]:
        spec = JobSpec(name=name)
        spec.adapter = AdapterConfig.for_method(method)
        job_id = service._insert(spec, "train", name=name)
        shutil.copytree(trained(tmp_path, name, method, seed=seed), Path(service.get(job_id)["out_dir"]) / "adapter")
        service.finish(job_id, "succeeded", only_if=("queued",))
        ids.append(job_id)
    return ids


def test_merge_tab_plans_launches_and_shows_the_result(service, adapter_jobs):
    import gradio as gr

    from app import merge_tab, ui

    a, b, vera = adapter_jobs
    assert [v for _, v in merge_tab.parent_choices(service)] == [b, a]  # not VeRA
    figure, plan, box = merge_tab.preview(service, [a, b], "ties", "0.6, 0.4", 0, 0.2, 0.5, 0)
    assert len(figure.data) == 2 and "rank **2**" in plan and not box["visible"]
    _, plan, box = merge_tab.preview(service, [a, b], "ties", "0.6, x", 0, 0.2, 0.5, 0)
    assert box["visible"] and "weights" in box["value"] and plan == ""
    _, _, box = merge_tab.preview(service, [a, vera], "linear", "", 0, 0.2, 0.5, 0)
    assert box["visible"] and "cannot be merged" in box["value"]
    before = len(service.list_jobs())
    box, _, _ = merge_tab.launch(service, [a, b], "cat", "", 4, 0.2, 0.5, 0, [], False, "")
    assert box["visible"] and "leave rank unset" in box["value"] and len(service.list_jobs()) == before
    box, status, picked = merge_tab.launch(service, [a, b], "dare_ties", "0.5,0.5", 3, 0.2, 0.3, 5, [], False, "")
    merge_id = picked["value"]
    assert not box["visible"] and f"#{merge_id}" in status
    assert service.get(merge_id)["info"]["merge"] == {"method": "dare_ties", "weights": [0.5, 0.5], "rank": 3,
                                                      "density": 0.2, "drop": 0.3, "seed": 5}
    _, text = merge_tab.result(service, merge_id)
    assert "queued" in text
    result = service.build_merge(merge_id)  # what the job's child does
    service.finish(merge_id, "succeeded", only_if=("queued",))
    figure, text = merge_tab.result(service, merge_id)
    assert len(figure.data) == 3 and f"{100 * result['energy']:.2f}%" in text and "rank **3**" in text
    assert merge_tab.compare_keys(service, merge_id) == [f"job:{a}", f"job:{b}", f"job:{merge_id}"]
    assert [v for _, v in merge_tab.merge_choices(service)] == [merge_id]
    assert [u["visible"] for u in merge_tab.setting_visibility("cat")] == [False, False, False, False]
    assert [u["visible"] for u in merge_tab.setting_visibility("dare_ties")] == [False, True, True, True]
    demo = ui.build_demo(service)
    assert isinstance(demo.workbench["merge"], merge_tab.MergeTab)
    assert isinstance(demo.workbench["merge"].heatmap, gr.Plot)
