"""pytest-benchmark front of the contrastive suite (the same cases as `mmfast bench contrastive`).

    pytest benchmarks/ --benchmark-only --benchmark-json=contrastive.json
    MMFAST_BENCH_PROFILE=full pytest benchmarks/test_contrastive.py --benchmark-only
"""
import pytest

from mmfast.bench.pytest_support import benchmark_case, cases


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("case", cases("contrastive"), ids=lambda c: f"{c.group}-{c.provider}".replace(" ", "-"))
def test_contrastive(benchmark, case, mode):
    benchmark.group = f"{case.group} {mode}"
    benchmark_case(benchmark, case, mode)
