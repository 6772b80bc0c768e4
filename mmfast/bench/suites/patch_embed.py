"""Patch embedding: mmfast's fused op against eager Conv2d/Conv3d (timm / HF style), unfold + linear,
and torch.compile of each, from uint8 pixels (normalization included) and from float pixels; and the
masked-autoencoder case: mmfast embedding only the kept quarter of the patches (`keep=`) against the
whole embedding followed by a gather of the kept tokens (timm's PatchEmbed, then MAE's gather).

FLOPs: forward 2 * B * N * K * E (K = C * patch volume); the backward computes the weight gradient
(another 2 B N K E; pixels need none). Bytes: pixels read + tokens written, the floor of the op.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import mmfast
from mmfast.bench.case import Case

MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


def _normalized(pixels, dtype):
    shape = (1, -1) + (1,) * (pixels.dim() - 2)
    mean = torch.tensor(MEAN[: pixels.shape[1]], device=pixels.device, dtype=dtype).view(shape)
    std = torch.tensor(STD[: pixels.shape[1]], device=pixels.device, dtype=dtype).view(shape)
    x = pixels.to(dtype)
    return (x / 255 - mean) / std if pixels.dtype == torch.uint8 else x


def eager_conv(pixels, weight, bias, pos, stride):
    """uint8 -> float -> normalize -> Conv -> flatten -> + position (float pixels skip the first steps)."""
    x = _normalized(pixels, weight.dtype)
    conv = F.conv3d if weight.dim() == 5 else F.conv2d
    return conv(x, weight, bias, stride=stride).flatten(2).transpose(1, 2) + pos


def unfold_linear(pixels, weight, bias, pos, stride):
    """The same as im2col (F.unfold) + one GEMM."""
    x = _normalized(pixels, weight.dtype)
    patches = F.unfold(x, weight.shape[-2:], stride=stride).transpose(1, 2)
    return F.linear(patches, weight.reshape(weight.shape[0], -1), bias) + pos


@functools.lru_cache(maxsize=None)
def _compiled(function):
    return torch.compile(function, dynamic=False)


def _case(name, batch, pixel_shape, kernel, embed, stride, provider, uint8, device, dtype=torch.bfloat16):
    from mmfast.ops.patch_embed import patch_grid

    video = len(kernel) == 3
    channels = pixel_shape[0]
    full_kernel = kernel if video else (1, *kernel)
    full_stride = stride if video else (1, *stride)
    size = pixel_shape[1:] if video else (1, *pixel_shape[1:])
    _, grid = patch_grid(size, full_kernel, full_stride, False)
    patches = grid[0] * grid[1] * grid[2]
    patch_volume = channels * full_kernel[0] * full_kernel[1] * full_kernel[2]

    def make():
        generator = torch.Generator(device=device).manual_seed(0)
        if uint8:
            pixels = torch.randint(0, 256, (batch, *pixel_shape), device=device, dtype=torch.uint8,
                                   generator=generator)
        else:
            pixels = torch.randn((batch, *pixel_shape), device=device, generator=generator).to(dtype)
        weight = (torch.randn(embed, channels, *kernel, device=device, generator=generator) * 0.02).to(dtype)
        bias = torch.zeros(embed, device=device, dtype=dtype)
        pos = (torch.randn(patches, embed, device=device, generator=generator) * 0.02).to(dtype)
        leaves = [t.requires_grad_() for t in (weight, bias, pos)]
        if provider == "mmfast":
            normalization = dict(mean=MEAN[:channels], std=STD[:channels]) if uint8 else {}
            step = lambda: mmfast.ops.patch_embed(pixels, weight, bias, stride=stride, pos_embed=pos,  # noqa: E731
                                                  **normalization).float().sum()
        else:
            function = {"eager": eager_conv, "unfold+linear": unfold_linear}[provider.removeprefix("compiled ")]
            function = _compiled(function) if provider.startswith("compiled") else function
            step = lambda: function(pixels, weight, bias, pos, stride).float().sum()  # noqa: E731
        return step, leaves

    flops = 2.0 * batch * patches * patch_volume * embed
    pixel_bytes = batch * torch.Size(pixel_shape).numel() * (1 if uint8 else 2)
    token_bytes = batch * patches * embed * 2
    return Case(
        suite="patch_embed", group=f"{name} from {'uint8' if uint8 else 'float'}", provider=provider,
        params={"B": batch, "shape": "x".join(map(str, pixel_shape)), "kernel": "x".join(map(str, kernel)),
                "stride": "x".join(map(str, stride)), "E": embed, "dtype": str(dtype).removeprefix("torch.")},
        make=make, flops=lambda mode: flops * {"forward": 1, "backward": 1, "full": 2}[mode],
        bytes=lambda mode: (pixel_bytes + token_bytes) * (1 if mode == "forward" else 2),
        modes=("forward", "full"), is_mmfast=provider == "mmfast",
    )


def embed_then_gather(pixels, weight, bias, pos, stride, keep):
    """MAE's way on timm's PatchEmbed: every patch embedded, the kept tokens gathered."""
    tokens = eager_conv(pixels, weight, bias, pos, stride)
    return tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[2]))


def _masked_case(name, batch, pixel_shape, patch, embed, provider, device, dtype=torch.bfloat16, ratio=0.75):
    channels = pixel_shape[0]
    patches = (pixel_shape[1] // patch) * (pixel_shape[2] // patch)
    kept = int(patches * (1 - ratio))

    def make():
        generator = torch.Generator(device=device).manual_seed(0)
        pixels = torch.randint(0, 256, (batch, *pixel_shape), device=device, dtype=torch.uint8, generator=generator)
        weight = (torch.randn(embed, channels, patch, patch, device=device, generator=generator) * 0.02).to(dtype)
        bias = torch.zeros(embed, device=device, dtype=dtype)
        pos = (torch.randn(patches, embed, device=device, generator=generator) * 0.02).to(dtype)
        keep = torch.rand(batch, patches, device=device, generator=generator).argsort(dim=1)[:, :kept]
        leaves = [t.requires_grad_() for t in (weight, bias, pos)]
        if provider == "mmfast":
            step = lambda: mmfast.ops.patch_embed(pixels, weight, bias, pos_embed=pos, keep=keep, mean=MEAN,  # noqa: E731
                                                  std=STD).float().sum()
        else:
            function = _compiled(embed_then_gather) if provider.startswith("compiled") else embed_then_gather
            step = lambda: function(pixels, weight, bias, pos, (patch, patch), keep).float().sum()  # noqa: E731
        return step, leaves

    flops = 2.0 * batch * kept * channels * patch * patch * embed  # the kept patches' work
    pixel_bytes = batch * torch.Size(pixel_shape).numel() * kept // patches
    token_bytes = batch * kept * embed * 2
    return Case(
        suite="patch_embed", group=f"{name} from uint8", provider=provider,
        params={"B": batch, "shape": "x".join(map(str, pixel_shape)), "kernel": f"{patch}x{patch}",
                "kept": f"{kept} of {patches}", "E": embed, "dtype": str(dtype).removeprefix("torch.")},
        make=make, flops=lambda mode: flops * {"forward": 1, "backward": 1, "full": 2}[mode],
        bytes=lambda mode: (pixel_bytes + token_bytes) * (1 if mode == "forward" else 2),
        modes=("forward", "full"), is_mmfast=provider == "mmfast",
    )


def cases(profile: str, device: torch.device):
    if profile == "cpu":
        settings = [("image 56/14/64", 4, (3, 56, 56), (14, 14), 64, (14, 14), True),
                    ("video 4x32x32/2x16x16", 2, (3, 4, 32, 32), (2, 16, 16), 64, (2, 16, 16), True),
                    ("ast 64x96/16 stride 10", 2, (1, 64, 96), (16, 16), 64, (10, 10), False)]
        providers = ("mmfast", "eager")
        return ([_case(*s[:6], p, s[6], device, torch.float32) for s in settings for p in providers]
                + [_masked_case("image 56/14/64, 75 % masked", 4, (3, 56, 56), 14, 64, p, device, torch.float32)
                   for p in ("mmfast", "embed+gather")])
    images = [("image 224/14/1024", 256, (3, 224, 224), (14, 14), 1024, (14, 14)),
              ("image 224/16/768", 256, (3, 224, 224), (16, 16), 768, (16, 16)),
              ("image 336/14/1024", 256, (3, 336, 336), (14, 14), 1024, (14, 14))]
    video = ("video 16x224x224/2x16x16", 8, (3, 16, 224, 224), (2, 16, 16), 768, (2, 16, 16))
    ast = ("ast 128x1024/16 stride 10", 64, (1, 128, 1024), (16, 16), 768, (10, 10))
    everything = ("mmfast", "eager", "unfold+linear", "compiled eager", "compiled unfold+linear")
    if profile == "quick":
        plan = [(images[0], True, ("mmfast", "eager", "compiled eager")), (video, True, ("mmfast", "eager"))]
    else:
        plan = [(setting, uint8, everything) for setting in images for uint8 in (True, False)]
        plan += [(video, True, ("mmfast", "eager", "compiled eager")), (video, False, ("mmfast", "eager")),
                 (ast, False, ("mmfast", "eager", "unfold+linear", "compiled eager"))]
    masked = [_masked_case("image 224/16/768, 75 % masked", 256, (3, 224, 224), 16, 768, provider, device)
              for provider in ("mmfast", "embed+gather", "compiled embed+gather")]
    return [_case(*setting, provider, uint8, device) for setting, uint8, providers in plan
            for provider in providers] + masked
