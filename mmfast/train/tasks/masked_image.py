"""Task `mae`: masked-autoencoder pretraining of an image tower (mmfast.models.mae) on the pictures of
a run's data (captions unused), evaluated by a linear probe of the frozen encoder on the bundled
color x shape classes against the same probe on a randomly initialized encoder. Its tower carries
over to a contrastive or LLaVA run by train.init_from. Task `videomae` (masked_video) is the same
loop over the bundled clips."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch

from mmfast.data.preprocess import Preprocess
from mmfast.data.splits import ensure_synth, load_split, other_split
from mmfast.data.synth import class_names
from mmfast.models.clip import VisionConfig, patch_count
from mmfast.models.mae import MaeConfig, MaskedAutoencoder, mae_flops_per_sample
from mmfast.train import distributed
from mmfast.train.probe import encode, linear_probe
from mmfast.train.tasks.base import Task
from mmfast.train.tasks.captions import global_rows

CLIP_MEAN, CLIP_STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
LOSS_SAMPLES = 1000  # held-out samples of the reconstruction loss


@dataclass(kw_only=True)
class CpuDecoder:
    """The light decoder every masked task's model section starts with, sized for the CPU (MAE's own
    default is 8 blocks of 512); first among a section's bases, so its values win."""

    decoder_width: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4


@dataclass(kw_only=True)
class MaeModelConfig(CpuDecoder, MaeConfig):
    """The run's `model:` section: every field of mmfast.models.mae.MaeConfig, sized here for the CPU;
    vision.image_size follows data.image_size."""

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=32, patch_size=4, width=128, layers=4, heads=4, mean=CLIP_MEAN, std=CLIP_STD))


