"""Helpers for tests that train: a recipe with overrides in a run directory, and a run's losses."""
import json
import os

from mmfast.train import load_config


def run_config(root, name, overrides, *extra):
    """clip-tiny with `overrides` and `extra`, the bundled data under root/synth, run dir root/name."""
    config = load_config("clip-tiny", [*overrides, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def losses(run_dir) -> dict:
    """{step: loss} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
