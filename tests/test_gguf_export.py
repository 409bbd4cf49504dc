"""GGUF and Ollama export (issue 18): a merged tiny LLaMA written as GGUF F16/Q8_0 loads back in
transformers with the merged model's logits and tokenizer; a LoRA as a GGUF adapter reproduces the
merged weights; the Modelfile's TEMPLATE renders what the HF chat template renders; export jobs build
the zips; llama-cpp-python, where installed, runs the files."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
import transformers as T

import core
from core import AdapterConfig
from core.fields import ConfigError
from core.gguf_export import Q8_BLOCK, export_lora_gguf, export_merged_gguf, write_model_gguf
from core.gguf_vocab import pre_tokenizer_name
from core.inject import adapters_of
from core.ollama import alpaca_format, chat_format, modelfile, ollama_format
from core.templates import render_prompt
from tests.tiny import tiny_model, tiny_tokenizer

TEXTS = ["The answer is 42.", "how many apples does Tom have?", "</s> plus <pad>", "  two  spaces\n"]


def tiny_llama(tok, seed: int = 0, tied: bool = False, model_type: str = "llama"):
    """A random LLaMA-family model over ``tok``'s vocabulary, heads of 16 (Q/K permutation visible)."""
    Config = T.MistralConfig if model_type == "mistral" else T.LlamaConfig
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    cfg = Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                 tie_word_embeddings=tied, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 bos_token_id=None, **extra)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def with_lora(model, **settings):
    """``model`` with a LoRA whose B is random (a fresh LoRA is the identity: nothing to check)."""
    core.attach(model, AdapterConfig.for_method("lora", **{"r": 4, "alpha": 8, "dropout": 0.0, **settings}))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in core.adapter_params(model):
            p.normal_(0, 0.05)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_back(path: Path):
    return (T.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval(),
            T.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ids(tok):
    return torch.randint(2, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied,model_type", [(False, "llama"), (True, "llama"), (False, "mistral")])
def test_merged_f16_loads_back_with_the_merged_logits_and_tokenizer(tok, ids, tmp_path, tied, model_type):
    model = with_lora(tiny_llama(tok, tied=tied, model_type=model_type))
    path = export_merged_gguf(model, tok, tmp_path / "model.gguf", "f16")
    back, back_tok = load_back(path)
    assert adapters_of(model), "the export works on a copy: the model keeps its adapter"
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(tiny_llama(tok, tied=tied, model_type=model_type), ids), atol=1e-3)
    torch.testing.assert_close(logits(back, ids), expected, atol=2e-3, rtol=1e-2)  # F16 weights: ~5e-4 relative
    for text in TEXTS:
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"], text
    assert back_tok.eos_token == tok.eos_token and back_tok.chat_template == tok.chat_template


def spm_tokenizer():
    """A SentencePiece-style (LLaMA-2) tokenizer: BPE with byte fallback and a "\u2581" prefix, trained in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(["The answer is 42, how many apples does Tom have? He buys more and gives some"] * 4,
                            trainer)
    model = json.loads(tok.to_str())["model"]
    return T.LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def test_sentencepiece_vocabulary_round_trips(ids, tmp_path):
    from gguf import GGUFReader

    tok = spm_tokenizer()
    model = with_lora(tiny_llama(tok))
    path = export_merged_gguf(model, tok, tmp_path / "model.gguf", "f16")
    fields = {k: f for k, f in GGUFReader(path).fields.items()}
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.add_space_prefix"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.convert_tokens_to_ids("<0x0A>")] == 6 and types[tok.unk_token_id] == 2  # BYTE, UNKNOWN
    scores = fields["tokenizer.ggml.scores"].contents()
    first, second = (m.replace(" ", "") for m in fields["tokenizer.ggml.merges"].contents()[:2])
    assert scores[tok.convert_tokens_to_ids(first)] > scores[tok.convert_tokens_to_ids(second)]  # merge order
    back, back_tok = load_back(path)
    for text in [*TEXTS, "caf\u00e9 \u2603"]:  # the last two characters only through byte fallback
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"], text
    ids = ids[:, :8] % len(tok)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=2e-3, rtol=1e-2)


def test_q8_0_is_within_its_documented_error(tok, ids, tmp_path):
    """Q8_0: blocks of 32 values, scale ``d = max|x| / 127`` stored in float16, each value off by at most
    ``d / 2`` plus 127 times the scale's float16 rounding (``d * 2^-11``)."""
    model = with_lora(tiny_llama(tok))
    merged_dir = core.export_merged(model, tmp_path / "merged")
    merged = T.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    path = export_merged_gguf(model, tok, tmp_path / "model.gguf", "q8_0")
    back, _ = load_back(path)
    from gguf import GGMLQuantizationType, GGUFReader

    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0 and types["output_norm.weight"].name == "F32"
    mine, theirs = merged.state_dict(), back.state_dict()
    for key, w in mine.items():
        if w.dim() < 2:
            assert torch.equal(theirs[key], w), key
            continue
        blocks = w.reshape(-1, Q8_BLOCK)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        err = (theirs[key].reshape(-1, Q8_BLOCK) - blocks).abs()
        assert bool((err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-9).all()), key
        assert err.max() > 0, f"{key} is not quantised"
    got, expected = logits(back, ids), logits(model, ids)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_other_architectures_and_tokenizers_are_refused(tok, tmp_path):
    with pytest.raises(ConfigError, match="LLaMA-family.*'qwen2'"):
        write_model_gguf(tiny_model("qwen2"), tok, tmp_path / "q.gguf")
    with pytest.raises(ConfigError, match="adapter attached"):
        write_model_gguf(with_lora(tiny_llama(tok)), tok, tmp_path / "a.gguf")
    with pytest.raises(ConfigError, match="quant"):
        write_model_gguf(tiny_llama(tok), tok, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(ConfigError, match="pre-tokenizer .Whitespace."):
        pre_tokenizer_name({"type": "Whitespace"})
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}) == "smollm"
    assert not (tmp_path / "q.gguf").exists()


