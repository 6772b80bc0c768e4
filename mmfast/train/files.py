"""Reading and writing run files safely: loads that never run code from the file, and writes that
a kill cannot leave half done."""
from __future__ import annotations

import os
import pickle

import torch


def load_tensors(path: str, map_location="cpu"):
    """torch.load that never executes code from the file (weights_only=True), with an error that
    says why a file was refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"{path}: refused to load: it holds Python objects other than tensors, numbers, strings "
                         f"and plain containers, and unpickling those can run code ({reason}). mmfast never "
                         "writes such objects. If you trust the file's origin, read it yourself with "
                         "torch.load(path, weights_only=False).") from None


def write_atomically(path: str, text: str) -> None:
    scratch = f"{path}.tmp-{os.getpid()}"
    with open(scratch, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(scratch, path)  # readers see the old file or the new one, never a partial one
