"""Mixed attention: packed documents whose first tokens are a bidirectional image span, the rest
causal text (BASELINES.md: B=2, H=16, S=8192, D=128, 4 documents of 2048 tokens per row, a
576-token image each), against FlexAttention (block mask built once outside the timing, and
rebuilt inside every step as when the packing changes), SDPA with the dense boolean mask, and,
on plain causal attention, SDPA's flash and cuDNN backends; flash-attn varlen and xformers'
block-diagonal causal mask join there where installed (they have no bidirectional spans, so they
time the packed causal case).

FLOPs count only the unmasked (query, key) pairs: forward 4 * D * pairs * H, forward+backward
3.5 times that (BASELINES.md's convention).
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

import mmfast
from mmfast.bench.case import Case
from mmfast.ops.mixed_attention import packing_from_segments, reference


def _layout(rows: int, row_length: int, documents: int, images: int, span: int):
    """Segments per document: [image span, text] repeated `images` times, packed `documents` per row."""
    length = row_length // documents
    text = (length - images * span) // images
    segments = []
    for _ in range(images):
        segments += [("image", span), ("text", text)]
    segments[-1] = ("text", length - images * span - text * (images - 1))
    return [segments] * (rows * documents)


def _allowed_pairs(cu, spans, causal: bool) -> int:
    pairs = 0
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if causal:
            pairs += int(reference.sequence_mask(spans[start:end].cpu(), True).sum())
        else:
            pairs += (end - start) ** 2
    return pairs


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_mask_builder(cu, spans, rows, row_length, device, compile_mask: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    total = rows * row_length
    document = torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True).reshape(rows, row_length)
    span = spans.reshape(rows, row_length)

    def rule(b, h, i, j):
        return (document[b, i] == document[b, j]) & reference.allowed(i, j, span[b, i], span[b, j])

    return lambda: create_block_mask(rule, rows, None, row_length, row_length, device=device, _compile=compile_mask)


def _case(name, rows, row_length, heads, dim, documents, images, span, provider, device, dtype, causal_only=False):

    if causal_only:
        cu = torch.arange(0, (rows + 1) * row_length, row_length, dtype=torch.int32)
        spans = torch.full((rows * row_length,), -1, dtype=torch.int32)
        longest = row_length
    else:
        cu, spans, longest = packing_from_segments(_layout(rows, row_length, documents, images, span))
    pairs = _allowed_pairs(cu, spans, True)
    cu, spans = cu.to(device), spans.to(device)

    def make():
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (rows * row_length, heads, dim)
        q, k, v = (torch.randn(shape, device=device, generator=generator).to(dtype).requires_grad_() for _ in range(3))
        batched = lambda x: x.reshape(rows, row_length, heads, dim).transpose(1, 2)  # noqa: E731
        if provider == "mmfast":
            # The packing is new every step: its metadata is built inside the step.
            step = lambda: mmfast.ops.mixed_attention(q, k, v, cu_seqlens=cu, max_seqlen=longest,  # noqa: E731
                                                      span_ids=spans, validate=False).float().sum()
        elif provider.startswith("flex"):
            build = _flex_mask_builder(cu, spans, rows, row_length, device, compile_mask=device.type == "cuda")
            attend = _compiled_flex()
            if provider == "flex, mask built once":
                mask = build()
                step = lambda: attend(batched(q), batched(k), batched(v), block_mask=mask).float().sum()  # noqa: E731
            else:
                step = lambda: attend(batched(q), batched(k), batched(v),  # noqa: E731
                                      block_mask=build()).float().sum()
        elif provider == "sdpa dense mask":
            dense = torch.zeros(rows, 1, row_length, row_length, dtype=torch.bool, device=device)
            for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
                row, offset = divmod(start, row_length)
                dense[row, 0, offset:offset + end - start, offset:offset + end - start] = reference.sequence_mask(
                    spans[start:end], True)
            step = lambda: F.scaled_dot_product_attention(batched(q), batched(k), batched(v),  # noqa: E731
                                                          attn_mask=dense).float().sum()
        elif provider.startswith("sdpa "):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION}[provider]

            def step():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(batched(q), batched(k), batched(v),
                                                          is_causal=True).float().sum()
        elif provider == "xformers block-diagonal":
            from xformers.ops import fmha

            bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(torch.diff(cu).tolist())
            step = lambda: fmha.memory_efficient_attention(q[None], k[None], v[None],  # noqa: E731
                                                           attn_bias=bias).float().sum()
        elif provider == "flash-attn varlen":
            from flash_attn import flash_attn_varlen_func

            step = lambda: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest,  # noqa: E731
                                                  causal=True).float().sum()
        else:
            raise ValueError(f"unknown provider {provider!r}")
        return step, [q, k, v]

    forward_flops = 4.0 * dim * heads * pairs
    return Case(
        suite="mixed_attention", group=name, provider=provider,
        params={"rows": rows, "S": row_length, "H": heads, "D": dim, "documents": documents, "images": images,
                "span": span, "mask_density": pairs / (rows * row_length ** 2), "dtype": str(dtype).removeprefix("torch.")},
        make=make, flops=lambda mode: forward_flops * {"forward": 1.0, "backward": 2.5, "full": 3.5}[mode],
        modes=("forward", "full"), is_mmfast=provider == "mmfast",
    )


def _mixed_providers(device) -> tuple[str, ...]:
    providers = ["mmfast", "flex, mask built once", "flex, mask built every step", "sdpa dense mask"]
    return tuple(providers if device.type == "cuda" else ["mmfast", "sdpa dense mask"])


def _causal_providers(device) -> tuple[str, ...]:
    providers = ["mmfast", "sdpa flash", "sdpa cudnn"]
    if importlib.util.find_spec("flash_attn"):
        providers.append("flash-attn varlen")
    if importlib.util.find_spec("xformers"):
        providers.append("xformers block-diagonal")
    return tuple(providers)


def cases(profile: str, device: torch.device):
    if profile == "cpu":
        settings = [("mixed S=256 2 docs", 1, 256, 2, 64, 2, 1, 48)]
        return [_case(*s, provider, device, torch.float32) for s in settings for provider in _mixed_providers(device)]
    baseline = ("mixed S=8192 (BASELINES)", 2, 8192, 16, 128, 4, 1, 576)
    causal = ("plain causal S=8192", 2, 8192, 16, 128, 1, 0, 0)
    result = [_case(*baseline, provider, device, torch.bfloat16) for provider in _mixed_providers(device)]
    result += [_case(*causal, provider, device, torch.bfloat16, causal_only=True)
               for provider in _causal_providers(device)]
    if profile == "full":
        sweeps = [(f"mixed S={s}", 2 if s <= 8192 else 1, s, 16, 128, s // 2048, 1, 576) for s in (2048, 32768)]
        sweeps += [(f"mixed S=8192 {n} images of {span}", 2, 8192, 16, 128, 4, n, span)
                   for n, span in ((2, 256), (2, 576), (1, 1024))]
        result += [_case(*s, provider, device, torch.bfloat16) for s in sweeps for provider in _mixed_providers(device)]
    return result
