"""The LoRA family: DoRA, rsLoRA, LoRA+, PiSSA and OLoRA, each against a direct implementation of its formula.

The generic contracts (identity at start, loss falls, save/load, disable, merge on every architecture)
come from the registry rows of ``tests/test_adapters.py``; PEFT loading our exports of each method and
preset from ``tests/test_peft_interop.py``. Here: the maths on one layer, the fast routes against the
plain ones, PiSSA/OLoRA's kept initial factors (disable, save/load, resume, the rank-2r export) and
LoRA+'s optimiser groups.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import core
from core import AdapterConfig, ConfigError
from core.adapters import lora as lora_module
from core.adapters.dora import DoraLinear
from core.adapters.lora import LoraLinear
from core.arch import fused_indices
from tests.test_adapters import adapted, logits, train_steps
from tests.tiny import tiny_model, toy_batch

STARTS = ["pissa", "pissa_fast", "olora"]


def _randomise(params, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * scale)


def _dora_reference(x, W, b, A, B, m, s):
    """``m ⊙ (W + s B A) / ||W + s B A||_c`` applied to ``x``, the norm a constant (detached)."""
    V = W + s * B @ A
    g = m / V.norm(dim=1).detach()
    return x @ (g[:, None] * V).T + (0 if b is None else b)


class FixedMask(nn.Module):
    """Dropout with a given keep-mask (inverted: kept values scaled by 1 / (1 - p))."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask / (1 - self.p) if self.training else x


# --------------------------------------------------------------------------------------------------
# DoRA

