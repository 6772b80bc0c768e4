"""Autograd function of mixed attention on the Triton kernels."""
from __future__ import annotations

import torch

from mmfast.ops.mixed_attention import triton as kernels


class MixedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, packing, scale: float):
        out, lse = kernels.forward(q, k, v, packing, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.packing, ctx.scale = packing, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = kernels.backward(q, k, v, out, lse, grad_out, ctx.packing, ctx.scale)
        return dq, dk, dv, None, None
