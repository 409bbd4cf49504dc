"""lm-evaluation-harness on our models (issue 17): the ``workbench`` LM class against our own scoring and
decoding, the custom task YAML rules of each deployment mode, and the ``lmeval`` job kind end to end.

Skipped when ``lm_eval`` is not installed (requirements-lmeval.txt; CI installs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402
import transformers as T  # noqa: E402

from core.config import EvalSettings  # noqa: E402
from core.deployment import Actor, Deployment  # noqa: E402
from core.fields import ConfigError  # noqa: E402
from core.lmeval import WorkbenchLM  # noqa: E402
from core.lmeval_tasks import FunctionRef, read_task_yaml, run_tasks, task_results  # noqa: E402
from jobs import JobService, Worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\\n\\n### Instruction:\\n{{instruction}}\\n\\n### Response:\\n")


def write_task(folder: Path, rows: int = 6, name: str = "tiny_mc") -> tuple[Path, Path]:
    """A multiple-choice JSON file (a ``choices`` column, the answer's index) and an lm-eval task YAML over it
    whose prompt is our alpaca template, as ``core.evaluate`` renders it for the loglikelihood protocol."""
    data = folder / f"{name}.json"
    options = ["1 apple", "2 apples", "three", "none left"]
    data.write_text(json.dumps([{"instruction": f"how many apples does Tom have {i}?", "choices": options[i % 2:],
                                 "answer": i % 3} for i in range(rows)]))
    task = folder / f"{name}.yaml"
    task.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{ALPACA}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return data, task


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = T.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, T.AutoTokenizer.from_pretrained(tiny_model_dir)


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_a_custom_task_chooses_as_our_loglikelihood_protocol_does(tiny, tmp_path):
    from core.evaluate import evaluate

    model, tok = tiny
    data, task = write_task(tmp_path)
    [result] = task_results(run_tasks(WorkbenchLM(model, tok, batch_size=3), [], [task], bootstrap_iters=0))
    ours = evaluate(model, tok, str(data), EvalSettings(protocol="loglikelihood", batch_size=5))
    assert result.task == "tiny_mc" and result.metric == "acc" and result.total == ours.total == 6
    assert [s["index"] for s in result.samples] == [s["index"] for s in ours.samples]
    assert [s["response"] for s in result.samples] == [s["response"] for s in ours.samples]  # the chosen option
    assert [s["correct"] for s in result.samples] == [s["correct"] for s in ours.samples]
    for theirs, mine in zip(result.samples, ours.samples):
        assert theirs["scores"] == pytest.approx(mine["scores"], abs=1e-4)
        assert len(set(theirs["scores"])) == len(theirs["scores"])  # no ties: the choice is a real test
    assert result.accuracy == pytest.approx(ours.accuracy) and result.correct == ours.correct
    assert result.accuracy_norm == pytest.approx(ours.accuracy_norm)
    assert {"acc", "acc_norm"} <= set(result.metrics)


def test_generate_until_is_greedy_decoding_cut_at_the_until_strings(tiny):
    model, tok = tiny
    prompts = ["how many apples", "Tom buys more and gives some away"]
    ids = [tok(p)["input_ids"] for p in prompts]
    with torch.no_grad():
        refs = [model.generate(torch.tensor([i]), attention_mask=torch.ones(1, len(i), dtype=torch.long),
                               max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(i):]
                for i in ids]
    texts = [tok.decode(r, skip_special_tokens=True) for r in refs]
    lm = WorkbenchLM(model, tok, batch_size=2)
    plain = lm.generate_until(requests(*[(p, {"until": [], "max_gen_toks": 12}) for p in prompts]))
    assert plain == texts
    stops = [t[len(t) // 2:len(t) // 2 + 2] for t in texts]  # a piece of each greedy answer
    assert all(stops)
    cut = lm.generate_until(requests(*[(p, {"until": [s], "max_gen_toks": 12, "do_sample": False})
                                       for p, s in zip(prompts, stops)]))
    assert cut == [t.split(s)[0] for t, s in zip(texts, stops)]
    [empty] = lm.generate_until(requests(("", {"until": [], "max_gen_toks": 3})))  # starts from BOS/EOS
    assert isinstance(empty, str)
    with pytest.raises(ValueError, match="greedily only"):
        lm.generate_until(requests(("x", {"until": [], "do_sample": True, "temperature": 0.7})))


def test_rolling_loglikelihood_is_the_texts_summed_logprob_after_bos(tiny):
    model, tok = tiny
    text = "He buys more and gives some away, plus minus times total left."
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        logits = model(torch.tensor([[prefix] + tokens[:-1]])).logits.float()
    direct = logits.log_softmax(-1)[0].gather(-1, torch.tensor(tokens).unsqueeze(-1)).sum().item()
    lm = WorkbenchLM(model, tok, batch_size=4)
    [total, short] = lm.loglikelihood_rolling(requests((text,), ("plus minus",)))
    assert total == pytest.approx(direct, abs=1e-3)
    windowed = WorkbenchLM(model, tok, batch_size=4, max_length=6).loglikelihood_rolling(requests((text,)))[0]
    assert windowed < 0 and windowed != pytest.approx(direct, abs=1e-3)  # shorter contexts: other numbers
    assert short < 0


def test_a_task_yaml_is_read_without_running_its_code():
    config = read_task_yaml("task: t\ndataset_path: json\nprocess_docs: !function os.system\n")
    assert config["process_docs"] == FunctionRef("os.system")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_task_yaml("task: [unclosed")


def test_custom_yaml_is_refused_in_public_mode_and_admin_only_in_team_mode(tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    data, task = write_task(tmp_path / "data")
    text = task.read_text()
    public = JobService(f"sqlite:///{tmp_path / 'p.db'}", home=tmp_path / "p", deployment=Deployment.for_mode("public"))
    with pytest.raises(ConfigError, match="public workbench") as err:
        public.scoped(Actor("anon:alice0000000000")).submit_lmeval(task_yaml=text, limit=10)
    assert err.value.field == "task_yaml"
    team = JobService(f"sqlite:///{tmp_path / 't.db'}", home=tmp_path / "t",
                      deployment=Deployment.for_mode("team", data_dirs=(tmp_path / "data", tiny_model_dir)))
    with pytest.raises(ConfigError, match="only an admin") as err:
        team.scoped(Actor("alice")).submit_lmeval(task_yaml=text, model=str(tiny_model_dir))
    assert err.value.field == "task_yaml"
    root = team.scoped(Actor("root", admin=True))
    job = root.get(root.submit_lmeval(task_yaml=text, model=str(tiny_model_dir)))
    assert job["kind"] == "lmeval" and job["info"]["lmeval"]["task_name"] == "tiny_mc"
    stored = read_task_yaml(job["info"]["lmeval"]["task_yaml"])
    assert stored["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())
    outside = tmp_path / "outside.json"
    outside.write_text(data.read_text())
    with pytest.raises(ConfigError) as err:
        root.submit_lmeval(task_yaml=text.replace(str(data), str(outside)), model=str(tiny_model_dir))
    assert err.value.field == "task_yaml.dataset_kwargs.data_files.test"
    with pytest.raises(ConfigError) as err:
        root.submit_lmeval(task_yaml=text + "include: other.yaml\n", model=str(tiny_model_dir))
    assert err.value.field == "task_yaml.include"
    for svc in (public, team):
        svc.close()


def test_public_visitors_run_the_servers_named_tasks_within_the_example_cap(tmp_path):
    public = JobService(f"sqlite:///{tmp_path / 'p.db'}", home=tmp_path / "p", deployment=Deployment.for_mode("public"))
    alice = public.scoped(Actor("anon:alice0000000000"))
    with pytest.raises(ConfigError) as err:
        alice.submit_lmeval(["arc_easy"])
    assert err.value.field == "limit"
    with pytest.raises(ConfigError) as err:
        alice.submit_lmeval(["arc_easy; rm -rf /"], limit=10)
    assert err.value.field == "tasks[0]"
    job = alice.get(alice.submit_lmeval(["arc_easy"], limit=10))
    assert job["info"]["lmeval"]["tasks"] == ["arc_easy"] and job["info"]["lmeval"]["task_yaml"] is None
    with pytest.raises(ConfigError, match="this public workbench runs the lm-eval tasks arc_easy, ") as err:
        alice.submit_lmeval(["piqa", "mmlu"], limit=10)  # a group of 57 tasks: not on the server's list
    assert err.value.field == "tasks"
    public.close()
    assert Deployment.from_env({"WORKBENCH_MODE": "public", "WORKBENCH_LMEVAL_TASKS": "piqa, mmlu"}).lmeval_tasks \
        == ("piqa", "mmlu")
    assert "hellaswag" in Deployment.from_env({"WORKBENCH_MODE": "public"}).lmeval_tasks


def test_a_hub_task_offline_fails_saying_so(monkeypatch, tmp_path):
    from core import lmeval_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = tmp_path / "hub_task.yaml"
    task.write_text("task: hub_task\ndataset_path: nobody-here/no-such-dataset\noutput_type: multiple_choice\n"
                    "test_split: test\ndoc_to_text: q\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n")
    with pytest.raises(lmeval_tasks.LmEvalError, match="custom task 'hub_task'.*offline"):
        lmeval_tasks.load_tasks([], [task])


@pytest.mark.slow
def test_named_tasks_offline_and_unknown_are_told_apart(monkeypatch):
    """lm-eval's own tasks (indexing its ~15,000 task names takes a while on a busy machine)."""
    from core import lmeval_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lmeval_tasks.LmEvalError, match="arc_easy.*offline"):
        lmeval_tasks.load_tasks(["arc_easy"], [])
    with pytest.raises(lmeval_tasks.LmEvalError, match="unknown lm-eval task 'no_such_task_anywhere'"):
        lmeval_tasks.load_tasks(["no_such_task_anywhere"], [])


