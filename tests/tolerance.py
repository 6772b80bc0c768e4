"""Self-setting tolerances (as FlashAttention's tests): a kernel's error against a float64
reference may be at most twice the error of the reference run in the same low precision,
plus a small per-dtype floor relative to the values' magnitude."""
import torch

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def max_error(actual, expected) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_within_reference_error(name, actual, exact, low_precision, dtype):
    """actual: the kernel's result; exact: float64 reference; low_precision: reference in `dtype`."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = max_error(actual, exact)
    reference_error = max_error(low_precision, exact)
    allowed = 2 * reference_error + FLOOR[dtype] * max(1.0, exact.abs().max().item())
    assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g} (reference in {dtype}: {reference_error:.3g})"
