"""The real embedded SmolLM2-135M-Instruct: every method attaches, trains a step, counts add up."""

from __future__ import annotations

import copy

import pytest
import torch

import core
from core import AdapterConfig, ModelSettings
from core.models import ModelLoadError, load_model


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the conversion's home, for this module only
        mp.setenv("WORKBENCH_HOME", str(tmp_path_factory.mktemp("home")))
        try:
            return load_model(ModelSettings(precision="fp32"))
        except ModelLoadError as err:
            pytest.skip(f"embedded model unavailable: {err}")


def lora_formula(cfg, r: int) -> int:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = r * (2 * h) + 2 * r * (h + kv) + r * (h + inter) + r * (inter + h)  # q, k, v, up, down
    return per_layer * cfg.num_hidden_layers


@pytest.mark.parametrize("method", ["lora", "series", "parallel", "prefix", "prompt", "ptuning"])
def test_each_method_attaches_and_trains_a_step(smol, method):
    model = copy.deepcopy(smol.model)
    cfg = AdapterConfig.for_method(method)
    core.attach(model, cfg, tokenizer=smol.tokenizer)
    c = model.config
    trainable = core.trainable_report(model)["trainable"]
    h, L = c.hidden_size, c.num_hidden_layers
    expected = {
        "lora": lora_formula(c, 32),
        "series": L * (h * 256 + 256 + 256 * h + h),  # AdapterP: after the MLP
        "parallel": L * (h * 256 + 256 + 256 * h + h),
        "prefix": 10 * h + h * 512 + 512 + 512 * (L * 2 * c.num_key_value_heads * (h // c.num_attention_heads))
        + L * 2 * c.num_key_value_heads * (h // c.num_attention_heads),
        "prompt": 10 * h,
        "ptuning": 10 * h + (h * 256 + 256) + (256 * 256 + 256) + (256 * h + h),
    }[method]
    assert trainable == expected
    if method == "lora":
        assert trainable == 6_635_520  # SmolLM2-135M: 30 layers, 576 wide, 3 kv heads of 64, MLP 1536
    batch = smol.tokenizer(["Q: 2 + 3? A: The answer is 5."], return_tensors="pt")
    model.train()
    opt = torch.optim.AdamW(core.adapter_params(model), lr=1e-3)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in core.adapter_params(model) if p.requires_grad)
