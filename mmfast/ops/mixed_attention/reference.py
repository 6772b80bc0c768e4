"""Plain PyTorch mixed attention with a dense mask per sequence: the test oracle and the CPU path.
Memory is O(L^2) per sequence (L its length), never O(T^2) for the packed batch."""
from __future__ import annotations

import torch


def allowed(query_position, key_position, query_span, key_span):
    """The rule of ARCHITECTURE.md inside one sequence, elementwise on broadcastable tensors: query i
    may attend key j iff j <= i, or both lie in one bidirectional span (span id >= 0). The one place
    it is written outside the kernels (the references, the transformers integration with a KV
    cache, FlexAttention's mask in the benchmark all call it)."""
    return (key_position <= query_position) | ((query_span >= 0) & (query_span == key_span))


def sequence_mask(span_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool [L, L]: query i may attend key j, for one sequence's span ids [L]."""
    length = span_ids.shape[0]
    if not causal:
        return torch.ones(length, length, dtype=torch.bool, device=span_ids.device)
    positions = torch.arange(length, device=span_ids.device)
    return allowed(positions[:, None], positions[None, :], span_ids[:, None], span_ids[None, :])


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


def masked_sdpa(query, key, value, mask, scale: float, is_causal: bool = False):
    """SDPA over `[B, H, L, D]` (key/value `[B, HK, L, D]`, HK dividing H) with a boolean `mask`
    broadcastable to `[B, H, L, L]`, or none (`is_causal`: the lower triangle). On the CPU in bfloat16/float16 the product is spelled out: scores
    in the input dtype, softmax in float32, the probabilities back in the input dtype for P @ V (as the
    flash kernels round them); PyTorch's CPU SDPA kernel takes about 4x longer there (38 against 10 ms
    forward and backward at 64 x 4 heads x 100 tokens x 48), and stays in use in float32, where it is
    the faster one."""
    group = query.shape[1] // key.shape[1]
    if query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                                is_causal=is_causal, enable_gqa=group > 1)
    if group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    if is_causal:
        mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    scores = ((query @ key.transpose(-1, -2)) * scale).float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(query.dtype) @ value


