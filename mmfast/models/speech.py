"""The speech encoder (Whisper's): waveform -> the fused log-mel with Whisper's settings (16 kHz, 25 ms
windows every 10 ms, Slaney mel, log10, Whisper's clamp to 8 below the peak and rescaling, the clip
padded with silence to 30 s) -> two 1-D convolutions (the second halving the frames), GELU each ->
fixed positions -> pre-norm transformer blocks on `MixedAttention` -> final norm. `from_hf_whisper`
takes an HF `WhisperModel`'s (or `WhisperForConditionalGeneration`'s) encoder weights and gives its
outputs from the same features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.models.clip import Block
from mmfast.models.convert import load_renamed
from mmfast.ops.log_mel import log_mel_spectrogram


@dataclass(kw_only=True)
class SpeechConfig:
    sample_rate: int = 16000
    num_mel_bins: int = 80
    max_source_positions: int = 1500  # positions after the strided convolution: 3,000 frames, 30 s
    width: int = 384
    layers: int = 4
    heads: int = 6
    mlp_ratio: float = 4.0

    @property
    def frames(self) -> int:
        return 2 * self.max_source_positions


class SpeechEncoder(nn.Module):
    """`forward(waveform=[B, samples] | input_features=[B, mel bins, frames])` -> `[B, positions, width]`."""

    def __init__(self, config: SpeechConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.width, config.width, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, config.width)
        self.layers = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio, False, "gelu", backend)
                                    for _ in range(config.layers))
        self.layer_norm = nn.LayerNorm(config.width)
        self.backend = backend

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """`[B, samples]` float waveforms -> Whisper's log-mel `[B, mel bins, frames]` of each clip padded
        with silence (or cut) to config.frames frames."""
        if waveform.dim() != 2 or not waveform.is_floating_point():
            raise ValueError(f"SpeechEncoder: waveform must be float [B, samples], got {tuple(waveform.shape)} "
                             f"{waveform.dtype}")
        hop = self.config.sample_rate // 100
        samples = self.config.frames * hop
        waveform = F.pad(waveform[:, :samples], (0, max(0, samples - waveform.shape[1])))
        mel = log_mel_spectrogram(waveform, sample_rate=self.config.sample_rate, n_fft=hop * 5 // 2, hop_length=hop,
                                  n_mels=self.config.num_mel_bins, normalize="whisper", backend=self.backend)
        return mel[..., :self.config.frames]  # Whisper drops the frame centred past the end

    def forward(self, waveform: torch.Tensor | None = None, *,
                input_features: torch.Tensor | None = None) -> torch.Tensor:
        if (waveform is None) == (input_features is None):
            raise ValueError("SpeechEncoder: pass exactly one of waveform and input_features")
        if input_features is None:
            input_features = self.features(waveform)
        expected = (self.config.num_mel_bins, self.config.frames)
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(f"SpeechEncoder: input_features must be [B, {expected[0]} mel bins, {expected[1]} "
                             f"frames], got {tuple(input_features.shape)}")
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


# HF's WhisperEncoder names onto ours (its keys have no bias: load_renamed zeroes ours)
_WHISPER_RENAMES = [
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
    (r"\.self_attn_layer_norm\.", ".layer_norm1."),
    (r"\.final_layer_norm\.", ".layer_norm2."),
    (r"^(layers\.\d+)\.fc(\d)\.", r"\1.mlp.fc\2."),
]


def from_hf_whisper(hf_model, backend: str | None = None) -> SpeechEncoder:
    """A SpeechEncoder with the encoder weights of an HF WhisperModel / WhisperForConditionalGeneration
    (or its WhisperEncoder)."""
    encoder = hf_model.get_encoder() if hasattr(hf_model, "get_encoder") else hf_model
    hf_config = encoder.config
    if hf_config.activation_function != "gelu":
        raise ValueError(f"from_hf_whisper: expected activation_function 'gelu', got {hf_config.activation_function!r}")
    config = SpeechConfig(num_mel_bins=hf_config.num_mel_bins, max_source_positions=hf_config.max_source_positions,
                          width=hf_config.d_model, layers=hf_config.encoder_layers,
                          heads=hf_config.encoder_attention_heads,
                          mlp_ratio=hf_config.encoder_ffn_dim / hf_config.d_model)
    model = SpeechEncoder(config, backend)
    return load_renamed(model, encoder.state_dict(), _WHISPER_RENAMES, zero_key_bias=True)
