"""`MixedAttention`: multi-head attention (q/k/v/o projections, GQA, optional rotary position
embedding) over `mmfast.ops.mixed_attention`, for padded or packed mixed-modality sequences."""
from __future__ import annotations

import torch
from torch import nn

from mmfast.nn.kv_cache import KVCache
from mmfast.ops.mixed_attention import Packing, mixed_attention


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_tables(positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    """cos and sin `[*positions.shape, 1, dim]` (Llama's half-rotation layout)."""
    inverse = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[..., None] * inverse
    angles = torch.cat((angles, angles), dim=-1)[..., None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def positions_in_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each packed token's index inside its own sequence."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)
    return tokens - cu_seqlens.long()[sequence]


class MixedAttention(nn.Module):
    """Self-attention whose mask follows the mixed rule (causal text, bidirectional spans, packed
    sequences); see `mmfast.ops.mixed_attention`.

    x: `[B, T, embed_dim]` padded, or `[total, embed_dim]` with `cu_seqlens`. Projections are
    `q_proj`, `k_proj`, `v_proj`, `o_proj` (Llama's names, so weights map one to one).
    rotary_base: apply rotary embeddings with this base (None: no rotary); positions are
    `position_ids` or each token's index inside its sequence; a model whose layers share positions
    passes the tables once as `rotary=(cos, sin)` (rotary_tables) with a shared `packing`
    (mmfast.ops.mixed_attention.build_packing) instead of each layer rebuilding both. `cache`
    (mmfast.nn.KVCache; packed input): keys and values are stored for generation, and a decoding
    step's tokens attend to their rows' stored tokens.
    bias: biases on the four projections; output_bias, where set, overrides it for o_proj (Qwen2: biases
    on q, k, v only).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, *, head_dim: int | None = None,
                 bias: bool = False, output_bias: bool | None = None, causal: bool = True,
                 rotary_base: float | None = 10000.0, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"MixedAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.head_dim = head_dim or embed_dim // num_heads
        if self.head_dim % 2 and rotary_base is not None:
            raise ValueError(f"MixedAttention: rotary embeddings need an even head_dim, got {self.head_dim}")
        options = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias, **options)
        self.k_proj = nn.Linear(embed_dim, self.num_kv_heads * self.head_dim, bias=bias, **options)
        self.v_proj = nn.Linear(embed_dim, self.num_kv_heads * self.head_dim, bias=bias, **options)
        self.o_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias if output_bias is None else output_bias,
                                **options)
        self.causal, self.rotary_base, self.backend = causal, rotary_base, backend

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                span_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                packing: Packing | None = None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        tokens = x.shape[:-1]
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if rotary is not None:
            cos, sin = rotary  # in q's dtype (rotary_tables' caller sees to it: see LlamaModel)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        elif self.rotary_base is not None:
            if position_ids is None:
                position_ids = (positions_in_sequences(cu_seqlens, tokens[0]) if cu_seqlens is not None
                                else torch.arange(tokens[-1], device=x.device).expand(tokens))
            cos, sin = rotary_tables(position_ids, self.head_dim, self.rotary_base, q.dtype)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None and cache.decoding:  # generation: one new token per row against its cache
            return self.o_proj(cache.attend(self, q, k, v).flatten(-2))
        if cache is not None:  # prompts: stored for the tokens that follow, attended as usual
            cache.store(self, k, v)
        out = mixed_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, span_ids=span_ids,
                              causal=self.causal, backend=self.backend, packing=packing)
        return self.o_proj(out.flatten(-2))
