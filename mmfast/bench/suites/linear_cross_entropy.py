"""Linear cross-entropy (a language model's head and loss): mmfast's fused op against the logits built
in the inputs' dtype and upcast for F.cross_entropy (as HF transformers' causal-LM loss does), eager
and torch.compile'd, and Liger-Kernel's fused loss and Apple's Cut Cross-Entropy where installed.

FLOPs are model FLOPs, the same for every provider: forward one T x V x D GEMM (2 T V D), backward
two (4 T V D), full 6 T V D.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

import mmfast
from mmfast.bench.case import Case


def materialized(hidden, weight, labels):
    """What a causal LM does without a fused head: [T, V] logits, upcast to float32."""
    return F.cross_entropy((hidden @ weight.T).float(), labels)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(materialized, dynamic=False)


def _liger(hidden, weight, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, labels)


def _cut_cross_entropy(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels)


PROVIDERS = {
    "mmfast": lambda h, w, y: mmfast.ops.linear_cross_entropy(h, w, y),
    "eager": materialized,
    "compiled": lambda h, w, y: _compiled()(h, w, y),
    "liger": _liger,
    "cut_cross_entropy": _cut_cross_entropy,
}
PEER_MODULES = {"liger": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}


def _available(provider: str, device: torch.device) -> bool:
    module = PEER_MODULES.get(provider)
    return module is None or (device.type == "cuda" and importlib.util.find_spec(module) is not None)


def _case(provider: str, t: int, d: int, v: int, dtype, device):
    function = PROVIDERS[provider]

    def make():
        generator = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(t, d, device=device, generator=generator).to(dtype).requires_grad_()
        weight = (torch.randn(v, d, device=device, generator=generator) / d ** 0.5).to(dtype).requires_grad_()
        labels = torch.randint(0, v, (t,), device=device, generator=generator)
        return (lambda: function(hidden, weight, labels)), [hidden, weight]

    gemm = 2.0 * t * v * d
    return Case(
        suite="linear_cross_entropy", group=f"T={t} D={d} V={v}", provider=provider,
        params={"T": t, "D": d, "V": v, "dtype": str(dtype).removeprefix("torch.")},
        make=make, flops=lambda mode: gemm * {"forward": 1, "backward": 2, "full": 3}[mode],
        is_mmfast=provider == "mmfast",
    )


def cases(profile: str, device: torch.device):
    if profile == "cpu":
        return [_case(provider, t, 64, v, torch.float32, device)
                for t, v in ((256, 2048), (1024, 8192)) for provider in ("mmfast", "eager")]
    providers = [p for p in PROVIDERS if _available(p, device)]
    # The issue's target setting (Llama 3's vocabulary), and 256k for memory (Gemma's vocabulary).
    grid = [(16384, 4096, 128256)] if profile == "quick" else [
        (4096, 4096, 32000), (16384, 4096, 128256), (8192, 4096, 256000)]
    return [_case(provider, t, d, v, torch.bfloat16, device)
            for t, d, v in grid for provider in providers if not (profile == "quick" and provider == "compiled")]
