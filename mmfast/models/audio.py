"""The audio encoder (AST, the Audio Spectrogram Transformer): waveform -> the fused log-mel
spectrogram with AST's settings (16 kHz, 25 ms windows every 10 ms, 128 mel bins, natural log,
normalized with AST's mean and std, padded or cut to `max_length` frames) -> `ASTPatchEmbed`
(overlapping 16 x 16 patches, class and distillation tokens) -> pre-norm transformer blocks on
`MixedAttention` -> final norm. `from_hf_ast` takes an HF `ASTModel`'s weights (same outputs from the
same spectrogram) with AST's own front end (`front_end="kaldi"`: Kaldi's fbank, as HF's feature extractor
computes it), so a converted model gives HF's outputs from the same waveform. `front_end="fused"` (the
default of a model trained here) is the fused log-mel kernel: no pre-emphasis or per-frame mean removal,
so a converted model should be fine-tuned before it is switched to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.audio import kaldi_fbank
from mmfast.models.clip import Block, run_packed
from mmfast.models.convert import load_renamed
from mmfast.nn.patch_embed import ASTPatchEmbed
from mmfast.ops.log_mel import log_mel_spectrogram, mel_filters

AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AST's AudioSet statistics of its log-mel features
FRONT_ENDS = ("fused", "kaldi")


@dataclass(kw_only=True)
class AudioConfig:
    sample_rate: int = 16000
    window_ms: float = 25.0
    hop_ms: float = 10.0
    num_mel_bins: int = 128
    max_length: int = 1024  # frames: 10.24 s at a 10 ms hop
    mean: float = AST_MEAN
    std: float = AST_STD
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-12
    front_end: str = "fused"  # or "kaldi": Kaldi's fbank, AST's (and HF's ASTFeatureExtractor's) features

    def __post_init__(self):
        if self.front_end not in FRONT_ENDS:
            raise ValueError(f"AudioConfig: front_end must be one of {FRONT_ENDS}, got {self.front_end!r}")
        for name in ("num_mel_bins", "max_length"):
            if getattr(self, name) < self.patch_size:
                raise ValueError(f"AudioConfig: {name} must be at least patch_size ({self.patch_size}), got "
                                 f"{getattr(self, name)}")


class AudioEncoder(nn.Module):
    """`forward(waveform=[B, samples] | input_values=[B, frames, mel bins])` -> hidden states
    `[B, patches + 2, width]` after the final norm; `pooled(hidden)`: the mean of the class and
    distillation tokens (HF's pooler_output)."""

    def __init__(self, config: AudioConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.embeddings = ASTPatchEmbed(config.width, config.patch_size, config.frequency_stride, config.time_stride,
                                        config.num_mel_bins, config.max_length, backend=backend)
        self.layers = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio, False, "gelu", backend)
                                    for _ in range(config.layers))
        self.layernorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = config.layer_norm_eps
        self.backend = backend
        self._mel_filters: dict[torch.device, torch.Tensor] = {}

    def features(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, samples]` float waveforms at config.sample_rate -> normalized log-mel `[B, max_length, mel
        bins]` (frames past the clip: the log-mel of silence, 0 before normalizing, as AST pads).
        lengths: `[B]` valid samples per clip; what follows them is read as silence and the frames that
        start past them are padding (0 before normalizing), whatever the batch holds there."""
        if waveform.dim() != 2 or not waveform.is_floating_point():
            raise ValueError(f"AudioEncoder: waveform must be float [B, samples], got {tuple(waveform.shape)} "
                             f"{waveform.dtype}")
        config = self.config
        if lengths is not None:
            waveform = waveform * (torch.arange(waveform.shape[1], device=waveform.device) < lengths[:, None])
        if config.front_end == "kaldi":
            mel = kaldi_fbank(waveform, sample_rate=config.sample_rate, num_mel_bins=config.num_mel_bins,
                              frame_length_ms=config.window_ms, frame_shift_ms=config.hop_ms)
            return self._fit(mel, lengths)
        window = round(config.sample_rate * config.window_ms / 1000)
        hop = round(config.sample_rate * config.hop_ms / 1000)
        filters = self._mel_filters.get(waveform.device)
        if filters is None:  # once per device (not a buffer: a cast of the model to bf16 must not round them)
            # AST's 128 HTK bins at a 25 ms window leave the lowest filters without a frequency bin; Kaldi's
            # fbank (AST's features) keeps them, their log the floor: so do we, where the op would refuse them
            filters = self._mel_filters[waveform.device] = mel_filters(
                config.sample_rate, window, config.num_mel_bins, mel_scale="htk", mel_norm=None,
                allow_empty=True).to(waveform.device)
        mel = log_mel_spectrogram(waveform, sample_rate=config.sample_rate, n_fft=window, hop_length=hop,
                                  n_mels=config.num_mel_bins, log="ln", clamp_min=1e-10, filters=filters,
                                  backend=self.backend).transpose(1, 2)
        return self._fit(mel, lengths)

    def _fit(self, mel: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """[B, frames, bins] log-mel -> cut or padded to max_length frames (padding and the frames past
        `lengths`: 0, as AST pads), normalized."""
        config = self.config
        mel = mel[:, :config.max_length]
        mel = F.pad(mel, (0, 0, 0, config.max_length - mel.shape[1]))
        if lengths is not None:
            mel = mel.masked_fill(self._frames(lengths)[..., None], 0.0)
        return (mel - config.mean) / (2 * config.std)  # AST's normalization: half a standard deviation

    def _frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B, max_length] True at the frames that start past each clip's `lengths` samples."""
        hop = round(self.config.sample_rate * self.config.hop_ms / 1000)
        starts = torch.arange(self.config.max_length, device=lengths.device) * hop
        return starts[None, :] >= lengths[:, None]

    def forward(self, waveform: torch.Tensor | None = None, *, input_values: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """keep: [B, K] spectrogram patch indices, only those embedded and attended (masked autoencoders).
        lengths: [B] valid samples per waveform (clips of different lengths in one batch, padded with
        anything): the patches that start past a clip's end are not attended by any token (each clip's
        tokens packed as one sequence), their states zero; without it every patch is attended, as AST
        (and HF's ASTModel) attends its silence padding."""
        if (waveform is None) == (input_values is None):
            raise ValueError("AudioEncoder: pass exactly one of waveform and input_values")
        if lengths is not None:
            lengths = self._check_lengths(waveform, keep, lengths)
        if input_values is None:
            input_values = self.features(waveform, lengths)
        expected = (self.config.max_length, self.config.num_mel_bins)
        if input_values.dim() != 3 or tuple(input_values.shape[1:]) != expected:
            raise ValueError(f"AudioEncoder: input_values must be [B, {expected[0]} frames, {expected[1]} mel bins], "
                             f"got {tuple(input_values.shape)}")
        x = self.embeddings(input_values, keep=keep)
        if lengths is not None:
            return run_packed(self.layers, x, self._valid_tokens(lengths), False, self.layernorm)
        for layer in self.layers:
            x = layer(x)
        return self.layernorm(x)

    def _check_lengths(self, waveform, keep, lengths) -> torch.Tensor:
        if waveform is None or keep is not None:
            raise ValueError("AudioEncoder: lengths (valid samples per clip) go with a waveform, without keep")
        lengths = torch.as_tensor(lengths, device=waveform.device)
        if lengths.shape != waveform.shape[:1] or lengths.is_floating_point() or bool((lengths < 1).any()):
            raise ValueError(f"AudioEncoder: lengths must be [{waveform.shape[0]}] integers >= 1 (valid samples per "
                             f"clip), got {lengths.dtype} {lengths.tolist()[:8]}")
        return lengths

    def _valid_tokens(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B, patches + 2]: the class and distillation tokens and every patch that starts inside its clip
        (patches are numbered frequency-major, AST's order: time place = index % time places)."""
        config = self.config
        times = (config.max_length - config.patch_size) // config.time_stride + 1
        frequencies = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
        first_padding = (~self._frames(lengths)).sum(1)  # frames inside each clip
        patch_starts = torch.arange(times, device=lengths.device).repeat(frequencies) * config.time_stride
        inside = patch_starts[None, :] < first_padding[:, None]
        return F.pad(inside, (2, 0), value=True)

    @staticmethod
    def pooled(hidden: torch.Tensor) -> torch.Tensor:
        return (hidden[:, 0] + hidden[:, 1]) / 2


# HF's ASTModel names, transformers 4 and 5, onto ours
_AST_RENAMES = [
    (r"^(?:encoder\.)?layers?\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.(?:attention\.query|q_proj)\.", ".self_attn.q_proj."),
    (r"\.attention\.(?:attention\.key|k_proj)\.", ".self_attn.k_proj."),
    (r"\.attention\.(?:attention\.value|v_proj)\.", ".self_attn.v_proj."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".self_attn.o_proj."),
    (r"\.layernorm_before\.", ".layer_norm1."),
    (r"\.layernorm_after\.", ".layer_norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"^(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]


def audio_config_of_hf(hf_config, front_end: str = "kaldi") -> AudioConfig:
    if getattr(hf_config, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"audio_config_of_hf: expected hidden_act 'gelu', got {hf_config.hidden_act!r}")
    return AudioConfig(num_mel_bins=hf_config.num_mel_bins, max_length=hf_config.max_length,
                       patch_size=hf_config.patch_size, frequency_stride=hf_config.frequency_stride,
                       time_stride=hf_config.time_stride, width=hf_config.hidden_size,
                       layers=hf_config.num_hidden_layers, heads=hf_config.num_attention_heads,
                       mlp_ratio=hf_config.intermediate_size / hf_config.hidden_size,
                       layer_norm_eps=hf_config.layer_norm_eps, front_end=front_end)


def from_hf_ast(hf_model, backend: str | None = None, front_end: str = "kaldi") -> AudioEncoder:
    """An AudioEncoder with an HF ASTModel's weights (ASTForAudioClassification: pass its
    `.audio_spectrogram_transformer`). front_end "kaldi" (AST's features: HF's outputs from the same
    waveform as HF's ASTFeatureExtractor gives them) or "fused" (mmfast's log-mel kernel: fine-tune first)."""
    return load_renamed(AudioEncoder(audio_config_of_hf(hf_model.config, front_end), backend),
                        hf_model.state_dict(), _AST_RENAMES)
