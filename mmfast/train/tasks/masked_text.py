"""Task `mlm`: masked-language-model pretraining (BERT's objective; mmfast.models.masked_text) of a
bidirectional text tower on a run's captions, evaluated by the held-out masked-token loss and accuracy
against the accuracy of always naming the most frequent picked token. Its tower carries over to a
contrastive run with `model.text.causal: false` by train.init_from (towers.load_text_tower)."""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.models.clip import TextConfig
from mmfast.models.masked_text import IGNORE, MaskedLanguageModel, MlmConfig, draw_masking, mlm_flops_per_sample
from mmfast.train.tasks.base import Task
from mmfast.train.tasks.captions import check_captions_in_memory, global_rows, mixture_log, prepare_captions

EVALUATION_CAPTIONS = 2000  # held-out captions of the masked-token metrics (the same picks every time)


@dataclass(kw_only=True)
class MlmModelConfig(MlmConfig):
    """The run's `model:` section: every field of MlmConfig, the tower sized as the main job's text tower;
    text.vocab_size is the tokenizer's target, its <eot> the rows' end."""

    text: TextConfig = field(default_factory=lambda: TextConfig(vocab_size=1000, context_length=16, width=128,
                                                                layers=2, heads=4, causal=False))


class MaskedTextTask(Task):
    name = "mlm"
    model_section = MlmModelConfig
    config_key = "mlm_config"
    headline = {"held_out_loss": "held-out loss", "masked_accuracy": "masked accuracy"}
    plot_metrics = {"held_out_loss": "held-out loss", "masked_accuracy": "masked-token accuracy, held-out",
                    "frequency_accuracy": "the most frequent token, held-out"}

    def check(self, world_size: int) -> None:
        check_captions_in_memory(self.config, self.name)

    def prepare(self, progress: bool) -> None:
        prepare_captions(self, progress)

    def restore(self, run_dir: str) -> None:
        self.tokenizer = CaptionTokenizer.load(os.path.join(run_dir, "tokenizer.json"))
        section = self.config.model
        fields = {item.name: getattr(section, item.name) for item in dataclasses.fields(MlmConfig)}
        fields["text"] = dataclasses.replace(section.text, vocab_size=self.tokenizer.vocab_size,
                                             eot_token_id=self.tokenizer.eot_id)
        self.model_config = MlmConfig(**fields)

    def special_ids(self) -> list[int]:
        """Ids never picked nor drawn as random words: <pad>, <sot>, <eot>, <unk>."""
        unknown = self.tokenizer.tokenizer.token_to_id("<unk>")
        return [self.tokenizer.pad_id, self.tokenizer.sot_id, self.tokenizer.eot_id,
                *([] if unknown is None else [unknown])]

    def build_model(self) -> MaskedLanguageModel:
        return MaskedLanguageModel(self.model_config)

    def batches(self, accumulation: int, start: int):
        """(inputs, masked, labels, weights) of this rank's share of every global batch from `start` on. The
        picks are drawn from (seed, step) over the global batch, so a resumed run and any number of ranks
        pick the same places; weights (per row) scale a row's summed loss so that the ranks' and
        micro-batches' mean is the global batch's mean over picked tokens."""
        placement, seed = self.placement, self.config.train.seed
        tokens, special = self.tokenizer(self.train_split[1]), self.special_ids()
        for step in itertools.count(start):
            rows = global_rows(self, step, len(tokens))
            inputs, masked, labels = draw_masking(tokens[rows], self.model_config, special,
                                                  torch.Generator().manual_seed(seed * 1000003 + step))
            picked = int((labels != IGNORE).sum())
            weights = torch.full((len(rows),), accumulation * placement.world_size / max(picked, 1))
            mine = torch.arange(len(rows)).view(accumulation, placement.world_size, -1)[:, placement.rank].reshape(-1)
            yield inputs[mine], masked[mine], labels[mine], weights[mine]

    def loss(self, model, batch) -> torch.Tensor:
        inputs, masked, labels, weights = batch
        return (model(inputs, masked, labels).sum(1) * weights).sum()

    def log(self, engine) -> dict:
        return mixture_log(self)

    def flops_per_sample(self) -> float:
        return mlm_flops_per_sample(self.model_config, self.model_config.text.context_length)

    def tokens_per_sample(self) -> int:
        return self.model_config.text.context_length

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """On the first EVALUATION_CAPTIONS held-out captions, the same picks every time: the mean loss and
        accuracy over picked tokens, and the accuracy of always naming the token picked most often in the
        training captions (what a model that ignores the context can reach)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        tokens = self.tokenizer(self.held_out[1][:EVALUATION_CAPTIONS])
        inputs, masked, labels = draw_masking(tokens, self.model_config, self.special_ids(),
                                              torch.Generator().manual_seed(0))
        total = correct = 0.0
        for start in range(0, len(tokens), 256):
            part = slice(start, start + 256)
            part_labels = labels[part].to(device)
            logits = model(inputs[part].to(device), masked[part].to(device)).float()  # one forward for both
            total += F.cross_entropy(logits.flatten(0, 1), part_labels.flatten(), ignore_index=IGNORE,
                                     reduction="sum").item()
            correct += ((logits.argmax(-1) == part_labels) & (part_labels != IGNORE)).sum().item()
        picked = max(int((labels != IGNORE).sum()), 1)
        model.train(was_training)
        return {"held_out_loss": total / picked, "masked_accuracy": correct / picked,
                "frequency_accuracy": (labels == self._most_frequent()).sum().item() / picked}

    def _most_frequent(self) -> int:
        """The token picked most often in the training captions (any non-special token can be picked)."""
        if not hasattr(self, "_frequent"):
            tokens = self.tokenizer(self.train_split[1]).flatten()
            counts = torch.bincount(tokens, minlength=self.tokenizer.vocab_size)
            counts[self.special_ids()] = 0
            self._frequent = int(counts.argmax())
        return self._frequent

    def saved_extras(self) -> dict:
        """The tokenizer beside the weights: a contrastive run checks that it reads the same tokens before
        it takes the text tower (towers.load_text_tower)."""
        return {"tokenizer": self.tokenizer.tokenizer.to_str()}

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(MaskedLanguageModel, tokenizer): model.features(tokenizer(texts)) gives the tower's features;
        model(inputs, masked) the logits at every place."""
        fields = dict(saved["mlm_config"])
        model = MaskedLanguageModel(MlmConfig(**{**fields, "text": TextConfig(**fields["text"])}))
        model.load_state_dict(saved["state_dict"])
        return model.to(device).eval(), CaptionTokenizer.load(os.path.join(directory, "tokenizer.json"))
