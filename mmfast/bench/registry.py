"""The suites that define the benchmark cases, by name."""
from __future__ import annotations

import torch

from mmfast.bench.case import MODES, PROFILES, Case
from mmfast.bench.suites import SUITES

__all__ = ["MODES", "PROFILES", "Case", "suite_cases", "suite_names"]


def suite_names() -> list[str]:
    return sorted(SUITES)


def suite_cases(name: str, profile: str, device: torch.device) -> list[Case]:
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; available: {sorted(SUITES)}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return SUITES[name](profile, device)
