"""Checkpoint folders and their consolidation.

`<run>/checkpoints/step-0000400/` holds what the engine writes (state.pt for one process and DDP,
a torch.distributed.checkpoint folder `sharded/` for FSDP2, DeepSpeed's own layout for ZeRO) and
`trainer-rank<R>.pt` (step and RNG states of each rank). `<run>/checkpoints/latest` names the
newest folder (DeepSpeed writes the same file). `consolidate` turns any of them into one plain
fp32 state dict without starting processes."""
from __future__ import annotations

import glob
import os
import tempfile

import torch


def folder_name(step: int) -> str:
    return f"step-{step:07d}"


def latest(checkpoints: str) -> str | None:
    """The newest complete checkpoint folder under `checkpoints`, or None."""
    marker = os.path.join(checkpoints, "latest")
    if not os.path.exists(marker):
        return None
    folder = os.path.join(checkpoints, open(marker).read().strip())
    return folder if os.path.isdir(folder) else None


def mark_latest(checkpoints: str, folder: str) -> None:
    with open(os.path.join(checkpoints, "latest"), "w") as handle:
        handle.write(os.path.basename(folder))


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
    state = torch.load(path, weights_only=False)
    torch.random.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["step"]


def consolidate(folder: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint folder, whatever engine wrote it."""
    if os.path.exists(os.path.join(folder, "state.pt")):
        return torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=False)["model"]
    if os.path.isdir(os.path.join(folder, "sharded")):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "full.pt")
            dcp_to_torch_save(os.path.join(folder, "sharded"), path)
            return {key: value.float() for key, value in torch.load(path, weights_only=False)["model"].items()}
    if glob.glob(os.path.join(folder, "*model_states.pt")):
        from mmfast.train.engines.zero import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))
        return {key: value.float() for key, value in state.items()}
    raise FileNotFoundError(f"{folder} holds no checkpoint written by mmfast's engines")
