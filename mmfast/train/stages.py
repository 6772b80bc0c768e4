"""Multi-stage recipes: `stages:` lists the stages of one run (e.g. alignment with the encoders frozen,
then tuning), each a mapping of config sections that override the recipe's, and a `name`:

    stages:
      - name: align
        train: {steps: 2000, trainable: [visual_projection, text_projection]}
      - name: tune
        optim: {lr: 1.0e-4}

Stage i runs in <run_dir>/<name> (a run directory of its own: config, checkpoints, metrics, model.pt)
and starts from stage i-1's model.pt. A stage whose model.pt exists is finished and skipped on a
re-run; one with checkpoints but no model.pt resumes; a stage that stops early (train.stop_after)
ends the run there."""
from __future__ import annotations

import copy
import os

from mmfast.train.config import RunConfig, apply_values, check_config


def stage_configs(config: RunConfig) -> list[tuple[str, RunConfig]]:
    """(name, full config) of each stage, in order; run_dir must be set."""
    stages, previous, names = [], None, set()
    for index, values in enumerate(config.stages):
        values = dict(values)
        name = str(values.pop("name", f"stage-{index + 1}"))
        if name in names or not name or os.sep in name or name.startswith("."):
            raise ValueError(f"config: stages[{index}].name must be a new folder name, got {name!r}")
        names.add(name)
        if "stages" in values or "run_dir" in values:
            raise ValueError(f"config: stages[{index}] ({name}) may not set stages or run_dir")
        stage = copy.deepcopy(config)
        stage.stages = []
        apply_values(stage, values, f"stages[{index}].")
        check_config(stage)
        stage.run_dir = os.path.join(config.run_dir, name)
        if previous is not None:
            stage.train.init_from = os.path.join(previous.run_dir, "model.pt")
        stages.append((name, stage))
        previous = stage
    return stages


def finished(stage: RunConfig) -> bool:
    return os.path.exists(os.path.join(stage.run_dir, "model.pt"))
