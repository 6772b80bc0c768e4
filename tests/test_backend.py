"""Backend selection: argument, MMFAST_BACKEND, auto's fallback log, clear errors."""
import logging

import pytest
import torch

import mmfast
from mmfast.ops import _backend
from mmfast.ops._backend import resolve_backend

CPU = torch.device("cpu")
IMPLEMENTED = ("triton", "reference")


def test_auto_on_cpu_uses_the_pytorch_path_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(_backend, "_fallbacks_logged", set())
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    with caplog.at_level(logging.INFO, logger="mmfast"):
        assert resolve_backend("some_op", None, CPU, IMPLEMENTED) == "reference"
        assert resolve_backend("some_op", "auto", CPU, IMPLEMENTED) == "reference"
    messages = [r.getMessage() for r in caplog.records if "some_op" in r.getMessage()]
    assert messages == ["mmfast.some_op: using the PyTorch path (tensors are on cpu)"]


def test_environment_variable_selects_and_argument_wins(monkeypatch):
    monkeypatch.setenv("MMFAST_BACKEND", "triton")
    assert resolve_backend("op", None, CPU, IMPLEMENTED) == "triton"  # interpreter is on in tests
    assert resolve_backend("op", "reference", CPU, IMPLEMENTED) == "reference"


def test_bad_backend_names_raise(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'fast'"):
        resolve_backend("op", "fast", CPU, IMPLEMENTED)
    monkeypatch.setenv("MMFAST_BACKEND", "Triton")
    with pytest.raises(ValueError, match=r"MMFAST_BACKEND must be one of .* got 'Triton'"):
        resolve_backend("op", None, CPU, IMPLEMENTED)
    with pytest.raises(ValueError, match=r"backend='native' is not implemented for this op"):
        mmfast.ops.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, backend="native")
    with pytest.raises(ValueError, match=r"backend='native' is not implemented for this op"):
        mmfast.ops.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, backend="cuda")  # the old name


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mmfast.ops.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, backend="triton")


def test_backends_agree_through_the_environment_variable(monkeypatch):
    image, text = torch.randn(9, 16), torch.randn(9, 16)
    results = {}
    for name in ("triton", "reference"):
        monkeypatch.setenv("MMFAST_BACKEND", name)
        results[name] = mmfast.ops.siglip_loss(image, text, 2.0, -1.0)
    torch.testing.assert_close(results["triton"], results["reference"], rtol=1e-5, atol=1e-6)