@pytest.mark.parametrize("fast", [True, False])
def test_dora_equals_its_formula_forward_and_backward(fast):
    """Output and gradients of A, B, m equal the formula's with the norm detached; both norm routes."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    dora = DoraLinear(base, r=4, alpha=8, dropout=0.0)
    dora.use_training_kernels(fast_function=fast, fast_dropout=True)
    torch.testing.assert_close(dora.lora_magnitude[0].detach(), W.norm(dim=1))  # m starts at ||W||_c
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(dora(x), base(x), atol=1e-6, rtol=0)  # identity at start
    _randomise([dora.lora_A, *dora.lora_B, *dora.lora_magnitude], 0.3)
    params = [dora.lora_A, dora.lora_B[0], dora.lora_magnitude[0]]
    A, B, m = (p.detach().clone().requires_grad_() for p in params)
    weights = torch.linspace(-1, 1, 10)
    (dora(x) * weights).sum().backward()
    expected = _dora_reference(x, W, b, A, B, m, dora.scaling)
    (expected * weights).sum().backward()
    torch.testing.assert_close(dora(x), expected, atol=1e-5, rtol=0)
    for got, ref in zip(params, (A, B, m)):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_dora_dropout_rescales_the_update_read_from_the_dropped_input():
    """Training with dropout: ``W x + b + (g - 1) ⊙ W xd + g ⊙ s B A xd`` (the authors' code and PEFT)."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    W, b = base.weight.detach(), base.bias.detach()
    dora = DoraLinear(base, r=4, alpha=8, dropout=0.3).train()
    _randomise([dora.lora_A, *dora.lora_B, *dora.lora_magnitude], 0.3)
    x = torch.randn(3, 12)
    mask = (torch.rand(3, 12) > 0.3).float()
    dora.dropout = FixedMask(mask, 0.3)
    xd = x * mask / 0.7
    A, B, m, s = dora.lora_A.detach(), dora.lora_B[0].detach(), dora.lora_magnitude[0].detach(), dora.scaling
    g = m / (W + s * B @ A).norm(dim=1)
    expected = x @ W.T + b + (g - 1) * (xd @ W.T) + g * (s * xd @ A.T @ B.T)
    torch.testing.assert_close(dora(x), expected, atol=1e-5, rtol=0)
    dora.eval()  # no dropout: the plain formula
    torch.testing.assert_close(dora(x), _dora_reference(x, W, b, A, B, m, s), atol=1e-5, rtol=0)


def test_dora_on_a_fused_conv1d_normalises_only_the_targeted_rows():
    """GPT-2's c_attn (Conv1D, [q | k | v]), q and v adapted: their rows follow the formula, k's are W's."""
    torch.manual_seed(0)
    base = Conv1D(48, 16)
    index = fused_indices("concat", 48, heads=4)
    dora = DoraLinear(base, r=4, alpha=8, dropout=0.0, slices={"q": index["q"], "v": index["v"]})
    assert [p.numel() for p in dora.lora_magnitude] == [16, 16]
    _randomise([dora.lora_A, *dora.lora_B, *dora.lora_magnitude], 0.3)
    W = base.weight.detach().T  # (out, in)
    x = torch.randn(2, 5, 16)
    expected = base(x)
    for i, role in enumerate(["q", "v"]):
        rows = index[role]
        A, B, m = dora.lora_A[4 * i:4 * (i + 1)].detach(), dora.lora_B[i].detach(), dora.lora_magnitude[i].detach()
        expected[..., rows] = _dora_reference(x, W[rows], base.bias.detach()[rows], A, B, m, dora.scaling)
    torch.testing.assert_close(dora(x), expected, atol=1e-5, rtol=0)
    full_m = dora.magnitude_vector()
    torch.testing.assert_close(full_m[index["k"]], W[index["k"]].norm(dim=1))  # g = 1 on k's rows
    dora.merge()
    torch.testing.assert_close(base(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_dora_merge_writes_the_formula_and_unmerge_restores(arch):
    model = adapted(arch, "dora", r=4, targets=["q", "v", "down"])
    batch = toy_batch()
    train_steps(model, batch, steps=5)
    before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    expected = logits(model, batch)
    for a in core.inject.adapters_of(model):
        W = a.weight_out_in().detach().float().clone()
        V = W + a.lora_delta().detach()
        merged = a.magnitude_vector().detach()[:, None] * V / V.norm(dim=1, keepdim=True)
        torch.testing.assert_close(a.delta_weight(), merged - W, atol=1e-5, rtol=0)
        a.merge()
        torch.testing.assert_close(a.weight_out_in(), merged, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-4, rtol=0)
    core.unmerge_adapter(model)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dora_norm_without_forming_the_weight_equals_the_direct_norm(dtype, tol):
    """The fast route's ||W + ΔW||_c from ``A W^T`` and ``A A^T`` equals the norm of the formed matrix."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).to(dtype)
    dora = DoraLinear(base, r=8, alpha=16, dropout=0.0, init="pissa_fast")
    _randomise([dora.lora_A, *dora.lora_B], 0.05)
    direct = dora._direct_norms()
    torch.testing.assert_close(dora._factored_norms(), direct, atol=0, rtol=tol)
    exact = (base.weight.float() + dora.lora_delta()).norm(dim=1)
    torch.testing.assert_close(direct, exact, atol=0, rtol=1e-6)


def test_dora_norm_cache_follows_in_place_changes():
    """Generation reuses the norm; an optimiser step, a load or a merge (in-place writes) recompute it."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    dora = DoraLinear(base, r=4, alpha=8, dropout=0.0)
    x = torch.randn(2, 12)
    first = dora(x)
    with torch.no_grad():
        dora.lora_B[0].add_(0.5)
    W, b = base.weight.detach(), base.bias.detach()
    A, B, m = dora.lora_A.detach(), dora.lora_B[0].detach(), dora.lora_magnitude[0].detach()
    second = dora(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, _dora_reference(x, W, b, A, B, m, dora.scaling), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# rsLoRA, LoRA+

@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rslora_scales_by_alpha_over_root_r(method):
    model = adapted("llama", method, r=16, alpha=8.0, rslora=True)
    modules = core.inject.adapters_of(model)
    assert modules and all(a.scaling == 8.0 / 4.0 for a in modules)
    plain = adapted("llama", method, r=16, alpha=8.0)
    assert all(a.scaling == 0.5 for a in core.inject.adapters_of(plain))
    lin = LoraLinear(nn.Linear(6, 5), r=4, alpha=2.0, dropout=0.0, rslora=True)
    _randomise(lin.lora_B)
    x = torch.randn(3, 6)
    expected = lin.base(x) + (2.0 / math.sqrt(4)) * x @ lin.lora_A.detach().T @ lin.lora_B[0].detach().T
    torch.testing.assert_close(lin(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_loraplus_trains_b_at_ratio_times_a_learning_rate(tiny_model_dir, tmp_path, method):
    """The trainer's optimiser groups: every B at 16 x the learning rate; A (and DoRA's m) at 1 x."""
    from core.train import Trainer
    from tests.test_train import write_rows
    from tests.test_jobs_support import tiny_spec

    spec = tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json"))
    spec.adapter = AdapterConfig.for_method(method, r=4, alpha=8, loraplus_ratio=16.0)
    trainer = Trainer(spec, tmp_path / "out")
    trainer.setup()
    # the schedule scales every group alike; its base is each group's initial learning rate
    lr_of = {id(p): group["initial_lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    base_lr = spec.train.learning_rate
    seen = set()
    for a in core.inject.adapters_of(trainer.model):
        for name, p in a.adapter_named_params():
            if p.requires_grad:
                seen.add(name.split(".")[0])
                assert lr_of[id(p)] == pytest.approx(base_lr * (16.0 if name.startswith("lora_B") else 1.0)), name
    assert seen == ({"lora_A", "lora_B"} | ({"lora_magnitude"} if method == "dora" else set()))
    assert sorted(lr_of.values()) != [base_lr] * len(lr_of)


def test_plain_lora_has_no_learning_rate_multipliers():
    assert all(a.lr_scales() == {} for a in core.inject.adapters_of(adapted("llama", "lora")))


# --------------------------------------------------------------------------------------------------
# PiSSA, OLoRA

def test_pissa_starts_from_the_principal_part_and_olora_from_qr():
    torch.manual_seed(0)
    left, right = torch.linalg.qr(torch.randn(20, 12))[0], torch.linalg.qr(torch.randn(12, 12))[0]
    W = left @ torch.diag(torch.tensor([10.0, 8, 6, 4] + [0.1] * 8)) @ right.T  # a spectrum with a gap, as W's
    s = 2.0
    base = nn.Linear(12, 20, bias=False)
    with torch.no_grad():
        base.weight.copy_(W)
    pissa = LoraLinear(base, r=4, alpha=8.0, dropout=0.0, init="pissa")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(s * pissa.lora_B[0] @ pissa.lora_A, top, atol=1e-5, rtol=0)
    torch.testing.assert_close(pissa.lora_delta(), torch.zeros(20, 12))  # B A = B0 A0 at start
    olora = LoraLinear(base, r=4, alpha=8.0, dropout=0.0, init="olora")
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(olora.lora_B[0].T @ olora.lora_B[0], torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(olora.lora_B[0] @ olora.lora_A, Q[:, :4] @ R[:4], atol=1e-5, rtol=0)
    fast = LoraLinear(base, r=4, alpha=8.0, dropout=0.0, init="pissa_fast")
    torch.testing.assert_close(s * fast.lora_B[0] @ fast.lora_A, top, atol=1e-3, rtol=0)


def test_a_layer_narrower_than_r_gives_what_it_has_and_starts_the_rest_as_lora():
    torch.manual_seed(0)
    lin = LoraLinear(nn.Linear(12, 6), r=8, alpha=8.0, dropout=0.0, init="pissa")
    assert (lin.lora_B[0][:, 6:] == 0).all() and (lin.lora_B[0][:, :6] != 0).any()
    assert (lin.lora_A[6:] != 0).any()  # random, as LoRA's A
    x = torch.randn(3, 12)
    torch.testing.assert_close(lin(x), lin.base(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("init", STARTS)
def test_pissa_olora_identity_at_start_disable_exact_and_save_load_exact(arch, method, init, tmp_path, monkeypatch):
    batch = toy_batch()
    base = logits(tiny_model(arch), batch)
    model = adapted(arch, method, r=4, init=init, targets=["q", "v", "down"])
    torch.testing.assert_close(logits(model, batch), base, atol=1e-5, rtol=0)
    train_steps(model, batch, steps=3)
    expected = logits(model, batch)
    assert (expected - base).abs().max() > 1e-4
    with core.disable_adapters(model):  # the original W, not the residual
        torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)
    core.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert any(k.endswith("lora_A0") for k in saved) and any(k.endswith("lora_B0") for k in saved)
    # Loading draws nothing that matters: the initial factors come from the file.
    monkeypatch.setattr(lora_module, "initial_factors",
                        lambda w, r, s, init: (torch.randn(min(r, *w.shape), w.shape[1]),
                                               torch.randn(w.shape[0], min(r, *w.shape))))
    fresh = core.load_adapter(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_pissa_merge_is_the_update_over_the_original_weight(method):
    model = adapted("llama", method, r=4, init="pissa", targets=["q", "up"])
    train_steps(model, toy_batch(), steps=3)
    for a in core.inject.adapters_of(model):
        W = a.weight_out_in().detach().clone()
        A, B = a.lora_A.detach(), a.lora_B[0].detach()
        A0, B0 = a.lora_A0, a.lora_B0
        update = W + a.scaling * (B @ A - B0 @ A0)
        assert a.lora_factors()[0].shape[0] == 8  # rank 2r: [A; A0], [B, -B0]
        if method == "dora":
            update = a.magnitude_vector().detach()[:, None] * update / update.norm(dim=1, keepdim=True)
        a.merge()
        torch.testing.assert_close(a.weight_out_in(), update, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init,precision", [("pissa_fast", "fp32"), ("olora", "fp32"), ("pissa_fast", "bf16")])
def test_pissa_checkpoint_resume_is_exact(tiny_model_dir, tmp_path, init, precision):
    """Stopping at step 3 and resuming gives the losses of one run, even with randomized SVD (and in bf16,
    where the fast route trains on the residual weight it forms again after the resume)."""
    from core.train import latest_checkpoint, train
    from tests.test_train import Recorder, write_rows
    from tests.test_jobs_support import tiny_spec

    spec = tiny_spec(tiny_model_dir, write_rows(tmp_path / "d.json"))
    spec.adapter = AdapterConfig.for_method("lora", r=4, alpha=8, dropout=0.1, init=init)
    spec.model.precision = precision
    full = Recorder()
    train(spec, tmp_path / "a", full)
    first = Recorder(stop_after=3)
    assert train(spec, tmp_path / "c", first).status == "stopped"
    checkpoint = latest_checkpoint(tmp_path / "c")
    rest = Recorder()
    train(spec, tmp_path / "c", rest, resume_from=checkpoint)
    losses = [r.loss for r in first.steps] + [r.loss for r in rest.steps]
    assert losses == pytest.approx([r.loss for r in full.steps], rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("init", STARTS)
def test_pissa_export_is_a_rank_2r_lora_of_the_original_base(arch, init, tmp_path):
    model = adapted(arch, "lora", r=4, init=init, targets=["q", "k", "v", "up"])
    train_steps(model, toy_batch(), steps=3)
    core.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    base = tiny_model(arch)
    merged = dict(core.merge_adapter(model).named_parameters())
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        path = key[len("base_model.model."):-len(".lora_A.weight")]
        A, B = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        r, alpha = cfg["rank_pattern"].get(path, cfg["r"]), cfg["alpha_pattern"].get(path, cfg["lora_alpha"])
        assert A.shape[0] == r and r % 8 == 0
        delta = (B @ A) * (alpha / r)
        w = base.get_submodule(path).weight.detach()
        expected = w + (delta.T if cfg["fan_in_fan_out"] else delta)
        torch.testing.assert_close(merged[f"{path}.base.weight"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fast_training_route_from_a_pissa_start_equals_the_plain_route(method):
    """bf16 training: the written-out route multiplying by the residual ``W - s B0 A0`` (and DoRA's
    factored norm) gives the output and gradients of the plain route's ``W x - s B0 A0 x``."""
    cls = DoraLinear if method == "dora" else LoraLinear
    for dropout in (0.0, 0.1):
        results = []
        for fast in (True, False):
            torch.manual_seed(0)
            base = nn.Linear(48, 40).to(torch.bfloat16).requires_grad_(False)
            module = cls(base, r=4, alpha=8, dropout=dropout, init="pissa").train()
            module.use_training_kernels(fast_function=fast, fast_dropout=True)
            _randomise([module.lora_A, *module.lora_B], 0.05)
            x = torch.randn(3, 5, 48).to(torch.bfloat16).requires_grad_()
            torch.manual_seed(1)  # the same dropout mask on both routes
            y = module(x)
            (y.float() * torch.linspace(-1, 1, 40)).sum().backward()
            params = [p for p in module.parameters() if p.requires_grad]
            results.append((y, x.grad, *(p.grad for p in params)))
            if fast:
                residual = base.weight.float() - module.scaling * module.lora_B0 @ module.lora_A0
                torch.testing.assert_close(module.fast_weight().float(), residual, atol=1e-2, rtol=1e-2)
                assert module.fast_weight() is module.fast_weight()  # formed once
                module.eval()
                assert module._fast_residual is None  # and dropped out of training
        for got, ref in zip(*results):
            assert got.dtype == ref.dtype
            torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=2e-2)


def test_pissa_estimate_counts_the_kept_factors_in_the_file_size(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from core import ModelSettings
    from core.estimate import estimate

    cfg = AdapterConfig.preset("PiSSA")
    est = estimate(ModelSettings(name=str(tiny_model_dir)), cfg)
    model = core.attach(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AdapterConfig.preset("PiSSA"))
    saved = core.save_adapter(model, tmp_path) / "adapter.safetensors"
    assert est["adapter_bytes"] == saved.stat().st_size
    plain = estimate(ModelSettings(name=str(tiny_model_dir)), AdapterConfig.preset("PiSSA", init="kaiming"))
    assert est["trainable"] == plain["trainable"] and est["adapter_bytes"] > 1.9 * plain["adapter_bytes"]


# --------------------------------------------------------------------------------------------------
# Settings, presets, PEFT

@pytest.mark.parametrize("change,field", [({"init": "svd"}, "init"), ({"loraplus_ratio": 0.0}, "loraplus_ratio"),
                                          ({"rslora": "yes"}, "rslora")])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bad_family_settings_name_the_field(method, change, field):
    with pytest.raises(ConfigError) as err:
        AdapterConfig.for_method(method, **change).validate()
    assert err.value.field == field


def test_presets_of_the_family():
    assert AdapterConfig.preset("DoRA").method == "dora"
    dora = AdapterConfig.preset("DoRA").settings
    assert (dora.r, dora.alpha, dora.dropout, dora.targets) == (32, 64.0, 0.05, ["q", "k", "v", "up", "down"])
    assert AdapterConfig.preset("rsLoRA").settings.rslora is True
    assert AdapterConfig.preset("LoRA+").settings.loraplus_ratio == 16.0
    pissa = AdapterConfig.preset("PiSSA").settings
    assert (pissa.init, pissa.alpha, pissa.dropout) == ("pissa_fast", 32.0, 0.0)
    assert pissa.targets == ["q", "k", "v", "o", "gate", "up", "down"]
    olora = AdapterConfig.preset("OLoRA").settings
    assert (olora.init, olora.alpha, olora.targets) == ("olora", 16.0, ["q", "v"])
    assert core.methods.get("dora").draw({"r": 8, "alpha": 16, "targets": ["q"], "rslora": True}).caption.startswith(
        "DoRA [rsLoRA]")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("settings", [
    {"method": "dora", "init": "pissa_fast", "rslora": True},
    {"method": "lora", "init": "olora", "rslora": True, "r": 8},
    {"method": "dora", "init": "olora"},
])
def test_peft_loads_the_family_combinations_with_the_same_logits(arch, settings, tmp_path):
    peft = pytest.importorskip("peft")
    settings = dict(settings)
    method = settings.pop("method")
    batch = toy_batch()
    model = adapted(arch, method, **{"r": 4, "targets": ["q", "k", "v", "up", "down"], **settings})
    train_steps(model, batch, steps=5, lr=5e-2)
    expected = logits(model, batch)
    core.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] == (method == "dora") and cfg["use_rslora"] == settings.get("rslora", False)
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, atol=2e-5, rtol=0)


def test_pissa_export_in_bf16_equals_the_trained_model_within_bf16_rounding(tmp_path):
    """A bf16 model trained from a PiSSA start, exported as a rank-2r LoRA and loaded by PEFT on the original
    bf16 base: the logits agree to bf16 rounding."""
    peft = pytest.importorskip("peft")
    batch = toy_batch()
    model = core.attach(tiny_model("llama").to(torch.bfloat16),
                        AdapterConfig.for_method("lora", r=4, init="pissa", targets=["q", "v", "up", "down"]))
    train_steps(model, batch, steps=5, lr=5e-2)
    expected = logits(model, batch).float()
    core.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), str(tmp_path)).eval()
    got = logits(loaded, batch).float()
    assert (expected - logits(tiny_model("llama").to(torch.bfloat16), batch).float()).abs().max() > 0.05
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # measured 2-6e-3: 1-2 bf16 steps at |logit| 0.5
