"""pytest-benchmark front of the linear cross-entropy suite (the same cases as `mmfast bench linear_cross_entropy`).

    pytest benchmarks/ --benchmark-only --benchmark-json=linear_cross_entropy.json
    MMFAST_BENCH_PROFILE=full pytest benchmarks/test_linear_cross_entropy.py --benchmark-only
"""
import pytest

from mmfast.bench.pytest_support import benchmark_case, cases


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("case", cases("linear_cross_entropy"), ids=lambda c: f"{c.group}-{c.provider}".replace(" ", "-"))
def test_linear_cross_entropy(benchmark, case, mode):
    benchmark.group = f"{case.group} {mode}"
    benchmark_case(benchmark, case, mode)
