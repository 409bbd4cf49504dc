"""Cross-entropy through the frozen LM head, in chunks of tokens, with its gradient made in the forward.

The plain route (``F.cross_entropy(head(h).float(), y)``) keeps a tokens x vocabulary logits tensor in
two precisions until the backward pass and makes five passes over it (cast, log-softmax, its backward,
cast back, matmul); with SmolLM2's 49k vocabulary that is ~0.3 GB per 1,000 labelled tokens and, on a
CPU, memory-bound passes of ~50 ms each. Here each chunk of tokens makes its logits and one fp32
softmax, and from it both its loss (``-log p_y``) and the gradient of the loss with respect to the
hidden states (softmax minus one-hot, through the head's weight); the backward pass only scales that
stored gradient. Only valid because the head is frozen (every adapter here leaves it so), which
``head_loss`` checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 2**23  # logits per chunk: 8M (~170 tokens of a 49k vocabulary)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        want_grad = ctx.needs_input_grad[0]
        ctx.hidden_dtype = hidden.dtype
        hidden = hidden.to(weight.dtype)
        grad = torch.empty_like(hidden) if want_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk, None]
            logits = F.linear(h, weight, bias)
            # One fp32 softmax serves both the loss (-log p_y) and the gradient (p - onehot).
            probs = logits.to(torch.float32, copy=True)  # logits stay for the underflow route
            torch.ops.aten._softmax.out(probs, -1, False, out=probs)  # in place: one fp32 buffer, not two
            nll = probs.gather(1, y).log_().neg_()
            if torch.isinf(nll).any():  # p_y underflowed (a logit gap > ~87): take the exact route
                nll = torch.log_softmax(logits, -1, dtype=torch.float32).gather(1, y).neg_()
            total += nll.sum()
            if want_grad:
                probs.scatter_add_(1, y, probs.new_full(y.shape, -1.0))
                grad[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.hidden_dtype), None, None, None


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of ``hidden`` (tokens x hidden) through ``head``.

    A frozen ``nn.Linear`` head takes the chunked path; anything else (a trainable or custom head)
    the plain one, with the same result.
    """
    if type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
