"""Task `unified`: the any-to-any model (mmfast.models.unified) on the bundled shapes, beeps and moving
shapes, five directions mixed in every batch (image -> text, text -> image, audio -> text, text -> audio,
video -> text, weighted by model.directions), each sample its own packed sequence; loss: next-token
cross-entropy on the captions plus model.loss_weights[m] x the flow-matching MSE of generated
images and spectrograms, from one forward pass. Evaluated by what it generates (train.unified_metrics)."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field

import torch

from mmfast.data import synth_media
from mmfast.data.other_renderer import other_moving_set, other_renderer_set
from mmfast.data.splits import ensure_synth, load_split
from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.models.clip import transformer_flops
from mmfast.models.llama import LlamaConfig
from mmfast.models.unified import (GENERATED, INPUT_KEYS, MODALITIES, SPECIAL_TOKENS, UnifiedConfig, UnifiedModel,
                                   audio_values, patch_rows, ramp_times, span_sequence, value_times)
from mmfast.models.image_autoencoder import autoencoder_geometry, image_codec
from mmfast.train import distributed
from mmfast.train.tasks.base import Task
from mmfast.train.tasks.video_contrastive import VIDEO_FORMAT
from mmfast.train.unified_metrics import ShapeClassifier

DIRECTIONS = ("image_to_text", "text_to_image", "audio_to_text", "text_to_audio", "video_to_text")
IGNORE = -100


def _source(direction: str) -> tuple[str, bool]:
    """(the direction's modality, whether it is generated)."""
    first, _, last = direction.split("_")
    return (last, True) if first == "text" else (first, False)


@dataclass(kw_only=True)
class UnifiedModelConfig(UnifiedConfig):
    """The run's `model:` section: mmfast.models.unified.UnifiedConfig's fields (text.vocab_size and
    text_vocab_size follow the caption tokenizer, trained to `vocab_size` tokens) and the task's own."""

    text: LlamaConfig = field(default_factory=lambda: LlamaConfig(
        vocab_size=1000 + len(SPECIAL_TOKENS), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4))
    vocab_size: int = 1000  # the caption tokenizer's target size
    context_length: int = 24  # caption tokens with <sot> and <eot>
    directions: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in DIRECTIONS})
    loss_weights: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in GENERATED})
    caption_dropout: float = 0.1  # text -> X samples trained without their caption (classifier-free guidance)
    # the fraction of video -> text clips played backwards, their direction word turned around: an exact
    # augmentation (mmfast.data.synth_media.reversed_clip_caption) that shows every clip moving both ways
    video_reversed: float = 0.0
    sample_steps: int = 25  # Euler steps when generating images and audio
    guidance: float = 3.0
    eval_items: int = 100  # per direction and set


def model_fields(section) -> dict:
    """The UnifiedConfig fields of a model section (or of a saved dict)."""
    names = {field.name for field in dataclasses.fields(UnifiedConfig)}
    values = section if isinstance(section, dict) else {name: getattr(section, name) for name in names}
    return {name: value for name, value in values.items() if name in names}