# --------------------------------------------------------------------------------------------------
# LoRA as a GGUF adapter.

def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("settings", [{}, {"rslora": True, "targets": ["q", "k", "v", "o", "gate", "up", "down"]},
                                      {"init": "pissa"}])
def test_lora_gguf_adds_up_to_the_merged_weights(tok, tmp_path, settings):
    from gguf import GGUFReader

    base = tiny_llama(tok)
    model = with_lora(tiny_llama(tok), **settings)
    merged = T.AutoModelForCausalLM.from_pretrained(core.export_merged(model, tmp_path / "merged")).state_dict()
    reader = GGUFReader(export_lora_gguf(model, tmp_path / "adapter.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == ("adapter", "lora", "llama")
    alpha = fields["adapter.lora.alpha"]
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    heads = {"attn_q": 4, "attn_k": 2}
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    seen = set()
    for name in [n for n in tensors if n.endswith(".lora_a")]:
        layer, role = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight\.lora_a", name).groups()
        A, B = tensors[name], tensors[name.replace("lora_a", "lora_b")]
        if role in heads:
            B = _unpermute(B, heads[role])
        key = f"model.layers.{layer}.{hf[role]}.weight"
        expected = base.state_dict()[key] + torch.from_numpy(B @ A) * (alpha / A.shape[0])
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=0)
        seen.add(role)
    gguf_role = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
                 "down": "ffn_down"}
    assert seen == {gguf_role[t] for t in model.adapter_config.settings.targets}


def test_lora_gguf_refuses_dora(tok, tmp_path):
    model = tiny_llama(tok)
    core.attach(model, AdapterConfig.for_method("dora", r=4))
    with pytest.raises(ConfigError, match="plain LoRA; this adapter is DoRA"):
        export_lora_gguf(model, tmp_path / "adapter.gguf")


# --------------------------------------------------------------------------------------------------
# Ollama: the Modelfile's TEMPLATE, rendered by a Go-template renderer for the subset core.ollama writes.

_ACTION = re.compile(r"{{\s*(.*?)\s*}}", re.S)


