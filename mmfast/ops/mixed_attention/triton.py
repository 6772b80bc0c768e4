"""Triton kernels of mixed attention (FlashAttention-2 style) over packed sequences.

Layout: q [T, H, D], k/v [T, HK, D] (T = total tokens), cu_seqlens [B + 1], LSE [H, T]. Programs
own one (block of queries of one sequence, head). The mask is never built: per token,
`reach[i]` is the last key i may attend (max(i, last token of its span)) and `first[j]` the
first query that attends key j (min(j, first token of its span)). A (query, key) tile is
- skipped when the keys start past the block's largest reach (empty),
- taken whole when the keys end before the block's first query, or always without
  causality (full),
- masked element by element otherwise (partial): j <= i, or both in one span.
Backward: one kernel over key blocks writes dK and dV (looping over the GQA group's query
heads), one over query blocks writes dQ. No atomics: deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.ops._backend import plans_for_gpu

LOG2E = 1.4426950408889634


@triton.jit
def _allowed(o_m, o_n, span_q, span_k, seq_end, CAUSAL: tl.constexpr):
    """The mask rule inside one sequence, with both bounds."""
    mask = (o_m < seq_end)[:, None] & (o_n < seq_end)[None, :]
    if CAUSAL:
        same_span = (span_q[:, None] >= 0) & (span_q[:, None] == span_k[None, :])
        mask = mask & ((o_n[None, :] <= o_m[:, None]) | same_span)
    return mask


@triton.jit
def _is_full(q_start, k_start, seq_end, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    inside = (k_start + BN <= seq_end) & (q_start + BM <= seq_end)
    if CAUSAL:
        inside = inside & (k_start + BN - 1 <= q_start)
    return inside


@triton.jit
def _load_rows(ptr, o_t, stride_t, head, stride_h, o_d, T_END, D, UPCAST: tl.constexpr):
    block = tl.load(ptr + o_t[:, None].to(tl.int64) * stride_t + head * stride_h + o_d[None, :],
                    mask=(o_t < T_END)[:, None] & (o_d < D)[None, :], other=0.0)
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def _query_reach(span_ptr, reach_ptr, o_m, seq_end, BM: tl.constexpr, CAUSAL: tl.constexpr):
    """The query block's span ids and the end of the keys it may attend."""
    span_q = tl.full((BM,), -1, tl.int32)
    k_end = seq_end
    if CAUSAL:
        m_m = o_m < seq_end
        span_q = tl.load(span_ptr + o_m, mask=m_m, other=-1)
        k_end = tl.minimum(tl.max(tl.load(reach_ptr + o_m, mask=m_m, other=0), 0) + 1, seq_end)
    return span_q, k_end


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, span_ptr, reach_ptr,
                sq_t, sq_h, sk_t, sk_h, so_t, so_h, T, D, qk_scale,
                GROUP: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_m, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_start = tl.load(cu_ptr + i_b)
    seq_end = tl.load(cu_ptr + i_b + 1)
    q_start = seq_start + i_m * BM
    if q_start < seq_end:
        i_hk = i_h // GROUP
        o_m = q_start + tl.arange(0, BM)
        m_m = o_m < seq_end
        o_d = tl.arange(0, BD)
        b_q = _load_rows(q_ptr, o_m, sq_t, i_h, sq_h, o_d, seq_end, D, UPCAST)
        b_max = tl.full((BM,), float("-inf"), tl.float32)
        b_sum = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, BD), tl.float32)
        span_q, k_end = _query_reach(span_ptr, reach_ptr, o_m, seq_end, BM, CAUSAL)
        for k_start in range(seq_start, k_end, BN):
            o_n = k_start + tl.arange(0, BN)
            b_k = _load_rows(k_ptr, o_n, sk_t, i_hk, sk_h, o_d, seq_end, D, UPCAST)
            b_v = _load_rows(v_ptr, o_n, sk_t, i_hk, sk_h, o_d, seq_end, D, UPCAST)
            s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
            if not _is_full(q_start, k_start, seq_end, BM, BN, CAUSAL):
                span_k = tl.load(span_ptr + o_n, mask=o_n < seq_end, other=-2)
                # rows past the sequence (never stored) see every key, so they never turn into NaN
                keep = _allowed(o_m, o_n, span_q, span_k, seq_end, CAUSAL) | (o_m >= seq_end)[:, None]
                s = tl.where(keep, s, float("-inf"))
            new_max = tl.maximum(b_max, tl.max(s, 1))
            p = tl.math.exp2(s - new_max[:, None])
            correction = tl.math.exp2(b_max - new_max)
            b_sum = b_sum * correction + tl.sum(p, 1)
            if UPCAST:
                acc = tl.dot(p, b_v, acc * correction[:, None], input_precision=PRECISION)
            else:
                acc = tl.dot(p.to(b_v.dtype), b_v, acc * correction[:, None], input_precision=PRECISION)
            b_max = new_max
        acc = acc / b_sum[:, None]
        tl.store(o_ptr + o_m[:, None].to(tl.int64) * so_t + i_h * so_h + o_d[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=m_m[:, None] & (o_d < D)[None, :])
        tl.store(lse_ptr + i_h * T + o_m, (b_max + tl.math.log2(b_sum)) / 1.4426950408889634, mask=m_m)


@triton.jit
def _probabilities(b_q, b_k, lse2, o_m, o_n, span_q, span_ptr, q_start, k_start, seq_end, qk_scale,
                   BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed softmax probabilities of one tile, zero where masked."""
    s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if not _is_full(q_start, k_start, seq_end, BM, BN, CAUSAL):
        span_k = tl.load(span_ptr + o_n, mask=o_n < seq_end, other=-2)
        p = tl.where(_allowed(o_m, o_n, span_q, span_k, seq_end, CAUSAL), p, 0.0)
    return p


@triton.jit
def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, span_ptr, first_ptr,
                   sq_t, sq_h, sk_t, sk_h, sdo_t, sdo_h, T, D, qk_scale, scale,
                   GROUP: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_n, i_b, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_start = tl.load(cu_ptr + i_b)
    seq_end = tl.load(cu_ptr + i_b + 1)
    k_start = seq_start + i_n * BN
    if k_start < seq_end:
        o_n = k_start + tl.arange(0, BN)
        m_n = o_n < seq_end
        o_d = tl.arange(0, BD)
        b_k = _load_rows(k_ptr, o_n, sk_t, i_hk, sk_h, o_d, seq_end, D, UPCAST)
        b_v = _load_rows(v_ptr, o_n, sk_t, i_hk, sk_h, o_d, seq_end, D, UPCAST)
        b_dk = tl.zeros((BN, BD), tl.float32)
        b_dv = tl.zeros((BN, BD), tl.float32)
        q_begin = seq_start
        if CAUSAL:
            q_begin = tl.min(tl.load(first_ptr + o_n, mask=m_n, other=2147483647), 0)
        for i_h in range(i_hk * GROUP, i_hk * GROUP + GROUP):
            for q_start in range(q_begin, seq_end, BM):
                o_m = q_start + tl.arange(0, BM)
                m_m = o_m < seq_end
                b_q = _load_rows(q_ptr, o_m, sq_t, i_h, sq_h, o_d, seq_end, D, UPCAST)
                b_do = _load_rows(do_ptr, o_m, sdo_t, i_h, sdo_h, o_d, seq_end, D, UPCAST)
                lse2 = tl.load(lse_ptr + i_h * T + o_m, mask=m_m, other=0.0) * 1.4426950408889634
                delta = tl.load(delta_ptr + i_h * T + o_m, mask=m_m, other=0.0)
                span_q = tl.load(span_ptr + o_m, mask=m_m, other=-1)
                p = _probabilities(b_q, b_k, lse2, o_m, o_n, span_q, span_ptr, q_start, k_start, seq_end, qk_scale,
                                   BM, BN, CAUSAL, PRECISION)
                dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                if UPCAST:
                    b_dv = tl.dot(tl.trans(p), b_do, b_dv, input_precision=PRECISION)
                    b_dk = tl.dot(tl.trans(ds), b_q, b_dk, input_precision=PRECISION)
                else:
                    b_dv = tl.dot(tl.trans(p.to(b_do.dtype)), b_do, b_dv, input_precision=PRECISION)
                    b_dk = tl.dot(tl.trans(ds.to(b_q.dtype)), b_q, b_dk, input_precision=PRECISION)
        out = o_n[:, None].to(tl.int64) * sk_t + i_hk * sk_h + o_d[None, :]
        mask = m_n[:, None] & (o_d < D)[None, :]
        tl.store(dk_ptr + out, (b_dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + out, b_dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_q_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, span_ptr, reach_ptr,
                  sq_t, sq_h, sk_t, sk_h, sdo_t, sdo_h, T, D, qk_scale, scale,
                  GROUP: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_m, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_start = tl.load(cu_ptr + i_b)
    seq_end = tl.load(cu_ptr + i_b + 1)
    q_start = seq_start + i_m * BM
    if q_start < seq_end:
        i_hk = i_h // GROUP
        o_m = q_start + tl.arange(0, BM)
        m_m = o_m < seq_end
        o_d = tl.arange(0, BD)
        b_q = _load_rows(q_ptr, o_m, sq_t, i_h, sq_h, o_d, seq_end, D, UPCAST)
        b_do = _load_rows(do_ptr, o_m, sdo_t, i_h, sdo_h, o_d, seq_end, D, UPCAST)
        lse2 = tl.load(lse_ptr + i_h * T + o_m, mask=m_m, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + i_h * T + o_m, mask=m_m, other=0.0)
        span_q, k_end = _query_reach(span_ptr, reach_ptr, o_m, seq_end, BM, CAUSAL)
        b_dq = tl.zeros((BM, BD), tl.float32)
        for k_start in range(seq_start, k_end, BN):
            o_n = k_start + tl.arange(0, BN)
            b_k = _load_rows(k_ptr, o_n, sk_t, i_hk, sk_h, o_d, seq_end, D, UPCAST)
            b_v = _load_rows(v_ptr, o_n, sk_t, i_hk, sk_h, o_d, seq_end, D, UPCAST)
            p = _probabilities(b_q, b_k, lse2, o_m, o_n, span_q, span_ptr, q_start, k_start, seq_end, qk_scale,
                               BM, BN, CAUSAL, PRECISION)
            dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if UPCAST:
                b_dq = tl.dot(ds, b_k, b_dq, input_precision=PRECISION)
            else:
                b_dq = tl.dot(ds.to(b_k.dtype), b_k, b_dq, input_precision=PRECISION)
        tl.store(dq_ptr + o_m[:, None].to(tl.int64) * sq_t + i_h * sq_h + o_d[None, :],
                 (b_dq * scale).to(dq_ptr.dtype.element_ty), mask=m_m[:, None] & (o_d < D)[None, :])


def _config(dtype: torch.dtype, device: torch.device, head_dim: int, backward: bool) -> dict:
    interpreting = not plans_for_gpu(device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if interpreting:
        return dict(BM=32, BN=32, BD=block_d, UPCAST=dtype == torch.bfloat16, PRECISION=precision, num_warps=4,
                    num_stages=1)
    # Tile sizes and warps that ptxas compiles without spilling to local memory for sm_80 and sm_90
    # (`mmfast bench compile` reports registers and spills): the [BN, BD] dK and dV accumulators of the
    # backward and the [BM, BD] output accumulator of the forward must stay in registers, so wider
    # heads take smaller tiles or more warps.
    if backward:  # (BM = BN, warps) by head dim; both backward kernels share them
        size, warps = {16: (64, 4), 32: (64, 4), 64: (32, 4), 128: (32, 8), 256: (16, 8)}[block_d]
        return dict(BM=size, BN=size, BD=block_d, UPCAST=False, PRECISION=precision, num_warps=warps, num_stages=2)
    bm, bn, warps, stages = {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 3),
                             256: (32, 32, 8, 2)}[block_d]
    return dict(BM=bm, BN=bn, BD=block_d, UPCAST=False, PRECISION=precision, num_warps=warps, num_stages=stages)


def _launch_options(c):
    return dict(BM=c["BM"], BN=c["BN"], BD=c["BD"], UPCAST=c["UPCAST"], PRECISION=c["PRECISION"],
                num_warps=c["num_warps"], num_stages=c["num_stages"])


def forward(q, k, v, packing, scale: float):
    """q [T, H, D], k/v [T, HK, D] (last dim contiguous); returns (out [T, H, D], lse [H, T] fp32)."""
    T, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    c = _config(q.dtype, q.device, D, backward=False)
    grid = (triton.cdiv(packing.max_seqlen, c["BM"]), packing.batch, H)
    _fwd_kernel[grid](q, k, v, out, lse, packing.cu_seqlens, packing.span_ids, packing.reach,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), T, D,
                      scale * LOG2E, GROUP=H // k.shape[1], CAUSAL=packing.causal, **_launch_options(c))
    return out, lse


def backward(q, k, v, out, lse, grad_out, packing, scale: float):
    """q [T, H, D], k/v [T, HK, D], out [T, H, D], lse [H, T] fp32, grad_out [T, H, D] -> (dq, dk, dv)
    shaped as q, k, v (dk, dv summed over the query heads sharing a key head)."""
    T, H, D = q.shape
    HK = k.shape[1]
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).T.contiguous()  # [H, T]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    c = _config(q.dtype, q.device, D, backward=True)
    common = (T, D, scale * LOG2E, scale)
    options = dict(GROUP=H // HK, CAUSAL=packing.causal, **_launch_options(c))
    _bwd_kv_kernel[(triton.cdiv(packing.max_seqlen, c["BN"]), packing.batch, HK)](
        q, k, v, grad_out, lse, delta, dk, dv, packing.cu_seqlens, packing.span_ids, packing.first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), grad_out.stride(0), grad_out.stride(1), *common,
        **options)
    _bwd_q_kernel[(triton.cdiv(packing.max_seqlen, c["BM"]), packing.batch, H)](
        q, k, v, grad_out, lse, delta, dq, packing.cu_seqlens, packing.span_ids, packing.reach,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), grad_out.stride(0), grad_out.stride(1), *common,
        **options)
    return dq, dk, dv
