"""Autograd function of the fused patch embedding (Triton forward and weight gradient)."""
from __future__ import annotations

import torch

from mmfast.ops.patch_embed import triton as kernels


class PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, weight, bias, pos_embed, prefix, mean, inv_std, in_scale, geometry, keep=None):
        """pixels [B, C, T, H, W] (a view, any strides); weight in its conv layout; keep int64 [B, K] or None."""
        weight_matrix = weight.reshape(weight.shape[0], -1).contiguous()
        out = kernels.forward(pixels, weight_matrix, bias, None if pos_embed is None else pos_embed.contiguous(),
                              None if prefix is None else prefix.contiguous(), mean, inv_std, in_scale, geometry, keep)
        ctx.save_for_backward(pixels, weight, mean, inv_std, keep)
        ctx.in_scale, ctx.geometry = in_scale, geometry
        ctx.has_bias, ctx.pos_rows = bias is not None, None if pos_embed is None else pos_embed.shape[0]
        ctx.prefix_count = 0 if prefix is None else prefix.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pixels, weight, mean, inv_std, keep = ctx.saved_tensors
        geometry, P = ctx.geometry, ctx.prefix_count
        grad_out = grad_out.contiguous()
        rows = grad_out[:, P:]
        if keep is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
            # each kept row's gradient back at its place in the grid (masked places get zero)
            grid_rows = rows.new_zeros(rows.shape[0], geometry.num_patches, rows.shape[2])
            grid_rows.scatter_add_(1, keep[..., None].expand(-1, -1, rows.shape[2]), rows)
        else:
            grid_rows = rows
        grad_pixels = grad_weight = grad_bias = grad_pos = grad_prefix = None
        if ctx.needs_input_grad[1]:
            grad_weight = kernels.weight_grad(pixels, grad_out, mean, inv_std, ctx.in_scale, geometry, P, keep)
            grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum((0, 1), dtype=torch.float32)
        if ctx.pos_rows is not None and ctx.needs_input_grad[3]:
            grad_pos = grid_rows.sum(0, dtype=torch.float32)
            if ctx.pos_rows != geometry.num_patches:
                grad_pos = torch.cat([grad_out[:, :P].sum(0, dtype=torch.float32), grad_pos])
        if P and ctx.needs_input_grad[4]:
            grad_prefix = grad_out[:, :P].sum(0, dtype=torch.float32)
        if ctx.needs_input_grad[0]:
            grad_pixels = _pixel_grad(pixels, weight, grid_rows, inv_std, ctx.in_scale, geometry)
        return grad_pixels, grad_weight, grad_bias, grad_pos, grad_prefix, None, None, None, None, None


def _pixel_grad(pixels, weight, rows, inv_std, in_scale, geometry):
    """Transposed convolution of the output gradient (cuDNN), cropped and un-normalized."""
    B, C, T, H, W = pixels.shape
    grid_grad = rows.transpose(1, 2).reshape(B, weight.shape[0], *geometry.grid)
    padded = (B, C, T + geometry.padding[0], H + geometry.padding[1], W + geometry.padding[2])
    if geometry.video:
        grad = torch.nn.grad.conv3d_input(padded, weight, grid_grad, stride=geometry.stride)
    else:
        grad = torch.nn.grad.conv2d_input((B, C) + padded[3:], weight, grid_grad[:, :, 0],
                                          stride=geometry.stride[1:]).unsqueeze(2)
    grad = grad[:, :, :T, :H, :W] * (inv_std * in_scale).view(1, -1, 1, 1, 1).to(grad.dtype)
    return grad.to(pixels.dtype)
