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
from mmfast.models.clip import TextConfig, TextTransformer, _scalars_as_vectors


@dataclass(kw_only=True)
class ClapConfig:
    embed_dim: int = 512
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = "gelu"  # the text tower's
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for SigLIP
    backend: str | None = None


class CLAP(nn.Module):
    """`encode_audio(waveform)`, `encode_text(tokens)`, and `forward(waveform, tokens)` returning both
    (normalized) with the exponentiated logit scale (and bias), as CLIP's forward does."""

    def __init__(self, config: ClapConfig):
        super().__init__()
        self.config = config
        self.audio_model = AudioEncoder(config.audio, config.backend)
        self.text_model = TextTransformer(config.text, config.activation, config.backend)
        self.audio_projection = nn.Linear(config.audio.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full([1], float(config.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.full([1], float(config.init_logit_bias)))
                           if config.init_logit_bias is not None else None)
        self._register_load_state_dict_pre_hook(_scalars_as_vectors)
        # AST's tokens and positions start at zero in HF; small random values let a fresh model tell
        # clips apart from the first step
        nn.init.normal_(self.audio_model.embeddings.position_embeddings, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text_model.grad_checkpointing = enable  # the audio blocks run plainly

    def blocks(self) -> list[nn.Module]:
        return [*self.audio_model.layers, *self.text_model.layers]

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def encode_audio(self, waveform: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, samples] float waveforms at config.audio.sample_rate -> [B, embed_dim]."""
        features = self.audio_projection(self.audio_model.pooled(self.audio_model(waveform)))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_projection(self.text_model(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, waveform: torch.Tensor, tokens: torch.Tensor) -> dict:
        """{"audio_features", "text_features" (unit length), "logit_scale" (exponentiated, capped),
        "logit_bias" (SigLIP)}."""
        output = {"audio_features": self.encode_audio(waveform, normalize=True),
                  "text_features": self.encode_text(tokens, normalize=True), "logit_scale": self.scale()}
        if self.logit_bias is not None:
            output["logit_bias"] = self.logit_bias
        return output
