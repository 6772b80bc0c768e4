"""Runs a benchmark case under pytest-benchmark (`pytest benchmarks/ --benchmark-only`)."""
from __future__ import annotations

import os

import torch

from mmfast.bench.registry import suite_cases


def device() -> torch.device:
    return torch.device(os.environ.get("MMFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def cases(suite: str):
    """The suite's cases for MMFAST_BENCH_PROFILE (default: quick on a GPU, cpu otherwise)."""
    chosen = device()
    profile = os.environ.get("MMFAST_BENCH_PROFILE") or ("quick" if chosen.type == "cuda" else "cpu")
    return suite_cases(suite, profile, chosen)


def benchmark_case(benchmark, case, mode: str) -> None:
    chosen = device()
    synchronize = torch.cuda.synchronize if chosen.type == "cuda" else (lambda: None)
    step, leaves = case.make()

    def clear():
        for leaf in leaves:
            leaf.grad = None

    if mode == "backward":
        def setup():
            clear()
            output = step()
            synchronize()
            return (output,), {}

        def target(output):
            output.backward()
            synchronize()
    else:
        def setup():
            clear()
            return (), {}

        def target():
            output = step()
            if mode == "full":
                output.backward()
            synchronize()

    benchmark.extra_info.update(case.params, provider=case.provider, group=case.group, mode=mode)
    rounds = 20 if chosen.type == "cuda" else 3
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=2)
    if case.flops is not None:
        benchmark.extra_info["tflops_at_median"] = case.flops(mode) / benchmark.stats.stats.median / 1e12
