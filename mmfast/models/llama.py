"""A decoder-only language model of the Llama / Qwen2 architecture (RMSNorm, SwiGLU, rotary positions,
grouped-query attention, tied or untied head) on `mmfast.nn.MixedAttention`: the language model of
the encoder + LLM paradigm (LLaVA) and of the unified model.

Module names are HF's (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, `.mlp.gate_proj`,
`model.norm`, `lm_head`), so `LlamaForCausalLM` / `Qwen2ForCausalLM` weights load one to one
(`from_hf_causal_lm`, `to_hf_causal_lm`). Sequences are packed (`cu_seqlens`) or padded `[B, T]`;
images and audio clips are bidirectional spans (`span_ids`) inside causal text. The packing tables and
the rotary tables are built once per forward and shared by every layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmfast.nn.attention import MixedAttention, positions_in_sequences, rotary_tables
from mmfast.nn.kv_cache import KVCache
from mmfast.nn.linear_cross_entropy import LinearCrossEntropy
from mmfast.ops.mixed_attention import build_packing

ARCHITECTURES = ("llama", "qwen2")


@dataclass(kw_only=True)
class LlamaConfig:
    """HF's field names (LlamaConfig / Qwen2Config), so a config converts field by field.
    model_type "qwen2": biases on the q, k, v projections (attention_bias is Llama's: on all four)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: as many as the query heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    backend: str | None = None

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"LlamaConfig: model_type must be one of {ARCHITECTURES}, got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError(f"LlamaConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads}), or head_dim set")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as HF's LlamaRMSNorm)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=bias)
        self.up_proj = nn.Linear(width, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, width, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        qkv_bias = config.attention_bias or config.model_type == "qwen2"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MixedAttention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                        head_dim=config.head_dim, bias=qkv_bias, output_bias=config.attention_bias,
                                        causal=True, rotary_base=config.rope_theta, backend=config.backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, x, packing, rotary, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), packing=packing, rotary=rotary, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def _begin_cache(cache: KVCache, rows: torch.Tensor | None, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Tells `cache` where this forward's tokens go; returns their positions."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    rows = torch.arange(len(lengths), device=lengths.device) if rows is None else rows.to(lengths.device)
    starts = cache.lengths.to(lengths.device)[rows]
    if bool((starts == 0).all()):  # prompts
        cache.begin(rows.repeat_interleave(lengths), positions_in_sequences(cu_seqlens, total), decoding=False)
    elif bool((lengths == 1).all()):
        cache.begin(rows, starts, decoding=True)
    else:
        raise ValueError("LlamaModel: with a KV cache, a forward either starts empty rows (prompts) or adds one "
                         f"token to each row; got sequences of lengths {lengths.tolist()} on rows of lengths "
                         f"{starts.tolist()}")
    return cache.position_of


class LlamaModel(nn.Module):
    """The trunk: token embeddings, decoder layers, final norm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.grad_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embeddings (transformers' accessor, so callers take either decoder alike)."""
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                span_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the final norm, `[B, T, hidden]` for padded `[B, T]` input (every row one
        sequence) or `[total, hidden]` for packed `[total]` input with `cu_seqlens` (int32 [B + 1]).
        inputs_embeds replaces input_ids (LLaVA puts projected image features among the token
        embeddings); span_ids marks bidirectional spans (-1: causal text); position_ids default to each
        token's index inside its sequence. cache (packed input, generation): the sequences are the
        prompts of empty cache rows, or one token each continuing its row; cache_rows: each sequence's
        row (default 0, 1, ...)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LlamaModel: pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        padded = cu_seqlens is None
        if padded:
            if x.dim() != 3:
                raise ValueError(f"LlamaModel: without cu_seqlens the input is padded [B, T], got embeddings of "
                                 f"shape {tuple(x.shape)}")
            batch, length = x.shape[:2]
            cu_seqlens = torch.arange(0, (batch + 1) * length, length, device=x.device, dtype=torch.int32)
            max_seqlen, x = length, x.flatten(0, 1)
            span_ids = None if span_ids is None else span_ids.reshape(-1)
            position_ids = None if position_ids is None else position_ids.reshape(-1)
        elif x.dim() != 2:
            raise ValueError(f"LlamaModel: with cu_seqlens the input is packed [total], got embeddings of shape "
                             f"{tuple(x.shape)}")
        if cache is not None:
            position_ids = _begin_cache(cache, cache_rows, cu_seqlens, x.shape[0])
        # built once here and shared by every layer (each layer rebuilding them cost a host sync apiece)
        packing = None if cache is not None and cache.decoding else build_packing(cu_seqlens, span_ids, x.shape[0],
                                                                                  max_seqlen, causal=True)
        if position_ids is None:
            position_ids = positions_in_sequences(cu_seqlens, x.shape[0])
        head_dim = self.layers[0].self_attn.head_dim if len(self.layers) else 2
        # in the projections' dtype, built once: under autocast they are bf16 while the residual stream stays
        # float32, and a float32 rotation would leave q and k in another dtype than v
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        rotary = rotary_tables(position_ids, head_dim, self.config.rope_theta, dtype)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, packing, rotary, use_reentrant=False)
            else:
                x = layer(x, packing, rotary, cache)
        x = self.norm(x)
        return x.unflatten(0, (batch, length)) if padded else x


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids) -> logits`, position t predicting token t + 1; with `labels` (already shifted:
    labels[t] is the target of position t, ignore_index where nothing is supervised) the per-token
    cross-entropy instead, by the fused linear cross-entropy (no `[tokens, vocab]` logits)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = LinearCrossEntropy(config.hidden_size, config.vocab_size, bias=False, reduction="none",
                                          backend=config.backend)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        """The units an engine shards, compiles or checkpoints."""
        return list(self.model.layers)

    def forward(self, input_ids: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
                ignore_index: int = -100, **inputs) -> torch.Tensor:
        """Logits (`[B, T, vocab]` or `[total, vocab]`), or with labels the per-token losses (0 where
        ignored). `inputs`: LlamaModel.forward's keywords."""
        hidden = self.model(input_ids, **inputs)
        if labels is None:
            return self.lm_head(hidden)
        return self.lm_head(hidden, labels, ignore_index=ignore_index)


def llama_config_of_hf(hf_config, backend: str | None = None) -> LlamaConfig:
    """An mmfast LlamaConfig from an HF LlamaConfig or Qwen2Config (refuses what the model does not do)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"llama_config_of_hf: expected a Llama or Qwen2 config, got model_type {model_type!r}")
    # transformers 5 keeps the rotary settings in rope_parameters (rope_scaling is its older name)
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"llama_config_of_hf: only the default rotary embedding is implemented, got rope type "
                         f"{rope_type!r}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"llama_config_of_hf: expected hidden_act 'silu', got {hf_config.hidden_act!r}")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("llama_config_of_hf: sliding-window attention is not implemented")
    theta = rope.get("rope_theta")
    return LlamaConfig(
        model_type=model_type, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads, num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        rope_theta=float(theta if theta is not None else getattr(hf_config, "rope_theta", 10000.0)),
        rms_norm_eps=hf_config.rms_norm_eps, tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        max_position_embeddings=hf_config.max_position_embeddings, backend=backend)


def from_hf_causal_lm(hf_model, backend: str | None = None) -> LlamaForCausalLM:
    """An mmfast LlamaForCausalLM with the weights of an HF LlamaForCausalLM or Qwen2ForCausalLM."""
    model = LlamaForCausalLM(llama_config_of_hf(hf_model.config, backend))
    state = {key: value for key, value in hf_model.state_dict().items() if not key.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model


def hf_config_of(config: LlamaConfig):
    """The HF LlamaConfig / Qwen2Config of an mmfast LlamaConfig."""
    import transformers

    fields = {key: value for key, value in dataclasses.asdict(config).items()
              if key not in ("model_type", "backend", "rope_theta")}
    if config.model_type == "qwen2":
        fields.pop("attention_bias"), fields.pop("mlp_bias")
        if config.attention_bias or config.mlp_bias:
            raise ValueError("to_hf_causal_lm: HF's Qwen2 has no attention_bias / mlp_bias option")
    kind = transformers.Qwen2Config if config.model_type == "qwen2" else transformers.LlamaConfig
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    fields["head_dim"] = config.head_dim or config.hidden_size // config.num_attention_heads
    fields["num_key_value_heads"] = config.num_key_value_heads or config.num_attention_heads
    return kind(**fields)


def to_hf_causal_lm(model: LlamaForCausalLM):
    """The HF LlamaForCausalLM / Qwen2ForCausalLM with `model`'s weights (to serve with the tools users
    already have)."""
    import transformers

    hf_config = hf_config_of(model.config)
    kind = transformers.Qwen2ForCausalLM if model.config.model_type == "qwen2" else transformers.LlamaForCausalLM
    hf_model = kind(hf_config)
    missing, unexpected = hf_model.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [key for key in missing if not key.endswith("rotary_emb.inv_freq")]:
        raise RuntimeError(f"to_hf_causal_lm: weights do not map, missing {missing}, unexpected {unexpected}")
    return hf_model
