"""torch.profiler around chosen training steps (`train.profile_steps=10-12`): one trace per rank that
Chrome's and Perfetto's trace viewers and TensorBoard's profiler plugin open, and a table of the ops
that took the time. mmfast's ops appear under their own names (mmfast.mixed_attention, ...)."""
from __future__ import annotations

import os

import torch


def step_range(text: str) -> tuple[int, int] | None:
    """"10-12" -> (10, 12): steps counted from 1 as logged; "" -> None; anything else a ValueError."""
    if not text:
        return None
    first, separator, last = text.partition("-")
    try:
        bounds = (int(first), int(last if separator else first))
    except ValueError:
        bounds = (0, -1)
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"config: train.profile_steps must look like FIRST-LAST (steps from 1, e.g. 10-12), "
                         f"got {text!r}")
    return bounds


class StepProfiler:
    """start(step) before a step's batch and stop(step) after its optimizer step; profiles the
    range's steps and writes <run_dir>/profile/rank<r>.steps-<a>-<b>.pt.trace.json and .txt."""

    def __init__(self, text: str, run_dir: str, rank: int, device: torch.device):
        self.range, self.run_dir, self.rank = step_range(text), run_dir, rank
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = None

    def start(self, step: int) -> None:
        if self.range and step == self.range[0]:
            self.profiler = torch.profiler.profile(activities=self.activities, record_shapes=True)
            self.profiler.__enter__()

    def stop(self, step: int) -> str | None:
        """The trace's path after the range's last step, else None."""
        if self.profiler is None or step != self.range[1]:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        folder = os.path.join(self.run_dir, "profile")
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, f"rank{self.rank}.steps-{self.range[0]}-{self.range[1]}")
        self.profiler.export_chrome_trace(stem + ".pt.trace.json")
        sort = "self_cuda_time_total" if len(self.activities) > 1 else "self_cpu_time_total"
        with open(stem + ".txt", "w") as handle:
            handle.write(self.profiler.key_averages().table(sort_by=sort, row_limit=30))
        self.profiler = None
        return stem + ".pt.trace.json"