def finished_adapter_job(service: JobService, model_dir: Path, tmp_path: Path) -> int:
    """A training job marked succeeded whose adapter (a LoRA with non-zero B, so it changes the model) is
    written where training writes it: cheaper than training one."""
    import core
    from tests.test_jobs_support import tiny_spec, write_data

    spec = tiny_spec(model_dir, write_data(tmp_path / "rows.json"))
    job_id = service.submit(spec)
    model = T.AutoModelForCausalLM.from_pretrained(model_dir)
    core.attach(model, spec.adapter)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    core.save_adapter(model, Path(service.get(job_id)["out_dir"]) / "adapter",
                      extra={"training": {"status": "completed", "spec": spec.to_dict()}})
    service.finish(job_id, "succeeded", only_if=None)
    return job_id


@pytest.mark.slow
def test_an_lmeval_job_runs_end_to_end(tmp_path, tiny_model_dir, tiny):
    """A job child on a tiny adapter job: the custom task stored as an lm-eval evaluation of that job with its
    samples, scored with the adapter loaded (its scores are the adapted model's, not the base model's)."""
    data, task = write_task(tmp_path, rows=5)
    service = JobService(f"sqlite:///{tmp_path / 'jobs.db'}", home=tmp_path / "home")
    adapter_job = finished_adapter_job(service, tiny_model_dir, tmp_path)
    job_id = service.submit_lmeval(task_yaml=task.read_text(), job_id=adapter_job, limit=4, batch_size=4)
    Worker(service, poll_s=0.1).run(until_idle=True)
    job = service.get(job_id)
    assert job["status"] == "succeeded", (job["error"], service.logs(job_id))
    [ev] = service.list_evaluations(protocol="lm-eval")
    assert (ev["benchmark"], ev["total"], ev["run_job_id"], ev["job_id"]) == ("tiny_mc", 4, job_id, adapter_job)
    assert ev["settings"]["metric"] == "acc" and "acc_norm" in ev["settings"]["metrics"]
    assert ev["accuracy"] == pytest.approx(ev["correct"] / 4) and ev["accuracy_norm"] is not None
    samples = service.eval_samples(ev["id"])
    assert [s["index"] for s in samples] == [0, 1, 2, 3] and all(len(s["scores"]) in (3, 4) for s in samples)
    assert job["result"]["evaluations"] == [ev["id"]]
    base = task_results(run_tasks(WorkbenchLM(*tiny, batch_size=4), [], [task], limit=4, bootstrap_iters=0))[0]
    assert all(s["scores"] != pytest.approx(b["scores"], abs=1e-3) for s, b in zip(samples, base.samples))
    service.close()


