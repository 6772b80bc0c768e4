"""Checkpoint folders and their consolidation.

`<run>/checkpoints/step-0000400/` holds what the engine writes (state.pt for one process and DDP,
a torch.distributed.checkpoint folder `sharded/` for FSDP2, DeepSpeed's own layout for ZeRO) and
`trainer-rank<R>.pt` (step and RNG states of each rank), then `complete` once every rank wrote its
part. `<run>/checkpoints/latest` names the newest folder (DeepSpeed writes the same file); it is
replaced atomically, and when it is missing, empty, corrupt or points outside `checkpoints/`, the
newest complete folder is used. `consolidate` turns any of them into one plain fp32 state dict
without starting processes.

Every file mmfast reads back is loaded with `torch.load(weights_only=True)` (`load_tensors`):
tensors, numbers, strings and plain containers only, so a crafted file cannot run code. DeepSpeed's
own checkpoint files are read by DeepSpeed, which unpickles them: resume or export a ZeRO run only
from storage you trust."""
from __future__ import annotations

import glob
import logging
import os
import re
import tempfile

import torch

from mmfast.train.files import load_tensors, write_atomically

logger = logging.getLogger("mmfast")
FOLDER_PATTERN = re.compile(r"step-\d{7,}")
COMPLETE = "complete"


def folder_name(step: int) -> str:
    return f"step-{step:07d}"


def _complete_folders(checkpoints: str) -> list[str]:
    """Checkpoint folders every rank finished writing, oldest first."""
    if not os.path.isdir(checkpoints):
        return []
    names = [name for name in os.listdir(checkpoints) if FOLDER_PATTERN.fullmatch(name)
             and os.path.exists(os.path.join(checkpoints, name, COMPLETE))]
    return [os.path.join(checkpoints, name) for name in sorted(names)]


def latest(checkpoints: str) -> str | None:
    """The newest complete checkpoint folder under `checkpoints`, or None.

    `latest` is followed only when it names a folder `step-NNNNNNN` directly inside `checkpoints`;
    anything else (empty after a kill, an absolute path, `..`) is reported and the newest folder
    marked complete is taken instead."""
    marker = os.path.join(checkpoints, "latest")
    if os.path.exists(marker):
        with open(marker, errors="replace") as handle:
            name = handle.read().strip()
        folder = os.path.join(checkpoints, name)
        if FOLDER_PATTERN.fullmatch(name) and os.path.isdir(folder):
            return folder
        logger.warning("mmfast: %s names %r, not a checkpoint folder of this run; using the newest complete "
                       "checkpoint instead", marker, name[:200])
    complete = _complete_folders(checkpoints)
    return complete[-1] if complete else None


def mark_latest(checkpoints: str, folder: str) -> None:
    """Marks `folder` complete (every rank wrote its part) and makes it the one `latest` names."""
    write_atomically(os.path.join(folder, COMPLETE), "")
    write_atomically(os.path.join(checkpoints, "latest"), os.path.basename(folder))


def rng_state() -> dict:
    state = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_trainer_state(folder: str, rank: int, step: int) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save({"step": step, "rng": rng_state()}, os.path.join(folder, f"trainer-rank{rank}.pt"))


def load_trainer_state(folder: str, rank: int) -> int:
    """Restores this rank's RNG states; returns the step the checkpoint was taken after."""
    path = os.path.join(folder, f"trainer-rank{rank}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: was the checkpoint written by as many ranks as this run has?")
    state = load_tensors(path)
    torch.random.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["step"]


def consolidate(folder: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint folder, whatever engine wrote it."""
    if os.path.exists(os.path.join(folder, "state.pt")):
        return load_tensors(os.path.join(folder, "state.pt"))["model"]
    if os.path.isdir(os.path.join(folder, "sharded")):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "full.pt")
            dcp_to_torch_save(os.path.join(folder, "sharded"), path)
            return {key: value.float() for key, value in load_tensors(path)["model"].items()}
    if glob.glob(os.path.join(folder, "*model_states.pt")):
        from mmfast.train.engines.deepspeed_engine import TOWERS_FILE, import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))
        towers = os.path.join(folder, TOWERS_FILE)  # ZeRO-3's frozen towers, kept out of its partitions
        if os.path.exists(towers):
            state.update(load_tensors(towers))
        return {key: value.float() for key, value in state.items()}
    raise FileNotFoundError(f"{folder} holds no checkpoint written by mmfast's engines")