def _parse(parts: list[str], i: int = 0) -> tuple[list, int]:
    nodes: list = []
    while i < len(parts):
        part, i = parts[i], i + 1
        if i % 2 == 1:  # text
            nodes.append(("text", part))
        elif part == "end":
            return nodes, i
        elif part.startswith(("range ", "if ")):
            body, i = _parse(parts, i)
            nodes.append((part.split()[0], part.split()[1][1:], body))
        elif re.fullmatch(r"\.\w+", part):
            nodes.append(("field", part[1:]))
        else:
            raise ValueError(f"unsupported Go template action {part!r}")
    return nodes, i


def _run(nodes: list, dot: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(dot[node[1]]))
        elif node[0] == "if":
            out.append(_run(node[2], dot) if dot.get(node[1]) else "")
        else:
            out.extend(_run(node[2], item) for item in dot[node[1]])
    return "".join(out)


def go_render(template: str, **data) -> str:
    assert "{{-" not in template and "-}}" not in template
    return _run(_parse(_ACTION.split(template))[0], data)


def ollama_chat(fmt, messages: list[dict]) -> str:
    """What Ollama sends the model for ``messages``: the Modelfile's SYSTEM first when the conversation
    has no system message, then the TEMPLATE over the messages."""
    if fmt.system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": fmt.system}, *messages]
    return go_render(fmt.template, Messages=[{"Role": m["role"], "Content": m["content"]} for m in messages])


def hf_render(template: str, messages: list[dict], **extra) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, bos_token="<s>", eos_token="</s>", **extra)


SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
          "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + "
          "'[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
          "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CONVERSATION = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."},
                {"role": "user", "content": "And times 4?"}]


@pytest.mark.parametrize("system", [None, "Answer briefly."])
@pytest.mark.parametrize("template,family", [(SMOLLM2, "ChatML"), (LLAMA3, "LLaMA-3")])
def test_modelfile_template_renders_the_chat_template(template, family, system):
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    fmt = chat_format(template, "<|im_end|>")
    assert fmt.family == family
    expected = hf_render(template, messages, add_generation_prompt=True).removeprefix("<s>")
    assert ollama_chat(fmt, messages) == expected
    assert (fmt.system is not None) == (family == "ChatML")


def test_modelfile_for_llama2_and_alpaca_renders_one_turn():
    fmt = chat_format(LLAMA2, "</s>")
    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2 + 3?"}]
    assert (go_render(fmt.template, System="Be exact.", Prompt="2 + 3?", Response="")
            == hf_render(LLAMA2, messages).removeprefix("<s>"))
    fmt = alpaca_format("</s>")
    assert go_render(fmt.template, Prompt="Add 2 and 3.", Response="") == render_prompt("Add 2 and 3.")
    assert fmt.stops == ["</s>", "### Instruction:"]


def test_modelfile_text_and_refusals(tok):
    text = modelfile(ollama_format(tok, "alpaca"))
    assert text.splitlines()[1] == "FROM ./model.gguf"
    assert 'TEMPLATE """Below is an instruction' in text and 'PARAMETER stop "### Instruction:"' in text
    chatml = modelfile(chat_format(SMOLLM2, "<|im_end|>"))
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in chatml
    assert 'PARAMETER stop "<|im_end|>"' in chatml
    with pytest.raises(ConfigError, match="known: ChatML, LLaMA-3, LLaMA-2"):
        ollama_format(tok, "chat")  # the tiny tokenizer's <|role|> template is no known family
    with pytest.raises(ConfigError, match="no chat template"):
        chat_format(None, "</s>")


# --------------------------------------------------------------------------------------------------
# Export jobs, the embedded model, llama.cpp.

