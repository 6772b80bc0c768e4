"""Plain PyTorch mixed attention with a dense mask per sequence: the test oracle and the CPU path.
Memory is O(L^2) per sequence (L its length), never O(T^2) for the packed batch."""
from __future__ import annotations

import torch


def sequence_mask(span_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool [L, L]: query i may attend key j (the rule of ARCHITECTURE.md, inside one sequence)."""
    length = span_ids.shape[0]
    if not causal:
        return torch.ones(length, length, dtype=torch.bool, device=span_ids.device)
    positions = torch.arange(length, device=span_ids.device)
    lower = positions[None, :] <= positions[:, None]
    same_span = (span_ids[:, None] >= 0) & (span_ids[:, None] == span_ids[None, :])
    return lower | same_span


def attention(q, k, v, cu_seqlens, span_ids, causal: bool, scale: float, dtype=torch.float32):
    """q [T, H, D], k/v [T, HK, D]; returns (out [T, H, D] in `dtype`, lse [H, T] in `dtype`)."""
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outputs, lses = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].to(dtype).transpose(0, 1)  # [H, L, D]
        ks = k[start:end].to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[start:end].to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        mask = sequence_mask(span_ids[start:end], causal)
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [H, L]
        outputs.append((torch.exp(scores - lse[..., None]) @ vs).transpose(0, 1))
        lses.append(lse)
    if not outputs:
        return q.new_zeros(q.shape, dtype=dtype), q.new_zeros((heads, 0), dtype=dtype)
    return torch.cat(outputs), torch.cat(lses, dim=1)
