"""Masked autoencoders: a share of the patches is hidden, the encoder sees only the visible ones,
embedded by the fused patch embedding's `keep` (the hidden patches are never gathered or projected),
and a light decoder reconstructs the hidden patches from the encoded visible tokens and a shared mask
token. The loss is the mean squared error on the hidden patches only, against each patch's values
normalized by their own mean and variance (`norm_pix_loss`).

- `MaskedAutoencoder` (MAE, He et al. 2021): images, a random 75 % of the patches hidden; the encoder
  is CLIP's vision transformer, so its weights carry over to a contrastive or LLaVA run.
- `VideoMaskedAutoencoder` (VideoMAE, Tong et al. 2022): clips, tube masking (the same 90 % of the
  spatial places hidden in every frame, so a hidden patch cannot be copied from its neighbour in
  time); the encoder is mmfast's VideoEncoder (a video_contrastive run's tower).
- `AudioMaskedAutoencoder` (AudioMAE, Huang et al. 2022): waveforms -> the fused log-mel -> 80 % of
  the spectrogram patches hidden at random; the encoder is mmfast's AST AudioEncoder (an
  audio_contrastive run's tower).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmfast.models.audio import AudioConfig, AudioEncoder
from mmfast.models.clip import Block, VisionConfig, VisionTransformer, patch_count, run_blocks, transformer_flops
from mmfast.models.video import VideoConfig, VideoEncoder, sinusoid_table, tube_grid
from mmfast.ops.patch_embed.reference import unfolded_patches


def kept_count(places: int, mask_ratio: float) -> int:
    return int(places * (1 - mask_ratio))


def random_keep(batch: int, places: int, kept: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """MAE's per-sample random subset `[batch, kept]`: the places with the lowest uniform noise."""
    return torch.rand(batch, places, generator=generator).argsort(dim=1)[:, :kept]


def _check_ratio(owner: str, places: int, mask_ratio: float) -> None:
    kept = kept_count(places, mask_ratio)
    if not 0.0 < mask_ratio < 1.0 or kept < 1 or kept >= places:
        raise ValueError(f"{owner}: mask_ratio must leave at least one patch visible and one hidden of the "
                         f"{places} {'places' if owner.startswith('Video') else 'patches'}, got {mask_ratio}")


