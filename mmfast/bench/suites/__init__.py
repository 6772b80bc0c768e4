"""Benchmark suites by name: each maps (profile, device) to a list of cases."""
from mmfast.bench.suites import contrastive

SUITES = {
    "contrastive": contrastive.cases,
}
