"""The video-text contrastive task: the contrastive task's loop, losses and engines over (frames, caption)
pairs of the bundled moving shapes (mmfast.data.synth_media: 8 frames of 32 x 32, a colored shape
moving left, right, up or down), with zero-shot classification of color x shape x direction by prompts
and retrieval both ways on the held-out clips. `model.tower=frames` trains the frame-pooling baseline
(mmfast.models.video_clip)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from mmfast.data import synth, synth_media
from mmfast.data.other_renderer import other_moving_set
from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.models.clip import TextConfig, patch_count, transformer_flops
from mmfast.models.video import VideoConfig, sample_frames, tube_grid
from mmfast.models.video_clip import VideoCLIP, VideoClipConfig, frame_vision_config
from mmfast.train.tasks.audio_contrastive import AudioContrastiveTask
from mmfast.train.tasks.contrastive import CLIP_MEAN, CLIP_STD
from mmfast.train.tasks.towers import load_media_tower

VIDEO_FORMAT = 1  # bumped when the bundled clips change


@dataclass(kw_only=True)
class VideoContrastiveModelConfig(VideoClipConfig):
    """The run's `model:` section: every field of mmfast.models.video_clip.VideoClipConfig, sized for
    the CPU, and the loss. video.image_size follows data.image_size; text.vocab_size is the tokenizer's
    target."""

    embed_dim: int = 128
    video: VideoConfig = field(default_factory=lambda: VideoConfig(
        image_size=32, patch_size=8, frames=8, tubelet_size=2, width=128, layers=4, heads=4, layer_norm_eps=1e-6,
        final_norm=True, mean=CLIP_MEAN, std=CLIP_STD))
    text: TextConfig = field(default_factory=lambda: TextConfig(vocab_size=200, context_length=12, width=128,
                                                                layers=2, heads=4, pooling="mean"))
    loss: str = "clip"  # or "siglip"


def class_prompts() -> tuple[list[tuple[str, str, str]], list[list[str]]]:
    """The zero-shot classes (color, shape, direction) and one prompt each, as the captions say it."""
    classes, prompts = [], []
    for color in synth.COLORS:
        article = "an" if color[0] in "aeiou" else "a"
        for shape in synth.SHAPES:
            for direction in synth_media.DIRECTIONS:
                classes.append((color, shape, direction))
                prompts.append([f"{article} {color} {shape} moving {direction}"])
    return classes, prompts


def _zero_shot(video: torch.Tensor, text: torch.Tensor, classes, metas: list[dict], prefix: str) -> dict:
    """Each clip's class by its prompt's cosine (text: [classes, D]); the whole class and each attribute."""
    predicted = [classes[index] for index in (video @ text.T).argmax(1).tolist()]
    truth = [(meta["color"], meta["shape"], meta["direction"]) for meta in metas]
    result = {f"{prefix}zero_shot_accuracy": float(np.mean([p == t for p, t in zip(predicted, truth)]))}
    for position, attribute in enumerate(("color", "shape", "direction")):
        result[f"{prefix}{attribute}_accuracy"] = float(np.mean([p[position] == t[position]
                                                                 for p, t in zip(predicted, truth)]))
    return result


def check_clip_size(config, task: str) -> None:
    """The bundled clips are 32 x 32: a task reading them refuses another data.image_size."""
    if config.data.image_size != 32:
        raise ValueError(f"config: task {task} reads the bundled 32 x 32 clips; data.image_size must be 32, "
                         f"got {config.data.image_size}")


class VideoPreprocess:
    """uint8 frames [T, H, W, 3] (any T, any size) -> uint8 [frames, S, S, 3]: `frames` of them picked by
    uniform segment sampling (each segment's centre), each resized on its shorter side and centre-cropped
    to S. Stack them for a batch."""

    def __init__(self, video: VideoConfig):
        from mmfast.data.preprocess import Preprocess

        self.frames, self.image = video.frames, Preprocess(video.image_size)

    def __call__(self, clip) -> torch.Tensor:
        array = np.asarray(clip)
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or not len(array):
            raise ValueError(f"preprocess: expected uint8 frames [T, H, W, 3] with T >= 1, got shape {array.shape} "
                             f"dtype {array.dtype}")
        chosen = sample_frames(len(array), self.frames)
        return torch.stack([self.image(array[int(index)]).permute(1, 2, 0) for index in chosen])


class VideoContrastiveTask(AudioContrastiveTask):
    name = "video_contrastive"
    model_section = VideoContrastiveModelConfig
    headline = {"zero_shot_accuracy": "zero-shot", "direction_accuracy": "direction",
                "other_zero_shot_accuracy": "drawn another way", "video_to_text_R@1": "V->T R@1"}
    plot_metrics = {"zero_shot_accuracy": "zero-shot, held-out", "other_zero_shot_accuracy": "zero-shot, drawn another way",
                    "shape_accuracy": "shape", "direction_accuracy": "direction"}

    def check(self, world_size: int) -> None:
        super().check(world_size)
        check_clip_size(self.config, self.name)

    def _ensure_clips(self, progress: bool) -> None:
        synth_media.ensure_media_shards(self.config.data, "video", VIDEO_FORMAT, progress)

    config_class, config_key = VideoClipConfig, "video_clip_config"
    modality = "video"

    def _media_fields(self, fields: dict) -> dict:
        return {**fields, "video": dataclasses.replace(fields["video"], image_size=self.config.data.image_size)}

    def build_model(self) -> VideoCLIP:
        return VideoCLIP(self.model_config)

    def initial_weights(self, model, saved: dict) -> None:
        """train.init_from: a video CLIP's model.pt, or a VideoMAE's (task videomae): its video tower, the
        text tower left as initialized."""
        if saved.get("task") != "videomae":
            return super().initial_weights(model, saved)
        if self.model_config.tower != "tubelets":
            raise ValueError("config: train.init_from of a videomae run needs model.tower=tubelets")
        load_media_tower(model, saved, "video", "videomae_config", self.model_config.video,
                         ("image_size", "patch_size", "patch_stride", "channels", "frames", "tubelet_size", "width",
                          "layers", "heads", "mlp_ratio", "final_norm"))

    def _media_tokens(self) -> int:
        video = self.model_config.video
        if self.model_config.tower == "frames":
            return video.frames * (patch_count(frame_vision_config(video)) + 1)
        times, places = tube_grid(video)
        return times * places

    def flops_per_sample(self) -> float:
        video, text = self.model_config.video, self.model_config.text
        if self.model_config.tower == "frames":
            media = video.frames * transformer_flops(self._media_tokens() // video.frames, video.width, video.layers,
                                                     video.mlp_ratio)
        else:
            media = transformer_flops(self._media_tokens(), video.width, video.layers, video.mlp_ratio)
        return 3.0 * (media + transformer_flops(text.context_length, text.width, text.layers, text.mlp_ratio))

    def tokens_per_sample(self) -> int:
        return self.model_config.text.context_length + self._media_tokens()

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Zero-shot color x shape x direction (and each attribute alone) and retrieval R@1/5 both ways
        on the held-out clips; zero-shot on the clips drawn another way (`other_...`: other_moving_set,
        another renderer and motion, per background band too)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        clips, captions, metas = self.held_out
        if getattr(self, "other", None) is None:  # drawn once per run, not at every evaluation
            self.other = other_moving_set(frames=self.model_config.video.frames, size=self.config.data.image_size)
        classes, prompts = class_prompts()
        text = model.encode_text(self.tokenizer([group[0] for group in prompts]).to(device), normalize=True).float().cpu()
        video = self._embed(model, clips, device)
        result = _zero_shot(video, text, classes, metas, "")
        other = self._embed(model, self.other[0], device)
        result.update(_zero_shot(other, text, classes, self.other[1], "other_"))
        for band in ("dark", "mid", "light"):
            rows = [index for index, meta in enumerate(self.other[1]) if meta["background"] == band]
            result[f"other_zero_shot_accuracy_{band}"] = _zero_shot(
                other[rows], text, classes, [self.other[1][index] for index in rows], "")["zero_shot_accuracy"]
        words = model.encode_text(self.tokenizer(captions).to(device), normalize=True).float().cpu()
        similarity, target = video @ words.T, torch.arange(len(captions))
        for direction, table in (("video_to_text", similarity), ("text_to_video", similarity.T)):
            rank = (table > table[target, target][:, None]).sum(1)
            for k in (1, 5):
                result[f"{direction}_R@{k}"] = (rank < k).float().mean().item()
        model.train(was_training)
        return result

    @staticmethod
    def _embed(model, clips: torch.Tensor, device) -> torch.Tensor:
        return torch.cat([model.encode_video(clips[start:start + 256].to(device), normalize=True).float().cpu()
                          for start in range(0, len(clips), 256)])

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(VideoCLIP, preprocess, tokenizer), as mmfast.load_clip gives them for a video run."""
        fields = dict(saved["video_clip_config"])
        video = dict(fields["video"])
        for key in ("mean", "std"):
            video[key] = tuple(video[key]) if video.get(key) is not None else None
        fields["video"], fields["text"] = VideoConfig(**video), TextConfig(**fields["text"])
        model = VideoCLIP(VideoClipConfig(**fields))
        model.load_state_dict(saved["state_dict"])
        tokenizer = CaptionTokenizer.load(os.path.join(directory, "tokenizer.json"))
        return model.to(device).eval(), VideoPreprocess(model.config.video), tokenizer