def sincos_grid_table(width: int, side: int) -> torch.Tensor:
    """MAE's fixed 2-D positions `[side * side, width]` (row-major places): the first half of the channels
    the row's 1-D sin-cos table, the second half the column's."""
    if width % 4:
        raise ValueError(f"sincos_grid_table: width must be a multiple of 4 (sin and cos for rows and columns), "
                         f"got {width}")
    table = sinusoid_table(side, width // 2)
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([table[rows.flatten()], table[columns.flatten()]], dim=1)


def normalized(pixels: torch.Tensor, mean, std, channel_dim: int = 1) -> torch.Tensor:
    """uint8 (scaled by 1/255) or float pixels, normalized with per-channel mean and std (None: as they are)."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    if mean is None:
        return x
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(std, device=x.device).view(shape)


@dataclass(kw_only=True)
class MaskingConfig:
    """What every masked autoencoder takes besides its encoder: the hidden share, the decoder, the targets.
    A subclass names its encoder's config and `places()`, the count masking draws from."""

    mask_ratio: float = 0.75
    decoder_width: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    backend: str | None = None

    def places(self) -> int:
        raise NotImplementedError

    def __post_init__(self):
        _check_ratio(type(self).__name__, self.places(), self.mask_ratio)

    def draw_keep(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The kept patches `[batch, K]`: each sample its own random ones."""
        places = self.places()
        return random_keep(batch, places, kept_count(places, self.mask_ratio), generator)


POSITION_KINDS = ("sincos", "learned")


@dataclass(kw_only=True)
class MaeConfig(MaskingConfig):
    vision: VisionConfig = field(default_factory=VisionConfig)  # the encoder
    activation: str = "gelu"
    # "sincos": MAE's fixed 2-D sin-cos positions in the encoder and the decoder (class token: zeros);
    # "learned": both tables trained from small random values (CLIP's). On the bundled pictures the fixed
    # tables lowered mae-tiny's held-out loss from 0.370 to 0.265 (see the README, "Masked pretraining").
    position_embedding: str = "sincos"

    def __post_init__(self):
        if self.position_embedding not in POSITION_KINDS:
            raise ValueError(f"MaeConfig: position_embedding must be one of {POSITION_KINDS}, "
                             f"got {self.position_embedding!r}")
        super().__post_init__()

    def places(self) -> int:
        return patch_count(self.vision)


@dataclass(kw_only=True)
class VideoMaeConfig(MaskingConfig):
    video: VideoConfig = field(default_factory=VideoConfig)  # the encoder
    mask_ratio: float = 0.9
    decoder_width: int = 384
    decoder_layers: int = 4
    decoder_heads: int = 6

    def __post_init__(self):
        if self.video.patch_stride not in (None, self.video.patch_size):
            raise ValueError(f"VideoMaeConfig: video.patch_stride must be the patch size ({self.video.patch_size}): "
                             f"overlapping tubelets would show the hidden pixels, got {self.video.patch_stride}")
        super().__post_init__()

    def places(self) -> int:
        return tube_grid(self.video)[1]  # spatial places: each is hidden in every time step or in none

    def draw_keep(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Tube masking: each sample keeps its own random spatial places, the same in every time step;
        `[batch, times * kept places]` tubelet indices (row-major over time, height, width)."""
        times, places = tube_grid(self.video)
        spatial = random_keep(batch, places, kept_count(places, self.mask_ratio), generator)
        return (torch.arange(times)[None, :, None] * places + spatial[:, None, :]).flatten(1)


@dataclass(kw_only=True)
class AudioMaeConfig(MaskingConfig):
    audio: AudioConfig = field(default_factory=AudioConfig)  # the encoder (non-overlapping patches: strides = patch)
    mask_ratio: float = 0.8

    def places(self) -> int:
        return audio_patch_count(self.audio)


def audio_patch_count(audio: AudioConfig) -> int:
    return (((audio.num_mel_bins - audio.patch_size) // audio.frequency_stride + 1)
            * ((audio.max_length - audio.patch_size) // audio.time_stride + 1))


class _MaskedAutoencoder(nn.Module):
    """The decoder and loss the masked autoencoders share. A subclass sets `prefix` (the encoder's
    prefix tokens: class token), calls `_build_decoder`, and gives `encode_visible(inputs, keep)`
    (normalized `[B, prefix + K, width]`) and `patch_targets(inputs)` (`[B, N, patch values]`)."""

    prefix = 0

    def _build_decoder(self, encoder_width: int, num_patches: int, num_kept: int, patch_values: int, config,
                       activation: str, mlp_ratio: float) -> None:
        self.config, self.num_patches, self.num_kept = config, num_patches, num_kept
        width = config.decoder_width
        self.decoder_embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_position = nn.Parameter(torch.zeros(1, num_patches + self.prefix, width))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.decoder_position, std=0.02)
        self.decoder_layers = nn.ModuleList(Block(width, config.decoder_heads, mlp_ratio, False, activation,
                                                  config.backend) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(width)
        self.decoder_prediction = nn.Linear(width, patch_values)

    def forward(self, inputs: torch.Tensor, keep: torch.Tensor) -> dict:
        """{"loss", "prediction" [B, N, patch values], "hidden" [B, N] (1 where the loss counts)}."""
        batch = inputs.shape[0]
        if keep.dim() != 2 or tuple(keep.shape) != (batch, self.num_kept):
            raise ValueError(f"{type(self).__name__}: keep must be [{batch}, {self.num_kept}] (mask_ratio "
                             f"{self.config.mask_ratio} of {self.num_patches} patches), got {tuple(keep.shape)}")
        latent = self.decoder_embed(self.encode_visible(inputs, keep))
        width, prefix = latent.shape[-1], self.prefix
        # every place starts as the mask token; the visible ones get their encoded state back
        places = self.mask_token.expand(batch, self.num_patches, width).to(latent.dtype)
        places = places.scatter(1, keep[..., None].expand(-1, -1, width), latent[:, prefix:])
        x = torch.cat([latent[:, :prefix], places], dim=1) + self.decoder_position.to(latent.dtype)
        x = run_blocks(self.decoder_layers, x, False)
        prediction = self.decoder_prediction(self.decoder_norm(x)[:, prefix:])
        hidden = torch.ones(batch, self.num_patches, device=inputs.device)
        hidden.scatter_(1, keep, 0.0)
        with torch.autocast(inputs.device.type, enabled=False):
            target = self.patch_targets(inputs)
            if self.config.norm_pix_loss:
                mean, variance = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                target = (target - mean) / (variance + 1e-6) ** 0.5
            error = (prediction.float() - target).square().mean(-1)
            loss = (error * hidden).sum() / hidden.sum()
        return {"loss": loss, "prediction": prediction, "hidden": hidden}

    def blocks(self) -> list[nn.Module]:
        return [*self.encoder_blocks(), *self.decoder_layers]


class MaskedAutoencoder(_MaskedAutoencoder):
    """Images: `forward(pixels, keep)` (uint8 `[B, C, H, W]`, keep from config.draw_keep); `features(pixels)`:
    the encoder's mean patch state over the whole image, for probes."""

    prefix = 1

    def __init__(self, config: MaeConfig):
        super().__init__()
        vision = config.vision
        self.vision_model = VisionTransformer(vision, config.activation, config.backend)  # CLIP's names
        patches = patch_count(vision)
        self._build_decoder(vision.width, patches, kept_count(patches, config.mask_ratio),
                            vision.channels * vision.patch_size ** 2, config, config.activation, vision.mlp_ratio)
        if config.position_embedding == "sincos":
            side = round(patches ** 0.5)
            for table in (self.vision_model.embeddings.position_embedding.weight, self.decoder_position):
                fixed = sincos_grid_table(table.shape[-1], side)
                table.data.copy_(torch.cat([fixed.new_zeros(1, fixed.shape[1]), fixed]).view_as(table))
                table.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision_model.grad_checkpointing = enable

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.vision_model.layers)

    def encode_visible(self, pixels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The encoder over the class token and the kept patches: `[B, 1 + K, width]`, normalized."""
        return self.vision_model.post_layernorm(self.vision_model.token_states(pixels, keep=keep))

    def patch_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        return patch_pixels(pixels, self.config.vision)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, width]`, all patches visible: the mean of the patch tokens' last states before the final
        norm (MAE's global pool; its fresh `fc_norm` left to the probe's standardization). On mae-tiny it
        read 0.40 of color x shape where the mean of every normalized token read 0.35 (random encoder:
        0.17 both ways; see the README, "Masked pretraining")."""
        return self.vision_model.token_states(pixels)[:, 1:].mean(1)


def patch_pixels(pixels: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
    """The reconstruction targets: each patch's normalized pixels `[B, N, C * p * p]` (the patch
    embedding's order), from uint8 `[B, C, H, W]` (normalized with vision.mean/std) or floats."""
    size, stride = vision.patch_size, vision.patch_stride or vision.patch_size
    x = normalized(pixels, vision.mean, vision.std).unsqueeze(2)
    return unfolded_patches(x, (1, size, size), (1, stride, stride))


class VideoMaskedAutoencoder(_MaskedAutoencoder):
    """Clips: `forward(frames, keep)` (uint8 `[B, T, H, W, C]`, keep from config.draw_keep: tube masking);
    `features(frames)`: the encoder's mean tubelet state over the whole clip, for probes."""

    def __init__(self, config: VideoMaeConfig):
        super().__init__()
        video = config.video
        # a video_contrastive run's names; its final norm (video.final_norm) normalizes what the decoder gets
        self.video_model = VideoEncoder(video, config.backend)
        times, places = tube_grid(video)
        self._build_decoder(video.width, times * places, times * kept_count(places, config.mask_ratio),
                            video.channels * video.tubelet_size * video.patch_size ** 2, config, "gelu",
                            video.mlp_ratio)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # the video encoder runs its blocks plainly

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.video_model.layers)

    def encode_visible(self, frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.video_model(frames, channels_last=True, keep=keep)

    def patch_targets(self, frames: torch.Tensor) -> torch.Tensor:
        video = self.config.video
        x = normalized(frames, video.mean, video.std, channel_dim=-1).permute(0, 4, 1, 2, 3)  # [B, C, T, H, W]
        kernel = (video.tubelet_size, video.patch_size, video.patch_size)
        return unfolded_patches(x, kernel, kernel)

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.video_model(frames, channels_last=True).mean(1)


class AudioMaskedAutoencoder(_MaskedAutoencoder):
    """Waveforms: `forward(waveforms, keep)` (float `[B, samples]` at config.audio.sample_rate, keep from
    config.draw_keep); the targets are the normalized log-mel's patches; `features(waveforms)`: the
    encoder's mean token state over the whole clip, for probes."""

    prefix = 2  # AST's class and distillation tokens

    def __init__(self, config: AudioMaeConfig):
        super().__init__()
        audio = config.audio
        self.audio_model = AudioEncoder(audio, config.backend)  # an audio_contrastive run's names
        nn.init.normal_(self.audio_model.embeddings.position_embeddings, std=0.02)  # as CLAP's: zeros tell no place
        patches = audio_patch_count(audio)
        self._build_decoder(audio.width, patches, kept_count(patches, config.mask_ratio), audio.patch_size ** 2,
                            config, "gelu", audio.mlp_ratio)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # the audio encoder runs its blocks plainly

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.audio_model.layers)

    def encode_visible(self, waveforms: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.audio_model(waveforms, keep=keep)

    def patch_targets(self, waveforms: torch.Tensor) -> torch.Tensor:
        audio = self.config.audio
        spectrogram = self.audio_model.features(waveforms.float()).transpose(1, 2)[:, None, None]  # [B, 1, 1, F, T]
        return unfolded_patches(spectrogram, (1, audio.patch_size, audio.patch_size),
                                (1, audio.frequency_stride, audio.time_stride))

    @torch.no_grad()
    def features(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.audio_model(waveforms).mean(1)


def mae_flops_per_sample(encoder_tokens: int, encoder_width: int, encoder_layers: int, decoder_tokens: int,
                         config, patch_values: int, mlp_ratio: float = 4.0) -> float:
    """Training FLOPs of one sample: the encoder over its visible tokens, the decoder over every place,
    the embedding and prediction projections (x 3: backward)."""
    forward = transformer_flops(encoder_tokens, encoder_width, encoder_layers, mlp_ratio)
    forward += transformer_flops(decoder_tokens, config.decoder_width, config.decoder_layers, mlp_ratio)
    forward += 2 * patch_values * (encoder_tokens * encoder_width + decoder_tokens * config.decoder_width)
    return 3.0 * forward