@pytest.mark.slow
def test_the_entry_point_hands_lm_eval_its_arguments(tmp_path, tiny_model_dir):
    """``python -m core.lmeval --base DIR`` runs lm-eval's own CLI with our model class."""
    _, task = write_task(tmp_path, rows=3)
    out = subprocess.run([sys.executable, "-m", "core.lmeval", "--base", str(tiny_model_dir), "--tasks", str(task),
                          "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tiny_mc" in out.stdout and "acc_norm" in out.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_the_compare_tabs_panel_queues_jobs_and_says_what_is_wrong(tmp_path, tiny_model_dir):
    from app.lmeval_panel import run_lmeval

    _, task = write_task(tmp_path)
    service = JobService(f"sqlite:///{tmp_path / 'jobs.db'}", home=tmp_path / "home")
    assert "pick an adapter" in run_lmeval(service, None, "arc_easy", "", 0, None, 8)["value"]
    assert "**tasks**" in run_lmeval(service, f"base:{tiny_model_dir}", " ", "", 0, None, 8)["value"]
    assert "whole number" in run_lmeval(service, f"base:{tiny_model_dir}", "arc_easy", "", 0, 1.5, 8)["value"]
    assert run_lmeval(service, f"base:{tiny_model_dir}", "arc_easy", task.read_text(), 5, 2, 4)["visible"] is False
    [job] = service.list_jobs(kind="lmeval")
    assert job["info"]["lmeval"]["tasks"] == ["arc_easy"] and job["info"]["lmeval"]["num_fewshot"] == 2
    assert (job["spec"]["eval"]["limit"], job["spec"]["eval"]["batch_size"]) == (5, 4)
    service.close()
