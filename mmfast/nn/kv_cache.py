"""`KVCache`: the keys and values of every attention layer during generation, so each new token costs
one token's forward instead of the whole sequence's."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values (rotary already applied) of every MixedAttention layer for `rows` sequences of up
    to `capacity` tokens each, `[rows, capacity, kv_heads, head_dim]` per layer.

    A forward that uses the cache first tells it where each of its tokens goes (`begin`: the row and
    position of each token). Prompts start empty rows and run packed as usual, their keys and values
    stored on the way; afterwards each forward adds one token per row, which attends to its row's
    stored tokens and itself (`attend`). `lengths` counts each row's tokens."""

    def __init__(self, rows: int, capacity: int):
        self.rows, self.capacity = rows, capacity
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.row_of = self.position_of = None
        self.decoding = False
        self._layers: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, row_of: torch.Tensor, position_of: torch.Tensor, decoding: bool) -> None:
        """The row and position of each token of the coming forward; decoding: one token per row, after
        the row's stored tokens (else: prompts starting their rows, attending only among themselves)."""
        if position_of.numel() and int(position_of.max()) >= self.capacity:
            raise ValueError(f"KVCache: a token at position {int(position_of.max())} does not fit the capacity "
                             f"{self.capacity}")
        self.lengths = self.lengths.to(row_of.device)
        self.row_of, self.position_of, self.decoding = row_of, position_of, decoding
        self.lengths.scatter_reduce_(0, row_of, position_of + 1, reduce="amax")

    def store(self, layer: torch.nn.Module, keys: torch.Tensor, values: torch.Tensor):
        """Writes this forward's `[tokens, kv_heads, head_dim]` keys and values of `layer`; returns the
        layer's whole cache (keys, values)."""
        if layer not in self._layers:
            shape = (self.rows, self.capacity, *keys.shape[1:])
            self._layers[layer] = (keys.new_zeros(shape), values.new_zeros(shape))
        cached_keys, cached_values = self._layers[layer]
        cached_keys[self.row_of, self.position_of] = keys
        cached_values[self.row_of, self.position_of] = values
        return cached_keys, cached_values

    def attend(self, layer: torch.nn.Module, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One new token per row: q `[n, heads, head_dim]` against its row's tokens up to its own
        position (stored first); returns `[n, heads, head_dim]`."""
        cached_keys, cached_values = self.store(layer, keys, values)
        keys, values = cached_keys[self.row_of], cached_values[self.row_of]  # [n, capacity, kv_heads, head_dim]
        groups = q.shape[1] // keys.shape[2]  # grouped-query attention: each key head serves `groups` heads
        keys = keys.transpose(1, 2).repeat_interleave(groups, dim=1)
        values = values.transpose(1, 2).repeat_interleave(groups, dim=1)
        visible = torch.arange(self.capacity, device=q.device) <= self.position_of[:, None]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=visible[:, None, None])
        return out[:, :, 0]
