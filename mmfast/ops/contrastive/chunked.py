"""The PyTorch path of the contrastive losses (CPU, and any device without Triton).

Same algorithm and interface as triton.py, on row chunks instead of tiles: a chunk of
at most CHUNK_ELEMENTS logits exists at a time, so memory stays O(N * D + chunk)
instead of N^2. Accumulation in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 logits per chunk


def _chunks(rows: int, columns: int):
    step = max(1, CHUNK_ELEMENTS // max(columns, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _siglip_signs(rows: slice, columns: int, positive_offset, device) -> torch.Tensor:
    signs = torch.full((rows.stop - rows.start, columns), -1.0, device=device)
    if positive_offset is not None:
        row_index = torch.arange(rows.start, rows.stop, device=device)
        positive = row_index + positive_offset
        valid = (positive >= 0) & (positive < columns)
        signs[(row_index - rows.start)[valid], positive[valid]] = 1.0
    return signs


def lse_forward(a, b, scale, columns: bool):
    """a [M, D], b [N, D], scale [1] -> row log-sum-exp of scale * a @ b.T, fp32 [M], and the
    column one [N] ([0] without columns), a row chunk at a time."""
    a32, b32, scale32 = a.float(), b.float(), scale.float()
    row_lse = torch.empty(a.shape[0], device=a.device)
    col_max = torch.full((b.shape[0],), float("-inf"), device=a.device)
    col_sum = torch.zeros(b.shape[0], device=a.device)
    for rows in _chunks(a.shape[0], b.shape[0]):
        logits = (a32[rows] @ b32.T) * scale32
        row_lse[rows] = torch.logsumexp(logits, dim=1)
        if columns:
            merged = torch.maximum(col_max, logits.amax(dim=0))
            col_sum = col_sum * torch.exp(col_max - merged) + torch.exp(logits - merged).sum(dim=0)
            col_max = merged
    if not columns:
        return row_lse, row_lse.new_empty(0)
    return row_lse, col_max + col_sum.log()


def lse_backward(a, b, scale, row_lse, col_lse, g_row, g_col, columns: bool):
    """Gradients (da [M, D], db [N, D], dscale [1]) of sum(g_row * row_lse) + sum(g_col * col_lse);
    row_lse, g_row [M], col_lse, g_col [N]."""
    a32, b32, scale32 = a.float(), b.float(), scale.float()
    da = torch.empty_like(a32)
    db = torch.zeros_like(b32)
    dscale = torch.zeros((), device=a.device)
    for rows in _chunks(a.shape[0], b.shape[0]):
        raw = a32[rows] @ b32.T
        logits = raw * scale32
        dlogits = g_row[rows, None] * torch.exp(logits - row_lse[rows, None])
        if columns:
            dlogits += g_col[None, :] * torch.exp(logits - col_lse[None, :])
        da[rows] = (dlogits @ b32) * scale32
        db += (dlogits.T @ a32[rows]) * scale32
        dscale += (dlogits * raw).sum()
    return da.to(a.dtype), db.to(b.dtype), dscale


def siglip_forward(a, b, scale, bias, positive_offset):
    """a [M, D], b [N, D], scale, bias [1] -> per-row sum of softplus(-y * (scale * a @ b.T + bias)),
    fp32 [M]; y = +1 on the diagonal shifted by positive_offset (None: every pair negative)."""
    a32, b32, scale32, bias32 = a.float(), b.float(), scale.float(), bias.float()
    row_loss = torch.empty(a.shape[0], device=a.device)
    for rows in _chunks(a.shape[0], b.shape[0]):
        logits = (a32[rows] @ b32.T) * scale32 + bias32
        signs = _siglip_signs(rows, b.shape[0], positive_offset, a.device)
        row_loss[rows] = F.softplus(-signs * logits).sum(dim=1)
    return row_loss


def siglip_backward(a, b, scale, bias, g_loss, positive_offset):
    """Gradients (da [M, D], db [N, D], dscale [1], dbias [1]) of g_loss * the sum of every term."""
    a32, b32, scale32, bias32 = a.float(), b.float(), scale.float(), bias.float()
    da = torch.empty_like(a32)
    db = torch.zeros_like(b32)
    dscale = torch.zeros((), device=a.device)
    dbias = torch.zeros((), device=a.device)
    for rows in _chunks(a.shape[0], b.shape[0]):
        raw = a32[rows] @ b32.T
        signs = _siglip_signs(rows, b.shape[0], positive_offset, a.device)
        # d softplus(-y z) / dz = -y * sigmoid(-y z)
        dlogits = -signs * torch.sigmoid(-signs * (raw * scale32 + bias32)) * g_loss
        da[rows] = (dlogits @ b32) * scale32
        db += (dlogits.T @ a32[rows]) * scale32
        dscale += (dlogits * raw).sum()
        dbias += dlogits.sum()
    return da.to(a.dtype), db.to(b.dtype), dscale, dbias
