"""Contrastive losses: mmfast's fused losses against the materialized open_clip-style losses
(the N x N logits built in the features' dtype, eager and torch.compile'd).

FLOPs are model FLOPs, the same for every provider: forward one N x N x D GEMM (2 N^2 D),
backward two (4 N^2 D), full 6 N^2 D.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import mmfast
from mmfast.bench.case import Case

SCALE, BIAS = 100.0, -10.0


def materialized_clip_loss(image, text, logit_scale):
    """open_clip's single-process ClipLoss: both N x N logits matrices exist."""
    logits_per_image = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def materialized_siglip_loss(image, text, logit_scale, logit_bias):
    """open_clip's single-process SigLipLoss: logits and the +-1 label matrix exist."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(image.shape[0], device=image.device, dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


@functools.lru_cache(maxsize=None)
def _compiled(function):
    return torch.compile(function, dynamic=False)


def _inputs(n, d, dtype, device, siglip):
    generator = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(n, d, device=device, generator=generator), dim=1).to(dtype).requires_grad_()
    text = F.normalize(torch.randn(n, d, device=device, generator=generator), dim=1).to(dtype).requires_grad_()
    leaves = [image, text, torch.tensor(SCALE, device=device, requires_grad=True)]
    if siglip:
        leaves.append(torch.tensor(BIAS, device=device, requires_grad=True))
    return leaves


def _case(loss: str, provider: str, n: int, d: int, dtype, device):

    siglip = loss == "siglip"
    function = {
        "mmfast": mmfast.ops.siglip_loss if siglip else mmfast.ops.clip_loss,
        "eager": materialized_siglip_loss if siglip else materialized_clip_loss,
    }.get(provider) or _compiled(materialized_siglip_loss if siglip else materialized_clip_loss)

    def make():
        leaves = _inputs(n, d, dtype, device, siglip)
        return (lambda: function(*leaves)), leaves

    gemm = 2.0 * n * n * d
    return Case(
        suite="contrastive", group=f"{loss} N={n} D={d}", provider=provider,
        params={"loss": loss, "N": n, "D": d, "dtype": str(dtype).removeprefix("torch.")},
        make=make, flops=lambda mode: gemm * {"forward": 1, "backward": 2, "full": 3}[mode],
        is_mmfast=provider == "mmfast",
    )


def cases(profile: str, device: torch.device):
    if profile == "cpu":
        sizes = [("clip", 256, 64), ("clip", 1024, 64), ("siglip", 1024, 64)]
        return [_case(loss, provider, n, d, torch.float32, device)
                for loss, n, d in sizes for provider in ("mmfast", "eager")]
    providers = ("mmfast", "eager", "compiled")
    if profile == "quick":
        # One compile (the BASELINES.md setting) and no N = 1M (tens of seconds a step) keep it short.
        grid = [("clip", 4096, 768, ("mmfast", "eager")), ("clip", 32768, 768, providers),
                ("siglip", 65536, 768, ("mmfast", "eager")), ("clip", 262144, 768, ("mmfast",))]
    else:
        grid = []
        for loss in ("clip", "siglip"):
            for d in (512, 768, 1024):
                for n in (4096, 16384, 32768, 65536, 262144, 1048576):
                    # The materialized losses need 8-32 bytes per logit: past 64k they cannot fit.
                    grid.append((loss, n, d, providers if n <= 65536 else ("mmfast",)))
    return [_case(loss, provider, n, d, torch.bfloat16, device)
            for loss, n, d, group_providers in grid for provider in group_providers]
