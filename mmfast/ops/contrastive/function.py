"""Autograd functions of the contrastive losses.

Both take the implementation module ("triton.py" or "chunked.py", same interface)
so the math of forward and backward is written once per backend, and the N x N
part never leaves it. Forward saves only the inputs and the O(N) statistics.
"""
from __future__ import annotations

import contextlib

import torch


def float32_math():
    """Autocast off on every device type: the losses accumulate in float32 as documented, where
    autocast would run the chunked path's matmuls in bf16/fp16 again (forward and backward)."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if device_type == "cpu" or torch.cuda.is_available():
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


class SimilarityLogsumexp(torch.autograd.Function):
    """(row_lse [M], col_lse [N]) of scale * a @ b.T, fp32; col_lse is empty without columns."""

    @staticmethod
    def forward(ctx, a, b, scale, columns: bool, kernels):
        row_lse, col_lse = kernels.lse_forward(a, b, scale, columns)
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.columns, ctx.kernels = columns, kernels
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, g_row, g_col):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.float().contiguous()
        if ctx.columns:
            g_col = torch.zeros_like(col_lse) if g_col is None else g_col.float().contiguous()
        with float32_math():
            da, db, dscale = ctx.kernels.lse_backward(a, b, scale, row_lse, col_lse, g_row, g_col, ctx.columns)
        return da, db, dscale.to(scale.dtype).reshape(scale.shape), None, None


class SigmoidPairLoss(torch.autograd.Function):
    """sum over all pairs of -log sigmoid(y * (scale * a_i . b_j + bias)) / M, fp32 scalar."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, positive_offset, kernels):
        row_loss = kernels.siglip_forward(a, b, scale, bias, positive_offset)
        ctx.save_for_backward(a, b, scale, bias)
        ctx.positive_offset, ctx.kernels = positive_offset, kernels
        return row_loss.sum() / a.shape[0]

    @staticmethod
    def backward(ctx, g_loss):
        a, b, scale, bias = ctx.saved_tensors
        per_pair = (g_loss.float() / a.shape[0]).reshape(())
        with float32_math():
            da, db, dscale, dbias = ctx.kernels.siglip_backward(a, b, scale, bias, per_pair, ctx.positive_offset)
        return (da, db, dscale.to(scale.dtype).reshape(scale.shape),
                dbias.to(bias.dtype).reshape(bias.shape), None, None)
