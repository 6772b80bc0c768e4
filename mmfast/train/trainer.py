"""The contrastive (CLIP) training loop, from one CPU process to many GPUs.

A run directory holds config.yaml (resolved), tokenizer.json, metrics.jsonl, tensorboard/,
checkpoints/, model.pt (the consolidated fp32 weights at the end) and curves.png. Launched by
torchrun or the deepspeed launcher, every rank runs this loop on its share of each global batch;
rank 0 writes everything but the checkpoint shards. Resuming from the latest checkpoint reproduces
the uninterrupted run: the data order is a function of (seed, step), and model, optimizer,
schedule and RNG states are restored.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import re
import time

import torch
from tqdm.auto import tqdm

import mmfast
from mmfast.data.tokenizer import CaptionTokenizer
from mmfast.models import CLIP, ClipConfig
from mmfast.models.clip import flops_per_sample
from mmfast.train import checkpoint, distributed
from mmfast.train.config import RunConfig, check_config, save_config
from mmfast.train.data import batch_indices, ensure_synth, load_split, other_split, shard_paths
from mmfast.train.stream import sample_captions, stream_batches
from mmfast.train.engines import build_engine
from mmfast.train.evaluate import evaluate
from mmfast.train.grad_cache import grad_cache_step
from mmfast.train.metrics import MetricsWriter, peak_flops, peak_memory_mb, plot
from mmfast.train.resume import check_resume

CLIP_MEAN, CLIP_STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


def clip_config(config: RunConfig, vocab_size: int, eot_token_id: int) -> ClipConfig:
    m = config.model
    return ClipConfig(embed_dim=m.embed_dim, vision=dataclasses.replace(m.vision, image_size=config.data.image_size),
                      text=dataclasses.replace(m.text, vocab_size=vocab_size, eot_token_id=eot_token_id),
                      init_logit_bias=-10.0 if m.loss == "siglip" else None)


def build_model(config: ClipConfig) -> CLIP:
    model = CLIP(config)
    # uint8 pixels go straight into the fused patch embedding, normalized there
    model.vision_model.embeddings.mean, model.vision_model.embeddings.std = CLIP_MEAN, CLIP_STD
    return model


def _check(config: RunConfig, world_size: int) -> None:
    if config.model.loss not in ("clip", "siglip"):
        raise ValueError(f"config: model.loss must be 'clip' or 'siglip', got {config.model.loss!r}")
    accumulation = config.train.accumulation_steps
    if accumulation < 1 or config.data.batch_size % (world_size * accumulation):
        raise ValueError(f"config: data.batch_size ({config.data.batch_size}) must be a multiple of ranks x "
                         f"train.accumulation_steps ({world_size} x {accumulation})")
    if config.data.streaming and config.data.source != "shards":
        raise ValueError(f"config: data.streaming reads webdataset shards: set data.source=shards, "
                         f"got {config.data.source!r}")
    if config.train.micro_batch and (config.engine.name not in ("auto", "single", "ddp") or accumulation > 1):
        raise ValueError("config: train.micro_batch (gradient caching) runs with engine.name single or ddp and "
                         "train.accumulation_steps=1")


def _loss_function(config: RunConfig, placement):
    if placement.world_size == 1:
        return mmfast.nn.ClipLoss() if config.model.loss == "clip" else mmfast.nn.SigLipLoss()
    if config.model.loss == "clip":  # each rank: its rows against the gathered batch; ranks' mean = global loss
        return mmfast.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=placement.rank,
                                  world_size=placement.world_size)
    return mmfast.nn.SigLipLoss(rank=placement.rank, world_size=placement.world_size)


def _run_name(recipe: str) -> str:
    """A folder name from the recipe's name (a recipe path or a name with separators stays in runs/)."""
    name = os.path.basename(recipe or "run").removesuffix(".yaml")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lstrip(".-") or "run"


