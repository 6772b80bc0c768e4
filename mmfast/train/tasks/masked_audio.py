"""Task `audiomae`: masked-autoencoder pretraining of an audio tower (mmfast.models.mae.AudioMaskedAutoencoder:
the fused log-mel, 80 % of its patches hidden) on the bundled beeps (captions unused), evaluated by a
linear probe of count x pitch on the frozen encoder against the same probe on a randomly initialized
encoder. Its tower (`audio_model.*`) is an audio_contrastive run's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from mmfast.data import synth_media
from mmfast.models.audio import AudioConfig
from mmfast.models.mae import (AudioMaeConfig, AudioMaskedAutoencoder, audio_patch_count, kept_count,
                               mae_flops_per_sample)
from mmfast.train.tasks.audio_contrastive import AudioPreprocess
from mmfast.train.tasks.masked_image import CpuDecoder, MaskedImageTask


@dataclass(kw_only=True)
class AudioMaeModelConfig(CpuDecoder, AudioMaeConfig):
    """The run's `model:` section: every field of mmfast.models.mae.AudioMaeConfig, sized for the CPU
    (the audio_contrastive task's tower, non-overlapping patches)."""

    audio: AudioConfig = field(default_factory=lambda: AudioConfig(
        num_mel_bins=64, max_length=100, patch_size=8, frequency_stride=8, time_stride=8, width=128, layers=3,
        heads=4))


class MaskedAudioTask(MaskedImageTask):
    name = "audiomae"
    model_section = AudioMaeModelConfig
    config_class, config_key, media_key = AudioMaeConfig, "audiomae_config", "audio"

    def check(self, world_size: int) -> None:
        super().check(world_size)
        if self.config.data.source != "synth":
            raise ValueError(f"config: task audiomae reads the bundled audio clips (data.source=synth), got "
                             f"{self.config.data.source!r}")

    def _ensure_data(self, progress: bool) -> None:
        synth_media.ensure_media_shards(self.config.data, "audio", synth_media.AUDIO_FORMAT, progress)

    def _split(self, name: str):
        return synth_media.load_media_split(self.config.data.synth_dir, name)

    def _other(self):
        waveforms, metas = synth_media.other_beeps()
        return torch.from_numpy(waveforms), metas

    def restore(self, run_dir: str) -> None:
        section = self.config.model
        self.model_config = AudioMaeConfig(**{item.name: getattr(section, item.name)
                                              for item in dataclasses.fields(AudioMaeConfig)})

    def probe_labels(self, metas: list[dict]) -> tuple[list[int], torch.Tensor, int]:
        """Every clip, and its count x pitch class (one to three beeps, low or high)."""
        pitches = list(synth_media.PITCHES)
        labels = [(meta["count"] - 1) * len(pitches) + pitches.index(meta["pitch"]) for meta in metas]
        return list(range(len(metas))), torch.tensor(labels), 3 * len(pitches)

    def build_model(self) -> AudioMaskedAutoencoder:
        return AudioMaskedAutoencoder(self.model_config)

    def flops_per_sample(self) -> float:
        config, audio = self.model_config, self.model_config.audio
        patches = audio_patch_count(audio)
        return mae_flops_per_sample(kept_count(patches, config.mask_ratio) + 2, audio.width, audio.layers, patches + 2,
                                    config, audio.patch_size ** 2, audio.mlp_ratio)

    def tokens_per_sample(self) -> int:
        return audio_patch_count(self.model_config.audio) + 2

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(AudioMaskedAutoencoder, preprocess): preprocess((waveform, sample_rate)) -> float32 [samples] at
        the model's rate; model.features(stacked) gives the encoder's features, model.audio_model its tower."""
        fields = dict(saved["audiomae_config"])
        fields["audio"] = AudioConfig(**fields["audio"])
        model = AudioMaskedAutoencoder(AudioMaeConfig(**fields))
        model.load_state_dict(saved["state_dict"])
        return model.to(device).eval(), AudioPreprocess(model.config.audio)
