"""A small causal language model over caption tokens: the CLIP text tower (token and position
embeddings, pre-norm causal blocks on mixed_attention, a final norm) and an untied output head."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmfast.models.clip import TextConfig, TextTransformer, transformer_flops


@dataclass(kw_only=True)
class CaptionLMConfig:
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = "gelu"  # or "quick_gelu"
    backend: str | None = None


class CaptionLM(nn.Module):
    """`forward(tokens [B, T] int64) -> logits [B, T, vocab_size]`, position t predicting token t + 1:
    the CLIP text tower's trunk (TextTransformer.hidden_states) and an output head."""

    def __init__(self, config: CaptionLMConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text, config.activation, config.backend)
        self.head = nn.Linear(config.text.width, config.text.vocab_size, bias=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text_model.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        """The units an engine shards, compiles or checkpoints."""
        return list(self.text_model.layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, vocab_size] logits."""
        return self.head(self.text_model.hidden_states(tokens))


def flops_per_sequence(config: TextConfig, tokens: int) -> float:
    """Training FLOPs (3 x forward) of one sequence of `tokens` tokens."""
    forward = transformer_flops(tokens, config.width, config.layers, config.mlp_ratio)
    forward += 2 * tokens * config.width * config.vocab_size  # the output head
    return 3 * forward
