"""QLoRA: LoRA and DoRA on a 4-bit NF4 base (``core.quant``), on a tiny checkpoint with bitsandbytes' CPU
kernels; the estimate's 4-bit memory; the clear errors; and, marked ``cuda``, the same on a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import core
from core import AdapterConfig, ConfigError, JobSpec, ModelSettings
from core.estimate import estimate
from core.inject import adapters_of
from core.models import load_model
from core.callbacks import TrainCallbacks
from core.train import Trainer, train
from tests.tiny import toy_batch

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="QLoRA needs the optional package bitsandbytes (requirements-dev.txt)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
METHODS = ["lora", "dora"]
# What this file imports runs on the GPU machine too (bench/gpu_check.sh), which has no SQLAlchemy:
# nothing from jobs, so not tests.test_jobs_support's spec either.
ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}
        for a in range(1, 7) for b in range(2, 6)]


class Losses(TrainCallbacks):
    def __init__(self):
        self.losses: list[float] = []

    def on_step(self, report) -> None:
        self.losses.append(report.loss)


def train_spec(model_dir, tmp_path, method: str, quantization: str = "nf4", device: str = "cpu",
               precision: str = "fp32") -> JobSpec:
    """``method`` (r 4, dropout 0.05) on the tiny checkpoint: 8 steps of 4 rows at a high learning rate."""
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS))
    spec = JobSpec(name="qlora")
    spec.model = ModelSettings(name=str(model_dir), precision=precision, device=device, quantization=quantization)
    spec.adapter = AdapterConfig.for_method(method, r=4, alpha=8, dropout=0.05)
    spec.data.source, spec.data.val_size = str(data), 4
    t = spec.train
    t.batch_size, t.micro_batch_size, t.learning_rate, t.warmup_steps = 4, 2, 1e-2, 1
    t.max_steps, t.eval_every, t.save_every = 8, 0, 0
    return spec


def settings(model_dir, quantization: str = "nf4", device: str = "cpu") -> ModelSettings:
    return ModelSettings(name=str(model_dir), precision="fp32", device=device, quantization=quantization)


def adapter(method: str, **options) -> AdapterConfig:
    return AdapterConfig.for_method(method, r=4, alpha=8, dropout=0.0,
                                    targets=["q", "k", "v", "o", "gate", "up", "down"], **options)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Random non-zero B (and magnitudes) in every adapter, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters_of(model):
            for B in a.lora_B:
                B.copy_(torch.randn(B.shape, generator=g) * 0.2)
            for m in getattr(a, "lora_magnitude", []):
                m.mul_(1 + 0.1 * torch.rand(m.shape, generator=g))


# ------------------------------------------------------------------------------------ settings, errors

def test_only_lora_and_dora_train_on_a_4bit_base(tiny_model_dir):
    spec = JobSpec()
    spec.model.quantization = "nf4"
    for method in METHODS:
        spec.adapter = AdapterConfig.for_method(method)
        spec.validate()
    spec.adapter = AdapterConfig.for_method("ia3")
    with pytest.raises(ConfigError) as err:
        spec.validate()
    assert err.value.field == "model.quantization"
    assert "LoRA or DoRA" in err.value.message and "'ia3'" in err.value.message
    with pytest.raises(ConfigError, match="LoRA or DoRA"):
        estimate(settings(tiny_model_dir), AdapterConfig.for_method("ia3"))
    with pytest.raises(ConfigError, match="must be one of none, nf4"):
        ModelSettings(quantization="int8").validate()


def test_missing_bitsandbytes_names_the_fix(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ConfigError) as err:
        load_model(settings(tiny_model_dir))
    assert err.value.field == "model.quantization"
    assert "pip install bitsandbytes==" in err.value.message and "quantization to none" in err.value.message


@needs_bnb
def test_a_model_without_linear_layers_is_refused():
    from core.quant import quantize_model
    from tests.tiny import tiny_model

    with pytest.raises(ConfigError, match="no nn.Linear layer to quantise"):
        quantize_model(tiny_model("gpt2"), torch.float32, torch.device("cpu"))


# ------------------------------------------------------------------------------------ the 4-bit base

@needs_bnb
def test_every_linear_but_the_head_is_4bit(tiny_model_dir):
    import bitsandbytes as bnb

    plain, loaded = load_model(settings(tiny_model_dir, "none")), load_model(settings(tiny_model_dir))
    model = loaded.model
    linears = [n for n, m in plain.model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    assert len(linears) == 14
    assert all(isinstance(model.get_submodule(n), bnb.nn.Linear4bit) for n in linears)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert loaded.num_params == plain.num_params  # counted before two values are packed into a byte
    # 4-bit rounding: close to the original weights, not equal
    w = plain.model.get_submodule(linears[0]).weight.detach()
    q = core.quant.dequantize(model.get_submodule(linears[0]))
    assert 0 < (w - q).abs().mean() < 0.15 * w.abs().mean()
    core.attach(model, adapter("lora"))
    core.attach(plain.model, adapter("lora"))
    assert core.trainable_report(model)["base"] == core.trainable_report(plain.model)["base"]  # packed count twice


@needs_bnb
def test_nf4_bytes_is_what_bitsandbytes_holds():
    import bitsandbytes as bnb

    from core.quant import BLOCKSIZE, nf4_bytes

    for shape in [(1536, 576), (64, 32), (100, 30)]:
        p = bnb.nn.Params4bit(torch.randn(shape), requires_grad=False, blocksize=BLOCKSIZE,
                              compress_statistics=True, quant_type="nf4").to("cpu")
        s = p.quant_state
        held = [p.data, s.absmax, s.code, s.state2.absmax, s.state2.code, s.offset.reshape(1)]
        assert nf4_bytes(shape[0] * shape[1]) == sum(t.numel() * t.element_size() for t in held)


def test_estimate_counts_4bit_weights(tiny_model_dir):
    from core.quant import nf4_bytes

    cfg = adapter("lora")
    full, four = estimate(settings(tiny_model_dir, "none"), cfg), estimate(settings(tiny_model_dir), cfg)
    # the tiny LLaMA (hidden 32, k/v 16, MLP 64, 2 layers): q, k, v, o, gate, up, down per layer, in fp32
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)] * 2
    saved = sum(4 * a * b - nf4_bytes(a * b) for a, b in shapes)
    assert full["memory_parts"]["weights"] - four["memory_parts"]["weights"] == saved
    assert (four["quantized_layers"], full["quantized_layers"]) == (14, 0)
    assert four["trainable"] == full["trainable"] and four["base"] == full["base"]


# ---------------------------------------------------------------------------------- adapters on 4 bits

@needs_bnb
@pytest.mark.parametrize("method", METHODS)
def test_a_fresh_adapter_is_the_4bit_base(tiny_model_dir, method):
    model = load_model(settings(tiny_model_dir)).model
    batch = toy_batch()
    before = logits(model, batch)
    core.attach(model, adapter(method))
    assert all(a.quantized for a in adapters_of(model))
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=1e-6)


@needs_bnb
@pytest.mark.parametrize("method", METHODS)
def test_trains_saves_and_loads_exactly(tiny_model_dir, tmp_path, method):
    spec = train_spec(tiny_model_dir, tmp_path, method)
    rec = Losses()
    trainer = Trainer(spec, tmp_path / "out", rec)
    trainer.setup()
    assert all(a.quantized for a in adapters_of(trainer.model))
    trainer.train()
    assert rec.losses[-1] < rec.losses[0]
    trained = trainer.model.eval()
    batch = toy_batch()
    fresh = load_model(spec.model).model
    core.load_adapter(fresh, tmp_path / "out" / "adapter")
    saved, loaded = core.adapter_state_dict(trained), core.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the trained model computes through the trainer's kernels (norms, attention; padded positions apart)
    attended = batch["attention_mask"].bool()
    torch.testing.assert_close(logits(fresh, batch)[attended], logits(trained, batch)[attended], rtol=0, atol=1e-5)


@needs_bnb
@pytest.mark.parametrize("method", METHODS)
def test_merged_export_folds_into_the_original_weights(tiny_model_dir, tmp_path, method):
    from transformers import AutoModelForCausalLM

    loaded = load_model(settings(tiny_model_dir))
    model = core.attach(loaded.model, adapter(method))
    perturb(model)
    batch = toy_batch()
    core.export_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    original = load_model(settings(tiny_model_dir, "none")).model
    path = "model.layers.0.self_attn.q_proj"
    a = model.get_submodule(path)
    w = original.get_submodule(path).weight.detach()
    got = merged.get_submodule(path).weight.detach()
    delta = a.lora_delta().detach()

    def folded(weight: torch.Tensor) -> torch.Tensor:  # LoRA: W + ΔW; DoRA: m ⊙ (W + ΔW) / ||W + ΔW||
        v = weight + delta
        return v if method == "lora" else a.magnitude_vector().detach()[:, None] * v / v.norm(dim=1, keepdim=True)

    torch.testing.assert_close(got, folded(w), rtol=0, atol=1e-5)
    assert (got - folded(core.quant.dequantize(a.base))).abs().max() > 1e-3  # not the 4-bit weights
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    # the merged model is the trained one up to the 4-bit rounding of the base: no further from it than
    # the quantised base is from the original
    with core.disable_adapters(model):
        rounding = (logits(model, batch) - logits(original, batch)).abs().max()
    assert (logits(merged, batch) - logits(model, batch)).abs().max() <= 2 * rounding
    assert rounding > 0
    assert adapters_of(model) and not any(a.merged for a in adapters_of(model))


@needs_bnb
def test_peft_export_is_the_lora_alone(tiny_model_dir, tmp_path):
    quantized = core.attach(load_model(settings(tiny_model_dir)).model, adapter("lora"))
    plain = core.attach(load_model(settings(tiny_model_dir, "none")).model, adapter("lora"))
    perturb(quantized)
    plain.load_state_dict(core.adapter_state_dict(quantized), strict=False)
    core.export_peft(quantized, tmp_path / "q")
    core.export_peft(plain, tmp_path / "p")
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["use_dora"]
    q, p = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("q", "p"))
    assert q.keys() == p.keys() and all(torch.equal(q[k], p[k]) for k in q)


@needs_bnb
def test_an_inference_pass_leaves_training_as_it_was(tiny_model_dir):
    """bitsandbytes repacks a CPU layer for an inference kernel without a backward pass on its first eval
    call without gradients (where the CPU has AVX-512-bf16); ``core.quant`` turns that off."""
    models = [core.attach(load_model(settings(tiny_model_dir)).model, adapter("lora")) for _ in range(2)]
    models[1].load_state_dict(core.adapter_state_dict(models[0]), strict=False)  # the same base, the same A
    batch = toy_batch()
    logits(models[0], batch)  # eval, no gradients: a validation pass
    grads = []
    for model in models:
        model.train()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        grads.append([p.grad for p in core.adapter_params(model)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@needs_bnb
def test_no_merge_into_4bit_weights(tiny_model_dir):
    model = core.attach(load_model(settings(tiny_model_dir)).model, adapter("dora"))
    with pytest.raises(ConfigError, match="export the merged model instead"):
        core.merge_adapter(model)
    assert not any(a.merged for a in adapters_of(model))


# --------------------------------------------------------------------------------------------- on a GPU

@pytest.mark.cuda
@needs_cuda
@needs_bnb
@pytest.mark.parametrize("method", METHODS)
def test_qlora_trains_on_cuda_in_bf16(tiny_model_dir, tmp_path, method):
    spec = train_spec(tiny_model_dir, tmp_path, method, device="cuda", precision="bf16")
    rec = Losses()
    trainer = Trainer(spec, tmp_path / "out", rec)
    trainer.setup()
    base = adapters_of(trainer.model)[0].base
    assert base.weight.device.type == "cuda" and base.compute_dtype == torch.bfloat16
    trainer.train()
    assert rec.losses[-1] < rec.losses[0]
    fresh = load_model(spec.model, dtype=torch.bfloat16).model  # as the trainer loads it
    core.load_adapter(fresh, tmp_path / "out" / "adapter")
    saved, loaded = core.adapter_state_dict(trainer.model), core.adapter_state_dict(fresh)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    batch = toy_batch()
    attended = batch["attention_mask"].bool()  # bf16 logits: a step of bf16 apart at most
    torch.testing.assert_close(logits(fresh, batch)[attended], logits(trainer.model.eval(), batch)[attended],
                               rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_lora_trains_on_cuda_in_bf16(tiny_model_dir, tmp_path, method):
    rec = Losses()
    result = train(train_spec(tiny_model_dir, tmp_path, method, "none", "cuda", "bf16"), tmp_path / "out", rec)
    assert rec.losses[-1] < rec.losses[0]
    assert 0 < result.peak_memory_mb < 1024  # torch.cuda.max_memory_allocated: a tiny model's MBs


@pytest.mark.cuda
@needs_cuda
@needs_bnb
def test_4bit_weights_on_the_gpu_are_what_the_estimate_says(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import tiny_tokenizer

    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    measured = {}
    for quantization in ("none", "nf4"):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = load_model(ModelSettings(name=str(tmp_path / "m"), device="cuda", precision="bf16",
                                         quantization=quantization), dtype=torch.bfloat16).model
        measured[quantization] = torch.cuda.memory_allocated() - before
        del model
    estimated = {q: estimate(ModelSettings(name=str(tmp_path / "m"), device="cuda", precision="bf16",
                                           quantization=q), adapter("lora"))["memory_parts"]["weights"]
                 for q in ("none", "nf4")}
    for q in measured:
        assert abs(measured[q] - estimated[q]) < 0.02 * estimated[q], (q, measured, estimated)
    assert measured["nf4"] < 0.45 * measured["none"]
