"""Flash attention over mixed visual/text sequences: packed sequences and bidirectional spans
(images, audio clips, prefixes) inside causal text, without a mask tensor."""
from __future__ import annotations

import math
import os

import torch

from mmfast.ops._backend import log_fallback, profiled, resolve_backend
from mmfast.ops.mixed_attention.packing import (Packing, build_packing, pad, packing_from_segments,
                                                span_ids_from_token_ids, unpad)

__all__ = ["mixed_attention", "packing_from_segments", "span_ids_from_token_ids", "unpad", "pad", "Packing"]

OP = "mixed_attention"
_IMPLEMENTED = ("triton", "reference")
TRITON_HEAD_DIMS = (16, 256)  # the PyTorch path takes any head dim


def _check_inputs(q, k, v):
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{OP}: {name} must be float16, bfloat16 or float32, got {tensor.dtype}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise TypeError(f"{OP}: q and {name} must have one dtype, got {q.dtype} and {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{OP}: q and {name} must be on one device, got {q.device} and {tensor.device}")
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"{OP}: q, k, v must all be [B, T, H, D] or all [total_tokens, H, D], got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"{OP}: q and k must have the same tokens, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    heads, kv_heads, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != dim:
        raise ValueError(f"{OP}: q and k must have the same head dim, got {dim} and {k.shape[-1]}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{OP}: q's heads ({heads}) must be a multiple of k/v's heads ({kv_heads}) (GQA/MQA)")
    if dim < 1:
        raise ValueError(f"{OP}: head dim must be >= 1, got {dim}")


def _check_max_seqlen(max_seqlen):
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1):
        raise ValueError(f"{OP}: max_seqlen must be a positive int (the longest sequence) or None, got {max_seqlen!r}")


def _check_packing(cu_seqlens, span_ids, total, device, leading_shape, max_seqlen):
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError(f"{OP}: cu_seqlens must be a 1-D int32 tensor, got "
                            f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                            f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
        if cu_seqlens.device != device:
            raise ValueError(f"{OP}: cu_seqlens must be on {device}, got {cu_seqlens.device}")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"{OP}: cu_seqlens needs at least 2 entries (one sequence), got {cu_seqlens.numel()}")
        # One small check of the values, read in one host synchronization (validate=False skips it).
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], lengths.min(),
                                                      lengths.max()]).tolist()
        if first != 0 or last != total or shortest < 0:
            raise ValueError(f"{OP}: cu_seqlens must start at 0, not decrease and end at total_tokens={total}, "
                             f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'a sequence that does not'}")
        # A smaller max_seqlen would size the kernel's grid too small and leave rows unwritten.
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"{OP}: max_seqlen must be at least the longest sequence in cu_seqlens ({longest}), "
                             f"got {max_seqlen}")
    if span_ids is not None:
        if not isinstance(span_ids, torch.Tensor) or span_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OP}: span_ids must be an int32 tensor, got "
                            f"{getattr(span_ids, 'dtype', type(span_ids).__name__)}")
        if tuple(span_ids.shape) != tuple(leading_shape):
            raise ValueError(f"{OP}: span_ids must have q's token shape {tuple(leading_shape)}, "
                             f"got {tuple(span_ids.shape)}")
        if span_ids.device != device:
            raise ValueError(f"{OP}: span_ids must be on {device}, got {span_ids.device}")


@profiled
def mixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                    max_seqlen: int | None = None, span_ids: torch.Tensor | None = None, causal: bool = True,
                    softmax_scale: float | None = None, return_lse: bool = False, validate: bool = True,
                    backend: str | None = None):
    """Attention where query i sees key j iff same sequence and (j <= i, or i and j in one span).

    Layouts: padded `q [B, T, H, D]`, `k, v [B, T, HK, D]` (every row a sequence of length T), or
    packed `q [total, H, D]`, `k, v [total, HK, D]` with `cu_seqlens` (int32 [B + 1], FlashAttention
    varlen). HK may divide H (GQA/MQA); D from 16 to 256 on the Triton kernels, any D on the PyTorch
    path; float16/bfloat16 (float32 runs too).
    span_ids: int32 `[B, T]` or `[total]`; -1 for causal tokens, an id >= 0 for the tokens of one
    bidirectional span (an image, an audio clip). causal=False: every token sees its whole
    sequence (encoders). max_seqlen: the longest sequence (saves a host synchronization).
    Returns out (q's shape and dtype), and with return_lse the float32 log-sum-exp of the scores,
    `[B, H, T]` padded or `[H, total]` packed. Gradients flow to q, k and v.
    validate=False skips the checks of cu_seqlens' values and of max_seqlen against them (one host
    synchronization); a max_seqlen smaller than the longest sequence then gives wrong rows.
    """
    _check_inputs(q, k, v)
    padded = q.dim() == 4
    if padded and cu_seqlens is not None:
        raise ValueError(f"{OP}: cu_seqlens goes with packed [total_tokens, H, D] inputs, got q of shape "
                         f"{tuple(q.shape)}")
    if not padded and cu_seqlens is None:
        raise ValueError(f"{OP}: packed [total_tokens, H, D] inputs need cu_seqlens")
    _check_max_seqlen(max_seqlen)
    if validate:
        _check_packing(cu_seqlens, span_ids, q.shape[0] if not padded else None, q.device, q.shape[:-2],
                       max_seqlen)
    if q.shape[:-2].numel() == 0:  # no tokens: nothing to attend (the kernels' grids would be empty)
        out = q.new_empty(q.shape)
        if not return_lse:
            return out
        lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if padded else (q.shape[1], 0)
        return out, torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    chosen = resolve_backend(OP, backend, q.device, _IMPLEMENTED)
    low, high = TRITON_HEAD_DIMS
    if chosen == "triton" and not low <= q.shape[-1] <= high:
        if (backend or os.environ.get("MMFAST_BACKEND", "auto")) != "auto":
            raise ValueError(f"{OP}: the Triton kernels take head dims in [{low}, {high}], got {q.shape[-1]}; "
                             "backend='reference' (PyTorch) takes any")
        log_fallback(OP, f"head dim {q.shape[-1]} is outside the Triton kernels' [{low}, {high}]")
        chosen = "reference"
    if padded and chosen == "reference":
        from mmfast.ops.mixed_attention import reference

        out, lse = reference.padded_attention(q, k, v, span_ids, causal, scale, return_lse)
        return (out, lse) if return_lse else out
    batch, length = (q.shape[0], q.shape[1]) if padded else (None, None)
    if padded:
        q, k, v = (x.reshape(batch * length, *x.shape[2:]) for x in (q, k, v))
        cu_seqlens = torch.arange(0, (batch + 1) * length, length, device=q.device, dtype=torch.int32)
        max_seqlen = length
        span_ids = None if span_ids is None else span_ids.reshape(-1)
    total = q.shape[0]
    if chosen == "triton":
        from mmfast.ops.mixed_attention.function import MixedAttentionFunction

        packing = build_packing(cu_seqlens, span_ids, total, max_seqlen, causal)
        out, lse = MixedAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), packing, scale)
    else:
        from mmfast.ops.mixed_attention import reference

        spans = span_ids if span_ids is not None else torch.full((total,), -1, device=q.device, dtype=torch.int32)
        out, lse = reference.attention(q, k, v, cu_seqlens, spans, causal, scale)
        out, lse = out.to(q.dtype), lse.float().detach()
    if padded:
        out = out.reshape(batch, length, *out.shape[1:])
        lse = lse.reshape(lse.shape[0], batch, length).transpose(0, 1)
    return (out, lse) if return_lse else out
