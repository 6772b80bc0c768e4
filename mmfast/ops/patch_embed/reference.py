"""Plain PyTorch patch embedding: normalize -> pad -> Conv2d/Conv3d (or, keeping some patches, their
pixels gathered and one matrix product) -> flatten -> + position -> prefix tokens. The test oracle and the CPU path; autograd gives every gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_pixels(pixels, mean, inv_std, in_scale, geometry, dtype=torch.float32):
    """[B, C, T, H, W] normalized in `dtype`, zero-padded to the geometry's padded size."""
    shape = (1, -1, 1, 1, 1)
    x = (pixels.to(dtype) * in_scale - mean.to(dtype).view(shape)) * inv_std.to(dtype).view(shape)
    pad_t, pad_h, pad_w = geometry.padding
    if pad_t or pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h, 0, pad_t))
    return x


def forward(pixels, weight, bias, pos_embed, prefix, mean, inv_std, in_scale, geometry, dtype=torch.float32,
            keep=None):
    """pixels [B, C, T, H, W]; weight in its conv layout; keep [B, K] patch indices or None; returns
    [B, P + N (or K), E] in `dtype`."""
    x = normalized_pixels(pixels, mean, inv_std, in_scale, geometry, dtype)
    bias = None if bias is None else bias.to(dtype)
    if keep is not None:
        return _kept_forward(x, weight.to(dtype), bias, pos_embed, prefix, geometry, keep, dtype)
    if geometry.video:
        y = F.conv3d(x, weight.to(dtype), bias, stride=geometry.stride)
    else:
        y = F.conv2d(x[:, :, 0], weight.to(dtype).reshape(weight.shape[0], weight.shape[1], *weight.shape[-2:]),
                     bias, stride=geometry.stride[1:])
    tokens = y.flatten(2).transpose(1, 2)
    N = tokens.shape[1]
    if pos_embed is not None:
        tokens = tokens + pos_embed[-N:].to(dtype)
    return _with_prefix(tokens, prefix, pos_embed, N, dtype)


def unfolded_patches(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """Every patch of `x` [B, C, T, H, W] as a row `[B, N, C * kt * kh * kw]`: patches in the row-major
    (t, h, w) grid order and each patch's values in the Conv weight's (C, kt, kh, kw) order, so row n
    times the flattened weight is token n (masked autoencoders' targets use the same rows)."""
    (kt, kh, kw), (st, sh, sw) = kernel, stride
    grid = x.unfold(2, kt, st).unfold(3, kh, sh).unfold(4, kw, sw)  # [B, C, GT, GH, GW, kt, kh, kw]
    return grid.permute(0, 2, 3, 4, 1, 5, 6, 7).flatten(1, 3).flatten(2)


def _kept_forward(x, weight, bias, pos_embed, prefix, geometry, keep, dtype):
    """Only the kept patches projected: their pixels gathered from the unfolded grid (so a masked
    patch's values reach neither the output nor a gradient), then one matrix product."""
    grid = unfolded_patches(x, geometry.kernel, geometry.stride)
    kept = grid.gather(1, keep[..., None].expand(-1, -1, grid.shape[2]))
    tokens = kept @ weight.reshape(weight.shape[0], -1).T
    if bias is not None:
        tokens = tokens + bias
    N = geometry.num_patches
    if pos_embed is not None:
        tokens = tokens + pos_embed[-N:].to(dtype)[keep]
    return _with_prefix(tokens, prefix, pos_embed, N, dtype)


def _with_prefix(tokens, prefix, pos_embed, num_patches, dtype):
    if prefix is None:
        return tokens
    P = prefix.shape[0]
    prefix_rows = prefix.to(dtype)
    if pos_embed is not None and pos_embed.shape[0] == num_patches + P:
        prefix_rows = prefix_rows + pos_embed[:P].to(dtype)
    return torch.cat([prefix_rows.expand(tokens.shape[0], P, -1), tokens], dim=1)
