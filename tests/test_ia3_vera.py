"""(IA)³ and VeRA: each method's maths against a direct implementation of its formula on one layer, VeRA's
shared projections (seeded, saved with the adapter), and both methods' PEFT layouts.

The generic contracts (identity at start, loss falls, save/load, disable, merge on every architecture)
come from the registry rows of ``tests/test_adapters.py``.
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
from core import AdapterConfig
from core.adapters import vera as vera_module
from core.adapters.ia3 import Ia3Linear
from core.adapters.vera import VeraLinear, projections
from core.arch import fused_indices, in_out_features
from tests.test_adapters import adapted, logits, train_steps
from tests.tiny import tiny_model, toy_batch


def _randomise(vectors) -> None:
    with torch.no_grad():
        for v in vectors:
            v.copy_(torch.randn_like(v))


# --------------------------------------------------------------------------------------------------
# (IA)³

@pytest.mark.parametrize("scales_input", [False, True])
def test_ia3_equals_its_formula_on_a_linear_layer(scales_input):
    """Output side: ``l ⊙ (W x + b)``; input side (down): ``W (l ⊙ x) + b``; merged weights the same maths."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    ia3 = Ia3Linear(base, scales_input=scales_input)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ia3(x), x @ W.T + b, atol=0, rtol=0)  # ones at start: the identity
    _randomise(ia3.ia3_l)
    l = ia3.ia3_l[0].detach()
    expected = (x * l) @ W.T + b if scales_input else l * (x @ W.T + b)
    torch.testing.assert_close(ia3(x), expected, atol=1e-6, rtol=0)
    W_merged = W * l[None, :] if scales_input else l[:, None] * W
    torch.testing.assert_close(ia3.delta_weight(), W_merged - W, atol=1e-6, rtol=0)
    ia3.merge()
    torch.testing.assert_close(base.weight, W_merged, atol=1e-6, rtol=0)
    torch.testing.assert_close(base.bias, b if scales_input else l * b, atol=1e-6, rtol=0)
    torch.testing.assert_close(ia3(x), expected, atol=1e-5, rtol=0)
    ia3.unmerge()
    assert torch.equal(base.weight, W) and torch.equal(base.bias, b)


