"""Decode attention (one new token per sequence against a KV cache, as in generation): mmfast's
split-key kernel against SDPA with the boolean mask a KV-cache step builds (what mmfast's transformers
integration ran before), SDPA without a mask (its best case: one query sees every key), and
flash-attn's `flash_attn_with_kvcache` where installed.

FLOPs: 4 B H Tq S D (scores and values); bytes: the K and V caches read once, 2 B S HK D elements.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from mmfast.bench.case import Case
from mmfast.ops.mixed_attention import mixed_attention_decode


def _sdpa_masked(q, k, v):
    """[B, Tq, H, D] queries, [B, S, HK, D] caches: the heads repeated and a [Tq, S] causal mask."""
    new, length = q.shape[1], k.shape[1]
    rows = torch.arange(new, device=q.device)[:, None] + length - new
    mask = torch.arange(length, device=q.device)[None, :] <= rows
    group = q.shape[2] // k.shape[2]
    key, value = (x.transpose(1, 2).repeat_interleave(group, dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), key, value, attn_mask=mask).transpose(1, 2)


def _sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          enable_gqa=True).transpose(1, 2)


def _flash_attn(q, k, v):
    from flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache(q, k, v, causal=True)


PROVIDERS = {"mmfast": lambda q, k, v: mixed_attention_decode(q, k, v, validate=False),
             "sdpa_mask": _sdpa_masked, "sdpa": _sdpa_plain, "flash_attn": _flash_attn}


def _case(provider, batch, length, heads, kv_heads, dim, new, dtype, device):
    function = PROVIDERS[provider]

    def make():
        generator = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, new, heads, dim, device=device, generator=generator).to(dtype)
        k, v = (torch.randn(batch, length, kv_heads, dim, device=device, generator=generator).to(dtype)
                for _ in range(2))
        return (lambda: function(q, k, v)), []

    element = torch.finfo(dtype).bits // 8
    return Case(
        suite="decode", group=f"B={batch} S={length} H={heads}/{kv_heads} D={dim} new={new}", provider=provider,
        params={"B": batch, "S": length, "H": heads, "HK": kv_heads, "D": dim, "new": new,
                "dtype": str(dtype).removeprefix("torch.")},
        make=make, modes=("forward",), is_mmfast=provider == "mmfast",
        flops=lambda mode: 4.0 * batch * heads * new * length * dim,
        bytes=lambda mode: 2.0 * batch * length * kv_heads * dim * element,
    )


def cases(profile: str, device: torch.device):
    if profile == "cpu":
        return [_case(provider, 2, 512, 4, 2, 64, 1, torch.float32, device)
                for provider in ("mmfast", "sdpa_mask", "sdpa")]
    providers = ["mmfast", "sdpa_mask", "sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        providers.append("flash_attn")
    lengths = (4096, 32768) if profile == "quick" else (1024, 4096, 16384, 32768, 131072)
    return [_case(provider, 8, length, 32, 8, 128, 1, torch.bfloat16, device)
            for length in lengths for provider in providers]
