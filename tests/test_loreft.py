"""LoReFT: the edit against a direct implementation of its formula, where it applies (the first and last
prompt positions only, from the first attended token), R orthonormal through training, generation with
the key/value cache, left-padded batches, save/load, the trainer and the chat.

The generic contracts (loss falls, save/load, disable on every architecture) come from the registry rows
of ``tests/test_adapters.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

import core
from core import AdapterConfig, ConfigError
from core.adapters.reft import Householder, Loreft
from core.arch import ARCHITECTURES, arch_for, get_layers
from core.decoding import batched_greedy
from core.inject import adapters_of, prompt_lengths
from tests.test_adapters import logits, train_steps
from tests.test_jobs_support import ROWS, tiny_spec, write_data
from tests.tiny import tiny_model, toy_batch

ARCHS = list(ARCHITECTURES)


def adapted(arch: str = "llama", layers: str = "all", **settings) -> torch.nn.Module:
    s = {"r": 4, "first_positions": 2, "last_positions": 2, "dropout": 0.0, **settings}
    return core.attach(tiny_model(arch), AdapterConfig.for_method("loreft", layers=layers, **s))


def reft_of(model) -> Loreft:
    (adapter,) = adapters_of(model)
    return adapter


def randomise(model) -> None:
    """Train-like values: W, b far from their init (R stays orthonormal by construction)."""
    with torch.no_grad():
        reft_of(model).W.normal_()
        reft_of(model).b.normal_()


def expected_positions(mask: torch.Tensor, first: int, last: int, lengths: list[int] | None = None) -> set:
    """The (row, column) pairs the method edits, written out: the first / last places of each prompt."""
    picked = set()
    for row in range(mask.shape[0]):
        columns = [c for c in range(mask.shape[1]) if mask[row, c]]
        prompt = columns[:lengths[row]] if lengths is not None else columns
        picked |= {(row, c) for c in prompt[:first] + prompt[len(prompt) - last:]}
    return picked


def with_formula(arch: str, adapter: Loreft, batch: dict, first: int, last: int) -> torch.Tensor:
    """The base model's logits with ``h + Rᵀ(W h + b − R h)`` added by hand at the expected positions."""
    base = tiny_model(arch)
    sites = sorted(expected_positions(batch["attention_mask"], first, last))
    hooks = []
    for k, layer_id in enumerate(adapter.layer_ids):
        R, W, b = adapter.R[k].detach().clone(), adapter.W[k].detach().clone(), adapter.b[k].detach().clone()

        def edit(module, args, output, R=R, W=W, b=b):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            for row, col in sites:
                x = h[row, col]
                h[row, col] = x + R.T @ (W @ x + b - R @ x)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        layer = get_layers(base, arch_for(base))[layer_id]
        hooks.append(layer.register_forward_hook(edit))
    out = logits(base, batch)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_equals_the_formula_at_the_first_and_last_prompt_positions(arch):
    batch = toy_batch()  # one left-padded row of 6 tokens, one of 9
    model = adapted(arch)
    randomise(model)
    expected = with_formula(arch, reft_of(model), batch, first=2, last=2)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=1e-5)
    assert (expected - logits(tiny_model(arch), batch)).abs().max() > 1e-3


