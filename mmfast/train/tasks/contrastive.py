"""The contrastive task: CLIP or SigLIP (model.loss) on image-caption pairs, with gradient caching
for batches beyond activation memory (train.micro_batch)."""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import torch

import mmfast
from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.data.preprocess import Preprocess
from mmfast.models import CLIP, ClipConfig
from mmfast.models.clip import TextConfig, VisionConfig, flops_per_sample, patch_count
from mmfast.train import checkpoint
from mmfast.data.splits import shard_paths
from mmfast.train.evaluate import evaluate
from mmfast.train.grad_cache import grad_cache_step
from mmfast.data.stream import stream_batches
from mmfast.train.tasks.base import Task
from mmfast.train.tasks.captions import CaptionChoice, global_rows, mixture_log, prepare_captions
from mmfast.train.tasks.towers import check_tower, load_text_tower, tower_weights

CLIP_MEAN, CLIP_STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


@dataclass(kw_only=True)
class ContrastiveModelConfig(ClipConfig):
    """The run's `model:` section: every field of mmfast.models.ClipConfig (sized here for the CPU)
    and the loss. vision.image_size follows data.image_size; text.vocab_size is the tokenizer's
    target (the model gets the trained tokenizer's size and end-of-text id); init_logit_bias left
    None is SigLIP's -10 with loss=siglip."""

    embed_dim: int = 128
    # the model takes the data's uint8 pixels and normalizes them in the fused patch embedding
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=32, patch_size=8, width=128, layers=4, heads=4, mean=CLIP_MEAN, std=CLIP_STD))
    text: TextConfig = field(default_factory=lambda: TextConfig(vocab_size=1000, context_length=24, width=128,
                                                                layers=3, heads=4))
    loss: str = "clip"  # or "siglip"


def model_config_of_run(config, vocab_size: int, eot_token_id: int) -> ClipConfig:
    """The model's config from the run's: image size from data, vocabulary from the trained tokenizer."""
    section = config.model
    fields = {item.name: getattr(section, item.name) for item in dataclasses.fields(ClipConfig)}
    fields.update(vision=dataclasses.replace(section.vision, image_size=config.data.image_size),
                  text=dataclasses.replace(section.text, vocab_size=vocab_size, eot_token_id=eot_token_id))
    if section.loss == "siglip" and section.init_logit_bias is None:
        fields["init_logit_bias"] = -10.0
    return ClipConfig(**fields)


def clip_config_of_file(saved: dict) -> ClipConfig:
    """The ClipConfig a model.pt was written with (files from before the normalization moved into the
    vision config keep it beside the config)."""
    fields = dict(saved["clip_config"])
    vision = dict(fields["vision"])
    if "mean" in saved and vision.get("mean") is None:
        vision["mean"], vision["std"] = saved["mean"], saved["std"]
    fields["vision"], fields["text"] = VisionConfig(**vision), TextConfig(**fields["text"])
    return ClipConfig(**fields)


def export(run_dir: str, folder: str, model_config: ClipConfig) -> str:
    """Writes <run_dir>/model.pt: the consolidated fp32 weights of checkpoint `folder` and the model's
    config, which `mmfast.load_clip` reads."""
    path = os.path.join(run_dir, "model.pt")
    torch.save({"task": "contrastive", "clip_config": dataclasses.asdict(model_config),
                "state_dict": checkpoint.consolidate(folder)}, path)
    return path


