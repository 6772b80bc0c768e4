"""The video encoder (VideoMAE's): frames -> `TubeletEmbed` (2 x 16 x 16 tubelets by default, fixed
sine-cosine positions added in the same pass; uint8 frames normalized inside it when the config has a
mean and std) -> pre-norm transformer blocks on `MixedAttention`. `from_hf_videomae` takes an HF
`VideoMAEModel`'s weights (same outputs from the same frames); `sample_frames` picks the frames a clip
gives the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmfast.models.clip import Block
from mmfast.models.convert import load_renamed
from mmfast.nn.patch_embed import TubeletEmbed


@dataclass(kw_only=True)
class VideoConfig:
    image_size: int = 224
    patch_size: int = 16
    # None: patch_size; smaller: overlapping tubelets (mmfast's, not in VideoMAE), e.g. 8-pixel patches every 4
    patch_stride: int | None = None
    channels: int = 3
    frames: int = 16
    tubelet_size: int = 2
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-12
    final_norm: bool = False  # VideoMAE with mean pooling (its default) leaves the last states unnormalized
    mean: tuple[float, ...] | None = None  # set: uint8 frames, normalized inside the tubelet embedding
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.frames % self.tubelet_size or self.image_size % self.patch_size:
            raise ValueError(f"VideoConfig: frames ({self.frames}) must be a multiple of tubelet_size "
                             f"({self.tubelet_size}) and image_size ({self.image_size}) of patch_size "
                             f"({self.patch_size})")


def tube_grid(video: VideoConfig) -> tuple[int, int]:
    """(time steps, spatial places) of a clip's tubelets."""
    places = (video.image_size - video.patch_size) // (video.patch_stride or video.patch_size) + 1
    return video.frames // video.tubelet_size, places ** 2


def sinusoid_table(positions: int, width: int) -> torch.Tensor:
    """VideoMAE's fixed positions `[positions, width]`: sin on even channels, cos on odd, channel pair
    j at the frequency 10000^(-2j / width)."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    rate = torch.pow(10000.0, -2 * (torch.arange(width) // 2).double() / width)
    angles = position * rate
    table = torch.where(torch.arange(width) % 2 == 0, angles.sin(), angles.cos())
    return table.float()


class VideoEncoder(nn.Module):
    """`forward(frames)`: `[B, T, C, H, W]` floats (normalized, as HF's processor gives) or, with
    channels_last, uint8 `[B, T, H, W, C]` as video decoders deliver (normalized with config.mean/std)
    -> `[B, tubelets, width]`; `pooled(hidden)`: their mean (VideoMAE's classifier input, before its norm)."""

    def __init__(self, config: VideoConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.embeddings = TubeletEmbed(config.image_size, config.patch_size, config.channels, config.width,
                                       config.frames, config.tubelet_size, stride=config.patch_stride,
                                       mean=config.mean, std=config.std, backend=backend)
        self.register_buffer("position_embeddings", sinusoid_table(self.embeddings.num_patches, config.width),
                             persistent=False)
        self.layers = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio, False, "gelu", backend)
                                    for _ in range(config.layers))
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = config.layer_norm_eps
        self.layernorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps) if config.final_norm else nn.Identity()

    def forward(self, frames: torch.Tensor, *, channels_last: bool = False,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: [B, K] tubelet indices, only those embedded and attended (masked autoencoders)."""
        count = frames.shape[1] if frames.dim() == 5 else None
        if count != self.config.frames:
            raise ValueError(f"VideoEncoder: expected [B, {self.config.frames} frames, ...], got shape "
                             f"{tuple(frames.shape)} (sample_frames picks a clip's frames)")
        x = self.embeddings(frames, self.position_embeddings.to(frames.device), channels_last=channels_last,
                            keep=keep)
        for layer in self.layers:
            x = layer(x)
        return self.layernorm(x)

    @staticmethod
    def pooled(hidden: torch.Tensor) -> torch.Tensor:
        return hidden.mean(1)


def sample_frames(total: int, count: int, *, mode: str = "uniform", training: bool = False, stride: int = 4,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of `count` frames of a `total`-frame clip. uniform (TSN's segments): the clip cut into
    `count` equal segments, one frame from each, random in training, the centre otherwise; dense:
    `count` frames every `stride`, from a random start in training, centred otherwise. Short clips
    repeat their last frame."""
    if total < 1 or count < 1:
        raise ValueError(f"sample_frames: expected total >= 1 and count >= 1, got {total} and {count}")
    if mode == "uniform":
        edges = torch.linspace(0, total, count + 1, dtype=torch.float64)
        length = edges[1:] - edges[:-1]
        offset = torch.rand(count, generator=generator, dtype=torch.float64) if training else torch.full((count,), 0.5)
        indices = (edges[:-1] + offset * length).floor().long()
    elif mode == "dense":
        span = (count - 1) * stride + 1
        room = max(total - span, 0)
        start = int(torch.randint(room + 1, (1,), generator=generator)) if training else room // 2
        indices = start + torch.arange(count) * stride
    else:
        raise ValueError(f"sample_frames: mode must be 'uniform' or 'dense', got {mode!r}")
    return indices.clamp(max=total - 1)


# HF's VideoMAEModel names onto ours (its keys have no bias: load_renamed zeroes ours)
_VIDEOMAE_RENAMES = [
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".self_attn.q_proj."),
    (r"\.attention\.attention\.key\.", ".self_attn.k_proj."),
    (r"\.attention\.attention\.value\.", ".self_attn.v_proj."),
    (r"\.attention\.output\.dense\.", ".self_attn.o_proj."),
    (r"\.layernorm_before\.", ".layer_norm1."),
    (r"\.layernorm_after\.", ".layer_norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"^(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.projection."),
]


def from_hf_videomae(hf_model, backend: str | None = None, *, mean=None, std=None) -> VideoEncoder:
    """A VideoEncoder with an HF VideoMAEModel's weights. mean, std: set to take uint8 frames (the HF
    processor's image_mean / image_std); None takes its normalized float pixel_values."""
    hf_config = hf_model.config
    if hf_config.hidden_act != "gelu" or not hf_config.qv_bias:
        raise ValueError(f"from_hf_videomae: expected hidden_act 'gelu' with q and v biases, got "
                         f"{hf_config.hidden_act!r}, qv_bias={hf_config.qv_bias}")
    config = VideoConfig(image_size=hf_config.image_size, patch_size=hf_config.patch_size,
                         channels=hf_config.num_channels, frames=hf_config.num_frames,
                         tubelet_size=hf_config.tubelet_size, width=hf_config.hidden_size,
                         layers=hf_config.num_hidden_layers, heads=hf_config.num_attention_heads,
                         mlp_ratio=hf_config.intermediate_size / hf_config.hidden_size,
                         layer_norm_eps=hf_config.layer_norm_eps, final_norm=not hf_config.use_mean_pooling,
                         mean=mean, std=std)
    model = VideoEncoder(config, backend)
    return load_renamed(model, hf_model.state_dict(), _VIDEOMAE_RENAMES, zero_key_bias=True)