def layer_output(model, layer: int, batch: dict, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The output of decoder layer ``layer`` as the next layer sees it (after the edit)."""
    seen = []
    block = get_layers(model, arch_for(model))[layer]
    hook = block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with prompt_lengths(model, lengths):
        logits(model, batch)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("lengths", [None, [4, 6]])
def test_only_the_first_and_last_prompt_positions_change(lengths):
    """Left-padded rows (generation: the prompt is every attended token) and right-padded rows with prompt
    lengths (training): the edited layer's output differs exactly at the chosen positions."""
    batch = toy_batch()
    if lengths is not None:  # right padding, as the trainer's batches
        batch["attention_mask"] = batch["attention_mask"].flip(-1)
        batch["input_ids"] = batch["input_ids"].flip(-1)
    model = adapted(layers="1", first_positions=1, last_positions=2)
    randomise(model)
    given = None if lengths is None else torch.tensor(lengths)
    edited = layer_output(model, 1, batch, given)
    with core.disable_adapters(model):
        plain = layer_output(model, 1, batch, given)
    changed = {tuple(x) for x in ((edited - plain).abs().amax(-1) > 0).nonzero().tolist()}
    assert changed == expected_positions(batch["attention_mask"], 1, 2, lengths)
    assert len(changed) == 6


def orthonormal_error(model) -> float:
    R = reft_of(model).R.detach()
    return (R @ R.mT - torch.eye(R.shape[-2])).abs().max().item()


def test_householder_map_is_torchs():
    """The rank-one updates give ``torch.linalg.householder_product`` of the same reflectors, and
    ``right_inverse`` gives back an orthonormal matrix up to its rows' signs."""
    torch.manual_seed(0)
    X = torch.randn(3, 5, 40)
    V = X.mT.tril(-1)
    expected = torch.linalg.householder_product(V, 2.0 / (1.0 + (V * V).sum(-2))).mT
    torch.testing.assert_close(Householder()(X), expected, atol=1e-6, rtol=0)
    R = torch.linalg.qr(torch.randn(40, 5))[0].mT
    again = Householder()(Householder().right_inverse(R))
    torch.testing.assert_close(again.abs(), R.abs(), atol=1e-6, rtol=0)
    assert torch.equal((again * R).sum(-1).abs().round(), torch.ones(5))  # each row is +-R's


def test_R_stays_orthonormal_while_training_and_the_loss_falls():
    """torch's AdamW decays weights by 0.01 here: R must survive it (torch's own orthogonal map does not)."""
    model = adapted(dropout=0.05)
    before = reft_of(model).R.detach().clone()
    assert orthonormal_error(model) < 1e-5
    losses = train_steps(model, toy_batch(), steps=30, lr=3e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    assert orthonormal_error(model) < 1e-5
    after = reft_of(model).R.detach()
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(after, before))  # every layer's R was trained


def test_parameter_count_and_a_model_built_on_meta():
    """2 r hidden + r per layer (R, W, b); the estimate attaches on the meta device."""
    model = adapted(layers="1", r=4)
    assert core.trainable_report(model)["trainable"] == 2 * 4 * 32 + 4
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_model("llama").config)
        core.attach(meta, AdapterConfig.for_method("loreft", r=8))
    assert core.trainable_report(meta)["trainable"] == 2 * (2 * 8 * 32 + 8)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_generation_with_the_cache_equals_greedy_recomputation(arch):
    """Only the prompt's positions are edited, on the first pass; each recomputed step is told where the
    prompt ends, so the last positions stay those of the prompt."""
    batch = toy_batch()
    model = adapted(arch)
    randomise(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq, m = ids, mask
    with prompt_lengths(model, mask.sum(-1)):
        for _ in range(4):
            nxt = logits(model, {"input_ids": seq, "attention_mask": m})[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


def test_a_left_padded_batch_equals_each_row_alone():
    """Logits, and the evaluation's batched greedy decoding (left padding, refilled batches)."""
    model = adapted()
    randomise(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (3, 7, 5, 9, 4)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    together = logits(model, {"input_ids": ids, "attention_mask": mask})
    for i, p in enumerate(prompts):
        alone = logits(model, {"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p))})
        torch.testing.assert_close(together[i, width - len(p):], alone[0], atol=1e-5, rtol=1e-5)

    def run(batch_size: int) -> dict:
        stop = lambda i, tokens: "length" if len(tokens) >= 5 else None  # noqa: E731
        with torch.no_grad():
            return batched_greedy(model, None, prompts, batch_size, stop, pad_id=0)[0]

    assert run(2) == run(1)


def test_save_load_is_exact_and_disable_gives_the_base(tmp_path):
    model = adapted(dropout=0.05)
    train_steps(model, toy_batch(), steps=5, lr=3e-2)
    batch = toy_batch(seed=3)
    expected = logits(model, batch)
    core.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["adapter"]["method"] == "loreft" and meta["adapter"]["settings"]["first_positions"] == 2
    fresh = core.load_adapter(tiny_model("llama"), tmp_path)
    assert torch.equal(logits(fresh, batch), expected)
    with core.disable_adapters(fresh):
        assert torch.equal(logits(fresh, batch), logits(tiny_model("llama"), batch))
    core.detach(fresh)
    assert torch.equal(logits(fresh, batch), logits(tiny_model("llama"), batch))  # the hooks are gone


def test_no_merge_and_no_peft_export(tmp_path):
    model = adapted()
    with pytest.raises(ConfigError, match="LoReFT cannot merge"):
        core.merge_adapter(model)
    with pytest.raises(ConfigError, match="LoReFT has no PEFT layout"):
        core.export_peft(model, tmp_path)


@pytest.mark.parametrize("settings,field", [({"r": 33}, "r"), ({"first_positions": 0, "last_positions": 0},
                                                                  "first_positions")])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ConfigError) as err:
        adapted(**settings)
    assert err.value.field == field


def test_preset_is_the_authors_placement():
    cfg = AdapterConfig.preset("LoReFT")
    assert cfg.method == "loreft" and cfg.layers == "all"
    s = cfg.settings
    assert (s.r, s.first_positions, s.last_positions, s.dropout) == (8, 7, 7, 0.05)


# --------------------------------------------------------------------------------------------------
# The trainer, the chat and the Train tab.

def loreft_spec(tiny_model_dir, data, **train):
    spec = tiny_spec(tiny_model_dir, data, **train)
    spec.adapter = AdapterConfig.for_method("loreft", r=4, dropout=0.0)
    return spec


def test_the_trainer_passes_prompt_lengths_and_keeps_R_orthonormal(tiny_model_dir, tmp_path, monkeypatch):
    """A short ``core.train`` run with weight decay: the loss falls, the edit sits on the prompt (the trainer
    says where each prompt ends), R is still orthonormal, and the saved adapter reloads exactly."""
    from core.callbacks import TrainCallbacks
    from core.train import Trainer

    class Losses(TrainCallbacks):
        def __init__(self):
            self.losses = []

        def on_step(self, report):
            self.losses.append(report.loss)

    given = []
    original = Loreft.use_prompt_lengths
    monkeypatch.setattr(Loreft, "use_prompt_lengths",
                        lambda self, lengths: (given.append(lengths), original(self, lengths))[1])
    spec = loreft_spec(tiny_model_dir, write_data(tmp_path / "d.json"), max_steps=8, weight_decay=0.1,
                       learning_rate=2e-2)
    record = Losses()
    trainer = Trainer(spec, tmp_path / "out", record)
    trainer.setup()
    result = trainer.train()
    assert result.status == "completed"
    assert record.losses[-1] < record.losses[0], record.losses
    prompts = {e.num_prompt_tokens for e in trainer.train_data.examples}
    seen = {int(n) for lengths in given if lengths is not None for n in lengths}
    assert seen and seen <= prompts
    assert orthonormal_error(trainer.model) < 1e-5

    batch = core.data.collate(trainer.train_data.examples[:3], trainer.pad_id)
    lengths = core.data.prompt_lengths(trainer.train_data.examples[:3])
    trainer.model.eval()
    with torch.no_grad():
        loss, count = trainer.batch_loss(batch, lengths)
        with prompt_lengths(trainer.model, lengths):
            reference = trainer.model(**batch).loss
        whole = trainer.model(**batch).loss  # every token taken as the prompt: another edit
    torch.testing.assert_close(loss / count, reference, atol=1e-5, rtol=0)
    assert abs(whole.item() - reference.item()) > 1e-4

    from transformers import AutoModelForCausalLM

    fresh = core.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    with torch.no_grad(), prompt_lengths(fresh, lengths), prompt_lengths(trainer.model, lengths):
        torch.testing.assert_close(fresh(**batch).logits, trainer.model(**batch).logits, atol=1e-5, rtol=0)


def test_chat_answers_with_the_adapter(tiny_model_dir, tmp_path):
    """The chat (``core.generate``, what app/chat_tab.py calls) loads the adapter and answers greedily: the
    answer is the greedy continuation of the prompt by the adapted model."""
    from core.generate import GenerationSettings, _cut, adapter_chat_model, answer
    from core.templates import render_prompt
    from core.train import train

    result = train(loreft_spec(tiny_model_dir, write_data(tmp_path / "d.json"), max_steps=2), tmp_path / "out")
    chat = adapter_chat_model(result.adapter_dir)
    assert isinstance(reft_of(chat.model), Loreft)
    settings = GenerationSettings(max_new_tokens=6)
    text = answer(chat, ROWS[0]["instruction"], settings)
    ids = chat.tokenizer(render_prompt(ROWS[0]["instruction"], "", chat.template, chat.tokenizer),
                         return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = chat.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                  pad_token_id=chat.tokenizer.pad_token_id)
    assert text == _cut(chat.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()


def test_train_tab_says_loreft_exports_in_our_own_format_only(tiny_model_dir):
    from app import train_form, train_tab

    form = {**train_form.default_form(), "model.name": str(tiny_model_dir), "adapter.method": "loreft"}
    model_line, estimate_md, diagram = train_tab.plan(form)
    assert "LoReFT exports in our own format only" in estimate_md
    assert f"{2 * (2 * 8 * 32 + 8):,}" in estimate_md  # two layers of 2 r hidden + r
    assert "f7+l7" in diagram
    assert "Hugging Face PEFT layout" in train_tab.exports_note("lora")
