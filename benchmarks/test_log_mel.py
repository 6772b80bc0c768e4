"""pytest-benchmark front of the log_mel suite (the same cases as `mmfast bench log_mel`)."""
import pytest

from mmfast.bench.pytest_support import benchmark_case, cases


@pytest.mark.parametrize("case", cases("log_mel"), ids=lambda c: f"{c.group}-{c.provider}".replace(" ", "-"))
def test_log_mel(benchmark, case):
    benchmark.group = case.group
    benchmark_case(benchmark, case, "forward")
