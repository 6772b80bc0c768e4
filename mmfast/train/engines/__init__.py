"""Engines behind one interface (see base.Engine): single process, DDP, FSDP2, DeepSpeed ZeRO."""
from __future__ import annotations

from mmfast.train.distributed import Placement
from mmfast.train.engines.base import Engine, Geometry

NAMES = ("auto", "single", "ddp", "fsdp2", "deepspeed")


def build_engine(config, placement: Placement) -> Engine:
    """The engine `config.engine.name` names, given the run's engine and optim sections and its batch geometry."""
    name = config.engine.name
    sections = (config.engine, config.optim, Geometry.of_run(config), placement)
    if name == "auto":
        name = "ddp" if placement.world_size > 1 else "single"
    if name == "single":
        if placement.world_size > 1:
            raise ValueError(f"config: engine.name=single runs one process, but {placement.world_size} were "
                             "launched; use ddp, fsdp2 or deepspeed")
        return Engine(*sections)
    if name == "ddp":
        from mmfast.train.engines.ddp import DDPEngine

        return DDPEngine(*sections) if placement.world_size > 1 else Engine(*sections)
    if name == "fsdp2":
        from mmfast.train.engines.fsdp2 import FSDP2Engine

        if placement.world_size == 1:
            raise ValueError("config: engine.name=fsdp2 shards over processes; launch with torchrun "
                             "--nproc_per_node N (one process: engine.name=single)")
        return FSDP2Engine(*sections)
    if name == "deepspeed":
        from mmfast.train.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(*sections)
    raise ValueError(f"config: engine.name must be one of {NAMES}, got {name!r}")


__all__ = ["Engine", "Geometry", "NAMES", "build_engine"]
