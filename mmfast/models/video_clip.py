"""The video-text dual encoder: a video tower and CLIP's text transformer projected into one embedding
space, trained by CLIP's or SigLIP's loss (task `video_contrastive`). Two video towers:

- `tubelets` (VideoMAE's encoder): uint8 frames -> 2 x p x p tubelets embedded in one pass
  (`TubeletEmbed`) -> transformer over space and time -> mean of the states. It sees motion.
- `frames`, the frame-pooling baseline: the image CLIP's vision transformer on each frame on its own,
  the projected features averaged over the frames. The mean of per-frame features cannot tell a clip
  from the same frames in another order, so it cannot tell left from right: the point of tubelets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.models.clip import DualEncoder, TextConfig, VisionConfig, VisionTransformer
from mmfast.models.video import VideoConfig, VideoEncoder

TOWERS = ("tubelets", "frames")


@dataclass(kw_only=True)
class VideoClipConfig:
    embed_dim: int = 512
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tower: str = "tubelets"  # or "frames" (see the module)
    activation: str = "gelu"  # the text tower's (and the frames tower's)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for SigLIP
    backend: str | None = None

    def __post_init__(self):
        if self.tower not in TOWERS:
            raise ValueError(f"VideoClipConfig: tower must be one of {list(TOWERS)}, got {self.tower!r}")


def frame_vision_config(video: VideoConfig) -> VisionConfig:
    """The image tower the frames baseline runs on each frame: the video tower's sizes."""
    return VisionConfig(image_size=video.image_size, patch_size=video.patch_size, patch_stride=video.patch_stride,
                        channels=video.channels,
                        width=video.width, layers=video.layers, heads=video.heads, mlp_ratio=video.mlp_ratio,
                        mean=video.mean, std=video.std)


class VideoCLIP(DualEncoder):
    """`encode_video(frames)` (uint8 `[B, T, H, W, 3]`, T = config.video.frames), `encode_text(tokens)`,
    and `forward(frames, tokens)` returning both (normalized) with the logit scale (and bias)."""

    def __init__(self, config: VideoClipConfig):
        super().__init__()
        self.config = config
        if config.tower == "tubelets":
            self.video_model = VideoEncoder(config.video, config.backend)
        else:
            self.video_model = VisionTransformer(frame_vision_config(config.video), config.activation, config.backend)
        self.text_model = self._text_model(config)
        self.video_projection = nn.Linear(config.video.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self._logit_parameters(config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text_model.grad_checkpointing = enable
        if isinstance(self.video_model, VisionTransformer):
            self.video_model.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        return [*self.video_model.layers, *self.text_model.layers]

    def encode_video(self, frames: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """uint8 `[B, T, H, W, 3]` -> `[B, embed_dim]` (unit length with normalize)."""
        expected = (self.config.video.frames, self.config.video.image_size, self.config.video.image_size,
                    self.config.video.channels)
        if frames.dim() != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"encode_video: expected frames [B, {', '.join(map(str, expected))}] (the run's "
                             f"preprocess samples and resizes a clip), got shape {tuple(frames.shape)}")
        if self.config.tower == "tubelets":
            features = self.video_projection(self.video_model.pooled(self.video_model(frames, channels_last=True)))
        else:
            batch, count = frames.shape[:2]
            pixels = frames.flatten(0, 1).permute(0, 3, 1, 2).contiguous()  # each frame alone: [B * T, C, H, W]
            features = self.video_projection(self.video_model(pixels)).view(batch, count, -1).mean(1)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor) -> dict:
        """{"video_features", "text_features" (unit length), "logit_scale", "logit_bias" (SigLIP)}."""
        return self._output("video_features", self.encode_video(frames, normalize=True), tokens)
