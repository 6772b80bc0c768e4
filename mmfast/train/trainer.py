"""The training loop, from one CPU process to many GPUs; what is trained comes from the run's task
(mmfast.train.tasks: data, model, loss, evaluation, export), the loop keeps engines, accumulation,
schedule, progress, metrics, checkpoints, resume and the run directory.

A run directory holds config.yaml (resolved), the task's files (tokenizer.json), metrics.jsonl,
tensorboard/, checkpoints/, model.pt (the consolidated fp32 weights at the end) and curves.png.
Launched by torchrun or the deepspeed launcher, every rank runs this loop on its share of each global batch;
rank 0 writes everything but the checkpoint shards. Resuming from the latest checkpoint reproduces
the uninterrupted run: the data order is a function of (seed, step), and model, optimizer,
schedule and RNG states are restored.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import time

import torch
from tqdm.auto import tqdm

from mmfast.train import checkpoint, distributed
from mmfast.train.config import RunConfig, check_config, save_config
from mmfast.train.engines import build_engine
from mmfast.train.engines.base import freeze
from mmfast.train.files import load_tensors
from mmfast.train.metrics import MetricsWriter, peak_flops, peak_memory_mb, plot
from mmfast.train.profiling import StepProfiler
from mmfast.train.resume import check_resume
from mmfast.train.stages import finished, stage_configs
from mmfast.train.tasks import build_task


def _check(config: RunConfig, world_size: int) -> None:
    accumulation = config.train.accumulation_steps
    if accumulation < 1 or config.data.batch_size % (world_size * accumulation):
        raise ValueError(f"config: data.batch_size ({config.data.batch_size}) must be a multiple of ranks x "
                         f"train.accumulation_steps ({world_size} x {accumulation})")


def _run_name(recipe: str) -> str:
    """A folder name from the recipe's name (a recipe path or a name with separators stays in runs/)."""
    name = os.path.basename(recipe or "run").removesuffix(".yaml")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lstrip(".-") or "run"


def _prepare_run(config: RunConfig, task, placement, progress: bool, resuming: bool) -> None:
    """The run directory (rank 0), then the task's data and tokenizer (see Task.prepare). A resumed
    run's config.yaml is rewritten only after its checkpoint loaded."""
    _resolve_run_dir(config, placement)
    if placement.is_main:
        os.makedirs(os.path.join(config.run_dir, "checkpoints"), exist_ok=True)
        if not resuming:
            save_config(config, os.path.join(config.run_dir, "config.yaml"))
    distributed.barrier()
    task.prepare(progress)


def _initial_weights(path: str) -> dict:
    """The contents of a model.pt (or of the model.pt in a run directory)."""
    path = os.path.join(path, "model.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: train.init_from names {path!r}, which does not exist")
    return load_tensors(path)


def _resolve_run_dir(config: RunConfig, placement) -> None:
    if placement.is_main:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        config.run_dir = config.run_dir or os.path.join("runs", f"{_run_name(config.recipe)}-{stamp}")
    config.run_dir = distributed.broadcast_object(config.run_dir)


def train_stages(config: RunConfig, progress: bool = True) -> dict:
    """Each stage of config.stages in turn (see mmfast.train.stages); returns the last evaluation."""
    placement = distributed.setup()
    _resolve_run_dir(config, placement)
    stages, result = stage_configs(config), {}
    if placement.is_main:  # the order of the stages, for loading a staged run by its directory
        os.makedirs(config.run_dir, exist_ok=True)
        with open(os.path.join(config.run_dir, "stages.json"), "w") as handle:
            json.dump({"stages": [name for name, _ in stages]}, handle)
    for name, stage in stages:
        if finished(stage):
            if placement.is_main:
                print(f"mmfast train: stage {name} is finished ({stage.run_dir}/model.pt), skipped")
            continue
        if placement.is_main:
            print(f"mmfast train: stage {name} ({stage.run_dir})")
        result = train(stage, progress)
        if not finished(stage):  # stopped early (train.stop_after): the later stages wait for it
            break
    return result