class UnifiedTask(Task):
    name = "unified"
    model_section = UnifiedModelConfig
    config_key = "unified_config"
    headline = {"image_to_text": "image->text", "audio_to_text": "audio->text", "video_to_text": "video->text",
                "text_to_image_color": "text->image color", "text_to_audio_pitch": "text->audio pitch"}
    plot_metrics = {**headline, "text_to_image_shape": "text->image shape", "text_to_audio_count": "text->audio count"}

    def check(self, world_size: int) -> None:
        config, section = self.config, self.config.model
        if config.train.micro_batch:
            raise ValueError("config: task unified uses train.accumulation_steps, not train.micro_batch")
        if config.data.source != "synth" or config.data.streaming:
            raise ValueError("config: task unified trains on the bundled data (data.source=synth, data.streaming=false)")
        if section.image_autoencoder:  # before any data is drawn: the folder and diffusers are there
            autoencoder_geometry(section.image_autoencoder)
        if config.data.image_size != section.image_size:
            raise ValueError(f"config: data.image_size ({config.data.image_size}) must equal model.image_size "
                             f"({section.image_size})")
        unknown = sorted(set(section.directions) - set(DIRECTIONS))
        weights = list(section.directions.values())
        if unknown or any(weight < 0 for weight in weights) or not sum(weights) > 0:
            raise ValueError(f"config: model.directions maps {list(DIRECTIONS)} to weights >= 0 (not all 0), got "
                             f"{section.directions}")
        if set(section.loss_weights) - set(GENERATED) or any(weight < 0 for weight in section.loss_weights.values()):
            raise ValueError(f"config: model.loss_weights maps {list(GENERATED)} to weights >= 0, got {section.loss_weights}")
        if not 0 <= section.caption_dropout < 1:
            raise ValueError(f"config: model.caption_dropout must be in [0, 1), got {section.caption_dropout}")
        if not 0 <= section.video_reversed <= 1:
            raise ValueError(f"config: model.video_reversed must be in [0, 1], got {section.video_reversed}")
        if config.data.batch_size % (world_size * config.train.accumulation_steps):
            raise ValueError(f"config: data.batch_size ({config.data.batch_size}) must be a multiple of ranks x "
                             f"train.accumulation_steps ({world_size} x {config.train.accumulation_steps})")

    # data

    def _data(self, modality: str):
        """The data config of one modality's bundled shards (each in its own folder under data.synth_dir)."""
        return dataclasses.replace(self.config.data, synth_dir=os.path.join(self.config.data.synth_dir, modality),
                                   digit_fraction=0.0)

    def _read(self, modality: str, split: str):
        """(inputs, captions, metas) of a split: uint8 images [N, 3, S, S], waveforms [N, samples], uint8
        clips [N, T, S, S, 3]."""
        if modality == "image":
            return load_split(self._data("image"), split)
        return synth_media.load_media_split(self._data(modality).synth_dir, split)

    def prepare(self, progress: bool, train: bool = True) -> None:
        if self.placement.is_main:
            ensure_synth(self._data("image"), progress)
            synth_media.ensure_media_shards(self._data("audio"), "audio", synth_media.AUDIO_FORMAT, progress)
            synth_media.ensure_media_shards(self._data("video"), "video", VIDEO_FORMAT, progress)
        distributed.barrier()
        self.held_out = {modality: self._read(modality, "held_out") for modality in MODALITIES}
        self.train_split = {modality: self._read(modality, "train") for modality in MODALITIES} if train else None
        path = os.path.join(self.config.run_dir, "tokenizer.json")
        if self.placement.is_main and not os.path.exists(path):
            splits = self.train_split or {modality: self._read(modality, "train") for modality in MODALITIES}
            captions = [caption for modality in MODALITIES for caption in splits[modality][1]]
            CaptionTokenizer.train(captions, self.config.model.vocab_size, self.config.model.context_length).save(path)
        distributed.barrier()
        self.restore(self.config.run_dir)
        if train:
            self.caption_ids = {modality: self._caption_ids(self.train_split[modality][1]) for modality in MODALITIES}
            _, captions, metas = self.train_split["video"]  # turned around only when some clips are reversed
            self.reversed_ids = self._caption_ids([synth_media.reversed_clip_caption(caption, meta["direction"])
                                                   for caption, meta in zip(captions, metas)]
                                                  if self.config.model.video_reversed > 0 else [])

    def prepare_evaluation(self, progress: bool) -> None:
        self.prepare(progress, train=False)

    def restore(self, run_dir: str) -> None:
        section = self.config.model
        self.tokenizer = CaptionTokenizer.load(os.path.join(run_dir, "tokenizer.json"))
        vocabulary = self.tokenizer.vocab_size
        latents = {}
        if section.image_autoencoder:  # the model sees the autoencoder's latents: its channels and size
            latents["image_channels"], latents["image_downsample"] = autoencoder_geometry(section.image_autoencoder)
        self.model_config = UnifiedConfig(**{
            **model_fields(section), "text_vocab_size": vocabulary, "sot_token_id": self.tokenizer.sot_id,
            "eot_token_id": self.tokenizer.eot_id, **latents,
            "text": dataclasses.replace(section.text, vocab_size=vocabulary + len(SPECIAL_TOKENS))})

    def _caption_ids(self, captions: list[str]) -> list[list[int]]:
        """`<sot> ... <eot>` of each caption, without padding."""
        rows = self.tokenizer(captions)
        return [row[row != self.tokenizer.pad_id].tolist() for row in rows]

    # batches

    def _sequence(self, direction: str, caption: list[int], dropped: bool) -> tuple[list[int], list[int]]:
        """(token ids, shifted labels) of one sample (module docstring of mmfast.models.unified)."""
        config = self.model_config
        modality, generated = _source(direction)
        span = span_sequence(config, modality)
        if generated:
            ids = [config.token_id(f"<to_{modality}>")] + ([] if dropped else caption) + span
            return ids, [IGNORE] * len(ids)
        ids = span + caption
        # position t predicts token t + 1: supervised from <sot> (predicting the first word) to the token before <eot>
        labels = [IGNORE] * len(span) + caption[1:] + [IGNORE]
        return ids, labels

    def batches(self, accumulation: int, start: int):
        """This rank's rows of every global batch of data.batch_size samples, each row one sample padded
        to the longest: (ids, labels, lengths, direction, time, images, image noise, waveforms, audio
        noise, clips); what a row does not use is zeros. Everything is drawn from (seed, step)."""
        config, section, placement = self.model_config, self.config.model, self.placement
        batch, seed = self.config.data.batch_size, self.config.train.seed
        weights = torch.tensor([float(section.directions.get(name, 0.0)) for name in DIRECTIONS])
        image_shape = (3, config.image_size, config.image_size)  # pixels; the noise is the values' (maybe latents)
        splits = self.train_split
        for step in itertools.count(start):
            generator = torch.Generator().manual_seed(seed * 1000003 + step)
            directions = torch.multinomial(weights, batch, replacement=True, generator=generator)
            picks = torch.rand(batch, generator=generator)
            times = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal, as SD3's rectified flow
            dropped = torch.rand(batch, generator=generator) < section.caption_dropout
            image_noise = torch.randn(batch, *config.values_shape("image"), generator=generator)
            audio_noise = torch.randn(batch, *config.values_shape("audio"), generator=generator)
            backwards = torch.rand(batch, generator=generator) < section.video_reversed  # drawn last: the draws above stay
            # the global batch's counts, so every micro-batch's loss is its share of the global means
            # (undone by the engines' means over ranks and micro-batches)
            norms = self._norms(directions, dropped, picks, accumulation * placement.world_size)
            mine = torch.arange(batch).view(accumulation, placement.world_size, -1)[:, placement.rank].reshape(-1)
            rows = []
            for row in mine.tolist():
                direction = DIRECTIONS[int(directions[row])]
                modality, _ = _source(direction)
                item = int(picks[row] * len(splits[modality][1]))
                reverse = modality == "video" and bool(backwards[row])
                caption = (self.reversed_ids if reverse else self.caption_ids[modality])[item]
                rows.append((direction, modality, item, reverse,
                             *self._sequence(direction, caption, bool(dropped[row]))))
            length = max(len(ids) for *_, ids, _ in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long)
            labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
            images = torch.zeros(len(rows), *image_shape, dtype=torch.uint8)
            waveforms = torch.zeros(len(rows), splits["audio"][0].shape[1])
            clips = torch.zeros(len(rows), *splits["video"][0].shape[1:], dtype=torch.uint8)
            inputs = {"image": images, "audio": waveforms, "video": clips}
            for index, (direction, modality, item, reverse, sequence, targets) in enumerate(rows):
                ids[index, :len(sequence)] = torch.tensor(sequence)
                labels[index, :len(targets)] = torch.tensor(targets)
                inputs[modality][index] = splits[modality][0][item].flip(0) if reverse else splits[modality][0][item]
            yield (ids, labels, torch.tensor([len(row[4]) for row in rows]),
                   torch.tensor([DIRECTIONS.index(row[0]) for row in rows]), times[mine], images, image_noise[mine],
                   waveforms, audio_noise[mine], clips, norms.expand(len(rows), -1))

    def _norms(self, directions: torch.Tensor, dropped: torch.Tensor, picks: torch.Tensor, parts: int) -> torch.Tensor:
        """[1, 3]: parts / (the global batch's supervised caption tokens, generated images, generated clips)."""
        supervised = 0
        for direction, pick in zip(directions.tolist(), picks.tolist()):
            modality, generated = _source(DIRECTIONS[direction])
            if not generated:
                ids = self.caption_ids[modality]
                supervised += len(ids[int(pick * len(ids))]) - 1
        counts = [supervised] + [int((directions == DIRECTIONS.index(f"text_to_{modality}")).sum()) for modality in GENERATED]
        return parts / torch.tensor([counts], dtype=torch.float32).clamp(min=1)

    def loss(self, model, batch) -> torch.Tensor:
        """This micro-batch's share of: the mean text cross-entropy over the global batch's supervised tokens
        + loss_weights[m] x the mean (over its generated items of m) of each item's velocity MSE."""
        ids, labels, lengths, directions, times, images, image_noise, waveforms, audio_noise, clips, norms = batch
        config, section = self.model_config, self.config.model
        present = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        inputs, targets = {}, {}
        for modality, clean, noise in (("image", images, image_noise), ("audio", waveforms, audio_noise)):
            rows = (directions == DIRECTIONS.index(f"{modality}_to_text")) | \
                   (directions == DIRECTIONS.index(f"text_to_{modality}"))
            if bool(rows.any()):
                values = image_codec(config, clean.device).encode(clean[rows]) if modality == "image" else \
                    audio_values(config, clean[rows])
                generated = directions[rows] == DIRECTIONS.index(f"text_to_{modality}")
                time = torch.where(generated, times[rows], torch.zeros_like(times[rows]))
                if modality == "audio" and config.audio_ramp:
                    time = self._ramp(time) * generated[:, None]  # inputs stay clean
                grown = value_times(config, time)
                inputs[modality] = ((1 - grown) * values + grown * noise[rows], time)
                targets[modality] = (generated, patch_rows(noise[rows] - values, config.patch_shape(modality)[1]))
        video = directions == DIRECTIONS.index("video_to_text")
        keywords = {key: value for modality, pair in inputs.items() for key, value in zip(INPUT_KEYS[modality], pair)}
        out = model(ids[present], cu_seqlens, int(lengths.max()), labels=labels[present],
                    video=clips[video] if bool(video.any()) else None, **keywords)
        supervised = (labels[present] != IGNORE).sum()
        total = out["text"].sum() * norms[0, 0]
        parts = {"text_loss": out["text"].sum() / supervised.clamp(min=1)}  # this micro-batch's, for the log
        for modality in GENERATED:
            predicted, (generated, target) = out[modality], targets.get(modality, (None, None))
            if generated is not None and bool(generated.any()):
                errors = (predicted[generated] - target[generated]).square().mean(2)  # [items, patches]
                time = inputs[modality][1][generated]
                if time.dim() == 2:  # per-patch times: the finished (clean) patches have nothing to predict
                    drawn = (time > 0).float()
                    errors = (errors * drawn).sum(1) / drawn.sum(1).clamp(min=1)
                else:
                    errors = errors.mean(1)
                total = total + section.loss_weights.get(modality, 1.0) * errors.sum() * norms[0, GENERATED.index(modality) + 1]
                parts[f"{modality}_loss"] = errors.mean()
            else:  # the head still joins the graph (every rank's engine waits for its gradient)
                total = total + predicted.sum() * 0.0
        self.last_parts = {name: float(value.detach()) for name, value in parts.items()}
        return total

    def _ramp(self, times: torch.Tensor) -> torch.Tensor:
        """Per-patch times `[N, patches]` of audio_ramp's sweep, its front drawn uniformly over the sweep from
        the item's logit-normal time (mapped back to a uniform draw, so the same (seed, step) draws serve)."""
        config = self.model_config
        patches, ramp = config.span_tokens("audio"), config.audio_ramp
        uniform = 0.5 * (1 + torch.erf(torch.logit(times.clamp(1e-6, 1 - 1e-6)) / math.sqrt(2)))
        return ramp_times(uniform * (patches - 1 + ramp) - ramp, patches, ramp)

    def log(self, engine) -> dict:
        """The last micro-batch's text and diffusion losses."""
        return dict(getattr(self, "last_parts", {}))

    def _mean_tokens(self) -> float:
        config, weights = self.model_config, self.config.model.directions
        caption = self.config.model.context_length * 0.6
        tokens = {name: config.span_tokens(_source(name)[0]) + 3 + caption for name in DIRECTIONS}
        total = sum(weights.get(name, 0.0) for name in DIRECTIONS)
        return sum(weights.get(name, 0.0) * tokens[name] for name in DIRECTIONS) / total

    def flops_per_sample(self) -> float:
        """3 x the forward FLOPs of a sequence of the mixture's mean length (captions taken at 60 % of
        the context), with the LM head; the patch embeddings and heads are left out."""
        text, tokens = self.model_config.text, int(self._mean_tokens())
        mlp_ratio = 1.5 * text.intermediate_size / text.hidden_size  # SwiGLU's three matrices
        forward = transformer_flops(tokens, text.hidden_size, text.num_hidden_layers, mlp_ratio)
        return 3 * (forward + 2 * tokens * text.hidden_size * text.vocab_size)

    def tokens_per_sample(self) -> int:
        return int(self._mean_tokens())

    def build_model(self) -> UnifiedModel:
        return UnifiedModel(self.model_config)

    # evaluation

    def _other(self, modality: str, count: int):
        """(inputs, metas) of `count` items of the vocabulary made another way."""
        if modality == "image":
            images, metas = other_renderer_set(count, self.config.data.image_size, self.config.data.seed)
            return images, metas
        if modality == "audio":
            waveforms, metas = synth_media.other_beeps(count, self.config.data.seed)
            return torch.as_tensor(waveforms, dtype=torch.float32), metas
        return other_moving_set(count, self.model_config.video_frames, self.config.data.image_size,
                                self.config.data.seed)

    def shape_classifier(self) -> ShapeClassifier:
        """Fitted once on the training pictures (read again for a finished run's evaluation)."""
        if getattr(self, "_shape_classifier", None) is None:
            images, _, metas = self.train_split["image"] if self.train_split else self._read("image", "train")
            keep = [index for index, meta in enumerate(metas) if meta.get("kind", "shape") == "shape"]
            self._shape_classifier = ShapeClassifier(images[keep], [metas[index] for index in keep])
        return self._shape_classifier

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        from mmfast.train.unified_eval import evaluate_unified

        return evaluate_unified(self, model)

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """A mmfast.train.unified_eval.UnifiedGenerator: generate_text / generate_image / generate_audio."""
        from mmfast.train.unified_eval import UnifiedGenerator

        fields = model_fields(dict(saved[cls.config_key]))
        model = UnifiedModel(UnifiedConfig(**{**fields, "text": LlamaConfig(**fields["text"])}))
        model.load_state_dict(saved["state_dict"])
        tokenizer = CaptionTokenizer.load(os.path.join(directory, "tokenizer.json"))
        sampling = {}
        if os.path.exists(os.path.join(directory, "config.yaml")):  # the run's sampling settings
            import yaml

            section = (yaml.safe_load(open(os.path.join(directory, "config.yaml"))) or {}).get("model") or {}
            sampling = {key: section[name] for key, name in (("steps", "sample_steps"), ("guidance", "guidance"))
                        if name in section}
        return UnifiedGenerator(model.to(device).eval(), tokenizer, **sampling)
