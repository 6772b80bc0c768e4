"""Flash attention over mixed visual/text sequences: packed sequences and bidirectional spans
(images, audio clips, prefixes) inside causal text, without a mask tensor."""
from __future__ import annotations

import math
import os

import torch

from mmfast.ops._backend import log_fallback, profiled, resolve_backend
from mmfast.ops.mixed_attention.packing import (Packing, build_packing, pad, packing_from_segments,
                                                span_ids_from_token_ids, unpad)

__all__ = ["mixed_attention", "mixed_attention_decode", "build_packing", "packing_from_segments", "span_ids_from_token_ids", "unpad", "pad", "Packing"]

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
                    backend: str | None = None, packing: Packing | None = None):
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
    packing: the tables of `build_packing(cu_seqlens, span_ids, total, max_seqlen, causal)`, built once
    and passed to every layer of a model (packed layout; cu_seqlens, span_ids, max_seqlen and causal then
    come from it, unchecked): a model's layers share one packing instead of rebuilding it each.
    """
    _check_inputs(q, k, v)
    if packing is not None:
        if q.dim() != 3 or packing.span_ids.shape[0] != q.shape[0]:
            raise ValueError(f"{OP}: a packing goes with packed [total_tokens, H, D] inputs of its "
                             f"{packing.span_ids.shape[0]} tokens, got q of shape {tuple(q.shape)}")
        cu_seqlens, span_ids, max_seqlen, causal, validate = (packing.cu_seqlens, packing.span_ids,
                                                              packing.max_seqlen, packing.causal, False)
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

        if packing is None:
            packing = build_packing(cu_seqlens, span_ids, total, max_seqlen, causal)
        out, lse = MixedAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), packing, scale)
    else:
        from mmfast.ops.mixed_attention import reference

        spans = span_ids if span_ids is not None else torch.full((total,), -1, device=q.device, dtype=torch.int32)
        if not return_lse:  # the sequences padded into one SDPA call, not a Python loop over them
            return reference.packed_attention(q, k, v, cu_seqlens, spans, causal, scale)
        out, lse = reference.attention(q, k, v, cu_seqlens, spans, causal, scale)
        out, lse = out.to(q.dtype), lse.float().detach()
    if padded:
        out = out.reshape(batch, length, *out.shape[1:])
        lse = lse.reshape(lse.shape[0], batch, length).transpose(0, 1)
    return (out, lse) if return_lse else out


def _check_decode(q, k, v, cache_seqlens, cache_leftpad, cu_seqlens_q, cu_seqlens_k, span_ids):
    op = "mixed_attention_decode"
    for name, tensor in (("q", q), ("k_cache", k), ("v_cache", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{op}: {name} must be a float16, bfloat16 or float32 tensor, got "
                            f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        if tensor.dtype != q.dtype or tensor.device != q.device:
            raise ValueError(f"{op}: q and {name} must have one dtype and device, got {q.dtype} on {q.device} "
                             f"and {tensor.dtype} on {tensor.device}")
    padded = q.dim() == 4
    if q.dim() not in (3, 4) or k.dim() != q.dim() or k.shape != v.shape:
        raise ValueError(f"{op}: expected q [B, Tq, H, D] with k_cache, v_cache [B, S, HK, D], or packed q "
                         f"[total_q, H, D] with k_cache, v_cache [total_k, HK, D]; got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if k.shape[-1] != q.shape[-1] or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{op}: k_cache must have q's head dim and a number of heads dividing q's {heads}, "
                         f"got {tuple(k.shape)}")
    if padded:
        if k.shape[0] != q.shape[0] or k.shape[1] < q.shape[1]:
            raise ValueError(f"{op}: k_cache [B, S, HK, D] must have q's batch {q.shape[0]} and S >= Tq = "
                             f"{q.shape[1]}, got {tuple(k.shape)}")
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError(f"{op}: cu_seqlens_q/cu_seqlens_k go with packed 3-D inputs, got q of shape "
                             f"{tuple(q.shape)}")
        expected = {"cache_seqlens": cache_seqlens, "cache_leftpad": cache_leftpad}
        shape, span_shape = (q.shape[0],), tuple(k.shape[:2])
    else:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"{op}: packed 3-D inputs need cu_seqlens_q and cu_seqlens_k")
        if cache_seqlens is not None or cache_leftpad is not None:
            raise ValueError(f"{op}: cache_seqlens/cache_leftpad go with the padded 4-D layout")
        expected = {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
        shape, span_shape = (cu_seqlens_q.shape[0],) if isinstance(cu_seqlens_q, torch.Tensor) else None, (k.shape[0],)
    for name, tensor in expected.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32 or tensor.shape != shape \
                or tensor.device != q.device:
            raise ValueError(f"{op}: {name} must be an int32 tensor of shape {shape} on {q.device}, got "
                             f"{getattr(tensor, 'dtype', type(tensor).__name__)} "
                             f"{tuple(getattr(tensor, 'shape', ()))}")
    if span_ids is not None and (not isinstance(span_ids, torch.Tensor) or span_ids.dtype != torch.int32
                                 or tuple(span_ids.shape) != span_shape or span_ids.device != q.device):
        raise ValueError(f"{op}: span_ids must be an int32 tensor of the cache's token shape {span_shape} on "
                         f"{q.device}, got {getattr(span_ids, 'dtype', type(span_ids).__name__)} "
                         f"{tuple(getattr(span_ids, 'shape', ()))}")


def _decode_rows(q, k, cache_seqlens, cache_leftpad, cu_seqlens_q, cu_seqlens_k, validate: bool):
    """The per-sequence tables of the decode kernel: first query token, query count, first key, key
    count, first row of the output; and the largest query and key counts, the number of output rows."""
    device = q.device
    if q.dim() == 4:
        batch, new, capacity = q.shape[0], q.shape[1], k.shape[1]
        leftpad = cache_leftpad if cache_leftpad is not None else torch.zeros(batch, device=device, dtype=torch.int32)
        counts = cache_seqlens if cache_seqlens is not None else capacity - leftpad
        q_first = torch.zeros(batch, device=device, dtype=torch.int32)
        q_count = torch.full((batch,), new, device=device, dtype=torch.int32)
        out_first = torch.arange(0, batch * new, new, device=device, dtype=torch.int32)
        most_queries, most_keys, rows_total = new, capacity, batch * new
        limits = (leftpad + counts <= capacity) & (leftpad >= 0)
        rows = (q_first, q_count, leftpad, counts.int(), out_first)
    else:
        q_count = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).int()
        counts = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).int()
        most_queries, most_keys = (int(x) for x in torch.stack([q_count.max(), counts.max()]).tolist())
        rows_total = q.shape[0]
        limits = (cu_seqlens_q[-1] == q.shape[0]) & (cu_seqlens_k[-1] == k.shape[0]) & (cu_seqlens_q[0] == 0) \
            & (cu_seqlens_k[0] == 0)
        rows = (cu_seqlens_q[:-1], q_count, cu_seqlens_k[:-1], counts, cu_seqlens_q[:-1])
    if validate and not bool((limits & (counts >= rows[1])).all()):
        raise ValueError("mixed_attention_decode: every sequence needs at least as many keys as new queries (the "
                         "new tokens are the last of the cache), inside the cache (leftpad + seqlen <= S; "
                         "cu_seqlens from 0 to the total)")
    return (*rows, most_queries, most_keys, rows_total)


@profiled
def mixed_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                           cache_seqlens: torch.Tensor | None = None, cache_leftpad: torch.Tensor | None = None,
                           cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                           span_ids: torch.Tensor | None = None, causal: bool = True,
                           softmax_scale: float | None = None, num_splits: int | None = None,
                           validate: bool = True, backend: str | None = None) -> torch.Tensor:
    """Attention of a few new queries per sequence against a KV cache, for generation (inference only:
    no gradient). The new tokens are the last keys of their sequence (their keys already written to
    the cache), and the rule is mixed_attention's: causal, plus whole bidirectional spans.

    Padded (as flash-attn's `flash_attn_with_kvcache`): q `[B, Tq, H, D]`, k_cache/v_cache
    `[B, S, HK, D]` (any strides with a unit last one), `cache_seqlens` int32 `[B]` valid keys per
    row (default S - leftpad), `cache_leftpad` int32 `[B]` where each row's keys start (left padding,
    default 0), `span_ids` int32 `[B, S]`. Packed: q `[total_q, H, D]`, k/v `[total_k, HK, D]` with
    `cu_seqlens_q` and `cu_seqlens_k` (int32 `[B + 1]`), `span_ids` `[total_k]`.
    HK divides H (GQA/MQA). num_splits: programs per sequence and KV head over the keys (default:
    enough to fill the GPU). validate=False skips the checks that need a host synchronization.
    Returns q's shape and dtype.
    """
    _check_decode(q, k_cache, v_cache, cache_seqlens, cache_leftpad, cu_seqlens_q, cu_seqlens_k, span_ids)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"mixed_attention_decode: num_splits must be a positive int or None, got {num_splits!r}")
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError("mixed_attention_decode has no backward (it is for generation); use mixed_attention "
                         "to train, or call it under torch.no_grad()")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[:-2].numel() == 0:
        return q.new_empty(q.shape)
    rows = _decode_rows(q, k_cache, cache_seqlens, cache_leftpad, cu_seqlens_q, cu_seqlens_k, validate)
    chosen = resolve_backend("mixed_attention_decode", backend, q.device, _IMPLEMENTED)
    low, high = TRITON_HEAD_DIMS
    if chosen == "triton" and not low <= q.shape[-1] <= high:
        log_fallback("mixed_attention_decode", f"head dim {q.shape[-1]} is outside the Triton kernels' [{low}, {high}]")
        chosen = "reference"
    spans = None if span_ids is None or not causal else span_ids.contiguous()
    if chosen == "triton":
        from mmfast.ops.mixed_attention.triton_decode import decode

        return decode(q, k_cache, v_cache, rows, spans, causal, scale, num_splits).reshape(q.shape)
    from mmfast.ops.mixed_attention.reference import decode_padded, decode_sequence

    if q.dim() == 4:
        return decode_padded(q, k_cache, v_cache, rows[2], rows[3], spans, causal, scale)
    q_first, q_count, k_first, k_count, out_first = (x.tolist() for x in rows[:5])
    flat_q = q.reshape(-1, *q.shape[-2:])
    out = torch.empty_like(flat_q)
    for index in range(len(q_first)):  # packed: one sequence at a time
        window = slice(k_first[index], k_first[index] + k_count[index])
        queries = q[q_first[index]:q_first[index] + q_count[index]]
        out[out_first[index]:out_first[index] + q_count[index]] = decode_sequence(
            queries, k_cache[window], v_cache[window], None if spans is None else spans[window], causal,
            scale).to(q.dtype)
    return out.reshape(q.shape)
