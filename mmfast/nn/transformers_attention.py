"""mmfast attention for HF transformers models: `attn_implementation="mmfast"` (transformers' attention
signature, a drop-in for its AttentionInterface). Users reach it through mmfast.integrations.transformers:

    import mmfast.integrations.transformers as mmfast_hf
    mmfast_hf.register()                       # once, before building or switching models
    model = AutoModelForCausalLM.from_config(config, attn_implementation="mmfast")
    # or: model.set_attn_implementation("mmfast")

Both of transformers' registries are filled: `AttentionInterface` gets the attention and
`AttentionMaskInterface` a mask function that hands over the 2-D padding mask (without it,
transformers passes no mask and padding would be silently ignored). Like transformers'
FlashAttention path: causality comes from `is_causal` (the call's, else the module's), padded
batches are unpadded into packed sequences, and packed batches come from `cu_seq_lens_q`
(with `max_length_q`) or from position_ids that restart at 0. Extra: pass `span_ids` ([B, T]
int32, e.g. `span_ids_from_token_ids(input_ids, config.image_token_id)`) through the model's
forward to make image tokens bidirectional inside causal text (they reach every attention
call; bidirectional ones, like a vision tower's, ignore them). Steps whose queries are fewer
than the keys (generation with a KV cache) go to `mixed_attention_decode` (split over the keys,
FlashDecoding-style) when each row's valid keys end at the newest one (no padding or left
padding), and to SDPA with the equivalent mask otherwise (or when a gradient is wanted).
The unpadding and the packing tables are computed once per forward and shared by its layers
(transformers hands each layer the same mask, cu_seq_lens and span_ids tensors).
"""
from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from mmfast.ops.mixed_attention import build_packing, mixed_attention, mixed_attention_decode, pad, unpad
from mmfast.ops.mixed_attention import _check_packing as check_packing
from mmfast.ops.mixed_attention.reference import allowed

logger = logging.getLogger("mmfast")
_warned: list[bool] = []

NAME = "mmfast"


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """The 2-D boolean padding mask of the keys, or None when nothing is padded."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    attention_mask = attention_mask[:, -kv_length:].bool()
    return None if attention_mask.shape[1] == kv_length and bool(attention_mask.all()) else attention_mask


def _packed_from_positions(position_ids: torch.Tensor | None, batch: int, length: int):
    """cu_seqlens when position_ids of a single row restart at 0 (packed sequences), else None."""
    if position_ids is None or batch != 1 or length < 2:
        return None
    positions = position_ids.reshape(-1)[:length]
    if bool((positions[1:] >= positions[:-1]).all()):
        return None
    starts = torch.nonzero(positions == 0).flatten().to(torch.int32)
    end = torch.tensor([length], device=positions.device, dtype=torch.int32)
    return torch.cat([starts, end]) if starts.numel() and int(starts[0]) == 0 else None


class _PerForward:
    """The last packing built, reused while the tensors it came from are the same objects, unchanged
    (same in-place version): one forward's layers get the same mask and span tensors, so the unpad
    and the packing tables are built by its first layer only."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, tensors, settings, build):
        if self.key is not None and self.key[1] == settings and all(
                (reference is None and tensor is None) or
                (reference is not None and reference[0]() is tensor and tensor._version == reference[1])
                for reference, tensor in zip(self.key[0], tensors)):
            return self.value
        self.value = build()
        self.key = ([None if tensor is None else (weakref.ref(tensor), tensor._version) for tensor in tensors],
                    settings)
        return self.value


_per_forward = _PerForward()


def _packed(cu_seqlens, span_ids, total, max_seqlen, causal):
    """The packing of packed input (cu_seq_lens_q or position_ids that restart), built once a forward."""
    def build():
        spans = None if span_ids is None else span_ids.reshape(-1).to(torch.int32)
        cu = cu_seqlens.to(torch.int32)
        check_packing(cu, spans, total, cu.device, (total,), max_seqlen)  # the user's: checked once
        return build_packing(cu, spans, total, max_seqlen, causal)
    return _per_forward.get((cu_seqlens, span_ids), ("packed", total, max_seqlen, causal), build)


def _unpadded(attention_mask, span_ids, batch, length, causal):
    """(indices, packing) of a padded batch's real tokens, built once a forward."""
    def build():
        indices, cu, longest = unpad(attention_mask)
        spans = None if span_ids is None else span_ids.to(torch.int32).reshape(-1)[indices]
        return indices, build_packing(cu, spans, indices.numel(), longest, causal)
    return _per_forward.get((attention_mask, span_ids), ("padded", batch, length, causal), build)


