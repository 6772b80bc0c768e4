"""Test setup: Triton's interpreter without a GPU, the `cuda` marker, NaN-poisoned torch.empty."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before triton is imported: every Triton kernel then runs on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
if HAS_CUDA:
    # The peers' float32 convolutions and matmuls are the references: no TF32 rounding in them.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


_empty, _empty_like = torch.empty, torch.empty_like


def _poisoned(tensor):
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    return tensor


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """Outputs allocated with torch.empty start as NaN, so a tile a kernel forgot shows up."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poisoned(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poisoned(_empty_like(*a, **k)))


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory):
    """A folder with a tiny CLIP run (`run`) trained on the bundled data written under `synth`."""
    from mmfast.train import train
    from tests.runs import run_config
    from tests.test_train import TINY

    root = tmp_path_factory.mktemp("trained-clip")
    train(run_config(root, "run", TINY), progress=False)
    return root
