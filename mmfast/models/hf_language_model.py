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