def train(config: RunConfig, progress: bool = True) -> dict:
    """Runs (or resumes) the training described by `config` (every stage, if it has stages); returns
    the last evaluation (rank 0)."""
    if config.stages:
        return train_stages(config, progress)
    placement = distributed.setup()
    check_config(config)
    _check(config, placement.world_size)
    task = build_task(config, placement)
    task.check(placement.world_size)
    # every rank checks a resume before anything is loaded or written, so all raise alike
    resume_from = checkpoint.latest(os.path.join(config.run_dir, "checkpoints")) if config.run_dir else None
    resuming = resume_from is not None
    changed = check_resume(config.run_dir, config) if resuming else {}
    engine = build_engine(config, placement)
    _prepare_run(config, task, placement, progress, resuming)
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    model = task.build_model()
    if config.train.init_from:  # a checkpoint, when resuming, replaces these weights below
        task.initial_weights(model, _initial_weights(config.train.init_from))
    freeze(model, config.train.trainable, config.train.frozen)
    model = task.adapt(model)  # adapters (LoRA) train beside what train.trainable names
    engine.prepare(model)
    if placement.is_main:
        engine.write_files(config.run_dir)

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
    sample_flops, sample_tokens = task.flops_per_sample(), task.tokens_per_sample()
    peak = peak_flops(device, config.engine.precision)
    bar = tqdm(range(start, end), initial=start, total=steps, desc="mmfast train",
               disable=not (progress and placement.is_main))
    last_eval, evaluated, window_start, window_samples, folder = {}, False, time.perf_counter(), 0, resume_from
    batches = task.batches(engine.accumulation, start)
    profiler = StepProfiler(config.train.profile_steps, config.run_dir, placement.rank, device)
    for step in bar:
        profiler.start(step + 1)
        batch_tensors = tuple(tensor.to(device, non_blocking=True) for tensor in next(batches))
        loss = task.forward_backward(engine, batch_tensors)
        grad_norm = engine.step()
        window_samples += batch
        done = step + 1
        trace = profiler.stop(done)
        if trace and placement.is_main:
            bar.write(f"mmfast train: profile of steps {config.train.profile_steps} in {trace}")
        if done % config.train.log_every == 0 or done == steps:
            mean_loss = distributed.mean(loss)  # collective: every rank logs at the same steps
            elapsed = time.perf_counter() - window_start
            rate = window_samples / elapsed
            record = {"step": done, "loss": mean_loss, "lr": engine.lr, "grad_norm": grad_norm,
                      **task.log(engine), "samples_per_s": rate, "tokens_per_s": rate * sample_tokens,
                      "tflops_per_s": rate * sample_flops / 1e12 / placement.world_size,  # per device
                      "peak_memory_mb": peak_memory_mb(device)}
            if peak:
                record["mfu"] = rate * sample_flops / placement.world_size / peak
            metrics.write(record, "train")
            bar.set_postfix(loss=f"{mean_loss:.3f}", samples_s=f"{rate:.0f}")
            window_start, window_samples = time.perf_counter(), 0
        if done % config.train.eval_every == 0 or done == steps:
            last_eval, evaluated = _evaluate(engine, task, done, metrics, bar), True
        if done % config.train.checkpoint_every == 0 or done in (steps, end):
            folder = save(done)
    if not evaluated:  # a resumed run with nothing left to do still reports its scores (logged once)
        last_eval = _evaluate(engine, task, max(start, end), metrics, bar, once=True)
    metrics.close()
    if placement.is_main and end == steps and folder:
        task.export(config.run_dir, folder)
        plot(metrics.path, os.path.join(config.run_dir, "curves.png"), task.plot_metrics)
    distributed.barrier()
    return last_eval


def _evaluate(engine, task, step: int, metrics: MetricsWriter, bar, once: bool = False) -> dict:
    """The task's scores, logged on rank 0."""
    model = engine.evaluation_model()  # collective; a plain module on rank 0
    result = {}
    if model is not None:
        result = {"step": step, **task.evaluate(model)}
        metrics.write(result, "eval", once=once)
        shown = [f"{label} {result[key]:.3f}" for key, label in task.headline.items() if key in result]
        bar.write(f"step {step}: " + ", ".join(shown))
    distributed.barrier()
    return result
