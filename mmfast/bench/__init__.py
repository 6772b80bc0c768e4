"""The benchmark harness: mmfast against the peers, measured in the same run.

`mmfast bench <suite>` and `pytest benchmarks/ --benchmark-only` both run the cases defined
in `mmfast.bench.suites`; see `runner.run_suites`.
"""
from mmfast.bench.registry import MODES, Case
from mmfast.bench.runner import run_suites

__all__ = ["MODES", "Case", "run_suites"]
