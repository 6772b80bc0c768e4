"""pytest-benchmark front of the patch_embed suite (the same cases as `mmfast bench patch_embed`)."""
import pytest

from mmfast.bench.pytest_support import benchmark_case, cases


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("case", cases("patch_embed"), ids=lambda c: f"{c.group}-{c.provider}".replace(" ", "-"))
def test_patch_embed(benchmark, case, mode):
    benchmark.group = f"{case.group} {mode}"
    benchmark_case(benchmark, case, mode)
