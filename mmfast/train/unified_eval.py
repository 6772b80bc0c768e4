"""What a user does with a trained unified model: evaluation by what it generates (train.unified_metrics),
the pictures of it, and `UnifiedGenerator` (mmfast.load_unified): strings, images and sounds in and out."""
from __future__ import annotations

import os
import textwrap
from types import SimpleNamespace

import numpy as np
import torch

from mmfast.data.preprocess import Preprocess
from mmfast.models.image_autoencoder import image_codec
from mmfast.models.unified import GENERATED, MODALITIES, UnifiedModel, audio_values, waveforms_of
from mmfast.train.caption_metrics import bleu, cider_d
from mmfast.train.tasks.audio_contrastive import AudioPreprocess
from mmfast.train.tasks.video_contrastive import VideoPreprocess
from mmfast.train.unified_metrics import (ATTRIBUTES, attributes_right, audio_right, caption_attributes,
                                          foreground_color)

CHUNK = 50  # items generated at once


def model_inputs(model: UnifiedModel, modality: str, raw: torch.Tensor) -> torch.Tensor:
    """What forward takes of a modality's data: uint8 images [N, 3, S, S], waveforms [N, samples] or uint8
    clips [N, T, S, S, 3]."""
    device = model.positions[modality].device
    raw = raw.to(device)
    if modality == "image":
        return image_codec(model.config, device).encode(raw)
    return audio_values(model.config, raw) if modality == "audio" else raw


def captions_of(model: UnifiedModel, tokenizer, modality: str, raw: torch.Tensor) -> list[str]:
    """Greedy captions of every item of `raw`."""
    captions = []
    for start in range(0, len(raw), CHUNK):
        outputs = model.generate_text(modality, model_inputs(model, modality, raw[start:start + CHUNK]))
        captions += [decode(model, tokenizer, output) for output in outputs]
    return captions


def decode(model: UnifiedModel, tokenizer, tokens: torch.Tensor) -> str:
    return tokenizer.decode([int(token) for token in tokens if token < model.config.text_vocab_size])


def generated_values(model: UnifiedModel, modality: str, caption_ids: list[list[int]], steps: int, guidance: float,
                     seed: int = 0) -> torch.Tensor:
    """Images or spectrograms for captions (`<sot> ... <eot>` ids), in chunks, from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    chunks = [model.generate_values(modality, [torch.tensor(ids) for ids in caption_ids[start:start + CHUNK]],
                                    steps=steps, guidance=guidance, generator=generator)
              for start in range(0, len(caption_ids), CHUNK)]
    return torch.cat(chunks).cpu()


def caption_scores(modality: str, captions: list[str], references: list[str], metas: list[dict]) -> dict:
    """All-attributes-right fraction, each attribute's, BLEU-4 and CIDEr-D of generated captions."""
    found = [caption_attributes(caption) for caption in captions]
    scores = {"attributes": float(np.mean([attributes_right(modality, c, m) for c, m in zip(captions, metas)])),
              "bleu4": float(np.mean(bleu(captions, [[r] for r in references]))),
              "cider": float(cider_d(captions, [[r] for r in references]))}
    for name in ATTRIBUTES[modality]:
        scores[name] = float(np.mean([named.get(name) == meta[name] for named, meta in zip(found, metas)]))
    return scores


def _shapes_only(metas: list[dict], count: int) -> list[int]:
    """The first `count` items that are shapes (the image split may hold digits)."""
    return [index for index, meta in enumerate(metas) if meta.get("kind", "shape") != "digit"][:count]


@torch.no_grad()
def evaluate_unified(task, model: UnifiedModel) -> dict:
    """X -> text: the fraction of captions naming every attribute right (held-out and made another way),
    BLEU-4 and CIDEr-D; text -> image: the fraction of images of the requested foreground color;
    text -> audio: the fractions of the requested pitch and beep count. Writes samples.png into the run."""
    section, count = task.config.model, task.config.model.eval_items
    was_training = model.training
    model.eval()
    scores = {}
    for modality in MODALITIES:
        raw, references, metas = task.held_out[modality]
        chosen = _shapes_only(metas, count)
        captions = captions_of(model, task.tokenizer, modality, raw[chosen])
        held_out = caption_scores(modality, captions, [references[i] for i in chosen], [metas[i] for i in chosen])
        scores[f"{modality}_to_text"] = held_out.pop("attributes")
        scores.update({f"{modality}_to_text_{name}": value for name, value in held_out.items()})
        other, other_metas = task._other(modality, count)
        other_captions = captions_of(model, task.tokenizer, modality, other)
        scores[f"other_{modality}_to_text"] = float(np.mean([attributes_right(modality, caption, meta) for
                                                             caption, meta in zip(other_captions, other_metas)]))
    samples = {}
    for modality in GENERATED:
        raw, references, metas = task.held_out[modality]
        chosen = _shapes_only(metas, count)
        requests = [references[i] for i in chosen]
        values = generated_values(model, modality, task._caption_ids(requests), section.sample_steps, section.guidance)
        if modality == "image":
            values = pixels = image_codec(model.config, values.device).decode(values)  # uint8, as drawn
            right = [foreground_color(pixels[index].permute(1, 2, 0).numpy()) == metas[i]["color"]
                     for index, i in enumerate(chosen)]
            scores["text_to_image_color"] = float(np.mean(right))
            classifier, wanted = task.shape_classifier(), [metas[i]["shape"] for i in chosen]
            scores["text_to_image_shape"] = float(np.mean([a == b for a, b in zip(classifier(pixels), wanted)]))
            # the classifier on the real pictures of the same captions: what the score can reach
            scores["shape_classifier_real"] = float(np.mean([a == b for a, b in zip(classifier(raw[chosen]), wanted)]))
        else:
            # Griffin-Lim starts from random phases: seeded, so a model scores the same each time
            waveforms = waveforms_of(model.config, values, generator=torch.Generator().manual_seed(0)).numpy()
            right = [audio_right(waveforms[index], model.config.sample_rate, metas[i]) for index, i in enumerate(chosen)]
            scores["text_to_audio_pitch"] = float(np.mean([pitch for pitch, _ in right]))
            scores["text_to_audio_count"] = float(np.mean([beeps for _, beeps in right]))
        samples[modality] = (values[:8], requests[:8])
    if task.config.run_dir and task.placement is not None and task.placement.is_main:
        draw_samples(samples, os.path.join(task.config.run_dir, "samples.png"))
    model.train(was_training)
    return scores


