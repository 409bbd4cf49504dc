"""QLoRA (Dettmers et al., 2023): the frozen linear weights in 4-bit NormalFloat, LoRA or DoRA trained on top.

``ModelSettings.quantization = "nf4"`` has ``core.models.load_model`` replace every ``nn.Linear`` of the
model except the output embedding (``lm_head``) by a ``bitsandbytes`` ``Linear4bit``, as the QLoRA
paper does: NF4 values in blocks of ``BLOCKSIZE`` weights, each block's scale itself quantised to
8 bits ("double quantisation", ``compress_statistics``), products computed in the model's compute
dtype (bf16 on a GPU). Embeddings, norms and the head stay in the load dtype. The adapters then wrap
the 4-bit layers (``adapters/lora.py``, ``adapters/dora.py``): their forward calls the 4-bit layer,
whose autograd function keeps only the packed weight for the backward pass and dequantises it again
there; DoRA's norms read ``dequantize``. A merged export reads the original weights again
(``core.models.load_unquantized``): an update merged into 4-bit weights would be rounded to 4 bits.

``bitsandbytes`` is optional (``pip install bitsandbytes==0.50.2``): its wheel carries CPU kernels as
well as CUDA ones, so the tests train a tiny model on 4 bits on a CPU. Nothing here imports it until a
model is quantised; a missing package is a ``ConfigError`` on ``model.quantization`` naming the fix.

Memory of one quantised (out x in) weight of ``n`` values (``nf4_bytes``): ``n / 2`` bytes of 4-bit
codes, one byte per block of 64 (the 8-bit block scale), four bytes per 256 blocks (the fp32 scale
of those scales), and the two code tables (16 + 256 fp32 values) and an fp32 offset: about 0.516
bytes per weight where bf16 takes 2.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

from .fields import ConfigError

BITSANDBYTES = "bitsandbytes==0.50.2"  # the version the tests run; its wheel has CPU and CUDA kernels
BLOCKSIZE = 64  # weights per block scale (bitsandbytes' default for 4-bit, and QLoRA's)
NESTED_BLOCKSIZE = 256  # block scales per fp32 scale of the double quantisation
CODE_BYTES = (16 + 256 + 1) * 4  # the NF4 code, the 8-bit scale code and the offset, fp32, per layer


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module; a ``ConfigError`` on ``model.quantization`` naming the fix when it is missing."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ConfigError("model.quantization", f"nf4 (QLoRA) needs the optional package bitsandbytes, which "
                                                f"cannot be imported here ({err}); install it with "
                                                f"`pip install {BITSANDBYTES}`, or set quantization to none") from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True for a ``bitsandbytes`` 4-bit linear layer. Imports nothing: without ``bitsandbytes`` loaded
    no module can be one."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def has_quantized(model: nn.Module) -> bool:
    """True when any layer of ``model`` is a 4-bit one."""
    return any(is_quantized(m) for m in model.modules())


def layers_to_quantize(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers QLoRA quantises: every plain ``nn.Linear`` but the output embedding, by path.

    GPT-2's ``Conv1D`` projections are not ``nn.Linear`` (``bitsandbytes`` has no 4-bit ``Conv1D``): a
    model without any other linear layer is a ``ConfigError`` on ``model.quantization``.
    """
    head = model.get_output_embeddings()
    layers = [(path, m) for path, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if not layers:
        raise ConfigError("model.quantization", f"{type(model).__name__} has no nn.Linear layer to quantise "
                                                "(GPT-2-style Conv1D projections cannot be 4-bit); set quantization "
                                                "to none")
    return layers


def weight_count(param: torch.Tensor) -> int:
    """The number of weights ``param`` holds: a packed 4-bit ``Params4bit`` stores two per byte, and its
    ``quant_state`` keeps the original shape."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight of ``numel`` values in NF4 with double quantisation (see the module docstring)."""
    blocks = math.ceil(numel / BLOCKSIZE)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + CODE_BYTES


@torch.no_grad()
def quantize_model(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace ``layers_to_quantize(model)`` by NF4 ``Linear4bit`` layers on ``device``.

    Each weight is quantised from its values as loaded (the load dtype), one layer at a time, so the
    process holds at most one dense layer more than the model. Biases are kept as loaded (the layer
    casts them to the compute dtype when first called).
    """
    bnb = require_bitsandbytes()
    for path, linear in layers_to_quantize(model):
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        # On a CPU with AVX-512-bf16 the layer's first forward in eval mode without gradients repacks its
        # weight in place for an inference kernel that has no backward pass: training after a validation
        # would then get no input gradients through the base, and dequantize_4bit cannot read that layout
        # (DoRA's norms). Off: one layout, the one every other device uses.
        q.support_avx512bf16_for_cpu = False
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4", module=q).to(device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, q)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight a 4-bit layer holds, dense, in the dtype it was quantised from."""
    bnb = sys.modules["bitsandbytes"]
    weight = module.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def linear(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``W z`` of a 4-bit layer without its bias, computed as the layer computes (in its compute dtype),
    returned in ``z``'s dtype. The backward pass keeps the packed weight only, as the layer's own does."""
    bnb = sys.modules["bitsandbytes"]
    weight = module.weight
    inner = module.compute_dtype or z.dtype
    return bnb.matmul_4bit(z.to(inner), weight, quant_state=weight.quant_state).to(z.dtype)

