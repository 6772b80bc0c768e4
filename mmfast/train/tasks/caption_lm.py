"""A causal language model on the bundled captions: next-token prediction, the text stage a
generative (LLaVA-style) model starts from. Written against the Task interface alone; the model
comes from `model:` (CaptionLMConfig: model.text's vocabulary, context, width, layers, heads; model.activation)."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os

import torch
import torch.nn.functional as F

from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.models.caption_lm import CaptionLM, CaptionLMConfig, flops_per_sequence
from mmfast.models.clip import TextConfig
from mmfast.train import checkpoint
from mmfast.train.tasks.base import Task
from mmfast.train.tasks.captions import check_captions_in_memory, global_rows, mixture_log, prepare_captions


def _model_section() -> CaptionLMConfig:
    """Sized for the CPU, as the contrastive task's text tower; text.vocab_size is the tokenizer's target."""
    return CaptionLMConfig(text=TextConfig(vocab_size=1000, context_length=24, width=128, layers=3, heads=4))


class CaptionLMTask(Task):
    name = "caption_lm"
    model_section = _model_section
    headline = {"held_out_loss": "held-out loss", "next_token_accuracy": "next-token accuracy"}
    plot_metrics = headline

    def check(self, world_size: int) -> None:
        check_captions_in_memory(self.config, self.name)

    def prepare(self, progress: bool) -> None:
        prepare_captions(self, progress)

    def prepare_evaluation(self, progress: bool) -> None:
        prepare_captions(self, progress, train=False)

    @classmethod
    def load_file(cls, saved: dict, directory: str, device="cpu"):
        """(CaptionLM, tokenizer)."""
        # files written before the model section had its own config hold the text config alone
        fields = dict(saved["model_config"]) if "model_config" in saved else {"text": saved["text_config"]}
        model = CaptionLM(CaptionLMConfig(**{**fields, "text": TextConfig(**fields["text"])}))
        model.load_state_dict(saved["state_dict"])
        tokenizer = CaptionTokenizer.load(os.path.join(directory, "tokenizer.json"))
        return model.to(device).eval(), tokenizer

    def restore(self, run_dir: str) -> None:
        self.tokenizer = CaptionTokenizer.load(os.path.join(run_dir, "tokenizer.json"))
        section = self.config.model
        self.model_config = dataclasses.replace(section, text=dataclasses.replace(
            section.text, vocab_size=self.tokenizer.vocab_size, eot_token_id=self.tokenizer.eot_id))

    def build_model(self) -> CaptionLM:
        return CaptionLM(self.model_config)

    def batches(self, accumulation: int, start: int):
        """(tokens,) of this rank's share of every global batch, as the contrastive task shares them."""
        placement = self.placement
        tokens = self.tokenizer(self.train_split[1])
        for step in itertools.count(start):
            rows = global_rows(self, step, len(tokens))
            yield (tokens[rows.view(accumulation, placement.world_size, -1)[:, placement.rank].reshape(-1)],)

    def _token_losses(self, model, tokens):
        """Per-token cross-entropy [B, T - 1] and the mask of real (not padding) targets."""
        logits = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        with torch.autocast(tokens.device.type, enabled=False):
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return losses.view_as(targets), targets != self.tokenizer.pad_id, logits

    def loss(self, model, batch) -> torch.Tensor:
        """Each caption's mean next-token loss, averaged over captions: every rank's batch weighs the
        same, so the ranks' mean is the global batch's loss. The head's fused linear cross-entropy
        gives the per-token losses without the [tokens, vocab] logits."""
        tokens = batch[0]
        targets = tokens[:, 1:]
        losses = model(tokens[:, :-1], labels=targets, ignore_index=self.tokenizer.pad_id)
        valid = targets != self.tokenizer.pad_id
        return ((losses * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()

    def log(self, engine) -> dict:
        return mixture_log(self)

    def flops_per_sample(self) -> float:
        return flops_per_sequence(self.model_config.text, self.model_config.text.context_length - 1)

    def tokens_per_sample(self) -> int:
        return self.model_config.text.context_length - 1

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Held-out token-level loss, perplexity and next-token accuracy (first 1,000 captions)."""
        was_training = model.training
        model.eval()
        tokens = self.tokenizer(self.held_out[1][:1000]).to(next(model.parameters()).device)
        total = correct = count = 0.0
        for start in range(0, len(tokens), 256):
            losses, valid, logits = self._token_losses(model, tokens[start:start + 256])
            total += (losses * valid).sum().item()
            correct += ((logits.argmax(-1) == tokens[start:start + 256, 1:]) & valid).sum().item()
            count += valid.sum().item()
        model.train(was_training)
        loss = total / max(count, 1)
        return {"held_out_loss": loss, "perplexity": math.exp(loss), "next_token_accuracy": correct / max(count, 1)}

    def export(self, run_dir: str, folder: str) -> str:
        """<run_dir>/model.pt: the consolidated fp32 weights and the model's config."""
        path = os.path.join(run_dir, "model.pt")
        torch.save({"task": self.name, "model_config": dataclasses.asdict(self.model_config),
                    "state_dict": checkpoint.consolidate(folder)}, path)
        return path