def draw_samples(samples: dict, path: str) -> None:
    """Generated images (top, uint8 pixels) and spectrograms (bottom), each under the caption it was asked for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(values) for values, _ in samples.values())
    figure, axes = plt.subplots(len(samples), columns, figsize=(2.2 * columns, 2.6 * len(samples)), squeeze=False)
    for row, (modality, (values, requests)) in enumerate(samples.items()):
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column >= len(values):
                continue
            if modality == "image":
                axis.imshow(values[column].permute(1, 2, 0).numpy())  # uint8 pixels
            else:
                axis.imshow(values[column][0].numpy(), origin="lower", aspect="auto", cmap="magma")
            axis.set_title(textwrap.fill(requests[column].rstrip("."), 22), fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


class UnifiedGenerator:
    """A trained unified model with its tokenizer and input processing (`mmfast.load_unified(run_dir)`).

    generate_text(image=PIL image | audio=(waveform, sample_rate) | video=uint8 frames [T, H, W, 3], prompt=None)
    -> str; generate_image(prompt) -> PIL image; generate_audio(prompt) -> (waveform [samples], sample_rate).
    Audio at another rate is resampled and padded or cut to the model's length; a video with another frame
    count is sampled to the model's (one frame per segment)."""

    def __init__(self, model: UnifiedModel, tokenizer, steps: int = 25, guidance: float = 3.0):
        self.model, self.tokenizer, self.steps, self.guidance = model, tokenizer, steps, guidance
        config = model.config
        self.preprocess = {
            "image": Preprocess(config.image_size),
            "audio": AudioPreprocess(sample_rate=config.sample_rate,
                                     samples=int(config.audio_seconds * config.sample_rate)),
            "video": VideoPreprocess(SimpleNamespace(frames=config.video_frames, image_size=config.video_size))}

    def generate_text(self, *, image=None, audio=None, video=None, prompt: str | None = None,
                      max_new_tokens: int = 24) -> str:
        """The caption of exactly one input; `prompt`: words the caption starts with."""
        given = {name: value for name, value in (("image", image), ("audio", audio), ("video", video))
                 if value is not None}
        if len(given) != 1:
            raise ValueError(f"generate_text: pass exactly one of image, audio and video, got {sorted(given) or 'none'}")
        (modality, item), = given.items()
        raw = self.preprocess[modality](item)[None]
        start = []
        if prompt is not None:
            if not prompt.strip():
                raise ValueError("generate_text: prompt is empty (pass None for no prompt)")
            start = [int(token) for token in self.tokenizer(prompt)[0] if token not in
                     (self.tokenizer.pad_id, self.tokenizer.sot_id, self.tokenizer.eot_id)]
        tokens = self.model.generate_text(modality, model_inputs(self.model, modality, raw),
                                          [torch.tensor(start, dtype=torch.long)], max_new_tokens=max_new_tokens)[0]
        return decode(self.model, self.tokenizer, torch.cat([torch.tensor(start, dtype=torch.long), tokens]))

    def _values(self, modality: str, prompt: str, steps: int | None, guidance: float | None, seed: int):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"generate_{modality}: prompt must be a non-empty string, got {prompt!r}")
        ids = self.tokenizer(prompt)[0]
        return generated_values(self.model, modality, [ids[ids != self.tokenizer.pad_id].tolist()],
                                steps or self.steps, self.guidance if guidance is None else guidance, seed)

    def generate_image(self, prompt: str, *, steps: int | None = None, guidance: float | None = None, seed: int = 0):
        """A PIL image of `prompt` (guidance in [1, 20]; 1: no classifier-free guidance)."""
        from PIL import Image

        values = self._values("image", prompt, steps, guidance, seed)
        pixels = image_codec(self.model.config, values.device).decode(values)
        return Image.fromarray(pixels[0].permute(1, 2, 0).numpy())

    def generate_audio(self, prompt: str, *, steps: int | None = None, guidance: float | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, int]:
        """(waveform [samples] float32 in [-1, 1], sample rate) of `prompt`, through the Griffin-Lim vocoder."""
        values = self._values("audio", prompt, steps, guidance, seed)
        return waveforms_of(self.model.config, values)[0], self.model.config.sample_rate
