"""Eager attention for training on a CPU: grouped-query heads without copies, fewer passes over scores.

Hugging Face's eager attention repeats each key/value head for the query heads that share it (two
copies forward, two reductions backward), scales the scores and adds the mask in two passes, and runs
the softmax in fp32 with a cast either way (two more passes, each way). On a CPU those memory-bound
passes cost as much as the attention matmuls. Here the query heads of a group are stacked as rows
against their one key/value head (a view when the query is contiguous, as it is after rotary
embedding), the scaling rides on the mask addition (``mask + scale * scores``, one pass), and the
softmax runs in the activations' dtype (its kernel accumulates in fp32). Same maths as eager attention;
the result differs only by low-precision rounding.

``patch(model)`` switches LLaMA-family models (whose eager attention is exactly this formula) to it;
a call with attention dropout falls back to eager attention.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from .arch import is_llama_family

NAME = "workbench_eager"


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``query`` (B, H, T, D) and ``key``/``value`` (B, KVH, S, D); returns (B, T, H, D)."""
    batch, heads, length, dim = query.shape
    kv_heads, source = key.shape[1], key.shape[2]
    if (dropout > 0 and module.training) or heads % kv_heads:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    group = heads // kv_heads
    rows = query.reshape(batch, kv_heads, group * length, dim)
    scores = torch.matmul(rows, key.transpose(-1, -2)).view(batch, heads, length, source)
    if attention_mask is not None:
        scores = torch.add(attention_mask[..., :source], scores, alpha=scaling)
    else:
        scores = scores * scaling
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.view(batch, kv_heads, group * length, source), value)
    return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), probs


AttentionInterface.register(NAME, grouped_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)


def patch(model: nn.Module) -> bool:
    """Make a LLaMA-family ``model`` use ``grouped_attention``; False (nothing changed) for any other."""
    if not is_llama_family(model):
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True
