"""RMSNorm for training in bf16/fp16 on a CPU: three memory passes instead of a dozen.

The Hugging Face RMSNorm of LLaMA-family models upcasts its input to fp32, squares it, normalises it,
casts back and multiplies by the weight: six passes over the activations forward, with fp32
intermediates kept for a backward pass that makes as many again. On a CPU these passes are memory-bound
and, over the 61 norms of SmolLM2, cost about a tenth of a LoRA training step (measured). Here the
sum of squares is one reduction accumulated in fp32, the output two low-precision multiplications,
and the backward pass is written out (``dx = r * g w - r^3 / H * (g w . x) * x``) from the saved input
and the per-row ``r`` only. The norm weights are frozen (no adapter trains them), which ``patch``
checks.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# RMSNorm classes whose forward is exactly LLaMA's ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``
LLAMA_STYLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        squares = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_()
        r = torch.rsqrt(squares.div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, r, weight)
        return x * r.to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        gw = (grad * weight).to(x.dtype)
        dot = (gw * x).sum(-1, keepdim=True, dtype=torch.float32)
        coef = dot.mul_(r.pow(3)).div_(x.shape[-1])
        return torch.addcmul(gw * r.to(x.dtype), x, coef.to(x.dtype), value=-1), None, None


def _fast_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype not in (torch.bfloat16, torch.float16) or self.weight.requires_grad:
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def patch(model: nn.Module) -> int:
    """Give every LLaMA-style RMSNorm of ``model`` the fast forward; returns how many were patched.

    Only low-precision activations take the new path; fp32 keeps the original forward bit for bit.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_STYLE_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count