class MaskedImageTask(Task):
    name = "mae"
    model_section = MaeModelConfig
    config_class, config_key, media_key = MaeConfig, "mae_config", "vision"  # model.pt's config and its encoder's
    probe_samples = 5000  # training samples the linear probe is fitted on
    headline = {"held_out_loss": "held-out loss", "probe_accuracy": "probe", "random_probe_accuracy": "random probe"}
    plot_metrics = {"held_out_loss": "held-out reconstruction loss", "probe_accuracy": "linear probe, held-out",
                    "random_probe_accuracy": "linear probe, random encoder"}

    def check(self, world_size: int) -> None:
        if self.config.data.streaming or self.config.data.sources:
            raise ValueError(f"config: task {self.name} reads one training set in memory: leave data.streaming "
                             f"false and data.sources empty")

    # --- data and model -------------------------------------------------------------------------------

    def prepare(self, progress: bool) -> None:
        """The training split (the probe is fitted on it, so evaluation reads it too), the held-out split
        and, on rank 0, the set drawn another way."""
        config, placement = self.config, self.placement
        if placement.is_main:
            self._ensure_data(progress)
        distributed.barrier()
        self.mixture = None
        self.train_split, self.held_out = self._split("train"), self._split("held_out")
        self.other = self._other() if placement.is_main else None
        self.restore(config.run_dir)

    def _ensure_data(self, progress: bool) -> None:
        if self.config.data.source == "synth":
            ensure_synth(self.config.data, progress)

    def _split(self, name: str):
        return load_split(self.config.data, name)

    def _other(self):
        """(inputs, metas) drawn another way, or None."""
        return other_split(self.config.data)

    def probe_labels(self, metas: list[dict]) -> tuple[list[int], torch.Tensor, int]:
        """The rows showing a bundled shape, their color x shape class (synth.class_names' index), and
        the class count."""
        names = {name: index for index, name in enumerate(class_names())}
        rows = [i for i, meta in enumerate(metas) if f"{meta.get('color')} {meta.get('shape')}" in names
                and meta.get("kind", "shape") == "shape"]
        labels = torch.tensor([names[f"{metas[i]['color']} {metas[i]['shape']}"] for i in rows], dtype=torch.long)
        return rows, labels, len(names)

    def restore(self, run_dir: str) -> None:
        section = self.config.model
        fields = {item.name: getattr(section, item.name) for item in dataclasses.fields(self.config_class)}
        fields[self.media_key] = dataclasses.replace(fields[self.media_key], image_size=self.config.data.image_size)
        self.model_config = self.config_class(**fields)

    def build_model(self) -> MaskedAutoencoder:
        return MaskedAutoencoder(self.model_config)

    def batches(self, accumulation: int, start: int):
        """(inputs, kept patch indices) of this rank's share of every global batch from `start` on; the
        hidden patches are drawn from (seed, step), so a resumed run hides the same ones."""
        inputs, seed, placement = self.train_split[0], self.config.train.seed, self.placement
        for step in itertools.count(start):
            rows = global_rows(self, step, len(inputs))
            keep = self.model_config.draw_keep(len(rows), torch.Generator().manual_seed(seed * 1000003 + step))
            mine = torch.arange(len(rows)).view(accumulation, placement.world_size, -1)[:, placement.rank].reshape(-1)
            yield inputs[rows[mine]], keep[mine]

    def loss(self, model, batch) -> torch.Tensor:
        inputs, keep = batch
        return model(inputs, keep)["loss"]

    def flops_per_sample(self) -> float:
        config, vision = self.model_config, self.model_config.vision
        patches = patch_count(vision)
        return mae_flops_per_sample(int(patches * (1 - config.mask_ratio)) + 1, vision.width, vision.layers,
                                    patches + 1, config, vision.channels * vision.patch_size ** 2, vision.mlp_ratio)

    def tokens_per_sample(self) -> int:
        return patch_count(self.model_config.vision) + 1

    # --- results ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """The held-out reconstruction loss (the same hidden patches every time), and linear probes on the
        frozen encoder's features: held-out, drawn another way, and the held-out probe of a randomly
        initialized encoder (the baseline the pretraining must beat)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        inputs = self.held_out[0][:LOSS_SAMPLES]
        losses = []
        for start in range(0, len(inputs), 256):
            part = inputs[start:start + 256]
            keep = self.model_config.draw_keep(len(part), torch.Generator().manual_seed(start))
            losses.append(model(part.to(device), keep.to(device))["loss"])
        result = {"held_out_loss": torch.stack(losses).float().mean().item(), **self._probes(model, device, "")}
        if not hasattr(self, "_random_probe"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.train.seed + 1)
                baseline = self.build_model().to(device).eval()
            self._random_probe = self._probes(baseline, device, "random_")
        result.update(self._random_probe)
        model.train(was_training)
        return result

    def _probes(self, model, device, prefix: str) -> dict:
        train_rows, train_labels, classes = self.probe_labels(self.train_split[2][:self.probe_samples])
        held_rows, held_labels, _ = self.probe_labels(self.held_out[2])
        if not train_rows or not held_rows:
            return {}
        train = encode(model.features, self.train_split[0][train_rows], device)
        held = encode(model.features, self.held_out[0][held_rows], device)
        result = {f"{prefix}probe_accuracy": linear_probe(train, train_labels, held, held_labels, classes)}
        if self.other is not None and not prefix:
            other_rows, other_labels, _ = self.probe_labels(self.other[1])
            other = encode(model.features, self.other[0][other_rows], device)
            result["other_probe_accuracy"] = linear_probe(train, train_labels, other, other_labels, classes)
        return result

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(MaskedAutoencoder, preprocess): preprocess(PIL image) -> uint8 [3, S, S]; model.features(stacked)
        gives the encoder's features, model.vision_model its tower."""
        fields = dict(saved["mae_config"])
        fields["vision"] = VisionConfig(**fields["vision"])
        model = MaskedAutoencoder(MaeConfig(**fields))
        model.load_state_dict(saved["state_dict"])
        return model.to(device).eval(), Preprocess(model.config.vision.image_size)
