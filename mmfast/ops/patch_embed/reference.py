"""Plain PyTorch patch embedding: normalize -> pad -> Conv2d/Conv3d -> flatten -> + position ->
prefix tokens. The test oracle and the CPU path; autograd gives every gradient."""
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


def forward(pixels, weight, bias, pos_embed, prefix, mean, inv_std, in_scale, geometry, dtype=torch.float32):
    """pixels [B, C, T, H, W]; weight in its conv layout; returns [B, P + N, E] in `dtype`."""
    x = normalized_pixels(pixels, mean, inv_std, in_scale, geometry, dtype)
    bias = None if bias is None else bias.to(dtype)
    if geometry.video:
        y = F.conv3d(x, weight.to(dtype), bias, stride=geometry.stride)
    else:
        y = F.conv2d(x[:, :, 0], weight.to(dtype).reshape(weight.shape[0], weight.shape[1], *weight.shape[-2:]),
                     bias, stride=geometry.stride[1:])
    tokens = y.flatten(2).transpose(1, 2)
    N = tokens.shape[1]
    P = 0 if prefix is None else prefix.shape[0]
    if pos_embed is not None:
        tokens = tokens + pos_embed[-N:].to(dtype)
    if P:
        prefix_rows = prefix.to(dtype)
        if pos_embed is not None and pos_embed.shape[0] == N + P:
            prefix_rows = prefix_rows + pos_embed[:P].to(dtype)
        tokens = torch.cat([prefix_rows.expand(tokens.shape[0], P, -1), tokens], dim=1)
    return tokens
