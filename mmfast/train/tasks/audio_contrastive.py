"""The audio-text contrastive task (CLAP-style): the contrastive task's loop, losses and engines over
(waveform, caption) pairs of the bundled beeps (mmfast.data.synth_media), with zero-shot classification
of count x pitch by prompts on the held-out clips and on beeps made another way, and retrieval both
ways on the held-out clips."""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from mmfast.data import synth_media
from mmfast.data.splits import batch_indices
from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.models.audio import AudioConfig
from mmfast.models.clap import CLAP, ClapConfig
from mmfast.models.clip import TextConfig, transformer_flops
from mmfast.train import distributed
from mmfast.train.tasks.base import Task
from mmfast.train.tasks.contrastive import ContrastiveTask
from mmfast.train.tasks.towers import load_media_tower

COUNT_WORDS = {1: ("one", "a"), 2: ("two",), 3: ("three",)}


@dataclass(kw_only=True)
class AudioContrastiveModelConfig(ClapConfig):
    """The run's `model:` section: every field of mmfast.models.clap.ClapConfig, sized for the CPU, and
    the loss. text.vocab_size is the tokenizer's target."""

    embed_dim: int = 128
    audio: AudioConfig = field(default_factory=lambda: AudioConfig(num_mel_bins=64, max_length=100, width=128,
                                                                    layers=3, heads=4))
    text: TextConfig = field(default_factory=lambda: TextConfig(vocab_size=200, context_length=12, width=128,
                                                                layers=2, heads=4, pooling="mean"))
    loss: str = "clip"  # or "siglip"


def class_prompts() -> tuple[list[tuple[int, str]], list[list[str]]]:
    """The zero-shot classes (count, pitch) and their prompts (each count word, with and without the
    waveform), scored by their best prompt."""
    classes, prompts = [], []
    for count in (1, 2, 3):
        for pitch in synth_media.PITCHES:
            noun = "beep" if count == 1 else "beeps"
            words = COUNT_WORDS[count]
            group = [f"{word} {pitch} {wave}{noun}" for word in words for wave in ("", "sine-wave ", "square-wave ")]
            classes.append((count, pitch))
            prompts.append((group * 2)[:6])  # as many prompts per class
    return classes, prompts