def test_ia3_on_a_fused_conv1d_rescales_only_the_targeted_slices():
    """GPT-2's c_attn (Conv1D, [q | k | v]): k and v outputs rescaled, q untouched, exact merge."""
    torch.manual_seed(0)
    base = Conv1D(48, 16)  # nf=48 outputs, nx=16 inputs, weight (16, 48)
    nn.init.normal_(base.bias)
    index = fused_indices("concat", 48, heads=4)
    ia3 = Ia3Linear(base, slices={"k": index["k"], "v": index["v"]})
    assert [p.numel() for p in ia3.adapter_params()] == [16, 16]
    _randomise(ia3.ia3_l)
    x = torch.randn(2, 5, 16)
    scale = torch.ones(48)
    scale[index["k"]], scale[index["v"]] = ia3.ia3_l[0].detach(), ia3.ia3_l[1].detach()
    expected = (x @ base.weight + base.bias) * scale
    torch.testing.assert_close(ia3(x), expected, atol=1e-6, rtol=0)
    ia3.merge()
    torch.testing.assert_close(base(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_ia3_targets_keys_values_and_the_mlp_inner_activation(arch):
    model = adapted(arch, "ia3")
    found = {type(m).__name__ for m in core.inject.adapters_of(model)}
    assert found == {"Ia3Linear"}
    sides = sorted((a.scales_input, tuple(a.roles)) for a in core.inject.adapters_of(model))
    kv = [(False, ("k", "v"))] if arch != "llama" else [(False, ()), (False, ())]
    assert sides == sorted(2 * (kv + [(True, ())]))  # two layers: k, v (fused or not) and down's input
    cfg = model.config
    if arch == "llama":
        kv_width = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        inner = cfg.intermediate_size
    else:  # fused qkv, no grouped keys; a 4x MLP
        kv_width, inner = 2 * cfg.hidden_size, 4 * cfg.hidden_size
    assert core.trainable_report(model)["trainable"] == 2 * (kv_width + inner)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_peft_layout_reproduces_the_merged_weights(arch, tmp_path):
    """PEFT's IA3 layout: ``ia3_l`` (out, 1), or (1, in) on ``feedforward_modules``; W' and b' from the file."""
    model = adapted(arch, "ia3")
    train_steps(model, toy_batch(), steps=2)
    core.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    down = {"llama": "mlp.down_proj"}.get(arch, "mlp.c_proj")
    layers = {"llama": "model.layers"}.get(arch, "transformer.h")
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == [f"{layers}.{i}.{down}" for i in range(2)]
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    assert cfg["target_modules"] == [name for name, m in model.named_modules() if isinstance(m, Ia3Linear)]
    base = tiny_model(arch)
    merged = dict(core.merge_adapter(model).named_parameters())
    assert len(tensors) == len(core.inject.adapters_of(model))
    for key, l in tensors.items():
        path = key[len("base_model.model."):-len(".ia3_l")]
        module = base.get_submodule(path)
        feedforward = path in cfg["feedforward_modules"]
        assert l.shape == ((1, module.weight.shape[0 if cfg["fan_in_fan_out"] else 1]) if feedforward
                           else (module.weight.shape[1 if cfg["fan_in_fan_out"] else 0], 1))
        W = module.weight.detach()
        W = W.T if cfg["fan_in_fan_out"] else W  # (out, in)
        expected = W * l  # (1, in) scales the columns (inputs), (out, 1) the rows (outputs)
        got = merged[f"{path}.base.weight"]
        torch.testing.assert_close(got.T if cfg["fan_in_fan_out"] else got, expected, atol=1e-6, rtol=0)
        if module.bias is not None:
            b = module.bias.detach()
            torch.testing.assert_close(merged[f"{path}.base.bias"], b if feedforward else b * l[:, 0],
                                       atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# VeRA

def test_vera_equals_its_formula_on_a_linear_layer():
    """``W x + b0 + Λ_b B[:out] Λ_d A[:, :in] x`` with the shared pair sliced; exact merge."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    W = base.weight.detach().clone()
    A, B = projections(r=6, max_in=20, max_out=16, seed=3)
    vera = VeraLinear(base, A, B, d_initial=0.1, dropout=0.0)
    x = torch.randn(3, 12)
    assert torch.equal(vera(x), base(x))  # b = 0 at start: the identity
    assert torch.equal(vera.vera_d[0].detach(), torch.full((6,), 0.1))
    _randomise([*vera.vera_d, *vera.vera_b])
    d, b = vera.vera_d[0].detach(), vera.vera_b[0].detach()
    delta = torch.diag(b) @ B[:10] @ torch.diag(d) @ A[:, :12]
    torch.testing.assert_close(vera(x), base(x) + x @ delta.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(vera.delta_weight(), delta, atol=1e-5, rtol=0)
    vera.merge()
    torch.testing.assert_close(base.weight, W + delta, atol=1e-6, rtol=0)
    vera.unmerge()
    assert torch.equal(base.weight, W)


def test_vera_on_a_fused_conv1d_gives_each_role_its_own_vectors():
    torch.manual_seed(0)
    base = Conv1D(48, 16)
    index = fused_indices("concat", 48, heads=4)
    A, B = projections(r=8, max_in=16, max_out=16, seed=0)
    vera = VeraLinear(base, A, B, 0.1, 0.0, slices={"q": index["q"], "v": index["v"]})
    assert [p.numel() for p in vera.adapter_params()] == [8, 8, 16, 16]
    _randomise([*vera.vera_d, *vera.vera_b])
    x = torch.randn(2, 5, 16)
    expected = base(x)
    for i, role in enumerate(["q", "v"]):
        d, b = vera.vera_d[i].detach(), vera.vera_b[i].detach()
        expected[..., index[role]] += ((x @ A.T) * d) @ B[:16].T * b
    torch.testing.assert_close(vera(x), expected, atol=1e-5, rtol=0)
    vera.merge()
    torch.testing.assert_close(base(x), expected, atol=1e-5, rtol=0)


def test_vera_projections_are_seeded_kaiming_uniform():
    A, B = projections(r=64, max_in=96, max_out=80, seed=7)
    A2, B2 = projections(r=64, max_in=96, max_out=80, seed=7)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    assert not torch.equal(A, projections(r=64, max_in=96, max_out=80, seed=8)[0])
    assert A.abs().max() <= math.sqrt(6 / 96) and A.abs().max() > 0.9 * math.sqrt(6 / 96)
    assert B.abs().max() <= math.sqrt(6 / 64) and B.abs().max() > 0.9 * math.sqrt(6 / 64)


def test_vera_shares_one_pair_sized_to_the_largest_layer_and_counts_two_vectors_per_layer():
    model = adapted("llama", "vera", r=16, targets=["q", "v", "down"])
    modules = core.inject.adapters_of(model)
    cfg = model.config
    assert len({m.vera_A.data_ptr() for m in modules}) == 1 and len({m.vera_B.data_ptr() for m in modules}) == 1
    assert modules[0].vera_A.shape == (16, cfg.intermediate_size)  # down reads the widest input
    assert modules[0].vera_B.shape == (cfg.hidden_size, 16)
    assert [m.owns_projections for m in modules] == [True] + [False] * (len(modules) - 1)
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = 3 * 16 + cfg.hidden_size + kv + cfg.hidden_size
    assert core.trainable_report(model)["trainable"] == per_layer * cfg.num_hidden_layers


def test_vera_adapter_file_holds_the_projections_and_loading_does_not_redraw_them(tmp_path, monkeypatch):
    batch = toy_batch()
    model = adapted("gpt2", "vera", r=8, seed=5)
    train_steps(model, batch, steps=3)
    expected = logits(model, batch)
    core.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert sorted(k for k in saved if k.endswith(("vera_A", "vera_B"))) == [
        "transformer.h.0.attn.c_attn.vera_A", "transformer.h.0.attn.c_attn.vera_B"]
    # A generator drawing other numbers (another torch, another seed) changes nothing once loaded.
    monkeypatch.setattr(vera_module, "projections",
                        lambda r, i, o, seed: (torch.randn(r, i), torch.randn(o, r)))
    fresh = core.load_adapter(tiny_model("gpt2"), tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-6, rtol=0)
    for m in core.inject.adapters_of(fresh):  # every layer sees the loaded pair
        assert torch.equal(m.vera_A, saved["transformer.h.0.attn.c_attn.vera_A"])


def test_vera_and_ia3_presets_and_configs():
    assert AdapterConfig.preset("VeRA").method == "vera" and AdapterConfig.preset("IA3").method == "ia3"
    s = AdapterConfig.for_method("vera").settings
    assert (s.r, s.d_initial, s.targets) == (256, 0.1, ["q", "v"])
    assert AdapterConfig.for_method("ia3").settings.targets == ["k", "v", "down"]


@pytest.mark.parametrize("arch,targets,blocks", [("llama", ["q", "v", "down"], 1), ("gpt2", ["q", "v"], 2),
                                                  ("gpt2", ["q", "v", "down"], 3), ("bloom", ["k", "o"], 2)])
def test_vera_peft_layout_reproduces_the_merged_weights(arch, targets, blocks, tmp_path):
    """PEFT's VeRA, ``W + Λ_b B_p[:out] Λ_d A_p[:, :in]``, computed from the exported file alone, is our
    merged weight; the pair is saved, sized as PEFT sizes it (largest in and out among the targets), and
    a fused layer's roles take a block of r columns each (plus one block for plain layers)."""
    model = adapted(arch, "vera", r=8, seed=3, targets=targets)
    train_steps(model, toy_batch(), steps=3, lr=5e-2)
    core.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    paths = [name for name, m in model.named_modules() if isinstance(m, VeraLinear)]
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] and cfg["target_modules"] == paths
    assert cfg["r"] == 8 * blocks and cfg["projection_prng_key"] == 3
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    base = tiny_model(arch)
    shapes = [in_out_features(base.get_submodule(p)) for p in paths]
    A, B = tensors.pop("base_model.vera_A"), tensors.pop("base_model.vera_B")
    assert A.shape == (8 * blocks, max(i for i, _ in shapes)) and B.shape == (max(o for _, o in shapes), 8 * blocks)
    assert sorted(tensors) == sorted(f"base_model.model.{p}.vera_lambda_{v}" for p in paths for v in "bd")
    merged = dict(core.merge_adapter(model).named_parameters())
    for path, (fan_in, fan_out) in zip(paths, shapes):
        lam_b = tensors[f"base_model.model.{path}.vera_lambda_b"]
        lam_d = tensors[f"base_model.model.{path}.vera_lambda_d"]
        assert lam_b.shape == (fan_out,) and lam_d.shape == (8 * blocks,)
        delta = (lam_b[:, None] * B[:fan_out]) @ (lam_d[:, None] * A[:, :fan_in])  # PEFT's get_delta_weight
        W = base.get_submodule(path).weight.detach()
        expected = W + (delta.T if cfg["fan_in_fan_out"] else delta)
        torch.testing.assert_close(merged[f"{path}.base.weight"], expected, atol=1e-6, rtol=0)
        assert delta.abs().max() > 1e-4  # the trained update is in the file
