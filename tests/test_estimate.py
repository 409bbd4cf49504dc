"""The estimate is exactly what training would get: same count as a real attach, same file size as a save."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import AdapterConfig, ConfigError, DataSettings, ModelSettings, TrainSettings, attach, save_adapter
from core import trainable_report
from core.config import METHOD_SETTINGS, PRESETS
from core.estimate import estimate, human_bytes, human_count, safetensors_size


def _real(model_dir, cfg):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    attach(model, cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    return model


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_estimate_equals_trainable_report_and_file_size(tiny_model_dir, tmp_path, method):
    cfg = AdapterConfig.for_method(method)
    est = estimate(ModelSettings(name=str(tiny_model_dir)), cfg)
    model = _real(tiny_model_dir, AdapterConfig.for_method(method))
    assert {k: est[k] for k in ("trainable", "base", "percent", "per_kind", "modules")} == trainable_report(model)
    saved = save_adapter(model, tmp_path / method) / "adapter.safetensors"
    assert est["adapter_bytes"] == saved.stat().st_size
    assert est["model_type"] == "llama" and est["layers"] == 2


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_and_layer_selection(tiny_model_dir, preset):
    cfg = AdapterConfig.preset(preset)
    if cfg.method in ("lora", "series", "parallel"):
        cfg.layers = "1"
    est = estimate(ModelSettings(name=str(tiny_model_dir)), cfg)
    assert est["trainable"] == trainable_report(_real(tiny_model_dir, cfg))["trainable"]


def test_memory_grows_with_batch_and_length(tiny_model_dir):
    settings, cfg = ModelSettings(name=str(tiny_model_dir)), AdapterConfig.for_method("lora")
    small = estimate(settings, cfg, DataSettings(cutoff_len=64), TrainSettings(micro_batch_size=1, batch_size=4))
    big = estimate(settings, cfg, DataSettings(cutoff_len=256), TrainSettings(micro_batch_size=4, batch_size=4))
    assert 0 < small["memory_bytes"] < big["memory_bytes"]
    assert small["memory_bytes"] == sum(small["memory_parts"].values())
    assert small["memory_parts"]["adapter_and_optimizer"] == 16 * small["trainable"]


def test_fast_logits_are_one_head_chunk_and_reference_logits_every_position(tiny_model_dir, monkeypatch):
    """The trainer's fast head loss holds one chunk of logits at a time; the plain forward all of them."""
    from core import estimate as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 2**12)  # ~10 tokens of the tiny vocabulary per chunk
    settings, cfg = ModelSettings(name=str(tiny_model_dir)), AdapterConfig.for_method("lora")

    def parts(micro, kernels):
        train = TrainSettings(micro_batch_size=micro, batch_size=4, kernels=kernels)
        return estimate(settings, cfg, DataSettings(cutoff_len=64), train)["memory_parts"]

    assert parts(1, "fast")["logits"] == parts(4, "fast")["logits"] < parts(1, "reference")["logits"]
    assert parts(4, "reference")["logits"] == 4 * parts(1, "reference")["logits"]
    assert set(parts(1, "fast")) == {"weights", "adapter_and_optimizer", "activations", "logits", "runtime"}


def test_activations_count_the_adapters_saved_inputs(tiny_model_dir):
    settings = ModelSettings(name=str(tiny_model_dir))
    few = estimate(settings, AdapterConfig.for_method("lora", targets=["q"]))["memory_parts"]
    many = estimate(settings, AdapterConfig.for_method("lora", targets=["q", "v", "down"]))["memory_parts"]
    assert few["activations"] < many["activations"]
    assert few["runtime"] == many["runtime"] > 0


@pytest.mark.parametrize("make, field", [
    (lambda d: (ModelSettings(name=str(d)), AdapterConfig.for_method("lora", r=0)), "adapter.r"),
    (lambda d: (ModelSettings(name=str(d)), AdapterConfig.for_method("lora", layers="0-9")), "adapter.layers"),
    (lambda d: (ModelSettings(name=str(d)), AdapterConfig.for_method("prefix", layers="0")), "adapter.layers"),
    (lambda d: (ModelSettings(name=str(d)), AdapterConfig.for_method("lora", targets=[])), "adapter.targets"),
    (lambda d: (ModelSettings(name=str(d / "missing")), AdapterConfig()), "model.name"),
    (lambda d: (ModelSettings(name=""), AdapterConfig()), "model.name"),
])
def test_invalid_settings_raise_config_error_naming_the_field(tiny_model_dir, make, field):
    settings, cfg = make(tiny_model_dir)
    with pytest.raises(ConfigError) as info:
        estimate(settings, cfg)
    assert info.value.field == field


def test_safetensors_size_of_nothing_and_helpers():
    assert safetensors_size({}) == 8 + 8  # "{}" padded to 8
    assert human_bytes(1536) == "1.5 KB" and human_bytes(12) == "12 B"
    assert human_count(1_234_567) == "1.23M" and human_count(999) == "999"
