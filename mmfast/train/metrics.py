"""What a run reports: JSONL and TensorBoard scalars (rank 0), MFU where the device's
peak is known, peak memory, and the curves PNG at the end."""
from __future__ import annotations

import json
import os
import resource

import torch

from mmfast.train.files import write_atomically

# dense peak FLOP/s by precision (vendor figures, SXM parts); fp32 is without TF32 (PyTorch's default)
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows_until(path: str, step: int) -> list[str]:
    """The lines of metrics.jsonl up to `step`: what a run resumed after `step` keeps (the steps it
    replays would otherwise appear twice). A line cut by a kill is dropped."""
    if not os.path.exists(path):
        return []
    kept = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors their numbers to TensorBoard (when installed).
    A run resumed after step `resumed_at` first drops what was logged past it (JSONL rows and
    TensorBoard events), so the curves hold each step once."""

    def __init__(self, run_dir: str, enabled: bool = True, resumed_at: int = 0):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.handle = self.board = None
        self.evaluated_steps: set[int] = set()
        if enabled:
            kept = _rows_until(self.path, resumed_at)
            rows = [json.loads(line) for line in kept]
            self.evaluated_steps = {row["step"] for row in rows if "loss" not in row}
            write_atomically(self.path, "".join(kept))
            self.handle = open(self.path, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resumed_at + 1)
            except ImportError:
                print("mmfast train: tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict, group: str, once: bool = False) -> None:
        """Logs `record` (which has a "step"); with once=True, an evaluation of a step already logged
        is not logged again."""
        if not self.enabled or (once and group == "eval" and record["step"] in self.evaluated_steps):
            return
        if group == "eval":
            self.evaluated_steps.add(record["step"])
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.board:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"{group}/{key}", value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            if self.board:
                self.board.close()


def plot(metrics_path: str, out_path: str, headline: dict) -> None:
    """Training loss and the task's headline evaluation metrics ({key: label}) of a run as a PNG:
    losses on the left, scores on the right (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "loss" not in r and any(key in r for key in headline)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    left.set(title="loss", xlabel="step")
    for key, label in headline.items():
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axis = left if "loss" in key else right
            axis.plot(*zip(*points), marker="o", label=label)
    left.legend(loc="upper right")
    right.set(title="evaluation", xlabel="step", ylim=(0, 1))
    if right.get_legend_handles_labels()[0]:  # a stage may have no scores (a text-only stage)
        right.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
