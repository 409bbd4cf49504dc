"""The training recipe on a tiny checkpoint: files in, adapter out, exact resume, clean stop, clear errors."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

import core
from core import AdapterConfig, ConfigError
from core.callbacks import TrainCallbacks
from core.train import Trainer, latest_checkpoint, plan_epoch, train
from tests.test_jobs_support import ROWS, tiny_spec

def write_rows(path, rows=ROWS):
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


class Recorder(TrainCallbacks):
    def __init__(self, stop_after: int | None = None):
        self.steps, self.evals, self.info = [], [], None
        self.stop_after = stop_after

    def on_start(self, info):
        self.info = info

    def on_step(self, report):
        self.steps.append(report)

    def on_eval(self, report):
        self.evals.append(report)

    def should_stop(self):
        return self.stop_after is not None and len(self.steps) >= self.stop_after


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_trains_end_to_end_from_each_file_format(tiny_model_dir, tmp_path, suffix):
    data = write_rows(tmp_path / f"rows{suffix}")
    rec = Recorder()
    result = train(tiny_spec(tiny_model_dir, data, max_steps=8, eval_every=4), tmp_path / "out", rec)
    assert result.status == "completed" and result.steps == 8
    assert [r.step for r in rec.steps] == list(range(1, 9))
    assert rec.steps[-1].loss < rec.steps[0].loss
    assert [e.step for e in rec.evals] == [4, 8]
    assert (tmp_path / "out" / "adapter" / "adapter.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "spec.json").read_text())["name"] == "tiny"
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x["type"] == "step") == 8
    assert rec.info["train_examples"] == len(ROWS) - 4


def test_fast_loss_equals_the_models_own_loss(tiny_model_dir, tmp_path):
    """Logits only at labelled positions give the same loss as the full Hugging Face forward."""
    trainer = Trainer(tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json")), tmp_path / "out")
    trainer.setup()
    examples = trainer.train_data.examples[:3]
    batch = core.data.collate(examples, trainer.pad_id)
    with torch.no_grad():
        fast, count = trainer.batch_loss(batch)
        reference = trainer.model(**batch).loss
    assert count == sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
    torch.testing.assert_close(fast / count, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_loss_equals_plain_cross_entropy(monkeypatch, dtype, bias):
    """Loss and gradient of the chunked head path equal ``F.cross_entropy`` on the full logits."""
    from core import head_loss as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 3 * 50)  # chunks of 3 tokens over a 50-word vocabulary
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).to(dtype).requires_grad_(False)
    hidden = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    loss = module.head_loss(head, hidden, targets)
    (2 * loss).backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(head(ref_hidden).float(), targets, reduction="sum")
    (2 * ref).backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, **tol)


def test_head_loss_is_exact_when_the_target_probability_underflows():
    """A logit gap beyond fp32's range (p_y == 0 after softmax) still gives the finite, exact loss."""
    from core.head_loss import head_loss

    head = torch.nn.Linear(2, 3, bias=False).requires_grad_(False)
    head.weight.copy_(torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 1.0]]))
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([1, 2])  # the first row's target sits 200 nats below the best logit
    loss = head_loss(head, hidden, targets)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(head(ref_hidden), targets, reduction="sum")
    ref.backward()
    assert torch.isfinite(loss) and loss.item() > 200
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)


