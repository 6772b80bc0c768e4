"""What a resumed run may change from the configuration it was started with.

A run directory that holds a checkpoint resumes. Its config.yaml is compared with the new
configuration before anything is loaded or written: what the checkpoint cannot be loaded into (the
model, the engine's checkpoint layout, the data's geometry, the optimizer's kind) is refused; the
keys in FREE change nothing the run computes and may differ; anything else (learning rate, batch
size, seed, schedule, ...) is refused unless named in `resume.allow_changes`."""
from __future__ import annotations

import dataclasses
import os

import yaml

from mmfast.train.config import RunConfig

FIXED = ("task", "model", "engine.name", "engine.zero_stage", "data.source", "data.image_size", "data.tokenizer",
         "optim.name", "optim.lr_groups", "train.frozen", "train.trainable")  # the optimizer's groups
FREE = ("recipe", "run_dir", "resume", "stages", "train.init_from", "train.stop_after", "train.log_every",
        "train.eval_every", "train.checkpoint_every", "train.profile_steps", "data.workers")


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _under(key: str, prefixes) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def changes(saved: dict, config: RunConfig) -> dict[str, tuple]:
    """{key: (saved value, new value)} for every key that differs, FREE keys left out."""
    old, new = _flat(saved), _flat(dataclasses.asdict(config))
    # keys a run written by an older mmfast lacks count as their defaults (fields added since)
    defaults = _flat(dataclasses.asdict(RunConfig(task=saved.get("task", config.task))))
    old = {**{key: value for key, value in defaults.items() if key not in old}, **old}
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not _under(key, FREE)}


def check_resume(run_dir: str, config: RunConfig) -> dict[str, tuple]:
    """The allowed changes of a resume of `run_dir` (empty for a new run); raises ValueError naming
    every change that is refused."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        saved = yaml.safe_load(handle) or {}
    differing = changes(saved, config)
    allowed = [key.strip() for key in config.resume.allow_changes.split(",") if key.strip()]
    fixed = {key: values for key, values in differing.items() if _under(key, FIXED)}
    refused = {key: values for key, values in differing.items() if key not in fixed and not _under(key, allowed)}
    if fixed:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in fixed.items())
        raise ValueError(f"resume: {run_dir} was trained with another configuration that its checkpoint cannot "
                         f"be loaded into ({listed}); start a new run directory instead")
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise ValueError(f"resume: the configuration differs from {path} ({listed}). Resume with the saved "
                         f"values, or allow the change: --resume.allow_changes={','.join(refused)}")
    return differing