@pytest.mark.slow
def test_gguf_artifacts_are_built_by_export_jobs(tmp_path, tiny_model_dir):
    from jobs import Worker
    from tests.test_jobs_support import make_service, tiny_spec, write_data

    service = make_service(tmp_path)
    try:
        job_id = service.submit(tiny_spec(tiny_model_dir, write_data(tmp_path / "rows.json"), max_steps=1,
                                          eval_every=0, save_every=0))
        Worker(service, poll_s=0.1).run(until_idle=True)
        assert service.get(job_id)["status"] == "succeeded", service.get(job_id)["error"]
        kinds = ("ollama", "gguf-lora")
        exports = {kind: service.export(job_id, kind) for kind in kinds}
        assert all(service.artifact(job_id, kind) is None for kind in kinds)  # queued, not built here
        Worker(service, poll_s=0.1).run(until_idle=True)
        for kind, export_id in exports.items():
            assert service.get(export_id)["status"] == "succeeded", service.get(export_id)["error"]
        with zipfile.ZipFile(service.artifact(job_id, "ollama")) as zf:
            names = {Path(n).name: n for n in zf.namelist()}
            assert set(names) == {"model.gguf", "Modelfile"}
            text = zf.read(names["Modelfile"]).decode()
            assert "FROM ./model.gguf" in text and "### Instruction:" in text  # the job trained on alpaca
            zf.extract(names["model.gguf"], tmp_path / "ollama")
        with zipfile.ZipFile(service.artifact(job_id, "gguf-lora")) as zf:
            assert [Path(n).name for n in zf.namelist()] == ["adapter.gguf"]
        from gguf import GGMLQuantizationType, GGUFReader

        types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "ollama" / names["model.gguf"]).tensors}
        assert types["blk.0.ffn_up.weight"] == GGMLQuantizationType.Q8_0  # Ollama gets the Q8_0 file
    finally:
        service.close()


def test_export_jobs_are_refused_up_front(tmp_path):
    from jobs.artifacts import _check_exportable
    from jobs.errors import JobError

    def job(method: str, arch: str = "llama") -> dict:
        core.save_adapter(core.attach(tiny_model(arch), AdapterConfig.for_method(method)), tmp_path / arch / "adapter")
        return {"id": 7, "out_dir": str(tmp_path / arch), "spec": {"adapter": {"method": method}}}

    with pytest.raises(JobError, match=r"DoRA adapter has no LoRA as a GGUF adapter.*methods that have: LoRA\)"):
        _check_exportable(job("dora"), "gguf-lora")
    with pytest.raises(JobError, match="Series adapter adapter has no merged model as GGUF F16"):
        _check_exportable(job("series"), "gguf-f16")
    with pytest.raises(JobError, match="job 7: GGUF export covers LLaMA-family.*'gpt2'"):
        _check_exportable(job("lora", "gpt2"), "ollama")
    _check_exportable(job("lora"), "gguf-lora")
    _check_exportable(job("vera"), "gguf-q8_0")  # VeRA merges into the weights: its merged model is a GGUF


@pytest.mark.slow
def test_the_embedded_model_round_trips(tmp_path_factory):
    from core import ModelSettings
    from core.models import ModelLoadError, load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_HOME", str(tmp_path_factory.mktemp("home")))
        try:
            smol = load_model(ModelSettings(precision="fp32"))
        except ModelLoadError as err:
            pytest.skip(f"embedded model unavailable: {err}")
    model, tok = smol.model, smol.tokenizer  # merging is checked on the tiny models; this is the real shape
    path = write_model_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "smol.gguf", "f16")
    back, back_tok = load_back(path)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    for sample in [*TEXTS, text]:
        assert back_tok(sample)["input_ids"] == tok(sample)["input_ids"], sample
    ids = torch.tensor([tok(text)["input_ids"]])
    expected = logits(model, ids)
    assert (logits(back, ids) - expected).abs().max() <= 1e-2 * expected.abs().max()
    fmt = ollama_format(tok, "chat")
    assert fmt.family == "ChatML" and ollama_chat(fmt, CONVERSATION) == text


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_runs_the_model_and_the_lora(tok, ids, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    base = tiny_llama(tok)
    model = with_lora(tiny_llama(tok))
    merged = export_merged_gguf(model, tok, tmp_path / "merged.gguf", "f16")
    base_path = write_model_gguf(base, tok, tmp_path / "base.gguf", "f16")
    adapter = export_lora_gguf(model, tmp_path / "adapter.gguf")
    row = ids[0].tolist()
    expected = logits(model, ids[:1])[0].numpy()
    for kwargs in ({"model_path": str(merged)}, {"model_path": str(base_path), "lora_path": str(adapter)}):
        llm = llama_cpp.Llama(n_ctx=64, logits_all=True, verbose=False, seed=0, **kwargs)
        llm.eval(row)
        got = np.asarray(llm.scores[:len(row)])
        assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max(), kwargs
        for text in TEXTS[:2]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], text