def test_head_loss_without_grad_and_with_a_trainable_head():
    from core.head_loss import head_loss

    head = torch.nn.Linear(8, 20)  # trainable: the plain path, so the head gets its gradient
    hidden, targets = torch.randn(5, 8), torch.randint(0, 20, (5,))
    head_loss(head, hidden, targets).backward()
    assert head.weight.grad is not None
    head.requires_grad_(False)
    with torch.no_grad():
        value = head_loss(head, hidden, targets)
    torch.testing.assert_close(value, torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum"))


def test_prompt_tokens_carry_no_loss(tiny_model_dir, tmp_path):
    trainer = Trainer(tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json")), tmp_path / "out")
    trainer.setup()
    example = trainer.train_data.examples[0]
    assert example.labels[:example.num_prompt_tokens] == [-100] * example.num_prompt_tokens
    assert all(x != -100 for x in example.labels[example.num_prompt_tokens:])


def test_same_seed_same_losses_and_exact_resume(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "d.json")
    spec = tiny_spec(tiny_model_dir, data)
    spec.adapter = AdapterConfig.for_method("lora", r=4, alpha=8, dropout=0.1)  # dropout consumes the RNG
    full = Recorder()
    train(spec, tmp_path / "a", full)
    again = Recorder()
    train(spec, tmp_path / "b", again)
    assert [r.loss for r in full.steps] == [r.loss for r in again.steps]

    first = Recorder(stop_after=3)
    assert train(spec, tmp_path / "c", first).status == "stopped"
    checkpoint = latest_checkpoint(tmp_path / "c")
    assert checkpoint is not None and checkpoint.name == "step-3"
    rest = Recorder()
    result = train(spec, tmp_path / "c", rest, resume_from=checkpoint)
    assert result.steps == 6
    losses = [r.loss for r in first.steps] + [r.loss for r in rest.steps]
    assert losses == pytest.approx([r.loss for r in full.steps], rel=1e-6)


def test_should_stop_leaves_a_loadable_adapter(tiny_model_dir, tmp_path):
    rec = Recorder(stop_after=2)
    result = train(tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json")), tmp_path / "out", rec)
    assert result.status == "stopped" and result.steps == 2
    from transformers import AutoModelForCausalLM
    model = core.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    assert core.trainable_report(model)["trainable"] > 0


@pytest.mark.parametrize("method", ["series", "parallel", "prefix", "prompt", "ptuning"])
def test_every_method_trains(tiny_model_dir, tmp_path, method):
    spec = tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json"), max_steps=4, eval_every=0, save_every=0)
    spec.adapter = AdapterConfig.for_method(method, **({"bottleneck": 8} if method in ("series", "parallel") else
                                                       {"num_virtual_tokens": 4}))
    rec = Recorder()
    assert train(spec, tmp_path / "out", rec).status == "completed"
    assert all(r.loss == r.loss for r in rec.steps)  # no NaN


def test_plan_epoch_groups_lengths_and_is_deterministic():
    lengths = [i % 50 for i in range(400)]
    plan = plan_epoch(lengths, 8, seed=1, epoch=0)
    assert plan == plan_epoch(lengths, 8, seed=1, epoch=0) != plan_epoch(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in plan for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan) / len(plan)
    assert spread < 10  # random batches would spread ~40


@pytest.mark.parametrize("change,field", [
    ({"learning_rate": 0}, "train.learning_rate"),
    ({"learning_rate": -1e-3}, "train.learning_rate"),
    ({"micro_batch_size": 8}, "train.micro_batch_size"),
])
def test_impossible_settings_fail_before_training(tiny_model_dir, tmp_path, change, field):
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json"), **change), tmp_path / "out")
    assert err.value.field == field


def test_cutoff_below_16_is_refused(tiny_model_dir, tmp_path):
    spec = tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json"))
    spec.data.cutoff_len = 8
    with pytest.raises(ConfigError) as err:
        train(spec, tmp_path / "out")
    assert err.value.field == "data.cutoff_len"


def test_bad_data_fails_before_training(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        train(tiny_spec(tiny_model_dir, empty), tmp_path / "out")
    bad = write_rows(tmp_path / "bad.json", ROWS[:5] + [{"instruction": "x", "output": 3}])
    with pytest.raises(ValueError, match="6"):
        train(tiny_spec(tiny_model_dir, bad), tmp_path / "out2")
    with pytest.raises(ValueError, match="nothing.json"):
        train(tiny_spec(tiny_model_dir, tmp_path / "nothing.json"), tmp_path / "out3")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_fast_rms_norm_matches_the_original_in_bf16_and_is_untouched_in_fp32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from core import fast_norm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = torch.rand(64) + 0.5
    norm.requires_grad_(False)
    fast = LlamaRMSNorm(64, eps=1e-5)
    fast.load_state_dict(norm.state_dict())
    fast.requires_grad_(False)
    assert fast_norm.patch(torch.nn.Sequential(fast)) == 1
    for dtype, tol in ((torch.bfloat16, dict(atol=3e-2, rtol=2e-2)), (torch.float32, dict(atol=0, rtol=0))):
        norm.to(dtype), fast.to(dtype)
        x = (torch.randn(3, 7, 64) * 3).to(dtype).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        grad = torch.randn(3, 7, 64).to(dtype)
        out, ref = fast(x), norm(x_ref)
        out.backward(grad)
        ref.backward(grad)
        assert out.dtype == ref.dtype == dtype
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_matches_eager_attention(dtype):
    """Same loss and gradients as HF eager attention on a grouped-query model with a left-padded row."""
    import copy

    from core import fast_attention
    from tests.tiny import tiny_model, toy_batch

    eager = tiny_model("llama").train()
    eager.set_attn_implementation("eager")
    grouped = copy.deepcopy(eager)
    assert fast_attention.patch(grouped) and grouped.config._attn_implementation == fast_attention.NAME
    assert eager.config.num_attention_heads != eager.config.num_key_value_heads
    batch = toy_batch(length=11)
    results = []
    for model in (grouped, eager):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        layer = model.model.layers[0].self_attn
        results.append((loss, layer.q_proj.weight.grad, layer.k_proj.weight.grad, layer.v_proj.weight.grad))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, **tol)


def test_grouped_attention_is_for_the_llama_family_only():
    from core import fast_attention
    from tests.tiny import tiny_model

    gpt2 = tiny_model("gpt2")
    before = gpt2.config._attn_implementation
    assert not fast_attention.patch(gpt2) and gpt2.config._attn_implementation == before


def test_training_process_keeps_freed_memory_on_glibc():
    import platform

    from core.host_memory import retain_freed_memory

    assert retain_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_onednn_cache_limit_is_a_default_the_user_can_override(monkeypatch):
    from core import host_memory

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    host_memory.limit_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(host_memory.ONEDNN_CACHE_ENTRIES)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    host_memory.limit_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"


def test_cli_spec_prints_the_default_spec_and_ends_quietly_on_a_closed_pipe(capsys):
    import subprocess
    import sys
    from pathlib import Path

    from core.__main__ import main

    assert main(["spec"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(core.JobSpec().to_json())
    proc = subprocess.Popen([sys.executable, "-m", "core", "spec"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the spec is written, as with `| head -1`
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err


# ------------------------------------------------------------------------------------------------------
# The kernels switch: "fast" trains as "reference" (plain Hugging Face + autograd) does.

@pytest.mark.parametrize("precision,rel", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_fast_kernels_train_like_the_reference(tiny_model_dir, tmp_path, precision, rel):
    """Five steps without dropout (the two draw dropout masks differently) give the same losses."""
    losses = {}
    for kernels in ("fast", "reference"):
        spec = tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json"), dropout=0.0, max_steps=5,
                         eval_every=0, save_every=0, kernels=kernels)
        spec.model.precision = precision
        rec = Recorder()
        train(spec, tmp_path / kernels, rec)
        losses[kernels] = [r.loss for r in rec.steps]
    assert len(losses["fast"]) == 5
    assert losses["fast"] == pytest.approx(losses["reference"], rel=rel)
    assert losses["fast"] != losses["reference"]  # two different routes, not one taken twice


def _lora_dropouts(tiny_model_dir, tmp_path, kernels):
    """The trainer's model with LoRA (dropout 0.5) on q, k, v, and each layer-0 dropout's output."""
    spec = tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json"), dropout=0.5, kernels=kernels)
    spec.adapter.settings.targets = ["q", "k", "v"]
    trainer = Trainer(spec, tmp_path / kernels)
    trainer.setup()
    attn = trainer.model.model.layers[0].self_attn
    outputs = {}
    for role in ("q", "k", "v"):
        module = getattr(attn, f"{role}_proj").dropout
        module.register_forward_hook(lambda m, args, out, role=role: outputs.setdefault(role, out))
    trainer.model.train()
    trainer.batch_loss(core.data.collate(trainer.train_data.examples[:2], trainer.pad_id))
    return trainer, {role: out == 0 for role, out in outputs.items()}


def test_fast_shares_one_dropout_mask_among_q_k_v_and_reference_does_not(tiny_model_dir, tmp_path):
    from core.adapters.base import FastDropout
    from core.fast_attention import NAME

    fast, dropped = _lora_dropouts(tiny_model_dir, tmp_path, "fast")
    assert fast.model.config._attn_implementation == NAME
    assert dropped["q"].float().mean() == pytest.approx(0.5, abs=0.1)
    assert torch.equal(dropped["q"], dropped["k"]) and torch.equal(dropped["q"], dropped["v"])

    reference, dropped = _lora_dropouts(tiny_model_dir, tmp_path, "reference")
    assert reference.parts == frozenset()
    assert reference.model.config._attn_implementation != NAME
    assert not any(isinstance(m, FastDropout) for m in reference.model.modules())
    assert not any("forward" in vars(m) for m in reference.model.modules())  # no patched norm
    assert dropped["q"].float().mean() == pytest.approx(0.5, abs=0.1)
    assert not torch.equal(dropped["q"], dropped["k"]) and not torch.equal(dropped["k"], dropped["v"])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_keeps_one_minus_p_of_its_input(p, dtype):
    """Over 2M draws the kept fraction is 1 - p within 4 standard errors; kept values scale by 1/(1-p)."""
    from core.adapters.base import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(p).train()
    x = torch.ones(1000, 250, dtype=dtype)
    outs = [drop(x) for _ in range(8)]
    kept = torch.stack([o != 0 for o in outs])
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(outs[0][kept[0]], torch.full((int(kept[0].sum()),), 1 / (1 - p), dtype=dtype))
    # successive draws are independent: two masks agree where both keep or both drop
    agree = (kept[0] == kept[1]).float().mean().item()
    assert abs(agree - ((1 - p) ** 2 + p ** 2)) < 4 * (0.25 / kept[0].numel()) ** 0.5
    assert torch.equal(drop.eval()(x), x)


def test_trainer_refuses_unknown_kernel_parts(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="warp"):
        Trainer(tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json")), tmp_path / "out", parts={"warp"})
