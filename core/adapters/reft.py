"""LoReFT (Wu et al., 2024, "ReFT: Representation Finetuning for Language Models").

The model's weights stay as they are; the *representations* are edited. At each chosen decoder layer,
on the residual stream (the layer's output hidden state ``h``) and only at a few positions of the
prompt,

    Φ(h) = h + Rᵀ (W h + b − R h)

with ``R`` (r x hidden) of orthonormal rows, ``W`` (r x hidden) and ``b`` (r) trained. Within the
r-dimensional subspace spanned by R's rows, ``R h`` is replaced by ``W h + b``; the rest of ``h`` is
untouched. Each layer has its own (R, W, b), shared by all its positions (the authors' tied weights);
that is ``2 r hidden + r`` parameters per layer.

Positions: the first ``p`` and the last ``s`` tokens of each row's *prompt* (``f7+l7`` is p = s = 7),
counted from the row's first attended token, so left and right padding give the same positions. The
prompt is, in training, the tokens before the response (``core.inject.prompt_lengths`` says how many,
per row: labels cannot tell when ``train_on_inputs`` is set); elsewhere all attended tokens of the
first forward pass over a sequence (generation: the prompt; later decoding steps read the key/value
cache and are left alone). A prompt shorter than ``p + s`` is intervened on where either rule picks
a position (the authors cap each side at half the prompt instead; the two differ only at the middle
token of an odd prompt shorter than ``p + s``).

``R`` stays orthonormal through training by construction (``Householder``): the trained tensor holds
Householder reflectors and R is their product, as in torch's orthogonal parametrisation (which pyreft
uses). That one reads the reflectors' signs from the tensor's diagonal with ``.int()``, so weight
decay (torch's AdamW decays by 0.01 unless told otherwise) turns 1 into 0.9999 and then into 0 and
wipes R out after one step; here every stored value is a free reflector entry or unused, so decay
only shrinks the reflectors. The adapter file holds ``r x hidden`` numbers per R, exact on reload
(torch's default trivialisation would keep a hidden x hidden basis per layer besides). As in pyreft,
``W`` and ``b`` start as an ``nn.Linear``'s random init and R as a random orthonormal matrix, so a
fresh adapter already edits the representations, and dropout (in training) applies to the whole
edited representation ``Φ(h)``.

There is no weight delta to merge (the edit depends on the position and is affine in ``h``), and
Hugging Face PEFT has no LoReFT: the adapter is saved in this workbench's own format only.

The end of the file declares the method: its settings, builder, drawing and record.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch import ArchSpec, get_layers
from ..config import AdapterConfig
from ..fields import ConfigError, Settings, setting
from ..methods import Drawing, Method, register
from .base import AdapterModule, make_dropout


class Householder(nn.Module):
    """A parametrisation (``torch.nn.utils.parametrize``) of (..., r, n) matrices with orthonormal rows, r <= n.

    The stored ``X`` holds, below the diagonal of ``Xᵀ``, the vectors ``v_i`` (with a unit i-th entry) of
    r Householder reflections ``H_i = I − τ_i v_i v_iᵀ``, ``τ_i = 2 / v_iᵀv_i``; the matrix is the first r
    columns of ``H_1 ⋯ H_r``, transposed: what ``torch.linalg.householder_product`` computes, here as r
    rank-one updates of an (n x r) matrix, because that function's backward pass costs 8x more (14 ms
    against 1.75 ms for a 576 x 8 matrix, one thread) and a training step runs it once per micro-batch.
    Orthonormal for any ``X``; its diagonal and other triangle are unused.
    """

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        r, n = X.shape[-2:]
        E = torch.eye(n, r, dtype=X.dtype, device=X.device)
        V = X.mT.tril(-1) + E
        tau = 2.0 / (V * V).sum(-2)
        Q = E.expand_as(V)
        for i in reversed(range(r)):
            v = V[..., i]
            Q = Q - (tau[..., i, None] * v)[..., None] * (v[..., None, :] @ Q)
        return Q.mT

    @torch.no_grad()
    def right_inverse(self, R: torch.Tensor) -> torch.Tensor:
        """Reflectors reproducing ``R`` (orthonormal rows) up to the signs of its rows (a QR decomposition)."""
        return torch.geqrf(R.mT)[0].tril(-1).mT


def prompt_sites(mask: torch.Tensor | None, shape: tuple[int, int], lengths: torch.Tensor | None,
                 first: int, last: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions to edit in a forward pass over ``shape`` = (batch, length) tokens.

    ``mask``: the 2-D attention mask (None: every token attended). A token's place in its row is its
    number among the row's attended tokens, so padding on either side is skipped. ``lengths``: each
    row's prompt length (None: all its attended tokens). Picked: the first ``first`` and the last
    ``last`` places of each prompt. ``device``: where the positions go when there is no mask.
    """
    if mask is None:
        real = torch.ones(shape, dtype=torch.bool, device=device)
    elif mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"LoReFT needs a (batch, length) = {tuple(shape)} attention mask of 0/1; "
                         f"got one of shape {tuple(mask.shape)}")
    else:
        real = mask.bool()
    place = real.long().cumsum(-1) - 1
    prompt = real.sum(-1) if lengths is None else torch.as_tensor(lengths, device=real.device).long()
    if prompt.shape != (shape[0],):
        raise ValueError(f"prompt lengths for {tuple(prompt.shape)} rows; the batch has {shape[0]}")
    end = prompt[:, None]
    picked = real & (place < end) & ((place < first) | (place >= end - last))
    return picked.nonzero(as_tuple=True)


