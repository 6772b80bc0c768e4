"""pytest-benchmark front of the mixed_attention suite (the same cases as `mmfast bench mixed_attention`)."""
import pytest

from mmfast.bench.pytest_support import benchmark_case, cases


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("case", cases("mixed_attention"), ids=lambda c: f"{c.group}-{c.provider}".replace(" ", "-"))
def test_mixed_attention(benchmark, case, mode):
    benchmark.group = f"{case.group} {mode}"
    benchmark_case(benchmark, case, mode)
