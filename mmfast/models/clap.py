"""The audio-text dual encoder (CLAP's shape): mmfast's AST audio encoder (waveforms through the fused
log-mel) and CLIP's text transformer, each projected into one embedding space, with a learnable logit
scale (and bias for SigLIP). Trained by the same contrastive losses as CLIP (task `audio_contrastive`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.models.audio import AudioConfig, AudioEncoder
from mmfast.models.clip import DualEncoder, TextConfig


@dataclass(kw_only=True)
class ClapConfig:
    embed_dim: int = 512
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = "gelu"  # the text tower's
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for SigLIP
    backend: str | None = None


class CLAP(DualEncoder):
    """`encode_audio(waveform)`, `encode_text(tokens)`, and `forward(waveform, tokens)` returning both
    (normalized) with the exponentiated logit scale (and bias), as CLIP's forward does."""

    def __init__(self, config: ClapConfig):
        super().__init__()
        self.config = config
        self.audio_model = AudioEncoder(config.audio, config.backend)
        self.text_model = self._text_model(config)
        self.audio_projection = nn.Linear(config.audio.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self._logit_parameters(config)
        # AST's tokens and positions start at zero in HF; small random values let a fresh model tell
        # clips apart from the first step
        nn.init.normal_(self.audio_model.embeddings.position_embeddings, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text_model.grad_checkpointing = enable  # the audio blocks run plainly

    def blocks(self) -> list[nn.Module]:
        return [*self.audio_model.layers, *self.text_model.layers]

    def encode_audio(self, waveform: torch.Tensor, normalize: bool = False,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[B, samples] float waveforms at config.audio.sample_rate -> [B, embed_dim]. lengths: [B] valid
        samples per clip, for clips of different lengths in one batch (AudioEncoder.forward)."""
        features = self.audio_projection(self.audio_model.pooled(self.audio_model(waveform, lengths=lengths)))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, waveform: torch.Tensor, tokens: torch.Tensor) -> dict:
        """{"audio_features", "text_features" (unit length), "logit_scale" (exponentiated, capped),
        "logit_bias" (SigLIP)}."""
        return self._output("audio_features", self.encode_audio(waveform, normalize=True), tokens)
