"""A small causal language model over caption tokens: token and position embeddings, the CLIP text
tower's pre-norm blocks (causal mixed_attention), a final norm and an untied output head."""
from __future__ import annotations

import torch
from torch import nn

from mmfast.models.clip import Block, TextConfig, run_blocks, transformer_flops


class CaptionLM(nn.Module):
    """`forward(tokens [B, T] int64) -> logits [B, T, vocab_size]`, position t predicting token t + 1."""

    def __init__(self, config: TextConfig, activation: str = "gelu", backend=None):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)
        self.layers = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio, True, activation, backend)
                                    for _ in range(config.layers))
        self.final_layer_norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        """The units an engine shards, compiles or checkpoints."""
        return list(self.layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.config.context_length:
            raise ValueError(f"CaptionLM: {tokens.shape[1]} tokens exceed context_length {self.config.context_length}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        x = run_blocks(self.layers, x, self.grad_checkpointing)
        return self.head(self.final_layer_norm(x))


def flops_per_sequence(config: TextConfig, tokens: int) -> float:
    """Training FLOPs (3 x forward) of one sequence of `tokens` tokens."""
    forward = transformer_flops(tokens, config.width, config.layers, config.mlp_ratio)
    forward += 2 * tokens * config.width * config.vocab_size  # the output head
    return 3 * forward
