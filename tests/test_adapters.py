"""Contracts of the adapter engine: every registered method on every architecture in the table.

The rows come from the method registry (``core.methods``) and ``core.arch.ARCHITECTURES``: a new method
or a new architecture row is tested without an edit here, and a row without a tiny config in
``tests/tiny.py`` fails.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import core
from core import AdapterConfig, ConfigError, methods
from core.adapters.lora import LoraLinear, LoraSettings
from core.arch import ARCHITECTURES
from tests.tiny import CONFIGS, tiny_model, toy_batch

# Smaller than the defaults, for speed (and prompt tuning without a tokenizer); a method not listed
# here is tested with its defaults.
TINY_SETTINGS = {
    "series": {"bottleneck": 16},
    "parallel": {"bottleneck": 16},
    "prefix": {"num_virtual_tokens": 4, "reparam_hidden": 16},
    "prompt": {"num_virtual_tokens": 4, "init": "random"},
    "ptuning": {"num_virtual_tokens": 4, "encoder_hidden": 16},
    # The generic generate test recomputes without saying where the prompt ends, so only positions counted
    # from the prompt's start stay put; tests/test_loreft.py checks the last positions with the lengths given.
    "loreft": {"r": 4, "first_positions": 3, "last_positions": 0},
}
ARCHS = list(ARCHITECTURES)
METHODS = methods.names()
CASES = [(a, m) for a in ARCHS for m in METHODS]
MERGING = [m.name for m in methods.all() if m.merges]


def adapted(arch: str, method: str, **overrides):
    model = tiny_model(arch)
    return core.attach(model, AdapterConfig.for_method(method, **{**TINY_SETTINGS.get(method, {}), **overrides}))


def test_every_architecture_row_has_a_tiny_config():
    missing = sorted(set(ARCHITECTURES) - set(CONFIGS))
    assert not missing, f"tests/tiny.py has no tiny config for {missing}: add one per row of core.arch"


def logits(model, batch):
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits


def train_steps(model, batch, steps=20, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW(core.adapter_params(model), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("arch,method", CASES)
def test_init_matches_base_and_disable_is_exact(arch, method):
    batch = toy_batch()
    base = logits(tiny_model(arch), batch)
    model = adapted(arch, method)
    out = logits(model, batch)
    assert out.shape == base.shape  # virtual tokens never appear in the logits
    if methods.get(method).identity_at_init:
        torch.testing.assert_close(out, base, atol=1e-5, rtol=0)
    else:
        assert (out - base).abs().max() > 1e-4  # virtual tokens do change the answer
    with core.disable_adapters(model):
        torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)


@pytest.mark.parametrize("arch,method", CASES)
def test_only_adapter_params_train_and_loss_drops(arch, method):
    model = adapted(arch, method)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in core.adapter_params(model)}
    assert trainable
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, toy_batch())
    assert losses[-1] < losses[0] - 1e-3, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"


@pytest.mark.parametrize("arch,method", CASES)
def test_save_load_roundtrip_and_generate(arch, method, tmp_path):
    batch = toy_batch()
    model = adapted(arch, method)
    train_steps(model, batch, steps=3)
    expected = logits(model, batch)
    core.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["adapter"]["method"] == method and meta["model_type"] == model.config.model_type
    fresh = core.load_adapter(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-6, rtol=0)

    # generate() with the KV cache agrees with greedy decoding by full recomputation
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = fresh.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq, m = ids, mask
    for _ in range(4):
        nxt = logits(fresh, {"input_ids": seq, "attention_mask": m})[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("arch,method", [(a, m) for a in ARCHS for m in MERGING])
def test_merge_unmerge(arch, method):
    batch = toy_batch()
    model = adapted(arch, method)
    train_steps(model, batch, steps=5)
    weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    unmerged = logits(model, batch)
    core.merge_adapter(model)
    core.merge_adapter(model)  # repeat-safe
    assert all(a.merged for a in core.inject.adapters_of(model))
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-4, rtol=0)
    with core.disable_adapters(model):
        torch.testing.assert_close(logits(model, batch), logits(tiny_model(arch), batch), atol=0, rtol=0)
    core.unmerge_adapter(model)
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(logits(model, batch), unmerged, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_peft_export_reproduces_merged_weights(arch, tmp_path):
    model = adapted(arch, "lora", targets=["q", "k", "v", "o", "up", "down"])
    train_steps(model, toy_batch(), steps=2)
    core.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 32
    base = tiny_model(arch)
    merged = dict(core.merge_adapter(model).named_parameters())
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        path = key[len("base_model.model."):-len(".lora_A.weight")]
        A, B = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        r = cfg["rank_pattern"].get(path, cfg["r"])
        alpha = cfg["alpha_pattern"].get(path, cfg["lora_alpha"])
        delta = (B @ A) * (alpha / r)
        w = base.get_submodule(path).weight.detach()
        expected = w + (delta.T if cfg["fan_in_fan_out"] else delta)
        torch.testing.assert_close(merged[f"{path}.base.weight"], expected, atol=1e-6, rtol=0)


def test_lora_parameter_count_matches_formula():
    model = adapted("llama", "lora", r=8)
    cfg = model.config
    hidden, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * 8
    per_layer = 8 * ((hidden + hidden) + 2 * (hidden + kv) + (hidden + inter) + (inter + hidden))
    assert core.trainable_report(model)["trainable"] == per_layer * cfg.num_hidden_layers


@pytest.mark.parametrize("dropout,bias", [(0.1, False), (0.0, True)])
def test_lora_training_function_equals_the_autograd_graph(monkeypatch, dropout, bias):
    """The written-out bf16 training route gives the output and gradients of the plain expression."""
    base = torch.nn.Linear(48, 40, bias=bias).to(torch.bfloat16).requires_grad_(False)
    lora = LoraLinear(base, r=4, alpha=8, dropout=dropout).train()
    torch.nn.init.normal_(lora.lora_B[0])  # B starts at zero; make the branch matter
    x0 = torch.randn(3, 5, 48).to(torch.bfloat16)
    results = []
    for fused in (True, False):
        assert lora._fused_path(x0)
        if not fused:
            monkeypatch.setattr(LoraLinear, "_fused_path", lambda self, x: False)
        lora.zero_grad()
        x = x0.clone().requires_grad_()
        torch.manual_seed(0)  # the same dropout mask on both routes
        y = lora(x)
        (y.float() * torch.linspace(-1, 1, 40)).sum().backward()
        results.append((y, x.grad, lora.lora_A.grad, lora.lora_B[0].grad))
    for got, ref in zip(*results):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=2e-2)


def test_fused_qkv_lora_counts_like_separate_layers():
    fused = core.trainable_report(adapted("gpt2", "lora", targets=["q", "v"]))["trainable"]
    assert fused == 2 * 32 * (32 + 32) * 2  # two roles, r=32, in=out=32, two layers


@pytest.mark.parametrize("placement,count", [("attn", 1), ("mlp", 1), ("both", 2)])
def test_series_placement(placement, count):
    model = adapted("llama", "series", placement=placement)
    assert core.trainable_report(model)["modules"] == 2 * count


def test_layer_selection():
    model = adapted("llama", "lora", targets=["q"], layers="1")
    assert isinstance(model.model.layers[1].self_attn.q_proj, LoraLinear)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)


def test_scaled_parallel_learns_its_scale():
    model = adapted("llama", "parallel", scale="learned")
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("scale")]
    assert len(names) == 2


def test_presets():
    assert AdapterConfig.preset("AdapterH").settings.placement == "both"
    assert AdapterConfig.preset("AdapterP").settings.placement == "mlp"
    assert AdapterConfig.preset("Scaled_Parallel").settings.scale == "learned"
    assert AdapterConfig.preset("LoRA").method == "lora"
    with pytest.raises(ConfigError, match="preset"):
        AdapterConfig.preset("Nope")


def test_config_json_roundtrip():
    for method in METHODS:
        layers = "all" if methods.get(method).all_layers_only else "0-1"
        cfg = AdapterConfig.for_method(method, layers=layers, **TINY_SETTINGS.get(method, {}))
        again = AdapterConfig.from_json(cfg.to_json())
        assert again == cfg


@pytest.mark.parametrize("build,field", [
    (lambda: AdapterConfig(method="magic"), "method"),
    (lambda: AdapterConfig.for_method("lora", r=0), "r"),
    (lambda: AdapterConfig.for_method("lora", dropout=-0.1), "dropout"),
    (lambda: AdapterConfig.for_method("series", non_linearity="cubic"), "non_linearity"),
    (lambda: AdapterConfig.for_method("prompt", num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: AdapterConfig.for_method("prefix", num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: AdapterConfig.for_method("lora", bogus=1), "bogus"),
])
def test_invalid_settings_name_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build().validate()
    assert err.value.field == field


@pytest.mark.parametrize("cfg,field", [
    (AdapterConfig.for_method("lora", targets=["gate"]), "targets"),  # GPT-2 has no gated MLP
    (AdapterConfig.for_method("lora", layers="0-5"), "layers"),      # it has two layers
    (AdapterConfig.for_method("prefix", layers="0"), "layers"),
])
def test_attach_rejects_what_the_model_lacks(cfg, field):
    with pytest.raises(ConfigError) as err:
        core.attach(tiny_model("gpt2"), cfg)
    assert err.value.field == field


def test_default_targets_skip_missing_roles():
    model = core.attach(tiny_model("gpt2"), AdapterConfig())  # q,k,v -> fused c_attn
    assert isinstance(model.transformer.h[0].attn.c_attn, LoraLinear)
    assert model.transformer.h[0].attn.c_attn.roles == ["q", "k", "v"]


def test_unknown_architecture_lists_layers_then_works_by_hand():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(core.UnsupportedArchitecture) as err:
        core.attach(model, AdapterConfig())
    assert "self_attn.q_proj" in str(err.value) and "model.layers" in str(err.value)
    cfg = AdapterConfig(arch={"layers": "model.layers", "roles": {"q": "self_attn.q_proj", "v": "self_attn.v_proj"}},
                        settings=LoraSettings(targets=["q", "v"]))
    core.attach(model, cfg)
    assert core.trainable_report(model)["modules"] == 4
    losses = train_steps(model, toy_batch(), steps=10)
    assert losses[-1] < losses[0]


def test_attach_twice_is_refused_and_detach_restores():
    batch = toy_batch()
    model = adapted("llama", "parallel")
    with pytest.raises(ConfigError):
        core.attach(model, AdapterConfig())
    train_steps(model, batch, steps=3)
    core.detach(model)
    torch.testing.assert_close(logits(model, batch), logits(tiny_model("llama"), batch), atol=0, rtol=0)
    assert not core.inject.adapters_of(model)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_exports_are_refused_where_the_method_has_none(method, tmp_path):
    record = methods.get(method)
    model = adapted("llama", method)
    if not record.merges:
        for act in (core.merge_adapter, core.unmerge_adapter, lambda m: core.export_merged(m, tmp_path / "merged")):
            with pytest.raises(ConfigError, match=f"{record.label} cannot merge") as err:
                act(model)
            assert err.value.field == "method"
    if record.peft is None:
        with pytest.raises(ConfigError, match=f"{record.label} has no PEFT layout"):
            core.export_peft(model, tmp_path / "peft")
    else:
        core.export_peft(model, tmp_path / "peft")
        assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert set(record.exports) == ({"peft"} if record.peft else set()) | (
        {"merged"} if record.merges else set())


@pytest.mark.parametrize("arch,targets", [("llama", ["q", "v", "down"]), ("gpt2", ["q", "v", "up"]),
                                          ("bloom", ["k", "o"])])
def test_lora_factors_give_the_delta(arch, targets):
    """``lora_factors`` (what exports read) is one LoRA of the whole layer: ``scaling * B @ A == delta_weight``."""
    model = adapted(arch, "lora", targets=targets)
    for a in core.inject.adapters_of(model):
        for B in a.lora_B:
            torch.nn.init.normal_(B)  # B starts at zero; make the update matter
        A, B = a.lora_factors()
        assert A.shape[0] == a.r * max(1, len(a.roles))
        torch.testing.assert_close(a.scaling * B @ A, a.delta_weight(), atol=1e-6, rtol=0)


def test_model_loss_ignores_virtual_tokens():
    """The loss with virtual tokens is the mean over the real labelled tokens only."""
    batch = toy_batch()
    model = adapted("llama", "prompt")
    with torch.no_grad():
        out = model(**batch)
    logp = out.logits[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    manual = -logp[keep].gather(-1, labels[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", MERGING)
def test_merged_export_is_a_plain_checkpoint(method, tmp_path):
    from transformers import AutoModelForCausalLM

    batch = toy_batch()
    model = adapted("llama", method)
    train_steps(model, batch, steps=3)
    expected = logits(model, batch)
    core.export_merged(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not core.inject.adapters_of(plain)
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-4, rtol=0)
    assert not any(a.merged for a in core.inject.adapters_of(model))  # the original is untouched
