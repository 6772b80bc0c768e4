"""A small causal language model over caption tokens: the CLIP text tower (token and position
embeddings, pre-norm causal blocks on mixed_attention, a final norm) and an untied output head whose
training loss never builds the [tokens, vocab] logits (mmfast.nn.LinearCrossEntropy)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmfast.models.clip import TextConfig, TextTransformer, transformer_flops
from mmfast.nn.linear_cross_entropy import LinearCrossEntropy


@dataclass(kw_only=True)
class CaptionLMConfig:
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = "gelu"  # or "quick_gelu"
    backend: str | None = None


class CaptionLM(nn.Module):
    """`forward(tokens [B, T] int64) -> logits [B, T, vocab_size]`, position t predicting token t + 1:
    the CLIP text tower's trunk (TextTransformer.hidden_states) and an output head.
    `forward(tokens, labels=targets, ignore_index=pad)` returns the per-token cross-entropy [B, T]
    instead (0 where ignored), by the fused linear cross-entropy (through forward, so DDP, FSDP2
    and DeepSpeed wrappers see the call)."""

    def __init__(self, config: CaptionLMConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text, config.activation, config.backend)
        self.head = LinearCrossEntropy(config.text.width, config.text.vocab_size, bias=False, reduction="none",
                                       backend=config.backend)  # nn.Linear's parameters and state-dict keys

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text_model.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        """The units an engine shards, compiles or checkpoints."""
        return list(self.text_model.layers)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """[B, T] token ids -> [B, T, vocab_size] logits, or with labels [B, T] the per-token losses."""
        hidden = self.text_model.hidden_states(tokens)
        if labels is None:
            return self.head(hidden)
        return self.head(hidden, labels, ignore_index=ignore_index)


def flops_per_sequence(config: TextConfig, tokens: int) -> float:
    """Training FLOPs (3 x forward) of one sequence of `tokens` tokens."""
    forward = transformer_flops(tokens, config.width, config.layers, config.mlp_ratio)
    forward += 2 * tokens * config.width * config.vocab_size  # the output head
    return 3 * forward
