"""Triton kernels of the contrastive losses.

S = scale * A @ B^T is only ever held as one [BM, BN] fp32 tile in registers.

Forward, InfoNCE: row-block programs sweep every column block once and, from the
same tile, update the row log-sum-exp (online, in registers) and the column
log-sum-exp (a running (max, sum) pair per column in the program's own slice of a
[programs, N] buffer; a small torch reduction merges the slices). No atomics, so the
result is deterministic.
Forward, SigLIP: row-block programs sum softplus(-y * z) per row.
Backward (both losses), D <= 256: one kernel over row blocks writes dA and the scale
and bias gradient partials, one over column blocks writes dB; each recomputes the
tiles and keeps a [block, D] accumulator in registers.
Backward, wider D (where that accumulator does not fit): dLoss/dLogits is recomputed
into a bounded block of rows (then of columns) and multiplied by cuBLAS; see
_backward_by_chunks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.ops._backend import multiprocessor_count, plans_for_gpu

NEG = tl.constexpr(-1.0e30)  # stands for -inf in masked tiles without producing NaN in (x - max)
FUSED_BACKWARD_MAX_D = 256  # wider features take _backward_by_chunks
DS_CHUNK_ELEMENTS = 1 << 27  # 256 MiB of bf16 dLoss/dLogits at a time


@triton.jit
def _raw_tile(a_ptr, b_ptr, o_m, o_n, M, N, D, stride_a, stride_b,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BM, BN] tile of dot products a[o_m] . b[o_n] (zeros outside M, N)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_a = tl.load(a_ptr + o_m[:, None] * stride_a + o_d[None, :],
                      mask=(o_m[:, None] < M) & m_d[None, :], other=0.0)
        b_b = tl.load(b_ptr + o_n[:, None] * stride_b + o_d[None, :],
                      mask=(o_n[:, None] < N) & m_d[None, :], other=0.0)
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        acc = tl.dot(b_a, tl.trans(b_b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _siglip_signs(o_m, o_n, positive_offset, NEGATIVE_ONLY: tl.constexpr):
    """+1 where column o_n is row o_m's positive (o_n == o_m + offset), -1 elsewhere."""
    positive = o_n[None, :] == o_m[:, None] + positive_offset
    if NEGATIVE_ONLY:
        positive = positive & (o_n[None, :] < 0)  # never true: every pair negative
    return tl.where(positive, 1.0, -1.0)


