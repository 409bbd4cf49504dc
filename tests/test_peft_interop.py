"""Our PEFT exports, loaded by Hugging Face PEFT itself: the same logits as our adapted model.

Rows come from the registry: every method whose record has a PEFT mapping (``Method.peft``), with its
default settings and with each of its presets (rsLoRA, PiSSA and the like are presets of a method),
on a plain architecture (LLaMA) and on fused-qkv ones (GPT-2's ``Conv1D`` [q | k | v], GPT-NeoX's
per-head layout). peft is a bench and test requirement only (``requirements-bench.txt``); ``core``
never imports it.
"""

from __future__ import annotations

import json

import pytest
import torch

import core
from core import methods
from core.adapters.base import available_roles
from core.arch import ARCHITECTURES
from tests.test_adapters import adapted, logits, train_steps
from tests.tiny import tiny_model, toy_batch

peft = pytest.importorskip("peft")

ARCHS = ["llama", "gpt2", "gpt_neox"]
# Targets that put plain and fused layers in one adapter where a method's defaults would not.
INTEROP_SETTINGS = {"vera": {"r": 16, "targets": ["q", "v", "down"]}}


def exported_configurations() -> list[tuple[str, str, dict]]:
    """(label, method, settings overrides): each exporting method's defaults and presets, once each."""
    rows: dict[tuple[str, str], str] = {}
    for m in methods.all():
        if m.peft is not None:
            for label, values in [(m.name, {}), *m.presets.items()]:
                rows.setdefault((m.name, json.dumps(dict(values), sort_keys=True)), label)
    return [(label, method, json.loads(values)) for (method, values), label in rows.items()]


CASES = [pytest.param(arch, method, values, id=f"{arch}-{label}")
         for arch in ARCHS for label, method, values in exported_configurations()]


@pytest.mark.parametrize("arch,method,values", CASES)
def test_peft_loads_our_export_with_the_same_logits(arch, method, values, tmp_path):
    if "targets" in values:  # a preset's roles this architecture lacks (GPT-2 has no gate) are left out
        have = available_roles(ARCHITECTURES[arch])
        values = {**values, "targets": [t for t in values["targets"] if t in have]}
    batch = toy_batch()
    model = adapted(arch, method, **{**INTEROP_SETTINGS.get(method, {}), **values})
    train_steps(model, batch, steps=5, lr=5e-2)
    expected = logits(model, batch)
    base = logits(tiny_model(arch), batch)
    assert (expected - base).abs().max() > 1e-3, "the trained adapter should change the logits"
    core.export_peft(model, tmp_path)

    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, atol=2e-5, rtol=0)