class AudioPreprocess:
    """(waveform, sample_rate) -> float32 [samples] at the model's rate (resampled polyphase), mono,
    padded with silence or cut to the model's frames: stack them for a batch."""

    def __init__(self, audio: AudioConfig | None = None, *, sample_rate: int | None = None, samples: int | None = None):
        """From an AudioEncoder's config, or a sample rate and a clip length in samples."""
        if audio is not None:
            sample_rate, samples = audio.sample_rate, audio.max_length * round(audio.sample_rate * audio.hop_ms / 1000)
        self.rate, self.samples = sample_rate, samples

    def __call__(self, item) -> torch.Tensor:
        from math import gcd

        from scipy.signal import resample_poly

        waveform, rate = item
        signal = np.asarray(waveform, dtype=np.float64)
        if signal.ndim == 2:  # [channels, samples]: the mean
            signal = signal.mean(0)
        if signal.ndim != 1 or rate <= 0:
            raise ValueError(f"preprocess: expected (waveform [samples] or [channels, samples], sample rate > 0), got "
                             f"shape {signal.shape} and rate {rate}")
        if rate != self.rate:
            common = gcd(int(rate), self.rate)
            signal = resample_poly(signal, self.rate // common, int(rate) // common)
        signal = np.pad(signal[:self.samples], (0, max(0, self.samples - len(signal))))
        return torch.from_numpy(signal.astype(np.float32))


class AudioContrastiveTask(ContrastiveTask):
    name = "audio_contrastive"
    model_section = AudioContrastiveModelConfig
    headline = {"zero_shot_accuracy": "zero-shot", "other_zero_shot_accuracy": "made another way",
                "audio_to_text_R@1": "A->T R@1"}
    plot_metrics = {"zero_shot_accuracy": "zero-shot, held-out", "other_zero_shot_accuracy": "zero-shot, made another way",
                    "count_accuracy": "count", "pitch_accuracy": "pitch"}

    def check(self, world_size: int) -> None:
        config = self.config
        if config.model.loss not in ("clip", "siglip"):
            raise ValueError(f"config: model.loss must be 'clip' or 'siglip', got {config.model.loss!r}")
        if config.data.source != "synth" or config.data.streaming:
            raise ValueError(f"config: task {self.name} reads the bundled {self.modality} clips (data.source=synth, not "
                             f"streamed), got data.source={config.data.source!r}")
        if config.train.micro_batch:
            raise ValueError(f"config: task {self.name} has no gradient caching; leave train.micro_batch unset")

    def _ensure_clips(self, progress: bool) -> None:
        synth_media.ensure_media_shards(self.config.data, "audio", synth_media.AUDIO_FORMAT, progress)

    def prepare(self, progress: bool, train: bool = True) -> None:
        config, placement = self.config, self.placement
        if placement.is_main:
            self._ensure_clips(progress)
        distributed.barrier()
        self.train_split = synth_media.load_media_split(config.data.synth_dir, "train") if train else None
        self.held_out = synth_media.load_media_split(config.data.synth_dir, "held_out")
        path = os.path.join(config.run_dir, "tokenizer.json")
        if placement.is_main and not os.path.exists(path):
            captions = (self.train_split or self.held_out)[1]
            CaptionTokenizer.train(captions, config.model.text.vocab_size, config.model.text.context_length).save(path)
        distributed.barrier()
        self.restore(config.run_dir)

    def prepare_evaluation(self, progress: bool) -> None:
        self.prepare(progress, train=False)

    def initial_weights(self, model, saved: dict) -> None:
        """train.init_from: a CLAP's model.pt, or an AudioMAE's (task audiomae): its audio tower, the text
        tower left as initialized."""
        if saved.get("task") != "audiomae":
            return super().initial_weights(model, saved)
        load_media_tower(model, saved, "audio", "audiomae_config", self.model_config.audio,
                         ("sample_rate", "window_ms", "hop_ms", "num_mel_bins", "max_length", "patch_size",
                          "frequency_stride", "time_stride", "width", "layers", "heads", "mlp_ratio"))

    config_class, config_key = ClapConfig, "clap_config"  # the model's config, and its key in model.pt
    export = Task.export  # model.pt under config_key (not the image CLIP's layout)
    modality = "audio"

    def restore(self, run_dir: str) -> None:
        self.tokenizer = CaptionTokenizer.load(os.path.join(run_dir, "tokenizer.json"))
        section = self.config.model
        fields = {item.name: getattr(section, item.name) for item in dataclasses.fields(self.config_class)}
        fields["text"] = dataclasses.replace(section.text, vocab_size=self.tokenizer.vocab_size,
                                             eot_token_id=self.tokenizer.eot_id)
        if section.loss == "siglip" and section.init_logit_bias is None:
            fields["init_logit_bias"] = -10.0
        self.model_config = self.config_class(**self._media_fields(fields))

    def _media_fields(self, fields: dict) -> dict:
        """The model fields the data decides (none for the audio clips)."""
        return fields

    def build_model(self) -> CLAP:
        return CLAP(self.model_config)

    def batches(self, accumulation: int, start: int):
        """(clips: waveforms, or frames for task video_contrastive, tokens) of this rank's share of every
        global batch from step `start` on."""
        data, seed, placement = self.config.data, self.config.train.seed, self.placement
        clips, captions, _ = self.train_split
        tokens = self.tokenizer(captions)
        for step in itertools.count(start):
            rows = batch_indices(step, len(tokens), data.batch_size, seed)
            rows = rows.view(accumulation, placement.world_size, -1)[:, placement.rank].reshape(-1)
            yield clips[rows], tokens[rows]

    def flops_per_sample(self) -> float:
        audio, text = self.model_config.audio, self.model_config.text
        return 3.0 * (transformer_flops(self._audio_tokens(), audio.width, audio.layers, audio.mlp_ratio)
                      + transformer_flops(text.context_length, text.width, text.layers, text.mlp_ratio))

    def _audio_tokens(self) -> int:
        audio = self.model_config.audio
        return (((audio.num_mel_bins - audio.patch_size) // audio.frequency_stride + 1)
                * ((audio.max_length - audio.patch_size) // audio.time_stride + 1) + 2)

    def tokens_per_sample(self) -> int:
        return self.model_config.text.context_length + self._audio_tokens()

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Zero-shot count x pitch (and each alone) and retrieval R@1/5 both ways on the held-out clips;
        zero-shot on the beeps made another way (mmfast.data.synth_media.other_beeps: `other_...`)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        waveforms, captions, metas = self.held_out
        if getattr(self, "other", None) is None:  # drawn once per run, not at every evaluation
            other_waveforms, other_metas = synth_media.other_beeps()
            self.other = torch.from_numpy(other_waveforms), other_metas
        classes, prompts = class_prompts()
        flat = [prompt for group in prompts for prompt in group]
        text = model.encode_text(self.tokenizer(flat).to(device), normalize=True).float().cpu()
        text = text.reshape(len(classes), len(prompts[0]), -1)
        audio = self._embed(model, waveforms, device)
        result = self._zero_shot(audio, text, classes, metas, "")
        result.update(self._zero_shot(self._embed(model, self.other[0], device), text, classes, self.other[1],
                                      "other_"))
        words = model.encode_text(self.tokenizer(captions).to(device), normalize=True).float().cpu()
        similarity, target = audio @ words.T, torch.arange(len(captions))
        for direction, table in (("audio_to_text", similarity), ("text_to_audio", similarity.T)):
            rank = (table > table[target, target][:, None]).sum(1)
            for k in (1, 5):
                result[f"{direction}_R@{k}"] = (rank < k).float().mean().item()
        model.train(was_training)
        return result

    def _embed(self, model, waveforms: torch.Tensor, device) -> torch.Tensor:
        samples = AudioPreprocess(self.model_config.audio).samples
        waveforms = torch.nn.functional.pad(waveforms[:, :samples], (0, max(0, samples - waveforms.shape[1])))
        return torch.cat([model.encode_audio(waveforms[start:start + 256].to(device), normalize=True).float().cpu()
                          for start in range(0, len(waveforms), 256)])

    @staticmethod
    def _zero_shot(audio: torch.Tensor, text: torch.Tensor, classes, metas: list[dict], prefix: str) -> dict:
        """Each clip's class by its best-scoring prompt (text: [classes, prompts, D])."""
        scores = torch.einsum("nd,cpd->ncp", audio, text).amax(-1)
        predicted = [classes[index] for index in scores.argmax(1).tolist()]
        pairs = list(zip(predicted, metas))
        return {f"{prefix}zero_shot_accuracy": float(np.mean([p == (m["count"], m["pitch"]) for p, m in pairs])),
                f"{prefix}count_accuracy": float(np.mean([p[0] == m["count"] for p, m in pairs])),
                f"{prefix}pitch_accuracy": float(np.mean([p[1] == m["pitch"] for p, m in pairs]))}

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(CLAP, preprocess, tokenizer), as mmfast.load_clip gives them for an audio run."""
        fields = dict(saved["clap_config"])
        fields["audio"], fields["text"] = AudioConfig(**fields["audio"]), TextConfig(**fields["text"])
        model = CLAP(ClapConfig(**fields))
        model.load_state_dict(saved["state_dict"])
        tokenizer = CaptionTokenizer.load(os.path.join(directory, "tokenizer.json"))
        return model.to(device).eval(), AudioPreprocess(model.config.audio), tokenizer
