"""Task `videomae`: masked-autoencoder pretraining of a video tower (mmfast.models.mae.VideoMaskedAutoencoder,
tube masking) on the bundled moving shapes (captions unused), evaluated by a linear probe of the
direction of motion on the frozen encoder against the same probe on a randomly initialized encoder.
Its tower (`video_model.*`) is a video_contrastive run's."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmfast.data import synth_media
from mmfast.data.other_renderer import other_moving_set
from mmfast.models.mae import VideoMaeConfig, VideoMaskedAutoencoder, kept_count, mae_flops_per_sample
from mmfast.models.video import tube_grid
from mmfast.models.video import VideoConfig
from mmfast.train.tasks.masked_image import CLIP_MEAN, CLIP_STD, CpuDecoder, MaskedImageTask
from mmfast.train.tasks.video_contrastive import VIDEO_FORMAT, VideoPreprocess, check_clip_size


@dataclass(kw_only=True)
class VideoMaeModelConfig(CpuDecoder, VideoMaeConfig):
    """The run's `model:` section: every field of mmfast.models.mae.VideoMaeConfig, sized for the CPU
    (the video_contrastive task's tower); video.image_size follows data.image_size."""

    video: VideoConfig = field(default_factory=lambda: VideoConfig(
        image_size=32, patch_size=8, frames=8, tubelet_size=2, width=128, layers=4, heads=4, layer_norm_eps=1e-6,
        final_norm=True, mean=CLIP_MEAN, std=CLIP_STD))


class MaskedVideoTask(MaskedImageTask):
    name = "videomae"
    model_section = VideoMaeModelConfig
    config_class, config_key, media_key = VideoMaeConfig, "videomae_config", "video"
    probe_samples = 2000  # a clip's features cost its whole encoder (every tubelet visible)

    def check(self, world_size: int) -> None:
        super().check(world_size)
        check_clip_size(self.config, self.name)

    def _ensure_data(self, progress: bool) -> None:
        synth_media.ensure_media_shards(self.config.data, "video", VIDEO_FORMAT, progress)

    def _split(self, name: str):
        return synth_media.load_media_split(self.config.data.synth_dir, name)

    def _other(self):
        return other_moving_set(frames=self.config.model.video.frames, size=self.config.data.image_size)

    def probe_labels(self, metas: list[dict]) -> tuple[list[int], torch.Tensor, int]:
        """Every clip, and its direction of motion (left, right, up, down)."""
        directions = list(synth_media.DIRECTIONS)
        return (list(range(len(metas))), torch.tensor([directions.index(meta["direction"]) for meta in metas]),
                len(directions))

    def build_model(self) -> VideoMaskedAutoencoder:
        return VideoMaskedAutoencoder(self.model_config)

    def flops_per_sample(self) -> float:
        config, video = self.model_config, self.model_config.video
        times, places = tube_grid(video)
        return mae_flops_per_sample(times * kept_count(places, config.mask_ratio), video.width, video.layers,
                                    times * places, config, video.channels * video.tubelet_size * video.patch_size ** 2,
                                    video.mlp_ratio)

    def tokens_per_sample(self) -> int:
        times, places = tube_grid(self.model_config.video)
        return times * places

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(VideoMaskedAutoencoder, preprocess): preprocess(uint8 frames [T, H, W, 3]) -> uint8 [frames, S, S, 3];
        model.features(stacked) gives the encoder's features, model.video_model its tower."""
        fields = dict(saved["videomae_config"])
        video = dict(fields["video"])
        for key in ("mean", "std"):
            video[key] = tuple(video[key]) if video.get(key) is not None else None
        fields["video"] = VideoConfig(**video)
        model = VideoMaskedAutoencoder(VideoMaeConfig(**fields))
        model.load_state_dict(saved["state_dict"])
        return model.to(device).eval(), VideoPreprocess(model.config.video)