@triton.jit
def _lse_fwd_kernel(a_ptr, b_ptr, scale_ptr, row_lse_ptr, col_max_ptr, col_sum_ptr,
                    M, N, D, stride_a, stride_b, num_programs,
                    COLUMNS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_p = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    for i_m in range(i_p, tl.cdiv(M, BM), num_programs):
        o_m = i_m * BM + tl.arange(0, BM)
        m_m = o_m < M
        b_max = tl.full((BM,), NEG, tl.float32)
        b_sum = tl.zeros((BM,), tl.float32)
        for n0 in range(0, N, BN):
            o_n = n0 + tl.arange(0, BN)
            m_n = o_n < N
            s = _raw_tile(a_ptr, b_ptr, o_m, o_n, M, N, D, stride_a, stride_b, BM, BN, BD, UPCAST, PRECISION)
            s = tl.where(m_m[:, None] & m_n[None, :], s * scale, NEG)
            new_max = tl.maximum(b_max, tl.max(s, 1))
            b_sum = b_sum * tl.exp(b_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
            b_max = new_max
            if COLUMNS:
                t_max = tl.max(s, 0)
                t_sum = tl.sum(tl.exp(s - t_max[None, :]), 0)
                p_max = col_max_ptr + i_p * N + o_n
                p_sum = col_sum_ptr + i_p * N + o_n
                old_max = tl.load(p_max, mask=m_n, other=NEG)
                old_sum = tl.load(p_sum, mask=m_n, other=0.0)
                merged = tl.maximum(old_max, t_max)
                tl.store(p_sum, old_sum * tl.exp(old_max - merged) + t_sum * tl.exp(t_max - merged), mask=m_n)
                tl.store(p_max, merged, mask=m_n)
        tl.store(row_lse_ptr + o_m, b_max + tl.log(b_sum), mask=m_m)


@triton.jit
def _siglip_fwd_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, row_loss_ptr,
                       M, N, D, stride_a, stride_b, positive_offset,
                       NEGATIVE_ONLY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_m = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    b_loss = tl.zeros((BM,), tl.float32)
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < N
        z = _raw_tile(a_ptr, b_ptr, o_m, o_n, M, N, D, stride_a, stride_b, BM, BN, BD, UPCAST, PRECISION)
        z = z * scale + bias
        y = _siglip_signs(o_m, o_n, positive_offset, NEGATIVE_ONLY)
        loss = tl.where(m_m[:, None] & m_n[None, :], _softplus(-y * z), 0.0)
        b_loss += tl.sum(loss, 1)
    tl.store(row_loss_ptr + o_m, b_loss, mask=m_m)


@triton.jit
def _grad_tile(raw, o_m, o_n, M, N, scale, bias, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, g_loss,
               positive_offset, SIGLIP: tl.constexpr, NEGATIVE_ONLY: tl.constexpr, COLUMNS: tl.constexpr):
    """dLoss/dLogits for one tile; zero outside [M, N]."""
    m_m = o_m < M
    m_n = o_n < N
    if SIGLIP:
        z = raw * scale + bias
        y = _siglip_signs(o_m, o_n, positive_offset, NEGATIVE_ONLY)
        # d softplus(-y z) / dz = -y * sigmoid(-y z)
        ds = -y * g_loss / (1.0 + tl.exp(y * z))
    else:
        s = raw * scale
        row_lse = tl.load(row_lse_ptr + o_m, mask=m_m, other=0.0)
        g_row = tl.load(g_row_ptr + o_m, mask=m_m, other=0.0)
        ds = g_row[:, None] * tl.exp(s - row_lse[:, None])
        if COLUMNS:
            col_lse = tl.load(col_lse_ptr + o_n, mask=m_n, other=0.0)
            g_col = tl.load(g_col_ptr + o_n, mask=m_n, other=0.0)
            ds += g_col[None, :] * tl.exp(s - col_lse[None, :])
    return tl.where(m_m[:, None] & m_n[None, :], ds, 0.0)


@triton.jit
def _bwd_rows_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
                     g_loss_ptr, norm_ptr, da_ptr, dscale_ptr, dbias_ptr,
                     M, N, D, stride_a, stride_b, positive_offset,
                     SIGLIP: tl.constexpr, NEGATIVE_ONLY: tl.constexpr, COLUMNS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dA for one row block over all of D (D <= BDO), and that block's scale and bias gradient."""
    i_m = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    g_loss = tl.load(g_loss_ptr).to(tl.float32)
    norm = tl.load(norm_ptr)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BDO)
    m_d = o_d < D
    b_da = tl.zeros((BM, BDO), tl.float32)
    b_dscale = tl.zeros((BM,), tl.float32)
    b_dbias = tl.zeros((BM,), tl.float32)
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        raw = _raw_tile(a_ptr, b_ptr, o_m, o_n, M, N, D, stride_a, stride_b, BM, BN, BD, UPCAST, PRECISION)
        ds = _grad_tile(raw, o_m, o_n, M, N, scale, bias, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
                        g_loss, positive_offset, SIGLIP, NEGATIVE_ONLY, COLUMNS)
        b_b = tl.load(b_ptr + o_n[:, None] * stride_b + o_d[None, :], mask=(o_n[:, None] < N) & m_d[None, :],
                      other=0.0)
        # ds / norm lies in [-2, 2]: no fp16 underflow when ds is cast for the tensor cores.
        if UPCAST:
            b_da = tl.dot(ds / norm, b_b.to(tl.float32), b_da, input_precision=PRECISION)
        else:
            b_da = tl.dot((ds / norm).to(b_b.dtype), b_b, b_da, input_precision=PRECISION)
        b_dscale += tl.sum(ds * raw, 1)
        b_dbias += tl.sum(ds, 1)
    tl.store(da_ptr + o_m[:, None] * D + o_d[None, :], (b_da * (scale * norm)).to(da_ptr.dtype.element_ty),
             mask=(o_m[:, None] < M) & m_d[None, :])
    tl.store(dscale_ptr + i_m, tl.sum(b_dscale, 0))
    tl.store(dbias_ptr + i_m, tl.sum(b_dbias, 0))


@triton.jit
def _bwd_cols_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
                     g_loss_ptr, norm_ptr, db_ptr,
                     M, N, D, stride_a, stride_b, positive_offset,
                     SIGLIP: tl.constexpr, NEGATIVE_ONLY: tl.constexpr, COLUMNS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dB for one column block over all of D (D <= BDO)."""
    i_n = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    g_loss = tl.load(g_loss_ptr).to(tl.float32)
    norm = tl.load(norm_ptr)
    o_n = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, BDO)
    m_d = o_d < D
    b_db = tl.zeros((BN, BDO), tl.float32)
    for m0 in range(0, M, BM):
        o_m = m0 + tl.arange(0, BM)
        raw = _raw_tile(a_ptr, b_ptr, o_m, o_n, M, N, D, stride_a, stride_b, BM, BN, BD, UPCAST, PRECISION)
        ds = _grad_tile(raw, o_m, o_n, M, N, scale, bias, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
                        g_loss, positive_offset, SIGLIP, NEGATIVE_ONLY, COLUMNS)
        b_a = tl.load(a_ptr + o_m[:, None] * stride_a + o_d[None, :], mask=(o_m[:, None] < M) & m_d[None, :],
                      other=0.0)
        if UPCAST:
            b_db = tl.dot(tl.trans(ds / norm), b_a.to(tl.float32), b_db, input_precision=PRECISION)
        else:
            b_db = tl.dot(tl.trans((ds / norm).to(b_a.dtype)), b_a, b_db, input_precision=PRECISION)
    tl.store(db_ptr + o_n[:, None] * D + o_d[None, :], (b_db * (scale * norm)).to(db_ptr.dtype.element_ty),
             mask=(o_n[:, None] < N) & m_d[None, :])


@triton.jit
def _grad_logits_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
                        g_loss_ptr, norm_ptr, ds_ptr, dscale_ptr, dbias_ptr,
                        row_start, row_end, col_start, col_end, D, stride_a, stride_b, positive_offset,
                        SIGLIP: tl.constexpr, NEGATIVE_ONLY: tl.constexpr, COLUMNS: tl.constexpr,
                        SUMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dLoss/dLogits / norm for the block [row_start, row_end) x [col_start, col_end), in ds's dtype."""
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    g_loss = tl.load(g_loss_ptr).to(tl.float32)
    norm = tl.load(norm_ptr)
    o_m = row_start + i_m * BM + tl.arange(0, BM)
    o_n = col_start + i_n * BN + tl.arange(0, BN)
    raw = _raw_tile(a_ptr, b_ptr, o_m, o_n, row_end, col_end, D, stride_a, stride_b, BM, BN, BD, UPCAST,
                    PRECISION)
    ds = _grad_tile(raw, o_m, o_n, row_end, col_end, scale, bias, row_lse_ptr, col_lse_ptr, g_row_ptr,
                    g_col_ptr, g_loss, positive_offset, SIGLIP, NEGATIVE_ONLY, COLUMNS)
    cols = col_end - col_start
    p_ds = ds_ptr + (o_m - row_start)[:, None] * cols + (o_n - col_start)[None, :]
    tl.store(p_ds, (ds / norm).to(ds_ptr.dtype.element_ty), mask=(o_m[:, None] < row_end) & (o_n[None, :] < col_end))
    if SUMS:
        i_tile = i_m * tl.num_programs(1) + i_n
        tl.store(dscale_ptr + i_tile, tl.sum(tl.sum(ds * raw, 1), 0))
        tl.store(dbias_ptr + i_tile, tl.sum(tl.sum(ds, 1), 0))


# ---------------------------------------------------------------------------------------------
# Launchers. Inputs arrive validated, 2-D, contiguous, of one dtype; scale and bias are 0-d.


def _config(a: torch.Tensor) -> dict:
    """Tile sizes and flags for a's dtype and D. Fixed (autotune fails in the interpreter)."""
    D = a.shape[1]
    interpreting = not plans_for_gpu(a.device)
    # The interpreter gets bf16 arithmetic wrong: upcast right after loading there.
    upcast = interpreting and a.dtype == torch.bfloat16
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    full_d = max(16, triton.next_power_of_2(D))
    if interpreting:
        # Few large tiles: the interpreter's cost is per operation, not per element.
        return dict(BM=64, BN=64, BD=min(full_d, 256), UPCAST=upcast,
                    PRECISION=precision, num_warps=4, num_stages=1, fwd_bm=64)
    wide = a.dtype != torch.float32
    # 32 columns per tile for fp16/bf16: ptxas compiles every kernel without spilling for sm_80 and
    # sm_90 (64 spilled up to 40 bytes per thread in the D <= 256 backward on sm_80; `mmfast bench compile`).
    return dict(BM=64, BN=32 if wide else 64, BD=64 if wide else 32, UPCAST=False,
                PRECISION=precision, num_warps=8, num_stages=2, fwd_bm=128 if wide else 64)


def _program_count(device: torch.device, row_blocks: int) -> int:
    if not plans_for_gpu(device):
        return row_blocks
    return min(row_blocks, 2 * multiprocessor_count(device))


def lse_forward(a, b, scale, columns: bool):
    """Row and column log-sum-exp of scale * a @ b.T as fp32 [M] and [N] ([0] without columns)."""
    M, D = a.shape
    N = b.shape[0]
    c = _config(a)
    row_lse = torch.empty(M, device=a.device, dtype=torch.float32)
    programs = _program_count(a.device, triton.cdiv(M, c["fwd_bm"]))
    slices = programs if columns else 1
    col_max = torch.full((slices, N), float("-inf"), device=a.device, dtype=torch.float32)
    col_sum = torch.zeros((slices, N), device=a.device, dtype=torch.float32)
    _lse_fwd_kernel[(programs,)](
        a, b, scale, row_lse, col_max, col_sum, M, N, D, a.stride(0), b.stride(0), programs,
        COLUMNS=columns, BM=c["fwd_bm"], BN=c["BN"], BD=c["BD"], UPCAST=c["UPCAST"], PRECISION=c["PRECISION"],
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    if not columns:
        return row_lse, row_lse.new_empty(0)
    return row_lse, torch.logsumexp(col_max + col_sum.log(), dim=0)


def siglip_forward(a, b, scale, bias, positive_offset: int | None):
    """Sum over columns of softplus(-y * (scale * a @ b.T + bias)) per row, fp32 [M]."""
    M, D = a.shape
    N = b.shape[0]
    c = _config(a)
    row_loss = torch.empty(M, device=a.device, dtype=torch.float32)
    _siglip_fwd_kernel[(triton.cdiv(M, c["fwd_bm"]),)](
        a, b, scale, bias, row_loss, M, N, D, a.stride(0), b.stride(0), positive_offset or 0,
        NEGATIVE_ONLY=positive_offset is None, BM=c["fwd_bm"], BN=c["BN"], BD=c["BD"],
        UPCAST=c["UPCAST"], PRECISION=c["PRECISION"], num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return row_loss


def _backward(a, b, scale, bias, row_lse, col_lse, g_row, g_col, g_loss, norm, positive_offset, siglip,
              columns):
    """(da, db, dscale, dbias). norm bounds |dLoss/dLogits| so that it can be cast to fp16."""
    M, D = a.shape
    N = b.shape[0]
    c = _config(a)
    inputs = (a, b, scale, bias, row_lse, col_lse, g_row, g_col, g_loss, norm)
    flags = dict(SIGLIP=siglip, NEGATIVE_ONLY=positive_offset is None, COLUMNS=columns,
                 BM=c["BM"], BN=c["BN"], BD=c["BD"], UPCAST=c["UPCAST"], PRECISION=c["PRECISION"],
                 num_warps=c["num_warps"], num_stages=c["num_stages"])
    offset = positive_offset or 0
    if D > FUSED_BACKWARD_MAX_D:
        return _backward_by_chunks(inputs, flags, offset)
    row_blocks = triton.cdiv(M, c["BM"])
    da, db = torch.empty_like(a), torch.empty_like(b)
    dscale = torch.empty(row_blocks, device=a.device, dtype=torch.float32)
    dbias = torch.empty(row_blocks, device=a.device, dtype=torch.float32)
    full_d = max(16, triton.next_power_of_2(D))
    _bwd_rows_kernel[(row_blocks,)](*inputs, da, dscale, dbias, M, N, D, a.stride(0), b.stride(0), offset,
                                    BDO=full_d, **flags)
    _bwd_cols_kernel[(triton.cdiv(N, c["BN"]),)](*inputs, db, M, N, D, a.stride(0), b.stride(0), offset,
                                                 BDO=full_d, **flags)
    return da, db, dscale.sum(), dbias.sum()


def _backward_by_chunks(inputs, flags, offset):
    """Wide features: a Triton kernel writes dLoss/dLogits for a block of rows (then of columns) of at
    most DS_CHUNK_ELEMENTS entries, and cuBLAS multiplies it with the features. Recomputing the tiles
    over a wide D once per pass costs less than once per slice of D."""
    a, b, scale, norm = inputs[0], inputs[1], inputs[2], inputs[9]
    M, D = a.shape
    N = b.shape[0]
    BM, BN = flags["BM"], flags["BN"]
    multiplier = scale.float() * norm
    da, db = torch.empty_like(a), torch.empty_like(b)
    dscale_parts, dbias_parts = [], []

    def grad_logits(row_start, row_end, col_start, col_end, sums):
        shape = (row_end - row_start, col_end - col_start)
        ds = torch.empty(shape, device=a.device, dtype=a.dtype)
        grid = (triton.cdiv(shape[0], BM), triton.cdiv(shape[1], BN))
        parts = [torch.empty(grid[0] * grid[1], device=a.device, dtype=torch.float32) for _ in range(2)]
        _grad_logits_kernel[grid](*inputs, ds, *parts, row_start, row_end, col_start, col_end, D, a.stride(0),
                                  b.stride(0), offset, SUMS=sums, **flags)
        if sums:
            dscale_parts.append(parts[0])
            dbias_parts.append(parts[1])
        return ds

    rows = max(1, DS_CHUNK_ELEMENTS // N)
    for start in range(0, M, rows):
        end = min(start + rows, M)
        da[start:end] = grad_logits(start, end, 0, N, True) @ b * multiplier
    columns = max(1, DS_CHUNK_ELEMENTS // M)
    for start in range(0, N, columns):
        end = min(start + columns, N)
        db[start:end] = grad_logits(0, M, start, end, False).T @ a * multiplier
    return da, db, torch.cat(dscale_parts).sum(), torch.cat(dbias_parts).sum()


def _gradient_bound(*gradients) -> torch.Tensor:
    bound = torch.stack([g.abs().max() for g in gradients]).sum()
    return bound.clamp_min(torch.finfo(torch.float32).tiny).float().reshape(1)


def lse_backward(a, b, scale, row_lse, col_lse, g_row, g_col, columns: bool):
    """Gradients (da, db, dscale) of sum(g_row * row_lse) + sum(g_col * col_lse)."""
    unused = torch.zeros(1, device=a.device, dtype=torch.float32)
    norm = _gradient_bound(g_row, g_col) if columns else _gradient_bound(g_row)
    da, db, dscale, _ = _backward(a, b, scale, unused, row_lse, col_lse if columns else unused, g_row,
                                  g_col if columns else unused, unused, norm, None, siglip=False, columns=columns)
    return da, db, dscale


def siglip_backward(a, b, scale, bias, g_loss, positive_offset: int | None):
    """Gradients (da, db, dscale, dbias) of g_loss * sum of every softplus(-y z) term."""
    unused = torch.zeros(1, device=a.device, dtype=torch.float32)
    g_loss = g_loss.float().reshape(1)
    return _backward(a, b, scale, bias, unused, unused, unused, unused, g_loss, _gradient_bound(g_loss),
                     positive_offset, siglip=True, columns=False)
