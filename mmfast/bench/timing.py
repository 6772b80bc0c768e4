"""Timing of one case: median and 20th/80th percentiles, with CUDA events on a GPU and the
wall clock on the CPU; peak memory above the inputs on a GPU."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_memory_mb: float | None
    repeats: int


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, started) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return started.elapsed_time(end)
        return (time.perf_counter() - started) * 1e3


def _clear(leaves):
    for leaf in leaves:
        leaf.grad = None


def measure(step, leaves, mode: str, device: torch.device, *, warmup: int, repeats: int,
            budget_s: float | None = None) -> Timing:
    """Times `mode` ("forward", "backward" or "full") of step(); stops early past budget_s."""
    clock = _Clock(device)
    cuda = device.type == "cuda"

    def once() -> float:
        _clear(leaves)
        if mode == "backward":
            output = step()
            if cuda:
                torch.cuda.synchronize()
            started = clock.start()
            output.backward()
            return clock.elapsed_ms(started)
        started = clock.start()
        output = step()
        if mode == "full":
            output.backward()
        return clock.elapsed_ms(started)

    for _ in range(warmup):
        once()
    _clear(leaves)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    times, began = [], time.perf_counter()
    for _ in range(repeats):
        times.append(once())
        if budget_s is not None and time.perf_counter() - began > budget_s and len(times) >= 3:
            break
    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if cuda else None
    _clear(leaves)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), peak, len(times))
