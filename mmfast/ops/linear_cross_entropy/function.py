"""The autograd function of the linear cross-entropy.

It takes the implementation module ("triton.py" or "chunked.py", same interface) and returns
per-token losses; the public op reduces them with plain torch, so reduction="none" gets any
per-token gradient back. Forward saves the inputs and the float32 log-sum-exp per token, never
logits.
"""
from __future__ import annotations

import dataclasses

import torch

from mmfast.ops.contrastive.function import float32_math


@dataclasses.dataclass(frozen=True)
class Options:
    ignore_index: int
    label_smoothing: float
    logit_softcap: float | None


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token cross-entropy [T] (float32, 0 on ignored labels) of hidden @ weight.T (+ bias)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options: Options, kernels):
        losses, lse = kernels.forward(hidden, weight, bias, labels, options)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options, ctx.kernels = options, kernels
        return losses

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grad = torch.where(labels != ctx.options.ignore_index, grad.float(), 0.0).contiguous()
        with float32_math():
            d_hidden, d_weight, d_bias = ctx.kernels.backward(hidden, weight, bias, labels, lse, grad, ctx.options,
                                                              ctx.needs_input_grad[:3])
        return d_hidden, d_weight, d_bias, None, None, None
