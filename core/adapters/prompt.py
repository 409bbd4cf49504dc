"""Prompt-based methods: virtual tokens the model attends to but never sees in its input or logits.

- ``PrefixTuning`` (Li & Liang, 2021): trainable keys and values prepended in every attention layer,
  produced during training by an MLP over a small embedding (the reparameterisation), fed through the
  key/value cache.
- ``PromptTuning`` (Lester et al., 2021): trainable embeddings prepended to the input embeddings.
- ``PTuning`` (Liu et al., 2021): the prepended embeddings come from a prompt encoder (MLP or LSTM).

All three share one mechanism (``VirtualTokens``): hooks on the model's backbone (``base_model``) that
make room for ``n`` virtual positions — the attention mask gains ``n`` leading ones, positions shift
by ``n`` — and strip the virtual positions from the backbone's output. So the adapted model keeps its
call signature: ``model(input_ids, attention_mask, labels)`` returns the loss and logits of the given
tokens only, and ``model.generate()`` works unchanged. Each acts on every layer at once.

The end of the file declares the three methods: settings, builders, drawings and records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from transformers import DynamicCache

from ..arch import ArchSpec, attention_shape
from ..config import AdapterConfig
from ..fields import ConfigError, Settings, setting
from ..methods import Drawing, Method, register
from .base import AdapterModule


class VirtualTokens(AdapterModule):
    """Base: ``n`` virtual positions in front of every sequence. Subclasses fill them in."""

    def __init__(self, num_virtual_tokens: int):
        super().__init__()
        self.n = num_virtual_tokens
        self._strip = False
        self._hooks: list[Any] = []

    def install(self, backbone: nn.Module) -> None:
        self._hooks = [backbone.register_forward_pre_hook(self._before, with_kwargs=True),
                       backbone.register_forward_hook(self._after, with_kwargs=True)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return None

    # Subclasses: put the virtual tokens in place on the first forward of a sequence.
    def fill(self, kwargs: dict[str, Any], batch: int, embed: nn.Module) -> None:
        raise NotImplementedError

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if not self.enabled:
            return None
        kwargs = dict(kwargs)
        if args:  # GPT-2 style backbones take input_ids positionally
            kwargs["input_ids"], args = args[0], args[1:]
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, length = ref.shape[0], ref.shape[1]
        past = kwargs.get("past_key_values")
        first = past is None or past.get_seq_length() == 0
        n = self.n
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        grows_input = first and self.prepends_embeddings
        pos = kwargs.get("position_ids")
        if pos is not None:
            pos = pos + n
            if grows_input:
                pos = torch.cat([torch.arange(n, device=pos.device).expand(pos.shape[0], n), pos], dim=1)
            kwargs["position_ids"] = pos
        cache_pos = kwargs.get("cache_position")
        if cache_pos is not None:
            kwargs["cache_position"] = (torch.arange(n + length, device=cache_pos.device)
                                        if grows_input else cache_pos + n)
        if first:
            self.fill(kwargs, batch, module.get_input_embeddings())
        self._strip = grows_input
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        if not self._strip:
            return None
        self._strip = False
        # contiguous: a strided (batch, length, hidden) view makes the bf16 LM head ~12x slower on a CPU
        # (measured: 1.47 s against 0.12 s for 8 x 128 tokens of SmolLM2's 49k vocabulary)
        output.last_hidden_state = output.last_hidden_state[:, self.n:].contiguous()
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, self.n:] for h in output.hidden_states)
        return output

    prepends_embeddings = True


class _PrependEmbeddings(VirtualTokens):
    """Virtual tokens as input embeddings (prompt tuning, P-tuning)."""

    def virtual_embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    def fill(self, kwargs: dict[str, Any], batch: int, embed: nn.Module) -> None:
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = embed(kwargs["input_ids"])
        kwargs["input_ids"] = None
        virtual = self.virtual_embeddings().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)


class PromptTuning(_PrependEmbeddings):
    """Soft prompt: ``n`` trainable embeddings, from the embeddings of a text or random."""

    def __init__(self, num_virtual_tokens: int, hidden: int, init_embeddings: torch.Tensor | None = None):
        super().__init__(num_virtual_tokens)
        if init_embeddings is None:
            init_embeddings = torch.randn(num_virtual_tokens, hidden) * 0.02
        self.embedding = nn.Parameter(init_embeddings.detach().float().clone())

    def virtual_embeddings(self) -> torch.Tensor:
        return self.embedding


class PTuning(_PrependEmbeddings):
    """P-tuning: embeddings of ``n`` virtual tokens passed through an MLP or LSTM prompt encoder."""

    def __init__(self, num_virtual_tokens: int, hidden: int, encoder: str, encoder_hidden: int):
        super().__init__(num_virtual_tokens)
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, hidden) * 0.02)
        self.kind = encoder
        if encoder == "lstm":
            self.lstm = nn.LSTM(hidden, encoder_hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * encoder_hidden, encoder_hidden), nn.ReLU(),
                                     nn.Linear(encoder_hidden, hidden))
        else:
            self.mlp = nn.Sequential(nn.Linear(hidden, encoder_hidden), nn.ReLU(),
                                     nn.Linear(encoder_hidden, encoder_hidden), nn.ReLU(),
                                     nn.Linear(encoder_hidden, hidden))

    def virtual_embeddings(self) -> torch.Tensor:
        x = self.embedding
        if self.kind == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        with torch.autocast(x.device.type, enabled=False):
            return self.mlp(x.float())


class PrefixTuning(VirtualTokens):
    """Trainable key/value prefixes in every attention layer, fed through the key/value cache.

    With ``reparam_hidden > 0`` the prefixes are ``MLP(E)`` for an (n x hidden) embedding ``E``: the
    reparameterisation that stabilises training (Li & Liang). Without it they are free parameters.
    """

    prepends_embeddings = False

    def __init__(self, num_virtual_tokens: int, hidden: int, num_layers: int, kv_heads: int, head_dim: int,
                 reparam_hidden: int):
        super().__init__(num_virtual_tokens)
        self.shape = (num_layers, 2, kv_heads, head_dim)
        width = num_layers * 2 * kv_heads * head_dim
        if reparam_hidden > 0:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, hidden) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(hidden, reparam_hidden), nn.Tanh(),
                                     nn.Linear(reparam_hidden, width))
        else:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, width) * 0.02)
            self.mlp = None

    def prefixes(self) -> torch.Tensor:
        """(layers, 2, kv_heads, n, head_dim): keys and values of every layer."""
        x = self.embedding
        if self.mlp is not None:
            with torch.autocast(x.device.type, enabled=False):
                x = self.mlp(x.float())
        return x.view(self.n, *self.shape).permute(1, 2, 3, 0, 4)

    def fill(self, kwargs: dict[str, Any], batch: int, embed: nn.Module) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = DynamicCache()
            kwargs["past_key_values"] = cache
        dtype = embed.weight.dtype
        if torch.is_autocast_enabled(embed.weight.device.type):
            dtype = torch.get_autocast_dtype(embed.weight.device.type)
        for layer, (k, v) in enumerate(self.prefixes().to(dtype)):
            cache.update(k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1), layer)


# --------------------------------------------------------------------------------------------------
# The methods: settings, builders, drawings, records.

MAX_PROMPT_TEXT = 2000  # characters of prompt-tuning init text


@dataclass
class PrefixSettings(Settings):
    """Prefix tuning: trainable keys/values prepended in every attention layer."""

    num_virtual_tokens: int = setting(10, "number of prefix positions", min=1, max=512, integer=True)
    reparam_hidden: int = setting(512, "hidden size of the MLP reparameterisation (0 = none)",
                                  min=0, max=65536, integer=True)


@dataclass
class PromptSettings(Settings):
    """Prompt tuning: trainable soft-prompt embeddings prepended to the input."""

    num_virtual_tokens: int = setting(10, "number of soft-prompt tokens", min=1, max=512, integer=True)
    init: str = setting("text", "initialise from the embeddings of init_text, or random",
                        choices=("text", "random"))
    init_text: str = setting("Solve the following math problem step by step.",
                             "text whose token embeddings initialise the prompt", max_len=MAX_PROMPT_TEXT)


@dataclass
class PTuningSettings(Settings):
    """P-tuning: virtual-token embeddings produced by a prompt encoder (MLP or LSTM)."""

    num_virtual_tokens: int = setting(10, "number of virtual tokens", min=1, max=512, integer=True)
    encoder: str = setting("mlp", "prompt encoder", choices=("mlp", "lstm"))
    encoder_hidden: int = setting(256, "hidden size of the prompt encoder", min=1, max=65536, integer=True)


def build_prefix(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
                 tokenizer: Any) -> dict[str, AdapterModule]:
    n_layers, kv_heads, head_dim = attention_shape(model)
    s: PrefixSettings = cfg.settings
    return {"": PrefixTuning(s.num_virtual_tokens, model.config.hidden_size, n_layers, kv_heads, head_dim,
                             s.reparam_hidden)}


def build_prompt(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
                 tokenizer: Any) -> dict[str, AdapterModule]:
    """Soft prompt initialised from the embeddings of ``init_text`` (repeated to length) or at random."""
    s: PromptSettings = cfg.settings
    init = None
    if s.init == "text":
        if tokenizer is None:
            raise ConfigError("init", "initialising from text needs the tokenizer; pass tokenizer= or use 'random'")
        ids = tokenizer(s.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("init_text", "the text has no tokens")
        ids = (ids * (s.num_virtual_tokens // len(ids) + 1))[: s.num_virtual_tokens]
        with torch.no_grad():
            init = model.get_input_embeddings().weight[torch.tensor(ids)].float()
    return {"": PromptTuning(s.num_virtual_tokens, model.config.hidden_size, init)}


def build_ptuning(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
                  tokenizer: Any) -> dict[str, AdapterModule]:
    s: PTuningSettings = cfg.settings
    return {"": PTuning(s.num_virtual_tokens, model.config.hidden_size, s.encoder, s.encoder_hidden)}


def draw_prefix(s: Mapping[str, Any]) -> Drawing:
    n = s.get("num_virtual_tokens", 10)
    return Drawing(caption=f"Prefix tuning: {s.get('num_virtual_tokens')} trainable key/value positions in every "
                           "attention layer", kv_tokens=f"prefix keys/values ×{n}")


def draw_prompt(s: Mapping[str, Any]) -> Drawing:
    n = s.get("num_virtual_tokens", 10)
    return Drawing(caption=f"Prompt tuning: {s.get('num_virtual_tokens')} soft-prompt embeddings before the input",
                   input_tokens=f"{n} soft-prompt vectors")


def draw_ptuning(s: Mapping[str, Any]) -> Drawing:
    n, encoder = s.get("num_virtual_tokens", 10), str(s.get("encoder", "mlp")).upper()
    return Drawing(caption=f"P-tuning: {s.get('num_virtual_tokens')} virtual tokens from a {encoder} prompt "
                           "encoder, before the input",
                   input_tokens=f"{n} virtual tokens", input_note=f"from an {encoder} prompt encoder")


PREFIX = register(Method(
    name="prefix", paper=True, label="Prefix tuning", settings=PrefixSettings, build=build_prefix, draw=draw_prefix,
    value_setting="num_virtual_tokens", sweep=lambda hidden: [10, 20, 30, 40], presets={"Prefix": {}},
    all_layers_only=True, identity_at_init=False,
))
PROMPT = register(Method(
    name="prompt", paper=True, label="Prompt tuning", settings=PromptSettings, build=build_prompt, draw=draw_prompt,
    value_setting="num_virtual_tokens", all_layers_only=True, identity_at_init=False,
    shape_settings={"init": "random"},
))
PTUNING = register(Method(
    name="ptuning", paper=True, label="P-tuning", settings=PTuningSettings, build=build_ptuning, draw=draw_ptuning,
    value_setting="num_virtual_tokens", all_layers_only=True, identity_at_init=False,
))
