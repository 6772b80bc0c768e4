"""Any transformers causal language model (AutoModelForCausalLM: Llama, Qwen2, Gemma, Phi, ...) as the
language model of mmfast's LLaVA, running mmfast's attention (`attn_implementation="mmfast"`,
mmfast.nn.transformers_attention): packed sequences go in as one row with `cu_seq_lens_q` and
per-sequence positions, image spans as `span_ids`, so the model's own layers run on the same packed
batches as mmfast's decoder. What is kept of it: its decoder (`base_model`, HF's module names) and its
output head's weight.
"""
from __future__ import annotations

import torch
from torch import nn

from mmfast.nn import transformers_attention as integration
from mmfast.nn.attention import positions_in_sequences


def hf_decoder(text_hf: dict) -> nn.Module:
    """The decoder of a causal LM of this HF config (its `to_dict()`), freshly initialized, on mmfast
    attention (weights come from a state dict: a saved run, or llava_with_language_model)."""
    import transformers

    integration.register()
    config = transformers.AutoConfig.for_model(**text_hf)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=integration.NAME).base_model


def switch_to_mmfast(causal_lm) -> None:
    """An HF model already built (from_pretrained of a local directory) onto mmfast attention."""
    integration.register()
    causal_lm.set_attn_implementation(integration.NAME)


def run_hf_decoder(decoder: nn.Module, embeds: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                   max_seqlen: int | None = None, span_ids: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LlamaModel's call on an HF decoder: packed `[total, hidden]` embeddings with cu_seqlens (one row of
    many sequences for the mmfast attention; positions restart in each) or padded `[B, T, hidden]`;
    returns the final hidden states in the same layout."""
    if cu_seqlens is None:
        return decoder(inputs_embeds=embeds, position_ids=position_ids, span_ids=span_ids,
                       use_cache=False).last_hidden_state
    if position_ids is None:
        position_ids = positions_in_sequences(cu_seqlens, embeds.shape[0])
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0
    out = decoder(inputs_embeds=embeds[None], position_ids=position_ids[None], use_cache=False,
                  span_ids=None if span_ids is None else span_ids[None], cu_seq_lens_q=cu_seqlens,
                  cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen)
    return out.last_hidden_state[0]


def decoder_layers(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's blocks (the units an engine shards or checkpoints)."""
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no `layers`: mmfast's LLaVA takes decoders whose blocks "
                         f"are `model.layers` (Llama, Qwen2, Mistral, Gemma, Phi, ...)")
    return list(layers)


class HFDecodingCache:
    """transformers' DynamicCache for an HF decoder in mmfast's decoding loop (mmfast.models.decoding): the
    prompts run once, left-padded into one batch (the mmfast attention decodes left-padded rows with
    mixed_attention_decode), then every prompt row takes one token a step against the cache; rows that
    have stopped take a zero embedding whose outputs are dropped."""

    def __init__(self, decoder: nn.Module):
        import inspect

        self.decoder, self.cache, self.mask, self.positions, self.rows = decoder, None, None, None, []
        # the cache keyword of the installed transformers (`cache` since 5.2x, `past_key_values` before)
        self.cache_keyword = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    def prompts(self, rows: list[int], embeds: list[torch.Tensor], span_ids: list[torch.Tensor] | None):
        """The last hidden state `[len(rows), hidden]` of each prompt (`embeds`: `[length, hidden]` each)."""
        import transformers

        longest = max(len(row) for row in embeds)
        padded = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[-1])
        self.mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=padded.device)
        spans = None if span_ids is None else torch.full(self.mask.shape, -1, dtype=torch.int32, device=padded.device)
        for index, row in enumerate(embeds):
            padded[index, longest - len(row):], self.mask[index, longest - len(row):] = row, 1
            if spans is not None:
                spans[index, longest - len(row):] = span_ids[index]
        self.positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.cache, self.rows = transformers.DynamicCache(), list(rows)
        out = self.decoder(inputs_embeds=padded, attention_mask=self.mask, position_ids=self.positions,
                           use_cache=True, span_ids=spans, **self._cache())
        self.positions = self.positions[:, -1:] + 1
        return out.last_hidden_state[:, -1]

    def _cache(self) -> dict:
        return {self.cache_keyword: self.cache}

    def step(self, rows: list[int], embeds: torch.Tensor) -> torch.Tensor:
        """The hidden states `[len(rows), hidden]` after one new token of each of `rows` (`embeds`
        `[len(rows), hidden]`); every other prompt row steps on a zero embedding."""
        places = torch.tensor([self.rows.index(row) for row in rows], device=embeds.device)
        batch = embeds.new_zeros(len(self.rows), 1, embeds.shape[-1])
        batch[places, 0] = embeds
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        out = self.decoder(inputs_embeds=batch, attention_mask=self.mask, position_ids=self.positions,
                           use_cache=True, **self._cache())
        self.positions = self.positions + 1
        return out.last_hidden_state[places, -1]