class Loreft(AdapterModule):
    """LoReFT on the output of the decoder layers ``blocks`` ({layer index: layer}), at prompt positions.

    The k-th adapted layer's parameters are ``R[k]`` (r x hidden, orthonormal rows), ``W[k]`` (r x
    hidden) and ``b[k]`` (r), stacked over the layers so that one ``Householder`` pass per forward makes
    every R. A model-level adapter: ``install`` hooks the backbone (to find the positions of each
    forward pass, and make R) and each adapted layer (to edit its output there). What a pass found and
    the prompt lengths set by ``use_prompt_lengths`` are kept per thread, so answers generated at the
    same time in several threads (the chat) do not see each other's positions.
    """

    def __init__(self, blocks: dict[int, nn.Module], hidden: int, r: int, first: int, last: int, dropout: float):
        super().__init__()
        self.first, self.last, self.r = first, last, r
        self.layer_ids = list(blocks)
        self.rotate = nn.Module()
        self.rotate.weight = nn.Parameter(torch.stack([nn.init.orthogonal_(torch.empty(r, hidden)) for _ in blocks]))
        parametrize.register_parametrization(self.rotate, "weight", Householder())
        bound = hidden ** -0.5  # W, b as nn.Linear(hidden, r) initialises them (pyreft's W, b are one)
        self.W = nn.Parameter(torch.empty(len(blocks), r, hidden).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(len(blocks), r).uniform_(-bound, bound))
        self.dropout = make_dropout(dropout)
        self._blocks = list(blocks.values())  # the frozen layers to hook: not submodules of the adapter
        self._hooks: list[Any] = []
        self._lengths: dict[int, torch.Tensor] = {}  # thread -> prompt lengths of its coming passes
        self._pass: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # thread -> rows, cols, R

    @property
    def R(self) -> torch.Tensor:
        """(adapted layers, r, hidden): each layer's R, with orthonormal rows."""
        return self.rotate.weight

    def edit(self, k: int, h: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``Φ(h) = h + Rᵀ(W h + b − R h)`` of the k-th adapted layer on rows ``h`` (..., hidden); dropout
        (in training) on ``Φ(h)``, as pyreft does. ``R``: ``self.R``, made once per forward pass."""
        return self.dropout(h + (h @ self.W[k].T + self.b[k] - h @ R[k].T) @ R[k])

    def install(self, backbone: nn.Module) -> None:
        self._hooks = [backbone.register_forward_pre_hook(self._locate, with_kwargs=True),
                       backbone.register_forward_hook(self._release)]
        self._hooks += [block.register_forward_hook(partial(self._edit, k)) for k, block in enumerate(self._blocks)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return None

    def use_prompt_lengths(self, lengths: torch.Tensor | None) -> None:
        """The prompt length of each row of this thread's coming forward passes (None: forget them)."""
        key = threading.get_ident()
        if lengths is None:
            self._lengths.pop(key, None)
        else:
            self._lengths[key] = lengths

    def _locate(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        key = threading.get_ident()
        self._pass.pop(key, None)
        if not self.enabled:
            return
        past = kwargs.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:  # a decoding step, after the prompt
            return
        ids = args[0] if args else kwargs.get("input_ids")  # GPT-2 style backbones take input_ids positionally
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        rows, cols = prompt_sites(kwargs.get("attention_mask"), tuple(ref.shape[:2]), self._lengths.get(key),
                                  self.first, self.last, ref.device)
        if rows.numel():
            with torch.autocast(ref.device.type, enabled=False):
                self._pass[key] = (rows, cols, self.R)

    def _release(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._pass.pop(threading.get_ident(), None)

    def _edit(self, k: int, module: nn.Module, args: tuple, output: Any) -> Any:
        found = self._pass.get(threading.get_ident())
        if found is None or not self.enabled:
            return None
        rows, cols, R = found
        hidden = output[0] if isinstance(output, tuple) else output
        # fp32 and no autocast: a few rows per sequence, and R's orthonormality holds in full precision
        with torch.autocast(hidden.device.type, enabled=False):
            edited = self.edit(k, hidden[rows, cols].float(), R)
        hidden = hidden.index_put((rows, cols), edited.to(hidden.dtype))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def extra_repr(self) -> str:
        return f"r={self.r}, positions=f{self.first}+l{self.last}, layers={self.layer_ids}"


# --------------------------------------------------------------------------------------------------
# The method: settings, builder, drawing, record.

@dataclass
class LoreftSettings(Settings):
    """LoReFT: h + Rᵀ(W h + b − R h) on each chosen layer's output, at the first and last prompt positions."""

    r: int = setting(8, "rank: rows of R (orthonormal) and of W", min=1, max=65536, integer=True)
    first_positions: int = setting(7, "the prompt's first positions edited (p of f<p>+l<s>)",
                                   min=0, max=4096, integer=True)
    last_positions: int = setting(7, "the prompt's last positions edited (s of f<p>+l<s>)",
                                  min=0, max=4096, integer=True)
    dropout: float = setting(0.05, "dropout on the edited representations (training)", min=0.0, max=0.99)

    def check(self) -> None:
        if self.first_positions + self.last_positions == 0:
            raise ConfigError("first_positions", "edit at least one position: first_positions or last_positions > 0")


def build(model: nn.Module, cfg: AdapterConfig, spec: ArchSpec, layers: list[int] | None,
          tokenizer: Any) -> dict[str, AdapterModule]:
    """One model-level ``Loreft`` with an intervention on each chosen decoder layer."""
    s: LoreftSettings = cfg.settings
    hidden = model.config.hidden_size
    if s.r > hidden:
        raise ConfigError("r", f"must be at most the hidden size ({hidden}): R has orthonormal rows")
    blocks = get_layers(model, spec)
    picked = range(len(blocks)) if layers is None else layers
    return {"": Loreft({i: blocks[i] for i in picked}, hidden, s.r, s.first_positions, s.last_positions,
                       s.dropout)}


def draw(s: Mapping[str, Any]) -> Drawing:
    return Drawing(caption=f"LoReFT (r={s.get('r')}) editing each layer's output (the residual stream) at "
                           f"prompt positions f{s.get('first_positions')}+l{s.get('last_positions')}")


# No placement axis (the paper's placement grid is LoRA's and the bottleneck adapters'); r is its value
# axis. The preset is the authors' placement for commonsense and arithmetic reasoning (pyreft's
# examples/loreft): every layer, r = 8, f7+l7, tied weights; they train it at a learning rate of 9e-4.
LOREFT = register(Method(
    name="loreft", label="LoReFT", settings=LoreftSettings, build=build, draw=draw, value_setting="r",
    presets={"LoReFT": {}}, identity_at_init=False,
))