class ContrastiveTask(Task):
    name = "contrastive"
    model_section = ContrastiveModelConfig
    headline = {"zero_shot_accuracy": "zero-shot", "other_zero_shot_accuracy": "drawn another way",
                "image_to_text_R@1": "I->T R@1"}
    plot_metrics = {"zero_shot_accuracy": "zero-shot, held-out",
                    "other_zero_shot_accuracy": "zero-shot, drawn another way", "image_to_text_R@1": "I->T R@1"}

    def check(self, world_size: int) -> None:
        config = self.config
        if config.model.loss not in ("clip", "siglip"):
            raise ValueError(f"config: model.loss must be 'clip' or 'siglip', got {config.model.loss!r}")
        if config.data.streaming and config.data.source != "shards":
            raise ValueError(f"config: data.streaming reads webdataset shards: set data.source=shards, "
                             f"got {config.data.source!r}")
        if config.train.micro_batch and (config.engine.name not in ("auto", "single", "ddp")
                                         or config.train.accumulation_steps > 1):
            raise ValueError("config: train.micro_batch (gradient caching) runs with engine.name single or ddp and "
                             "train.accumulation_steps=1")

    # --- data and model -------------------------------------------------------------------------------

    def prepare(self, progress: bool) -> None:
        prepare_captions(self, progress, with_other=True)

    def prepare_evaluation(self, progress: bool) -> None:
        prepare_captions(self, progress, with_other=True, train=False)

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(CLIP, preprocess, tokenizer), as mmfast.load_clip gives them."""
        model = CLIP(clip_config_of_file(saved))
        model.load_state_dict(saved["state_dict"])
        tokenizer = CaptionTokenizer.load(os.path.join(directory, "tokenizer.json"))
        return model.to(device).eval(), Preprocess(model.config.vision.image_size), tokenizer

    def restore(self, run_dir: str) -> None:
        self.tokenizer = CaptionTokenizer.load(os.path.join(run_dir, "tokenizer.json"))
        self.model_config = model_config_of_run(self.config, self.tokenizer.vocab_size, self.tokenizer.eot_id)

    def build_model(self) -> CLIP:
        return CLIP(self.model_config)

    def initial_weights(self, model, saved: dict) -> None:
        """train.init_from: a CLIP's model.pt; a masked autoencoder's (task mae): its image tower, the text
        tower left as initialized; a masked language model's (task mlm): its text tower, the image tower
        left as initialized."""
        if saved.get("task") == "mlm":
            return load_text_tower(model, saved, self.tokenizer, self.model_config.text, self.model_config.activation)
        if saved.get("task") != "mae":
            return super().initial_weights(model, saved)
        tower = saved["mae_config"]
        check_tower(tower["vision"], self.model_config.vision, self.model_config.vision.layers, "train.init_from")
        if tower["activation"] != self.model_config.activation:
            raise ValueError(f"config: train.init_from's vision tower uses {tower['activation']!r}, model.activation "
                             f"is {self.model_config.activation!r}")
        model.load_state_dict(tower_weights(saved), strict=False)

    def batches(self, accumulation: int, start: int):
        """(uint8 pixels, tokens) of this rank's share of every global batch from step `start` on."""
        data, seed, placement, tokenizer = self.config.data, self.config.train.seed, self.placement, self.tokenizer
        if data.streaming:
            stream = stream_batches(shard_paths(data, "train"), data.batch_size // placement.world_size,
                                    placement.rank, placement.world_size, data.image_size, seed + start,
                                    data.shuffle_buffer, data.workers, data.synthetic_captions)
            for pixels, captions in stream:
                yield pixels, tokenizer(captions)
            return
        images, captions, metas = self.train_split
        choose = CaptionChoice(tokenizer, captions, metas, data.synthetic_captions, seed)
        for step in itertools.count(start):
            rows = global_rows(self, step, len(captions))
            tokens = choose(step, rows)  # drawn for the global batch: any number of ranks, the same captions
            # accumulated batch i is the global batch's i-th slice, shared out over the ranks: the same
            # contrastive batches as in one process
            mine = torch.arange(len(rows)).view(accumulation, placement.world_size, -1)[:, placement.rank].reshape(-1)
            yield images[rows[mine]], tokens[mine]

    # --- the step ---------------------------------------------------------------------------------------

    @property
    def loss_function(self):
        if getattr(self, "_loss_function", None) is None:
            siglip, placement = self.config.model.loss == "siglip", self.placement
            if placement.world_size == 1:
                self._loss_function = mmfast.nn.SigLipLoss() if siglip else mmfast.nn.ClipLoss()
            elif siglip:
                self._loss_function = mmfast.nn.SigLipLoss(rank=placement.rank, world_size=placement.world_size)
            else:  # each rank: its rows against the gathered batch; ranks' mean = global loss
                self._loss_function = mmfast.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=placement.rank,
                                                         world_size=placement.world_size)
        return self._loss_function

    def loss(self, model, batch) -> torch.Tensor:
        """The encoders in the engine's precision; the loss in float32, outside autocast."""
        media, text = batch  # pixels, or waveforms (task audio_contrastive), or frames (video_contrastive)
        output = model(media, text)
        features = next(value for key, value in output.items() if key.endswith("_features") and key != "text_features")
        with torch.autocast(media.device.type, enabled=False):
            extra = [output["logit_bias"].float()] if "logit_bias" in output else []
            return self.loss_function(features.float(), output["text_features"].float(),
                                      output["logit_scale"].float(), *extra)

    def forward_backward(self, engine, batch) -> torch.Tensor:
        pixels, text = batch
        micro_batch = self.config.train.micro_batch
        if micro_batch and micro_batch < len(text):
            with engine.autocast():
                return grad_cache_step(engine.unwrapped, self.loss_function, pixels, text, micro_batch,
                                       forward=engine.wrapped, no_sync=engine.no_sync)
        return super().forward_backward(engine, batch)

    def log(self, engine) -> dict:
        """exp(logit_scale), and each source's samples and epochs when mixing."""
        return {"logit_scale": engine.full_value(engine.unwrapped.logit_scale).float().exp().item(),
                **mixture_log(self)}

    def flops_per_sample(self) -> float:
        return flops_per_sample(self.model_config)

    def tokens_per_sample(self) -> int:
        return self.model_config.text.context_length + patch_count(self.model_config.vision) + 1

    # --- results ------------------------------------------------------------------------------------------

    def evaluate(self, model) -> dict:
        """Zero-shot and retrieval on the held-out split, and on the set drawn another way."""
        return evaluate(model, self.tokenizer, self.held_out, self.other)

    def export(self, run_dir: str, folder: str) -> str:
        return export(run_dir, folder, self.model_config)
