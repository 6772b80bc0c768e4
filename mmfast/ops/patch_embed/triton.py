"""Triton kernels of the fused patch embedding.

Forward: programs own a [BM patches, BE channels] output tile. For each slice of the
patch vector (K = C * kt * kh * kw) they gather the pixels straight from the input (any
strides: NCHW, NHWC, video, overlapping patches), scale uint8 by 1/255, normalize with
the per-channel mean and std, zero what lies in the padding, and multiply with the
projection on the tensor cores; the epilogue adds bias and position embedding and writes
the row after the prefix (class) tokens. Neither the float image nor the im2col matrix
is ever written.
Weight gradient: programs own a [BK, BE] tile of dW and a share of the patches (split
over M for parallelism); they gather the same normalized patches and multiply with the
output gradient. Partial sums are added by torch (deterministic).
Kept patches (masked autoencoders): rows are (sample, slot) pairs and each slot's patch index
is read from `keep`; the masked patches are never loaded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.ops._backend import multiprocessor_count, plans_for_gpu


@triton.jit
def _gather_patches(p_ptr, mean_ptr, inv_std_ptr, o_m, o_k, M, K, T, H, W, GT, GH, GW, KT, KH, KW,
                    ST, SH, SW, s_b, s_c, s_t, s_h, s_w, in_scale):
    """Normalized pixels of patches o_m at patch-vector positions o_k, fp32 [BM, BK]."""
    gw = o_m % GW
    rest = o_m // GW
    gh = rest % GH
    rest = rest // GH
    gt = rest % GT
    b = (rest // GT).to(tl.int64)
    kw = o_k % KW
    rest_k = o_k // KW
    kh = rest_k % KH
    rest_k = rest_k // KH
    kt = rest_k % KT
    c = rest_k // KT
    t = gt[:, None] * ST + kt[None, :]
    h = gh[:, None] * SH + kh[None, :]
    w = gw[:, None] * SW + kw[None, :]
    m_k = o_k < K
    mask = (o_m < M)[:, None] & m_k[None, :] & (t < T) & (h < H) & (w < W)
    offsets = b[:, None] * s_b + c[None, :] * s_c + t * s_t + h * s_h + w * s_w
    x = tl.load(p_ptr + offsets, mask=mask, other=0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=m_k, other=0.0)
    inv_std = tl.load(inv_std_ptr + c, mask=m_k, other=0.0)
    x = (x * in_scale - mean[None, :]) * inv_std[None, :]
    return tl.where(mask, x, 0.0)


@triton.jit
def _row_patches(keep_ptr, o_m, M, R, N, HAS_KEEP: tl.constexpr):
    """Output rows o_m (R per sample) -> (their patches' ids in the whole batch's grid, their grid
    index n, valid). Rows past M, and kept indices outside [0, N), map to patch B * N, which loads
    nothing. int32 throughout (int64 index math spills registers)."""
    m_m = o_m < M
    if HAS_KEEP:
        n = tl.load(keep_ptr + o_m, mask=m_m, other=0).to(tl.int32)
        valid = m_m & (n >= 0) & (n < N)
        patch = tl.where(valid, (o_m // R) * N + n, (M // R) * N)
    else:
        n = o_m % N
        valid = m_m
        patch = o_m
    return patch, n, valid


@triton.jit
def _fwd_kernel(p_ptr, w_ptr, bias_ptr, pos_ptr, mean_ptr, inv_std_ptr, keep_ptr, out_ptr,
                M, R, K, E, N, T, H, W, GT, GH, GW, KT, KH, KW, ST, SH, SW, s_b, s_c, s_t, s_h, s_w, in_scale,
                PREFIX: tl.constexpr, POS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
                HAS_KEEP: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    i_m = tl.program_id(0)
    i_e = tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_e = i_e * BE + tl.arange(0, BE)
    m_m = o_m < M
    m_e = o_e < E
    patch, n, valid = _row_patches(keep_ptr, o_m, M, R, N, HAS_KEEP)
    acc = tl.zeros((BM, BE), tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_x = _gather_patches(p_ptr, mean_ptr, inv_std_ptr, patch, o_k, (M // R) * N, K, T, H, W, GT, GH, GW,
                              KT, KH, KW, ST, SH, SW, s_b, s_c, s_t, s_h, s_w, in_scale)
        b_w = tl.load(w_ptr + o_e[None, :] * K + o_k[:, None], mask=(o_k < K)[:, None] & m_e[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(b_x, b_w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(b_x.to(b_w.dtype), b_w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o_e, mask=m_e, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        acc += tl.load(pos_ptr + (n + POS_OFFSET)[:, None] * E + o_e[None, :],
                       mask=valid[:, None] & m_e[None, :], other=0.0).to(tl.float32)
    acc = tl.where(valid[:, None], acc, 0.0)
    row = (o_m // R).to(tl.int64) * (R + PREFIX) + PREFIX + o_m % R
    tl.store(out_ptr + row[:, None] * E + o_e[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_e[None, :])


@triton.jit
def _weight_grad_kernel(p_ptr, g_ptr, mean_ptr, inv_std_ptr, keep_ptr, dw_ptr,
                        M, R, K, E, N, T, H, W, GT, GH, GW, KT, KH, KW, ST, SH, SW, s_b, s_c, s_t, s_h, s_w,
                        in_scale, splits,
                        PREFIX: tl.constexpr, HAS_KEEP: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr,
                        BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_k = tl.program_id(0)
    i_e = tl.program_id(1)
    i_s = tl.program_id(2)
    o_k = i_k * BK + tl.arange(0, BK)
    o_e = i_e * BE + tl.arange(0, BE)
    m_e = o_e < E
    acc = tl.zeros((BK, BE), tl.float32)
    for m0 in range(i_s * BM, M, splits * BM):
        o_m = m0 + tl.arange(0, BM)
        patch, n, valid = _row_patches(keep_ptr, o_m, M, R, N, HAS_KEEP)
        b_x = _gather_patches(p_ptr, mean_ptr, inv_std_ptr, patch, o_k, (M // R) * N, K, T, H, W, GT, GH, GW,
                              KT, KH, KW, ST, SH, SW, s_b, s_c, s_t, s_h, s_w, in_scale)
        row = (o_m // R).to(tl.int64) * (R + PREFIX) + PREFIX + o_m % R
        b_g = tl.load(g_ptr + row[:, None] * E + o_e[None, :], mask=(o_m < M)[:, None] & m_e[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(tl.trans(b_x), b_g.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(b_x.to(b_g.dtype)), b_g, acc, input_precision=PRECISION)
    tl.store(dw_ptr + (i_s * K + o_k[:, None]).to(tl.int64) * E + o_e[None, :], acc,
             mask=(o_k < K)[:, None] & m_e[None, :])


def _config(dtype: torch.dtype, device: torch.device, weight_grad: bool = False) -> dict:
    interpreting = not plans_for_gpu(device)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if interpreting:
        return dict(BM=64, BE=64, BK=64, UPCAST=dtype == torch.bfloat16, PRECISION=precision, num_warps=4,
                    num_stages=1)
    # 64 x 64 output tiles: ptxas compiles every variant of both kernels without spilling for sm_80 and
    # sm_90 with triton 3.6 (the GPU image's), 3.8 and 3.9 (`mmfast bench compile`). 128 rows spilled
    # with 3.6 (the weight gradient up to 296 bytes per thread, the forward 56; none with 3.8), and with
    # kept patches (whose row -> patch indices stay live across the K loop) up to 92 bytes with 3.8; the
    # weight gradient with 3 stages spilled 24 bytes with 3.8 on sm_80, with 1 none.
    return dict(BM=64, BE=64, BK=32, UPCAST=False, PRECISION=precision, num_warps=8,
                num_stages=1 if weight_grad else 3)


def _geometry_args(pixels, geometry):
    _, _, T, H, W = pixels.shape
    return (T, H, W, *geometry.grid, *geometry.kernel, *geometry.stride, *pixels.stride())


def forward(pixels, weight, bias, pos_embed, prefix, mean, inv_std, in_scale, geometry, keep=None):
    """pixels: [B, C, T, H, W] view (any strides); weight [E, K] contiguous; keep: int64 [B, R] patch
    indices or None (R = N); returns [B, P + R, E]."""
    B = pixels.shape[0]
    E, K = weight.shape
    N = geometry.num_patches
    R = N if keep is None else keep.shape[1]
    P = 0 if prefix is None else prefix.shape[0]
    out = torch.empty((B, P + R, E), device=pixels.device, dtype=weight.dtype)
    if P:
        prefix_rows = prefix.to(torch.float32)
        if pos_embed is not None and pos_embed.shape[0] == N + P:
            prefix_rows = prefix_rows + pos_embed[:P].to(torch.float32)
        out[:, :P] = prefix_rows.to(out.dtype)
    c = _config(weight.dtype, pixels.device)
    M = B * R
    dummy = weight
    _fwd_kernel[(triton.cdiv(M, c["BM"]), triton.cdiv(E, c["BE"]))](
        pixels, weight, bias if bias is not None else dummy, pos_embed if pos_embed is not None else dummy,
        mean, inv_std, keep if keep is not None else mean, out, M, R, K, E, N, *_geometry_args(pixels, geometry),
        in_scale, PREFIX=P, POS_OFFSET=(pos_embed.shape[0] - N) if pos_embed is not None else 0,
        HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, HAS_KEEP=keep is not None,
        BM=c["BM"], BE=c["BE"], BK=c["BK"], UPCAST=c["UPCAST"], PRECISION=c["PRECISION"],
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return out


def weight_grad(pixels, grad_out, mean, inv_std, in_scale, geometry, prefix_count, keep=None):
    """dLoss/dWeight as fp32 [E, K] from the output gradient [B, P + R, E] (R = N, or keep's K)."""
    B = pixels.shape[0]
    E = grad_out.shape[2]
    K = geometry.patch_size
    N = geometry.num_patches
    R = N if keep is None else keep.shape[1]
    M = B * R
    c = _config(grad_out.dtype, pixels.device, weight_grad=True)
    tiles = triton.cdiv(K, c["BK"]) * triton.cdiv(E, c["BE"])
    if plans_for_gpu(pixels.device):
        programs = 4 * multiprocessor_count(pixels.device)
        splits = max(1, min(triton.cdiv(M, c["BM"]), programs // tiles))
    else:
        splits = 2  # exercises the split reduction in the interpreter
    partial = torch.empty((splits, K, E), device=pixels.device, dtype=torch.float32)
    _weight_grad_kernel[(triton.cdiv(K, c["BK"]), triton.cdiv(E, c["BE"]), splits)](
        pixels, grad_out, mean, inv_std, keep if keep is not None else mean, partial, M, R, K, E, N,
        *_geometry_args(pixels, geometry), in_scale, splits, PREFIX=prefix_count, HAS_KEEP=keep is not None,
        BM=c["BM"], BE=c["BE"], BK=c["BK"], UPCAST=c["UPCAST"], PRECISION=c["PRECISION"],
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return partial.sum(0).T
