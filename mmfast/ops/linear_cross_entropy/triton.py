"""Triton kernels of the linear cross-entropy.

Z = hidden @ weight^T is only ever held as one [BT, BV] fp32 tile in registers (forward) or as a
bounded block of dLoss/dZ in the inputs' dtype (backward).

Forward: programs over (token block, vocab split) sweep their split's vocab blocks and keep, per
token, an online (max, sum of exp), the target's logit and (with label smoothing) the sum of the
logits; a small torch reduction merges the splits. No atomics: deterministic.
Backward (Cut Cross-Entropy's recompute, chunked over the vocabulary): a kernel recomputes the tiles
of one vocabulary chunk and writes dLoss/dZ for every token, then cuBLAS multiplies it out:
d_weight[chunk] = dZ^T @ hidden in one product (exact accumulation in the GEMM), d_hidden +=
dZ @ weight[chunk] in a float32 [T, D] buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.ops._backend import multiprocessor_count, plans_for_gpu

NEG = tl.constexpr(-1.0e30)  # stands for -inf in masked tiles without producing NaN in (x - max)
CHUNK_ELEMENTS = 1 << 26  # dLoss/dZ held at a time: 128 MiB in bf16


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, o_t, o_v, T, V, v_end, D, stride_h, stride_w, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, BT: tl.constexpr,
                BV: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BT, BV] tile of (softcapped) logits, and tanh(z / softcap) for the gradient. Rows past T
    and V are read wrapped around (as Triton's matmul tutorial does: no row masks in the loop) and
    must be masked by the caller."""
    o_d = tl.arange(0, BD)
    p_h = h_ptr + (o_t % T).to(tl.int64)[:, None] * stride_h + o_d[None, :]
    p_w = w_ptr + (o_v % V).to(tl.int64)[:, None] * stride_w + o_d[None, :]
    acc = tl.zeros((BT, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        if EVEN_D:
            b_h = tl.load(p_h)
            b_w = tl.load(p_w)
        else:
            m_d = (d0 + o_d) < D
            b_h = tl.load(p_h, mask=m_d[None, :], other=0.0)
            b_w = tl.load(p_w, mask=m_d[None, :], other=0.0)
        if UPCAST:
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        acc = tl.dot(b_h, tl.trans(b_w), acc, input_precision=PRECISION)
        p_h += BD
        p_w += BD
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_v, mask=o_v < v_end, other=0.0).to(tl.float32)[None, :]
    squashed = acc
    if SOFTCAP:
        squashed = 2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0  # tanh(z / softcap)
        acc = softcap * squashed
    return acc, squashed


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, max_ptr, sum_ptr, target_ptr, total_ptr,
                T, V, D, stride_h, stride_w, v_per_split, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, EVEN_D: tl.constexpr,
                BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_y = tl.load(y_ptr + o_t, mask=m_t, other=-1)
    b_max = tl.full((BT,), NEG, tl.float32)
    b_sum = tl.zeros((BT,), tl.float32)
    b_target = tl.zeros((BT,), tl.float32)
    b_total = tl.zeros((BT,), tl.float32)
    v_start = i_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < v_end
        z, _ = _logit_tile(h_ptr, w_ptr, b_ptr, o_t, o_v, T, V, v_end, D, stride_h, stride_w, softcap,
                           HAS_BIAS, SOFTCAP, EVEN_D, BT, BV, BD, UPCAST, PRECISION)
        b_target += tl.sum(tl.where(o_v[None, :] == b_y[:, None], z, 0.0), 1)
        if SMOOTHING:
            b_total += tl.sum(tl.where(m_v[None, :], z, 0.0), 1)
        z = tl.where(m_v[None, :], z, NEG)
        new_max = tl.maximum(b_max, tl.max(z, 1))
        b_sum = b_sum * tl.exp(b_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
        b_max = new_max
    o_out = i_s * T + o_t
    tl.store(max_ptr + o_out, b_max, mask=m_t)
    tl.store(sum_ptr + o_out, b_sum, mask=m_t)
    tl.store(target_ptr + o_out, b_target, mask=m_t)
    if SMOOTHING:
        tl.store(total_ptr + o_out, b_total, mask=m_t)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr,
                        T, V, D, stride_h, stride_w, v_start, v_end, softcap, smoothing,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
                        BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dZ for tokens x [v_start, v_end): g * (softmax - (1 - smoothing) * one_hot - smoothing / V),
    through the softcap, in dz's dtype (g is the token's gradient over the largest one, in [-1, 1])."""
    i_t = tl.program_id(0)
    i_v = tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = v_start + i_v * BV + tl.arange(0, BV)
    m_t = o_t < T
    m_v = o_v < v_end
    z, squashed = _logit_tile(h_ptr, w_ptr, b_ptr, o_t, o_v, T, V, v_end, D, stride_h, stride_w, softcap,
                              HAS_BIAS, SOFTCAP, EVEN_D, BT, BV, BD, UPCAST, PRECISION)
    b_lse = tl.load(lse_ptr + o_t, mask=m_t, other=0.0)
    b_g = tl.load(g_ptr + o_t, mask=m_t, other=0.0)
    b_y = tl.load(y_ptr + o_t, mask=m_t, other=-1)
    dz = tl.exp(z - b_lse[:, None]) - tl.where(o_v[None, :] == b_y[:, None], 1.0 - smoothing, 0.0) - smoothing / V
    dz = dz * b_g[:, None]
    if SOFTCAP:
        dz = dz * (1.0 - squashed * squashed)
    p_dz = dz_ptr + o_t.to(tl.int64)[:, None] * (v_end - v_start) + (o_v - v_start)[None, :]
    tl.store(p_dz, dz.to(dz_ptr.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers. Inputs arrive validated, 2-D, contiguous, of one dtype; labels int64 (int32 in the kernels:
# V < 2^31, and [BT, BV] comparisons of int64 would cost registers).


def config(hidden: torch.Tensor) -> dict:
    """Tile sizes and flags for hidden's dtype. Fixed (autotune fails in the interpreter)."""
    interpreting = not plans_for_gpu(hidden.device)
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    if interpreting:
        # Few large tiles: the interpreter's cost is per operation, not per element. It also gets
        # bf16 arithmetic wrong: upcast right after loading there.
        full_d = max(16, triton.next_power_of_2(hidden.shape[1]))
        return dict(BT=32, BV=128, BD=min(full_d, 128), UPCAST=hidden.dtype == torch.bfloat16,
                    PRECISION=precision, num_warps=4, num_stages=1)
    wide = hidden.dtype != torch.float32
    return dict(BT=64, BV=128 if wide else 64, BD=64 if wide else 32, UPCAST=False, PRECISION=precision,
                num_warps=8, num_stages=3 if wide else 2)


def _splits(device: torch.device, token_blocks: int, vocab_blocks: int) -> int:
    """Vocabulary splits that give the forward grid about four programs per SM."""
    if not plans_for_gpu(device):
        return 1
    return max(1, min(vocab_blocks, triton.cdiv(4 * multiprocessor_count(device), token_blocks)))


def _flags(hidden, bias, options, c: dict) -> dict:
    return dict(HAS_BIAS=bias is not None, SOFTCAP=options.logit_softcap is not None,
                EVEN_D=hidden.shape[1] % c["BD"] == 0,
                BT=c["BT"], BV=c["BV"], BD=c["BD"], UPCAST=c["UPCAST"], PRECISION=c["PRECISION"],
                num_warps=c["num_warps"], num_stages=c["num_stages"])


def forward(hidden, weight, bias, labels, options):
    """(losses [T], lse [T]) in float32; losses are 0 on ignored labels."""
    T, D = hidden.shape
    V = weight.shape[0]
    c = config(hidden)
    token_blocks, vocab_blocks = triton.cdiv(T, c["BT"]), triton.cdiv(V, c["BV"])
    splits = _splits(hidden.device, token_blocks, vocab_blocks)
    per_split = triton.cdiv(vocab_blocks, splits) * c["BV"]
    splits = triton.cdiv(V, per_split)
    parts = [torch.empty((splits, T), device=hidden.device, dtype=torch.float32) for _ in range(4)]
    softcap = options.logit_softcap or 1.0
    smoothing = options.label_smoothing
    _fwd_kernel[(token_blocks, splits)](
        hidden, weight, hidden if bias is None else bias, labels.int(), *parts, T, V, D, hidden.stride(0),
        weight.stride(0), per_split, softcap, SMOOTHING=smoothing > 0, **_flags(hidden, bias, options, c))
    maxima, sums, targets, totals = parts
    top = maxima.amax(dim=0)
    lse = top + (sums * torch.exp(maxima - top)).sum(dim=0).log()
    losses = lse - (1.0 - smoothing) * targets.sum(dim=0)
    if smoothing > 0:
        losses -= smoothing * totals.sum(dim=0) / V
    return torch.where(labels != options.ignore_index, losses, 0.0), lse


def backward(hidden, weight, bias, labels, lse, grad, options, needs=(True, True, True)):
    """(d_hidden, d_weight, d_bias) of sum(grad * losses), each None where `needs` says it is not wanted
    (a frozen head); grad [T] float32, 0 on ignored rows."""
    T, D = hidden.shape
    V = weight.shape[0]
    c = config(hidden)
    # dZ is stored in the inputs' dtype, scaled into [-1, 1] by the largest token gradient: fp16 does
    # not overflow, and the small gradients of a mean over many tokens are not lost.
    norm = grad.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    grad = grad / norm
    d_hidden = torch.zeros((T, D), device=hidden.device, dtype=torch.float32) if needs[0] else None
    d_weight = torch.empty_like(weight) if needs[1] else None
    d_bias = torch.empty(V, device=hidden.device, dtype=torch.float32) if bias is not None and needs[2] else None
    columns = max(c["BV"], CHUNK_ELEMENTS // max(T, 1) // c["BV"] * c["BV"])
    labels32 = labels.int()
    for start in range(0, V, columns):
        end = min(start + columns, V)
        d_logits = torch.empty((T, end - start), device=hidden.device, dtype=hidden.dtype)
        grid = (triton.cdiv(T, c["BT"]), triton.cdiv(end - start, c["BV"]))
        _grad_logits_kernel[grid](
            hidden, weight, hidden if bias is None else bias, labels32, lse, grad, d_logits, T, V, D,
            hidden.stride(0), weight.stride(0), start, end, options.logit_softcap or 1.0,
            options.label_smoothing, **_flags(hidden, bias, options, c))
        if d_weight is not None:
            d_weight[start:end] = torch.mm(d_logits.T, hidden).mul_(norm.to(hidden.dtype))
        if d_hidden is not None:
            d_hidden += torch.mm(d_logits, weight[start:end]).float()
        if d_bias is not None:
            d_bias[start:end] = d_logits.float().sum(dim=0)
    return (None if d_hidden is None else (d_hidden * norm).to(hidden.dtype), d_weight,
            None if d_bias is None else (d_bias * norm).to(bias.dtype))
