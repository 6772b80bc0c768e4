"""Runs benchmark cases and writes what they measured (see report.py for the files)."""
from __future__ import annotations

import datetime
import gc
import os
import re

import torch
from tqdm.auto import tqdm

from mmfast.bench.registry import MODES, suite_cases
from mmfast.bench.timing import measure
from mmfast.environment import describe, gpu_state

SETTINGS = {  # warmup, repeats, seconds per mode at most
    "cuda": (3, 20, 10.0),
    "cpu": (1, 5, 5.0),
}


def _out_of_memory(error: Exception) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def trace_case(step, leaves, mode: str, device: torch.device, path: str, repeats: int = 3) -> None:
    """A torch.profiler trace of `repeats` runs of one timed mode (after its timing: warm), written as
    Chrome/Perfetto JSON that TensorBoard's profiler plugin also reads; mmfast's ops carry their names."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(repeats):
            for leaf in leaves:
                leaf.grad = None
            output = step()
            if mode != "forward":
                output.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    profiler.export_chrome_trace(path)


def _trace_path(directory: str, case, mode: str) -> str:
    name = re.sub(r"[^A-Za-z0-9.=]+", "_", f"{case.suite}-{case.group}-{case.provider}-{mode}")
    return os.path.join(directory, f"{name}.pt.trace.json")


def run_case(case, device: torch.device, modes, context: dict, trace: str | None = None) -> list[dict]:
    """One row per mode; with `trace` (a folder) also a profiler trace of each mode that ran."""
    warmup, repeats, budget = SETTINGS["cuda" if device.type == "cuda" else "cpu"]
    rows = []
    for mode in modes:
        if mode not in case.modes:
            continue
        row = {**context, "suite": case.suite, "group": case.group, "provider": case.provider,
               "is_mmfast": case.is_mmfast, "mode": mode, **case.params, "rate_names": sorted(case.rates)}
        try:
            step, leaves = case.make()
            timing = measure(step, leaves, mode, device, warmup=warmup, repeats=repeats, budget_s=budget)
        except Exception as error:  # one failing provider must not end the run: its row says why
            if _out_of_memory(error):
                row.update(status="out of memory")
            else:
                row.update(status=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                print(f"mmfast bench: {case.group} / {case.provider} / {mode} failed: {error!r}")
        else:
            row.update(status="ok", median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                       peak_memory_mb=timing.peak_memory_mb, repeats=timing.repeats)
            if case.flops is not None:
                row["tflops"] = case.flops(mode) / (timing.median_ms * 1e-3) / 1e12
            if case.bytes is not None:
                row["gbps"] = case.bytes(mode) / (timing.median_ms * 1e-3) / 1e9
            for name, amount in case.rates.items():
                row[name] = amount / (timing.median_ms * 1e-3)
            if trace:
                os.makedirs(trace, exist_ok=True)
                row["trace"] = _trace_path(trace, case, mode)
                trace_case(step, leaves, mode, device, row["trace"])
        finally:
            step = leaves = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def run_suites(names, profile: str, device: torch.device, modes=MODES, progress: bool = True,
               trace: str | None = None) -> list[dict]:
    """Every case of the named suites on `device`; one row per (case, mode); `trace`: a folder for a
    profiler trace of each."""
    machine = describe()
    context = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile, "device": str(device), "torch": machine["torch"], "triton": machine["triton"],
        "git_commit": machine["git_commit"], "cpu": machine["cpu"],
        **(gpu_state(device.index or 0) if device.type == "cuda" else {"gpu": None}),
    }
    cases = [case for name in names for case in suite_cases(name, profile, device)]
    rows = []
    for case in tqdm(cases, desc="mmfast bench", unit="case", disable=not progress):
        rows.extend(run_case(case, device, modes, context, trace))
    return rows