def _decode_with_cache(query, key, value, padding, causal, scaling, span_ids):
    """Queries are the last of the keys (KV cache): mixed_attention_decode on the cache as it is, when
    each row's valid keys are one run ending at the newest key (no padding, or left padding as
    batched generation pads); None otherwise (the caller falls back to SDPA)."""
    q_length, kv_length = query.shape[2], key.shape[2]
    if span_ids is not None and span_ids.shape[-1] != kv_length:
        return None
    leftpad = counts = None
    if padding is not None:
        valid = padding.to(torch.int32)
        counts = valid.sum(dim=1, dtype=torch.int32)
        leftpad = (kv_length - counts).to(torch.int32)
        runs = valid.cumsum(dim=1) == (torch.arange(kv_length, device=valid.device) - leftpad[:, None] + 1).clamp(min=0)
        if not bool((runs.all(dim=1) & (counts >= q_length)).all()):  # one host synchronization
            return None
    spans = None if span_ids is None else span_ids.to(torch.int32).contiguous()
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # views: the kernel takes strides
    return mixed_attention_decode(q, k, v, cache_seqlens=counts, cache_leftpad=leftpad, span_ids=spans,
                                  causal=causal, softmax_scale=scaling, validate=False)


def _sdpa_with_cache(query, key, value, padding, causal, scaling, span_ids):
    """Queries are the last of the keys (KV cache): SDPA with the rule's mask, offset accordingly."""
    q_length, kv_length = query.shape[2], key.shape[2]
    offset = kv_length - q_length
    rows = torch.arange(q_length, device=query.device)[:, None] + offset
    columns = torch.arange(kv_length, device=query.device)[None, :]
    if not causal:
        mask = torch.ones(1, 1, q_length, kv_length, dtype=torch.bool, device=query.device)
    elif span_ids is not None and span_ids.shape[-1] == kv_length:
        mask = allowed(rows, columns, span_ids[:, -q_length:, None], span_ids[:, None, :])[:, None]
    else:
        mask = (columns <= rows)[None, None]
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling).transpose(1, 2)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' attention signature: query `[B, H, T, D]`, key/value `[B, HK, T, D]`;
    returns (`[B, T, H, D]`, None)."""
    if dropout and module.training:
        raise ValueError(f"attn_implementation='{NAME}' has no attention dropout; set the model's attention "
                         f"dropout to 0 (got {dropout})")
    if kwargs.get("output_attentions") and not _warned:
        _warned.append(True)  # once, as transformers' sdpa and flash attention say it
        logger.warning("attn_implementation='%s' does not return attention weights (output_attentions=True "
                       "gives none); set the attention to 'eager' for them", NAME)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attn_implementation='{NAME}' has no logit softcapping; use 'eager' (or a FlashAttention "
                         "kernel that has it)")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    batch, _, length, _ = query.shape
    # span_ids travel to every attention of the model (a LLaVA vision tower too): they matter
    # only where attention is causal.
    span_ids = kwargs.get("span_ids") if causal else None
    if key.shape[2] != length:
        if not torch.is_grad_enabled() or not (query.requires_grad or key.requires_grad):
            out = _decode_with_cache(query, key, value, attention_mask, causal, scaling, span_ids)
            if out is not None:
                return out, None
        return _sdpa_with_cache(query, key, value, attention_mask, causal, scaling, span_ids), None
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None and attention_mask is None:
        cu_seqlens = _packed_from_positions(kwargs.get("position_ids"), batch, length)
    options = dict(causal=causal, softmax_scale=scaling)
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"attn_implementation='{NAME}': packed sequences (cu_seq_lens_q) need batch size 1, "
                             f"got {batch}")
        packing = _packed(cu_seqlens, span_ids, length, kwargs.get("max_length_q"), causal)
        out = mixed_attention(q[0], k[0], v[0], packing=packing, softmax_scale=scaling)[None]
    elif attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attn_implementation='{NAME}' takes a 2-D padding mask; got a "
                             f"{attention_mask.dim()}-D mask (custom 4-D masks need 'sdpa' or 'eager')")
        indices, packing = _unpadded(attention_mask, span_ids, batch, length, causal)
        gather = lambda x: x.reshape(batch * length, *x.shape[2:])[indices]  # noqa: E731
        packed = mixed_attention(gather(q), gather(k), gather(v), packing=packing, softmax_scale=scaling)
        out = pad(packed, indices, batch, length)
    else:
        spans = None if span_ids is None else span_ids.to(torch.int32)
        out = mixed_attention(q, k, v, span_ids=spans, **options)
    return out, None


def register(name: str = NAME) -> str:
    """Registers the attention and its mask function with transformers under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name