def _prepare_run(config: RunConfig, placement, progress: bool, resuming: bool):
    """Run directory, data and tokenizer: written by rank 0, read by every rank. The training split is
    None when streamed. A resumed run's config.yaml is rewritten only after its checkpoint loaded."""
    if placement.is_main:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        config.run_dir = config.run_dir or os.path.join("runs", f"{_run_name(config.recipe)}-{stamp}")
        os.makedirs(os.path.join(config.run_dir, "checkpoints"), exist_ok=True)
        if not resuming:
            save_config(config, os.path.join(config.run_dir, "config.yaml"))
        if config.data.source == "synth":
            ensure_synth(config.data, progress)
    config.run_dir = distributed.broadcast_object(config.run_dir)
    distributed.barrier()
    train_split = None if config.data.streaming else load_split(config.data, "train")
    held_out = load_split(config.data, "held_out")
    tokenizer_path = os.path.join(config.run_dir, "tokenizer.json")
    if placement.is_main and not os.path.exists(tokenizer_path):
        context = config.model.text.context_length
        if config.data.tokenizer:
            tokenizer = CaptionTokenizer.load(config.data.tokenizer, context)
        else:
            captions = train_split[1] if train_split else sample_captions(shard_paths(config.data, "train"), 20000)
            tokenizer = CaptionTokenizer.train(captions, config.model.text.vocab_size, context)
        tokenizer.save(tokenizer_path)
    distributed.barrier()
    return train_split, held_out, CaptionTokenizer.load(tokenizer_path)


def _batches(config: RunConfig, placement, accumulation: int, start: int, train_split, tokenizer):
    """This rank's share of every global batch from step `start` on: (uint8 pixels, tokens)."""
    data, seed = config.data, config.train.seed
    if data.streaming:
        stream = stream_batches(shard_paths(data, "train"), data.batch_size // placement.world_size, placement.rank,
                                placement.world_size, data.image_size, seed + start, data.shuffle_buffer,
                                data.workers)
        for pixels, captions in stream:
            yield pixels, tokenizer(captions)
        return
    images, captions, _ = train_split
    tokens = tokenizer(captions)
    for step in itertools.count(start):
        rows = batch_indices(step, len(tokens), data.batch_size, seed)
        # accumulated batch i is the global batch's i-th slice, shared out over the ranks: the same
        # contrastive batches as in one process
        rows = rows.view(accumulation, placement.world_size, -1)[:, placement.rank].reshape(-1)
        yield images[rows], tokens[rows]


def _forward_backward(engine, loss_fn, pixels, text, micro_batch: int | None) -> torch.Tensor:
    """This rank's gradients for one optimizer step; returns its loss (detached). The loss runs in
    float32 whatever the engine's precision."""
    if micro_batch and micro_batch < len(text):
        with engine.autocast():
            return grad_cache_step(engine.module, loss_fn, pixels, text, micro_batch, forward=engine.model,
                                   no_sync=getattr(engine.model, "no_sync", None))
    losses = []
    parts = list(zip(pixels.chunk(engine.accumulation), text.chunk(engine.accumulation)))
    for index, (part_pixels, part_text) in enumerate(parts):
        with engine.autocast():
            output = engine.model(part_pixels, part_text)
        extra = [output["logit_bias"].float()] if "logit_bias" in output else []
        loss = loss_fn(output["image_features"].float(), output["text_features"].float(),
                       output["logit_scale"].float(), *extra)
        engine.backward(loss, sync=index == len(parts) - 1)
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def train(config: RunConfig, progress: bool = True) -> dict:
    """Runs (or resumes) the training described by `config`; returns the last evaluation (rank 0)."""
    placement = distributed.setup()
    check_config(config)
    _check(config, placement.world_size)
    # every rank checks a resume before anything is loaded or written, so all raise alike
    resume_from = checkpoint.latest(os.path.join(config.run_dir, "checkpoints")) if config.run_dir else None
    resuming = resume_from is not None
    changed = check_resume(config.run_dir, config) if resuming else {}
    engine = build_engine(config, placement)
    train_split, held_out, tokenizer = _prepare_run(config, placement, progress, resuming)
    other = other_split(config.data) if placement.is_main else None
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    model_config = clip_config(config, tokenizer.vocab_size, tokenizer.eot_id)
    engine.prepare(build_model(model_config))
    if placement.is_main and hasattr(engine, "deepspeed_config"):
        with open(os.path.join(config.run_dir, "deepspeed.json"), "w") as handle:
            json.dump(engine.deepspeed_config(), handle, indent=1)
    loss_fn = _loss_function(config, placement)

    checkpoints = os.path.join(config.run_dir, "checkpoints")
    start = 0
    if resume_from:
        engine.load(resume_from)
        start = checkpoint.load_trainer_state(resume_from, placement.rank)
        if "optim.lr" in changed:
            engine.set_learning_rate(config.optim.lr)
        if placement.is_main and changed:
            print(f"mmfast train: resuming with changes {changed}")
            save_config(config, os.path.join(config.run_dir, "config.yaml"))

    def save(step: int) -> str:
        folder = os.path.join(checkpoints, checkpoint.folder_name(step))
        engine.save(folder)
        checkpoint.save_trainer_state(folder, placement.rank, step)
        distributed.barrier()
        if placement.is_main:
            checkpoint.mark_latest(checkpoints, folder)
        return folder

    metrics = MetricsWriter(config.run_dir, enabled=placement.is_main, resumed_at=start)
    batch, steps, device = config.data.batch_size, config.train.steps, placement.device
    end = min(steps, config.train.stop_after or steps)
    sample_flops = flops_per_sample(model_config)
    peak = peak_flops(device, config.engine.precision)
    sample_tokens = model_config.text.context_length + (model_config.vision.image_size //
                                                        model_config.vision.patch_size) ** 2 + 1
    bar = tqdm(range(start, end), initial=start, total=steps, desc="mmfast train",
               disable=not (progress and placement.is_main))
    last_eval, evaluated, window_start, window_samples, folder = {}, False, time.perf_counter(), 0, resume_from
    batches = _batches(config, placement, engine.accumulation, start, train_split, tokenizer)
    for step in bar:
        pixels, text = next(batches)
        pixels, text = pixels.to(device, non_blocking=True), text.to(device, non_blocking=True)
        loss = _forward_backward(engine, loss_fn, pixels, text, config.train.micro_batch)
        grad_norm = engine.step()
        window_samples += batch
        done = step + 1
        if done % config.train.log_every == 0 or done == steps:
            mean_loss = distributed.mean(loss)  # collective: every rank logs at the same steps
            elapsed = time.perf_counter() - window_start
            rate = window_samples / elapsed
            record = {"step": done, "loss": mean_loss, "lr": engine.lr, "grad_norm": grad_norm,
                      "logit_scale": _logit_scale(engine.module),
                      "samples_per_s": rate, "tokens_per_s": rate * sample_tokens,
                      "tflops_per_s": rate * sample_flops / 1e12 / placement.world_size,  # per device
                      "peak_memory_mb": peak_memory_mb(device)}
            if peak:
                record["mfu"] = rate * sample_flops / placement.world_size / peak
            metrics.write(record, "train")
            bar.set_postfix(loss=f"{mean_loss:.3f}", samples_s=f"{rate:.0f}")
            window_start, window_samples = time.perf_counter(), 0
        if done % config.train.eval_every == 0 or done == steps:
            last_eval, evaluated = _evaluate(engine, tokenizer, (held_out, other), done, metrics, bar), True
        if done % config.train.checkpoint_every == 0 or done in (steps, end):
            folder = save(done)
    if not evaluated:  # a resumed run with nothing left to do still reports its scores (logged once)
        last_eval = _evaluate(engine, tokenizer, (held_out, other), max(start, end), metrics, bar, once=True)
    metrics.close()
    if placement.is_main and end == steps and folder:
        export(config.run_dir, folder, model_config)
        plot(metrics.path, os.path.join(config.run_dir, "curves.png"))
    distributed.barrier()
    return last_eval


