"""Helpers for tests that train: a recipe with overrides in a run directory, and a run's losses."""
import json
import os

from mmfast.train import load_config
from mmfast.train.tasks import build_task

ONE_PROCESS = type("Placement", (), dict(rank=0, world_size=1, is_main=True))()


def run_config(root, name, overrides, *extra):
    """clip-tiny with `overrides` and `extra`, the bundled data under root/synth, run dir root/name."""
    config = load_config("clip-tiny", [*overrides, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def losses(run_dir) -> dict:
    """{step: loss} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def prepared_task(config):
    """config's task, prepared (data, tokenizer) in its run directory as rank 0 of one process."""
    os.makedirs(config.run_dir, exist_ok=True)
    task = build_task(config, placement=ONE_PROCESS)
    task.prepare(progress=False)
    return task
