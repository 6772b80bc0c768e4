"""Triton kernel of mixed attention for generation: a few new queries per sequence against a long KV
cache (FlashDecoding: the keys are split across programs, so a batch of one still fills the GPU).

Programs own (sequence, KV head, block of query rows, key split). A block's rows are the GQA group's
query heads times the sequence's new queries, so each key tile is loaded once for the whole group.
Each program keeps an online softmax over its split and writes unnormalized partial outputs with
their (max, sum) in log2 units; a small torch reduction merges the splits. The rule is the one of
ARCHITECTURE.md: query t of a sequence sits at key position k_count - q_count + t (the new tokens
are the last of the cache) and sees key j iff j <= its position, or both lie in one span.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.ops._backend import multiprocessor_count, plans_for_gpu

LOG2E = 1.4426950408889634
NEG = tl.constexpr(-1.0e30)  # stands for -inf without producing NaN in (x - max)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr, q_first_ptr, q_count_ptr, k_first_ptr, k_count_ptr,
                   out_first_ptr, span_ptr,
                   sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, ss_b,
                   KV_HEADS, ROWS_TOTAL, HEADS, D, TQ, keys_per_split, qk_scale,
                   GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_bh, i_m, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // KV_HEADS
    i_hk = i_bh % KV_HEADS
    q_first = tl.load(q_first_ptr + i_b)
    q_count = tl.load(q_count_ptr + i_b)
    k_first = tl.load(k_first_ptr + i_b)
    k_count = tl.load(k_count_ptr + i_b)
    out_first = tl.load(out_first_ptr + i_b)
    o_r = i_m * BM + tl.arange(0, BM)
    o_g = o_r // TQ  # the row's query head inside the group
    o_t = o_r % TQ  # the row's query
    m_r = (o_g < GROUP) & (o_t < q_count)
    head = i_hk * GROUP + o_g
    position = k_count - q_count + o_t  # the query's place among the keys
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = tl.load(q_ptr + i_b.to(tl.int64) * sq_b + (q_first + o_t).to(tl.int64)[:, None] * sq_t
                  + head[:, None] * sq_h + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    span_q = tl.full((BM,), -1, tl.int32)
    if CAUSAL and HAS_SPANS:
        span_q = tl.load(span_ptr + i_b.to(tl.int64) * ss_b + k_first + position, mask=m_r, other=-1)
    b_max = tl.full((BM,), NEG, tl.float32)
    b_sum = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    n_start = i_s * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, k_count)
    for n0 in range(n_start, n_end, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_end
        o_key = (k_first + o_n).to(tl.int64)
        b_k = tl.load(k_ptr + i_b.to(tl.int64) * sk_b + o_key[:, None] * sk_t + i_hk * sk_h + o_d[None, :],
                      mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_v = tl.load(v_ptr + i_b.to(tl.int64) * sv_b + o_key[:, None] * sv_t + i_hk * sv_h + o_d[None, :],
                      mask=m_n[:, None] & m_d[None, :], other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        mask = m_r[:, None] & m_n[None, :]
        if CAUSAL:
            visible = o_n[None, :] <= position[:, None]
            if HAS_SPANS:
                span_k = tl.load(span_ptr + i_b.to(tl.int64) * ss_b + k_first + o_n, mask=m_n, other=-2)
                visible = visible | ((span_q[:, None] >= 0) & (span_q[:, None] == span_k[None, :]))
            mask = mask & visible
        s = tl.where(mask, s, NEG)
        new_max = tl.maximum(b_max, tl.max(s, 1))
        p = tl.where(mask, tl.exp2(s - new_max[:, None]), 0.0)
        alpha = tl.exp2(b_max - new_max)
        b_sum = b_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_max = new_max
    o_row = (i_s * ROWS_TOTAL + out_first + o_t).to(tl.int64) * HEADS + head
    tl.store(o_ptr + o_row[:, None] * D + o_d[None, :], acc, mask=m_r[:, None] & m_d[None, :])
    tl.store(m_ptr + o_row, b_max, mask=m_r)
    tl.store(l_ptr + o_row, b_sum, mask=m_r)


def _config(dtype: torch.dtype, device: torch.device, head_dim: int, rows: int) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if not plans_for_gpu(device):  # the interpreter: few large tiles, bf16 upcast (it gets bf16 math wrong)
        return dict(BM=min(64, max(16, triton.next_power_of_2(rows))), BN=64, BD=block_d,
                    UPCAST=dtype == torch.bfloat16, PRECISION=precision, num_warps=4, num_stages=1)
    # Sizes that ptxas compiles without spilling for sm_80 and sm_90 (mmfast bench compile): the
    # [BM, BD] accumulator and query block stay in registers, so head dim 256 takes half the rows and
    # a 16-key tile, and blocks of more than 16 rows take 8 warps.
    block_m = min(64 if block_d <= 128 else 32, max(16, triton.next_power_of_2(rows)))
    return dict(BM=block_m, BN=32 if block_d <= 128 else 16, BD=block_d, UPCAST=False, PRECISION=precision,
                num_warps=4 if block_m == 16 else 8, num_stages=2)


def decode(q, k, v, rows, spans, causal: bool, scale: float, num_splits: int | None):
    """q [B, Tq, H, D] or [total_q, H, D], k/v likewise with HK heads (any strides, unit last one);
    rows: the per-sequence tables of __init__._decode_rows. Returns out [rows_total, H, D] in q's dtype."""
    (q_first, q_count, k_first, k_count, out_first, most_queries, most_keys, rows_total) = rows
    padded = q.dim() == 4  # padded rows step by the batch stride, packed ones by their first token
    strides_b = (q.stride(0), k.stride(0), v.stride(0), spans.stride(0) if spans is not None else 0) if padded \
        else (0, 0, 0, 0)
    heads, kv_heads, D = q.shape[-2], k.shape[-2], q.shape[-1]
    group = heads // kv_heads
    batch = q_first.shape[0]
    c = _config(q.dtype, q.device, D, group * most_queries)
    row_blocks = triton.cdiv(group * most_queries, c["BM"])
    key_blocks = max(1, triton.cdiv(most_keys, c["BN"]))
    if num_splits is None:
        programs = batch * kv_heads * row_blocks
        num_splits = max(1, min(key_blocks, triton.cdiv(2 * multiprocessor_count(q.device), programs))) \
            if plans_for_gpu(q.device) else 1
    keys_per_split = triton.cdiv(key_blocks, num_splits) * c["BN"]
    num_splits = max(1, triton.cdiv(most_keys, keys_per_split))
    partial = torch.empty((num_splits, rows_total, heads, D), device=q.device, dtype=torch.float32)
    maxima = torch.empty((num_splits, rows_total, heads), device=q.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    span_ptr = spans if spans is not None else q_first
    _decode_kernel[(batch * kv_heads, row_blocks, num_splits)](
        q, k, v, partial, maxima, sums, q_first, q_count, k_first, k_count, out_first, span_ptr,
        strides_b[0], q.stride(-3), q.stride(-2), strides_b[1], k.stride(-3), k.stride(-2),
        strides_b[2], v.stride(-3), v.stride(-2), strides_b[3],
        kv_heads, rows_total, heads, D, most_queries, keys_per_split, scale * LOG2E,
        GROUP=group, CAUSAL=causal, HAS_SPANS=spans is not None, BM=c["BM"], BN=c["BN"], BD=c["BD"],
        UPCAST=c["UPCAST"], PRECISION=c["PRECISION"], num_warps=c["num_warps"], num_stages=c["num_stages"])
    top = maxima.amax(dim=0)
    weights = torch.exp2(maxima - top)
    out = (partial * weights[..., None]).sum(dim=0) / (sums * weights).sum(dim=0)[..., None]
    return out.to(q.dtype)
