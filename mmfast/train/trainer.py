"""The contrastive (CLIP) training loop, single process (CPU or one GPU).

A run directory holds config.yaml (resolved), tokenizer.json, metrics.jsonl, checkpoints/ and
curves.png. Resuming from the latest checkpoint reproduces the uninterrupted run: the data order
is a function of (seed, step), and model, optimizer, scheduler and RNG states are restored.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import mmfast
from mmfast.data import ShardPairs, class_names, write_shards
from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.models import CLIP, ClipConfig
from mmfast.train.config import RunConfig, save_config
from mmfast.train.evaluate import retrieval_recall, zero_shot_accuracy
from mmfast.train.grad_cache import grad_cache_step

CLIP_MEAN, CLIP_STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


def _split(config: RunConfig, split: str):
    """(uint8 images [N, 3, H, W], captions, metas) of a split of the bundled data, writing it if needed."""
    data = config.data
    marker = os.path.join(data.synth_dir, "synth.json")
    wanted = {"train": data.train_samples, "held_out": data.held_out_samples, "size": data.image_size,
              "seed": data.seed, "digit_fraction": data.digit_fraction}
    if not os.path.exists(marker) or json.load(open(marker)) != wanted:
        write_shards(data.synth_dir, train=data.train_samples, held_out=data.held_out_samples, size=data.image_size,
                     seed=data.seed, digit_fraction=data.digit_fraction)
        with open(marker, "w") as handle:
            json.dump(wanted, handle)
    shards = sorted(os.path.join(data.synth_dir, name) for name in os.listdir(data.synth_dir)
                    if name.startswith(split + "-") and name.endswith(".tar"))
    dataset = ShardPairs(shards)
    images, captions, metas = [], [], []
    for image, caption, meta in dataset:
        images.append(np.asarray(image))
        captions.append(caption)
        metas.append(meta)
    if dataset.skipped:
        print(f"mmfast train: skipped {dataset.skipped} samples of {split}: {dict(dataset.problems)}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions, metas


def build_model(config: RunConfig, vocab_size: int, eot_token_id: int) -> CLIP:
    m = config.model
    model = CLIP(ClipConfig(
        embed_dim=m.embed_dim,
        vision=dataclasses.replace(m.vision, image_size=config.data.image_size),
        text=dataclasses.replace(m.text, vocab_size=vocab_size, eot_token_id=eot_token_id),
        init_logit_bias=-10.0 if m.loss == "siglip" else None))
    # uint8 pixels go straight into the fused patch embedding, normalized there
    model.vision_model.embeddings.mean, model.vision_model.embeddings.std = CLIP_MEAN, CLIP_STD
    return model


def _schedule(optim, steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps)
        if optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1 - progress) if optim.schedule == "linear" else 1.0
    return factor


def _batch_indices(step: int, size: int, batch: int, seed: int) -> torch.Tensor:
    """The data order as a function of (seed, step): one permutation per epoch."""
    per_epoch = max(1, size // batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * batch:(position + 1) * batch]


def evaluate(model, tokenizer, held_out) -> dict:
    images, captions, metas = held_out
    shapes = [i for i, meta in enumerate(metas) if meta.get("kind") == "shape"]
    labels = torch.tensor([metas[i]["label"] for i in shapes])
    was_training = model.training
    model.eval()
    result = {"zero_shot_accuracy": zero_shot_accuracy(model, tokenizer, images[shapes], labels, class_names())}
    result.update(retrieval_recall(model, tokenizer, images[:1000], captions[:1000]))
    model.train(was_training)
    return result


def _plot(metrics_path: str, out_path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "zero_shot_accuracy" in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(title="training loss", xlabel="step")
    right.plot([r["step"] for r in evals], [r["zero_shot_accuracy"] for r in evals], marker="o", label="zero-shot")
    right.plot([r["step"] for r in evals], [r["image_to_text_R@1"] for r in evals], marker="o", label="I->T R@1")
    right.set(title="held-out evaluation", xlabel="step", ylim=(0, 1))
    right.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)


def train(config: RunConfig, progress: bool = True) -> dict:
    """Runs (or resumes) the training described by `config`; returns the last evaluation."""
    if config.model.loss not in ("clip", "siglip"):
        raise ValueError(f"config: model.loss must be 'clip' or 'siglip', got {config.model.loss!r}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    config.run_dir = config.run_dir or os.path.join("runs", f"{config.recipe or 'run'}-{stamp}")
    checkpoints = os.path.join(config.run_dir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    save_config(config, os.path.join(config.run_dir, "config.yaml"))
    torch.manual_seed(config.train.seed)

    images, captions, _ = _split(config, "train")
    held_out = _split(config, "held_out")
    tokenizer_path = os.path.join(config.run_dir, "tokenizer.json")
    if os.path.exists(tokenizer_path):
        tokenizer = CaptionTokenizer.load(tokenizer_path)
    else:
        tokenizer = CaptionTokenizer.train(captions, config.model.text.vocab_size, config.model.text.context_length)
        tokenizer.save(tokenizer_path)
    tokens = tokenizer(captions)
    model = build_model(config, tokenizer.vocab_size, tokenizer.eot_id)
    loss_fn = mmfast.nn.ClipLoss() if config.model.loss == "clip" else mmfast.nn.SigLipLoss()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = config.optim
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(o, config.train.steps))
    start = 0
    latest = os.path.join(checkpoints, "latest.pt")
    if os.path.exists(latest):
        state = torch.load(latest, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.random.set_rng_state(state["rng"])
        start = state["step"]

    metrics_path = os.path.join(config.run_dir, "metrics.jsonl")
    log = open(metrics_path, "a")
    batch, steps = config.data.batch_size, config.train.steps
    end = min(steps, config.train.stop_after or steps)
    bar = tqdm(range(start, end), initial=start, total=steps, desc="mmfast train", disable=not progress)
    last_eval, window_start, window_samples = {}, time.perf_counter(), 0

    def save(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.random.get_rng_state(), "step": step}
        torch.save(state, os.path.join(checkpoints, f"step-{step:07d}.pt"))
        torch.save(state, latest)

    for step in bar:
        rows = _batch_indices(step, len(tokens), batch, config.train.seed)
        micro = config.train.micro_batch
        if micro and micro < len(rows):
            optimizer.zero_grad()
            loss = grad_cache_step(model, loss_fn, images[rows], tokens[rows], micro)
        else:
            output = model(images[rows], tokens[rows])
            loss = loss_fn(output["image_features"], output["text_features"], output["logit_scale"],
                           *([output["logit_bias"]] if "logit_bias" in output else []))
            optimizer.zero_grad()
            loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        window_samples += len(rows)
        done = step + 1
        if done % config.train.log_every == 0 or done == steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                      "logit_scale": model.logit_scale.exp().item(), "samples_per_s": window_samples / elapsed}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}")
            window_start, window_samples = time.perf_counter(), 0
        if done % config.train.eval_every == 0 or done == steps:
            last_eval = {"step": done, **evaluate(model, tokenizer, held_out)}
            log.write(json.dumps(last_eval) + "\n")
            log.flush()
            bar.write(f"step {done}: zero-shot {last_eval['zero_shot_accuracy']:.3f}, "
                      f"I->T R@1 {last_eval['image_to_text_R@1']:.3f}")
        if done % config.train.checkpoint_every == 0 or done in (steps, end):
            save(done)
    log.close()
    if not last_eval:
        last_eval = {"step": start, **evaluate(model, tokenizer, held_out)}
    _plot(metrics_path, os.path.join(config.run_dir, "curves.png"))
    return last_eval