def packed_attention(q, k, v, cu_seqlens, span_ids, causal: bool, scale: float):
    """The CPU path for packed sequences: the sequences sorted by length into groups of similar lengths,
    each group gathered into a zero-padded [B, L] batch (L its longest) for one SDPA call with the rule's
    mask over the real keys, and scattered back to [T, H, D]; the same result as `attention`, which loops
    over the sequences (and stays the tests' reference). Grouping matters in mixed batches: padding
    short captions to a long video clip's length made the scores several times larger than needed."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    order = torch.argsort(lengths)
    sorted_lengths = lengths[order].tolist()
    if not sorted_lengths or sorted_lengths[-1] == 0:
        return q.new_zeros(q.shape)
    starts = cu_seqlens[:-1].long()
    outputs, tokens = [], []
    for first, last in length_groups(sorted_lengths):
        rows = order[first:last]
        out, where = _padded_group(q, k, v, starts[rows], lengths[rows], sorted_lengths[last - 1], span_ids,
                                   causal, scale)
        outputs.append(out)
        tokens.append(where)
    out, tokens = torch.cat(outputs), torch.cat(tokens)
    inverse = torch.empty_like(tokens)
    inverse[tokens] = torch.arange(tokens.numel(), device=tokens.device)
    return out.index_select(0, inverse)  # back to the packed order


def length_groups(sorted_lengths: list[int], ratio: float = 0.75) -> list[tuple[int, int]]:
    """[first, last) ranges of ascending lengths, each group's shortest at least `ratio` of its longest
    (zero lengths apart: they have no tokens)."""
    groups, last = [], len(sorted_lengths)
    while last > 0 and sorted_lengths[last - 1] > 0:
        first = last - 1
        while first > 0 and sorted_lengths[first - 1] >= ratio * sorted_lengths[last - 1]:
            first -= 1
        groups.append((first, last))
        last = first
    return groups[::-1]


def _padded_group(q, k, v, starts, lengths, longest: int, span_ids, causal: bool, scale: float):
    """One group's attention: (out [its tokens, H, D], those tokens' places in the packed input)."""
    steps = torch.arange(longest, device=q.device)
    valid = steps[None, :] < lengths[:, None]  # [B, L]
    index = (starts[:, None] + steps[None, :]).clamp(max=q.shape[0] - 1)
    # index_select, not x[index]: its backward is an index_add, where advanced indexing's is a much
    # slower accumulating index_put (the padded slots repeat the last token; their gradients are zero)
    query, key, value = (x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:]).transpose(1, 2)
                         for x in (q, k, v))  # [B, H, L, D]
    mask = valid[:, None, :].expand(-1, longest, -1)
    if causal:
        spans = span_ids.long()[index]
        mask = mask & allowed(steps[:, None], steps[None, :], spans[:, :, None], spans[:, None, :])
    mask = mask | torch.eye(longest, dtype=torch.bool, device=q.device)  # padded query rows: no empty softmax
    out = masked_sdpa(query, key, value, mask[:, None], scale).transpose(1, 2)  # [B, L, H, D]
    kept = valid.reshape(-1).nonzero().squeeze(1)
    return out.reshape(-1, *out.shape[2:]).index_select(0, kept), index.reshape(-1)[kept]


def padded_attention(q, k, v, span_ids, causal: bool, scale: float, return_lse: bool):
    """The CPU path for the padded layout: one SDPA call over [B, H, T, D] (the rule's mask built
    densely only when spans are given), instead of a loop over sequences. Returns (out, lse or None)."""
    group = q.shape[2] // k.shape[2]
    query, key, value = (x.transpose(1, 2) for x in (q, k, v))
    mask = None
    if causal and span_ids is not None:
        positions = torch.arange(q.shape[1], device=q.device)
        mask = allowed(positions[:, None], positions[None, :], span_ids[:, :, None], span_ids[:, None, :])[:, None]
    out = masked_sdpa(query, key, value, mask, scale, is_causal=causal and mask is None)
    lse = None
    if return_lse:
        with torch.no_grad():
            scores = (query.float() @ key.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
            if causal:
                visible = mask if mask is not None else torch.ones(scores.shape[-2:], dtype=torch.bool,
                                                                   device=q.device).tril()
                scores = scores.masked_fill(~visible, float("-inf"))
            lse = torch.logsumexp(scores, dim=-1)  # [B, H, T]
    return out.transpose(1, 2), lse


def decode_sequence(q, k, v, span_ids, causal: bool, scale: float, dtype=torch.float32):
    """One sequence's new queries against its keys: q [Tq, H, D], k/v [L, HK, D] (L >= Tq; the queries
    are the last Tq of the keys), span_ids [L] or None. Returns out [Tq, H, D] in `dtype`."""
    new, length, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    query = q.to(dtype).transpose(0, 1)  # [H, Tq, D]
    key = k.to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)
    value = v.to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)
    scores = (query @ key.transpose(1, 2)) * scale
    if causal:
        positions = torch.arange(length - new, length, device=q.device)
        keys = torch.arange(length, device=q.device)
        spans = span_ids if span_ids is not None else torch.full((length,), -1, device=q.device)
        mask = allowed(positions[:, None], keys[None, :], spans[positions][:, None], spans[None, :])
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ value).transpose(0, 1)


def decode_padded(q, k, v, leftpad, counts, span_ids, causal: bool, scale: float):
    """The CPU path of the padded decode layout in one SDPA call: q [B, Tq, H, D], k/v [B, S, HK, D],
    each row's keys in [leftpad, leftpad + count), the queries the last Tq of them."""
    new, capacity, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    keys = torch.arange(capacity, device=q.device)
    positions = (leftpad + counts - new)[:, None] + torch.arange(new, device=q.device)  # [B, Tq]
    mask = ((keys >= leftpad[:, None]) & (keys < (leftpad + counts)[:, None]))[:, None, :]  # [B, 1, S]
    if causal:
        spans = span_ids if span_ids is not None else torch.full(k.shape[:2], -1, device=q.device)
        span_q = spans.gather(1, positions.long())
        mask = mask & allowed(positions[..., None], keys, span_q[..., None], spans[:, None, :])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale,
        enable_gqa=group > 1)
    return out.transpose(1, 2)