def _logit_scale(module) -> float:
    """exp(logit_scale) for the metrics; collective under FSDP2 and ZeRO-3, so every rank calls it."""
    parameter = module.logit_scale
    if hasattr(parameter, "ds_numel"):  # partitioned by ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter]):
            return parameter.detach().float().exp().item()
    value = parameter.detach()
    if hasattr(value, "full_tensor"):  # a DTensor under FSDP2
        value = value.full_tensor()
    return value.float().exp().item()


def _evaluate(engine, tokenizer, splits, step: int, metrics: MetricsWriter, bar, once: bool = False) -> dict:
    """Scores on (held-out split, out-of-generator set or None), logged on rank 0."""
    model = engine.evaluation_model()  # collective; a plain module on rank 0
    result = {}
    if model is not None:
        result = {"step": step, **evaluate(model, tokenizer, *splits)}
        metrics.write(result, "eval", once=once)
        shown = [f"zero-shot {result['zero_shot_accuracy']:.3f}"] if "zero_shot_accuracy" in result else []
        if "other_zero_shot_accuracy" in result:
            shown.append(f"drawn another way {result['other_zero_shot_accuracy']:.3f}")
        bar.write(f"step {step}: " + ", ".join(shown + [f"I->T R@1 {result['image_to_text_R@1']:.3f}"]))
    distributed.barrier()
    return result


def export(run_dir: str, folder: str, model_config: ClipConfig) -> str:
    """Writes <run_dir>/model.pt: the consolidated fp32 weights of checkpoint `folder` and the model's
    config, which `mmfast.load_clip` reads."""
    path = os.path.join(run_dir, "model.pt")
    torch.save({"clip_config": dataclasses.asdict(model_config), "state_dict": checkpoint.consolidate(folder),
                "mean": CLIP_MEAN, "std": CLIP_STD}, path)
    return path
