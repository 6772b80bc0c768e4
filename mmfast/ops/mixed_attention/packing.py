"""Packing metadata for mixed attention, and helpers that build `cu_seqlens` and `span_ids`
from what users hold.

The mask rule (ARCHITECTURE.md): query i may attend key j iff they are in the same sequence
and (j <= i, or span_ids[i] >= 0 and span_ids[i] == span_ids[j]). The kernels need, per
token, how far its attention reaches (`reach`) and from which query a key is attended
(`first`); both come from a sort and two scatter reductions on the device, without a host
synchronization (pass max_seqlen to avoid the one that sizes the grid), so a new packing
every step costs microseconds and no recompilation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

TEXT = "text"


@dataclass(frozen=True)
class Packing:
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    span_ids: torch.Tensor  # int32 [T]
    reach: torch.Tensor  # int32 [T]: last key index token i attends
    first: torch.Tensor  # int32 [T]: first query index that attends key j
    max_seqlen: int
    batch: int
    causal: bool


def build_packing(cu_seqlens: torch.Tensor, span_ids: torch.Tensor | None, total: int, max_seqlen: int | None,
                  causal: bool) -> Packing:
    """The per-sequence tables the kernels read: cu_seqlens int32 [B + 1], span_ids int32 [total] (or
    None: every token causal or every token bidirectional), over `total` packed tokens."""
    device = cu_seqlens.device
    batch = cu_seqlens.numel() - 1
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if batch else 0
    positions = torch.arange(total, device=device)
    if span_ids is None or not causal:
        span = torch.full((total,), -1, device=device, dtype=torch.int32)
        reach = first = positions.to(torch.int32)
        return Packing(cu_seqlens, span if span_ids is None else span_ids, reach, first, max_seqlen, batch, causal)
    span = span_ids.to(torch.int32)
    sequence = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
    in_span = span >= 0
    # Group tokens by (sequence, span id) with a sort: no host synchronization anywhere.
    key = sequence * 2**32 + (span.long() + 1)
    order = torch.sort(key, stable=True).indices
    boundary = torch.ones_like(key, dtype=torch.bool)
    boundary[1:] = key[order][1:] != key[order][:-1]
    groups = torch.empty_like(key)
    groups[order] = boundary.long().cumsum(0) - 1
    last = torch.full((total,), -1, device=device, dtype=torch.long).scatter_reduce(
        0, groups, torch.where(in_span, positions, -1), reduce="amax")
    start = torch.full((total,), total, device=device, dtype=torch.long).scatter_reduce(
        0, groups, torch.where(in_span, positions, total), reduce="amin")
    reach = torch.where(in_span, torch.maximum(last[groups], positions), positions)
    first = torch.where(in_span, torch.minimum(start[groups], positions), positions)
    return Packing(cu_seqlens, span, reach.to(torch.int32), first.to(torch.int32), max_seqlen, batch, causal)


def packing_from_segments(samples: Sequence[Sequence[tuple[str, int]]], device=None):
    """(cu_seqlens int32 [B + 1], span_ids int32 [T], max_seqlen) from per-sample segments.

    samples: for each sequence, a list of (modality, length); "text" segments are causal, every
    other segment ("image", "audio", "video", ...) becomes its own bidirectional span.
    """
    lengths, span_ids, next_span = [], [], 0
    for index, segments in enumerate(samples):
        total = 0
        for modality, length in segments:
            if length < 0:
                raise ValueError(f"packing_from_segments: sample {index} has a segment of negative length {length}")
            if modality == TEXT:
                span_ids.append(torch.full((length,), -1, dtype=torch.int32))
            else:
                span_ids.append(torch.full((length,), next_span, dtype=torch.int32))
                next_span += 1
            total += length
        lengths.append(total)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    spans = torch.cat(span_ids) if span_ids else torch.zeros(0, dtype=torch.int32)
    return cu_seqlens.to(device), spans.to(device), max(lengths, default=0)


def span_ids_from_token_ids(input_ids: torch.Tensor, image_token_id: int | Sequence[int]) -> torch.Tensor:
    """span_ids (same shape as input_ids, int32) for LLaVA-style sequences: every maximal run of
    image tokens becomes its own bidirectional span, everything else is causal text (-1)."""
    ids = torch.as_tensor(image_token_id, device=input_ids.device).flatten()
    is_image = torch.isin(input_ids, ids)
    previous = torch.zeros_like(is_image)
    previous[..., 1:] = is_image[..., :-1]
    starts = is_image & ~previous
    run = starts.flatten().cumsum(0).reshape(input_ids.shape) - 1
    return torch.where(is_image, run, torch.full_like(run, -1)).to(torch.int32)


def unpad(attention_mask: torch.Tensor):
    """(indices, cu_seqlens, max_seqlen) of the kept tokens of a padded `[B, T]` attention mask
    (1 = token, 0 = padding, on either side), as flash-attn's `unpad_input` returns them."""
    if attention_mask.dim() != 2:
        raise ValueError(f"unpad: attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=attention_mask.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    return indices, cu_seqlens, int(lengths.max().item()) if lengths.numel() else 0


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Inverse of unpad for a `[total, ...]` tensor: `[B, T, ...]` with zeros in the padding."""
    out = packed.new_zeros((batch * length, *packed.shape[1:]))
    out[indices] = packed
    return out.reshape(batch, length, *packed.shape[1:])
