"""Masked language modeling (BERT's objective) for the text tower (single-device model code).

The encoder is CLIP's text transformer made bidirectional (`TextConfig.causal=False`: each row's tokens up
to its end token attend to each other, packed, so padding is never attended). `draw_masking` picks 15 % of
the real tokens (never <sot>, <eot> or padding); of those, 80 % are replaced by a learned mask embedding,
10 % by a random word and 10 % left as they are; the head (BERT's: dense, GELU, LayerNorm, then the
vocabulary) predicts the original token at the picked places only, by the fused linear cross-entropy. The
mask is an embedding of its own rather than an extra row of the vocabulary, so the tower's weights have the
shape of a CLIP's text tower and carry over to a contrastive run (`train.init_from`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmfast.models.clip import TextConfig, TextTransformer, transformer_flops
from mmfast.nn.linear_cross_entropy import LinearCrossEntropy

IGNORE = -100  # the label of every place not picked


@dataclass(kw_only=True)
class MlmConfig:
    text: TextConfig = field(default_factory=lambda: TextConfig(causal=False))
    activation: str = "gelu"
    backend: str | None = None
    mask_ratio: float = 0.15  # of each row's real tokens, picked for prediction
    replace_with_mask: float = 0.8  # of the picked: shown as the mask embedding
    replace_with_random: float = 0.1  # of the picked: shown as a random word (the rest: unchanged)

    def __post_init__(self):
        if self.text.causal:
            raise ValueError("MlmConfig: masked language modeling needs a bidirectional tower: text.causal=false")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"MlmConfig: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        shown = (self.replace_with_mask, self.replace_with_random)
        if min(shown) < 0 or sum(shown) > 1:
            raise ValueError(f"MlmConfig: replace_with_mask and replace_with_random must be >= 0 with a sum <= 1, "
                             f"got {self.replace_with_mask} and {self.replace_with_random}")


def draw_masking(tokens: torch.Tensor, config: MlmConfig, special_ids, generator: torch.Generator | None = None):
    """The corruption of one batch [B, T], drawn from `generator` (on the CPU, so a run's draws depend on
    (seed, step) alone): (inputs [B, T] with the random words put in, masked [B, T] bool: the places shown
    as the mask embedding, labels [B, T]: the original token where picked, IGNORE elsewhere). special_ids:
    the tokenizer's ids that are never picked nor drawn as random words (<pad>, <sot>, <eot>, <unk>)."""
    tokens = tokens.cpu()
    special = torch.zeros(config.text.vocab_size, dtype=torch.bool)
    special[list(special_ids)] = True
    words = (~special).nonzero().squeeze(1)
    draws = torch.rand((3, *tokens.shape), generator=generator)
    picked = (draws[0] < config.mask_ratio) & ~special[tokens]
    masked = picked & (draws[1] < config.replace_with_mask)
    randomized = picked & ~masked & (draws[1] < config.replace_with_mask + config.replace_with_random)
    random_words = words[(draws[2] * len(words)).long().clamp(max=len(words) - 1)]
    inputs = torch.where(randomized, random_words, tokens)
    return inputs, masked, torch.where(picked, tokens, IGNORE)


class MaskedLanguageModel(nn.Module):
    """`forward(inputs, masked, labels) -> per-token losses [B, T]` (0 where not picked), or without labels
    the logits [B, T, vocab]. `features(tokens)`: the mean of each row's states up to its end token."""

    def __init__(self, config: MlmConfig):
        super().__init__()
        if config.text.eot_token_id is None:
            raise ValueError("MaskedLanguageModel: text.eot_token_id must be set (the tokenizer's <eot>): the rows' "
                             "ends cannot be found by the largest id once random words are put in")
        self.config = config
        width = config.text.width
        self.text_model = TextTransformer(config.text, config.activation, config.backend)
        self.mask_embedding = nn.Parameter(torch.empty(width).normal_(std=0.02))
        # BERT's prediction head: a transform, then the vocabulary (not tied to the input embedding: engines
        # that shard parameters keep tied ones apart)
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.head = LinearCrossEntropy(width, config.text.vocab_size, reduction="none", backend=config.backend)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text_model.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        """The units an engine shards, compiles or checkpoints."""
        return list(self.text_model.layers)

    def forward(self, inputs: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if inputs.shape != masked.shape or (labels is not None and labels.shape != inputs.shape):
            raise ValueError(f"MaskedLanguageModel: inputs, masked and labels must have one shape [B, T], got "
                             f"{tuple(inputs.shape)}, {tuple(masked.shape)} and "
                             f"{None if labels is None else tuple(labels.shape)}")
        embedded = self.text_model.token_embedding(inputs)
        embedded = torch.where(masked[..., None], self.mask_embedding.to(embedded.dtype), embedded)
        hidden = self.transform(self.text_model.hidden_states(inputs, embeddings=embedded))
        if labels is None:
            return self.head(hidden)
        return self.head(hidden, labels, ignore_index=IGNORE)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids (nothing masked) -> [B, width]: the mean of each row's final states up to its end."""
        hidden = self.text_model.hidden_states(tokens)
        lengths = self.text_model.ends(tokens) + 1
        return hidden.sum(1) / lengths[:, None].to(hidden.dtype)  # the states past the end are zero


def mlm_flops_per_sample(config: MlmConfig, tokens: int) -> float:
    """Training FLOPs (3 x forward) of one row of `tokens` tokens: the tower, the transform on every token,
    and the vocabulary on the picked ones."""
    text = config.text
    forward = transformer_flops(tokens, text.width, text.layers, text.mlp_ratio) + 2 * tokens * text.width ** 2
    forward += 2 * tokens * config.mask_ratio * text.width * text.vocab_size
    return 3 * forward


__all__ = ["IGNORE", "MaskedLanguageModel", "MlmConfig", "draw_masking", "mlm_flops_per_sample"]
