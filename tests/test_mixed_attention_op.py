"""mmfast.ops.mixed_attention against a float64 dense-mask reference on random packings, against
SDPA with the dense boolean mask (the CPU peer), the packing helpers, and bad inputs."""
import random

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.ops.mixed_attention import packing_from_segments, pad, span_ids_from_token_ids, unpad
from mmfast.ops.mixed_attention import reference
from mmfast.ops.mixed_attention.packing import build_packing
from tests.conftest import DEVICE
from tests.tolerance import assert_within_reference_error

BACKENDS = ["triton", "reference"]


def random_segments(seed, max_sequences=5, max_length=300):
    """1-5 sequences of 1-max_length tokens with 0-3 spans of 1-100 tokens at the start, middle or end."""
    rng = random.Random(seed)
    samples = []
    for _ in range(rng.randint(1, max_sequences)):
        length = rng.randint(1, max_length)
        spans = sorted(rng.sample(range(length), min(length, rng.randint(0, 3))))
        segments, cursor = [], 0
        for start in spans:
            if start < cursor:
                continue
            if start > cursor:
                segments.append(("text", start - cursor))
            size = min(rng.randint(1, 100), length - start)
            segments.append((rng.choice(["image", "audio"]), size))
            cursor = start + size
        if cursor < length:
            segments.append(("text", length - cursor))
        samples.append(segments)
    return samples


def qkv(total, heads, kv_heads, dim, dtype, seed, leading=None):
    g = torch.Generator().manual_seed(seed)
    shape = leading or (total,)
    make = lambda h: torch.randn(*shape, h, dim, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def run_against_reference(q, k, v, cu, spans, causal, dtype, label, backend="triton"):
    """Kernel vs float64 reference; the reference in `dtype` sets the tolerance."""
    out, lse = mmfast.ops.mixed_attention(q, k, v, cu_seqlens=cu, span_ids=spans, causal=causal, return_lse=True,
                                          backend=backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    scale = q.shape[-1] ** -0.5
    results = {}
    for precision in (torch.float64, dtype):
        leaves = [x.detach().to(precision).requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = reference.attention(*leaves, cu, spans, causal, scale, dtype=precision)
        results[precision] = (ref_out, ref_lse, torch.autograd.grad(ref_out, leaves, upstream.to(precision)))
    exact, low = results[torch.float64], results[dtype]
    assert_within_reference_error(f"{label} out", out, exact[0], low[0], dtype)
    torch.testing.assert_close(lse.double(), exact[1].detach(), rtol=1e-4, atol=1e-4)
    for name, grad, exact_grad, low_grad in zip(("dq", "dk", "dv"), grads, exact[2], low[2]):
        assert_within_reference_error(f"{label} {name}", grad, exact_grad, low_grad, dtype)


@pytest.mark.parametrize("seed", range(6))
def test_random_packings_match_reference(seed):
    rng = random.Random(100 + seed)
    cu, spans, _ = packing_from_segments(random_segments(seed), device=DEVICE)
    heads, kv_heads = rng.choice([(2, 2), (4, 2), (3, 1)])
    dim = rng.choice([40, 64, 128])
    dtype = rng.choice([torch.float16, torch.float32])
    causal = seed != 5
    q, k, v = qkv(int(cu[-1]), heads, kv_heads, dim, dtype, seed)
    run_against_reference(q, k, v, cu, spans, causal, dtype, f"seed {seed} H{heads}/{kv_heads} D{dim}")


@pytest.mark.parametrize("case", [
    pytest.param([[("text", 1)], [("image", 1)], [("text", 70)]], id="length-1-sequences"),
    pytest.param([[("image", 97)], [("text", 33), ("image", 64)]], id="spans-at-start-and-end"),
    pytest.param([[("text", 31), ("image", 2), ("text", 40), ("audio", 65), ("text", 1)]], id="spans-in-the-middle"),
    pytest.param([[("text", 130)]], id="all-causal"),
    pytest.param([[("image", 130)], [("image", 17)]], id="all-bidirectional-spans"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_packings(case, backend):
    cu, spans, _ = packing_from_segments(case, device=DEVICE)
    q, k, v = qkv(int(cu[-1]), 2, 1, 64, torch.float16, 7)
    run_against_reference(q, k, v, cu, spans, True, torch.float16, "edge", backend=backend)


@pytest.mark.parametrize("dim, backend", [(16, "triton"), (16, "reference"), (8, "reference"), (4, "reference")],
                         ids=["D16-triton", "D16-reference", "D8-reference", "D4-reference"])
def test_small_head_dims_of_tiny_test_models(dim, backend):
    """Tiny transformers test models have head dims of 4-16: the PyTorch path takes any, Triton 16 up."""
    segments = [[("text", 5), ("image", 9), ("text", 7)], [("text", 13)]]
    cu, spans, _ = packing_from_segments(segments, device=DEVICE)
    q, k, v = qkv(int(cu[-1]), 4, 2, dim, torch.float32, seed=dim)
    run_against_reference(q, k, v, cu, spans, True, torch.float32, f"D{dim}", backend=backend)
    padded = [x.detach()[:21].reshape(1, 21, x.shape[1], dim) for x in (q, k, v)]
    out = mmfast.ops.mixed_attention(*padded, backend=backend)
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (padded[0], padded[1].repeat_interleave(
        2, 2), padded[2].repeat_interleave(2, 2))), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_auto_falls_back_for_head_dims_triton_does_not_take(monkeypatch, caplog):
    """On a GPU "auto" picks Triton; a head dim of 8 then runs the PyTorch path, said once in the log."""
    import importlib
    import logging

    module = importlib.import_module("mmfast.ops.mixed_attention")  # the package, not the function
    q = torch.randn(1, 9, 2, 8)
    expected = mmfast.ops.mixed_attention(q, q, q, backend="reference")
    monkeypatch.setattr(module, "resolve_backend", lambda *arguments, **keywords: "triton")
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    with caplog.at_level(logging.INFO, logger="mmfast"):
        out = mmfast.ops.mixed_attention(q, q, q)
    torch.testing.assert_close(out, expected)
    assert "head dim 8 is outside the Triton kernels' [16, 256]" in caplog.text


def test_padded_layout_equals_packed():
    batch, length = 3, 45
    q, k, v = qkv(None, 4, 2, 40, torch.float32, 8, leading=(batch, length))
    spans = torch.full((batch, length), -1, dtype=torch.int32, device=DEVICE)
    spans[0, 5:20] = 0
    spans[2, :10] = 1
    padded, lse = mmfast.ops.mixed_attention(q, k, v, span_ids=spans, return_lse=True, backend="triton")
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=DEVICE)
    flat = [x.reshape(batch * length, *x.shape[2:]) for x in (q, k, v)]
    packed, packed_lse = mmfast.ops.mixed_attention(*flat, cu_seqlens=cu, span_ids=spans.flatten(), return_lse=True,
                                                    backend="triton")
    torch.testing.assert_close(padded.reshape_as(packed), packed)
    assert lse.shape == (batch, 4, length)
    torch.testing.assert_close(lse.transpose(0, 1).reshape(4, -1), packed_lse)


def test_bidirectional_encoder_equals_sdpa():
    q, k, v = qkv(None, 2, 2, 32, torch.float32, 9, leading=(2, 50))
    ours = mmfast.ops.mixed_attention(q, k, v, causal=False, backend="triton")
    theirs = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_parity_with_sdpa_dense_mask(seed):
    """The peer on the CPU: SDPA with the dense boolean block mask of the whole packed batch."""
    cu, spans, _ = packing_from_segments(random_segments(seed + 20, max_length=120), device=DEVICE)
    total = int(cu[-1])
    q, k, v = qkv(total, 4, 4, 64, torch.float32, seed)
    mask = torch.zeros(total, total, dtype=torch.bool, device=DEVICE)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        mask[start:end, start:end] = reference.sequence_mask(spans[start:end], True)
    upstream = torch.randn(total, 4, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ours = mmfast.ops.mixed_attention(q, k, v, cu_seqlens=cu, span_ids=spans, backend="triton")
    theirs = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)),
                                            attn_mask=mask)[0].transpose(0, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for mine, expected in zip(torch.autograd.grad(ours, (q, k, v), upstream),
                              torch.autograd.grad(theirs, (q, k, v), upstream)):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-4)


def test_bf16_through_interpreter():
    cu, spans, _ = packing_from_segments([[("text", 20), ("image", 30), ("text", 20)]], device=DEVICE)
    q, k, v = qkv(70, 2, 2, 64, torch.bfloat16, 10)
    run_against_reference(q, k, v, cu, spans, True, torch.bfloat16, "bf16")


def test_backward_is_deterministic():
    cu, spans, _ = packing_from_segments(random_segments(3, max_length=100), device=DEVICE)
    q, k, v = qkv(int(cu[-1]), 4, 2, 40, torch.float32, 11)
    grads = []
    for _ in range(2):
        out = mmfast.ops.mixed_attention(q, k, v, cu_seqlens=cu, span_ids=spans, backend="triton")
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.cuda
@pytest.mark.parametrize("seed", range(8))
def test_bf16_random_packings_on_gpu(seed):
    cu, spans, _ = packing_from_segments(random_segments(seed, max_length=2000), device="cuda")
    q, k, v = qkv(int(cu[-1]), 8, 2, [64, 80, 96, 128, 256][seed % 5], torch.bfloat16, seed)
    run_against_reference(q, k, v, cu, spans, seed % 4 != 3, torch.bfloat16, f"gpu bf16 seed {seed}")


@pytest.mark.cuda
def test_parity_with_flex_attention_on_gpu():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    cu, spans, _ = packing_from_segments([[("image", 576), ("text", 1472)]] * 2, device="cuda")
    total = int(cu[-1])
    q, k, v = qkv(total, 8, 8, 128, torch.bfloat16, 12)
    sequence = torch.searchsorted(cu[1:], torch.arange(total, device="cuda"), right=True)

    def rule(b, h, i, j):
        same_span = (spans[i] >= 0) & (spans[i] == spans[j])
        return (sequence[i] == sequence[j]) & ((j <= i) | same_span)

    block_mask = flex.create_block_mask(rule, None, None, total, total, device="cuda")
    theirs = flex.flex_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=block_mask)
    ours = mmfast.ops.mixed_attention(q, k, v, cu_seqlens=cu, span_ids=spans)
    torch.testing.assert_close(ours, theirs[0].transpose(0, 1), rtol=2e-2, atol=2e-2)


# --- metadata and helpers -----------------------------------------------------------------------


def test_packing_metadata_matches_brute_force():
    cu, spans, max_len = packing_from_segments(random_segments(4), device=DEVICE)
    spans = spans.clone()
    if spans.numel() > 12:  # a span id used twice, apart, in one sequence: still one span
        spans[-3:] = spans[:3] if spans[0] >= 0 else 7
    packing = build_packing(cu, spans, spans.numel(), None, True)
    assert packing.max_seqlen == max_len
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        mask = reference.sequence_mask(spans[start:end], True)
        for offset in range(end - start):
            allowed_keys = mask[offset].nonzero().flatten()
            allowed_queries = mask[:, offset].nonzero().flatten()
            assert packing.reach[start + offset] == start + allowed_keys.max()
            assert packing.first[start + offset] == start + allowed_queries.min()


def test_span_ids_from_token_ids_and_unpad():
    image = 32000
    input_ids = torch.tensor([[1, image, image, 5, image, 6], [image, image, 2, 3, 0, 0]])
    spans = span_ids_from_token_ids(input_ids, image)
    assert spans.tolist() == [[-1, 0, 0, -1, 1, -1], [2, 2, -1, -1, -1, -1]]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    indices, cu, longest = unpad(mask)
    assert cu.tolist() == [0, 6, 10] and longest == 6 and cu.dtype == torch.int32
    packed = torch.arange(12.0).reshape(2, 6)[mask.bool()]
    assert pad(packed, indices, 2, 6).tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 0, 0]]


# --- bad inputs ------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(10, 4, 32)
    kv = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    call = mmfast.ops.mixed_attention
    with pytest.raises(ValueError, match="must not decrease and end at total_tokens=10|end at total_tokens=10"):
        call(q, kv, kv, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="start at 0, not decrease"):
        call(q, kv, kv, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32 tensor"):
        call(q, kv, kv, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match=r"span_ids must have q's token shape \(10,\), got \(9,\)"):
        call(q, kv, kv, cu_seqlens=cu, span_ids=torch.zeros(9, dtype=torch.int32))
    with pytest.raises(TypeError, match="q and k must have one dtype"):
        call(q, kv.half(), kv, cu_seqlens=cu)
    with pytest.raises(ValueError, match="q and v must be on one device"):
        call(q, kv, kv.to("meta"), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"q's heads \(4\) must be a multiple of k/v's heads \(3\)"):
        call(q, torch.randn(10, 3, 32), torch.randn(10, 3, 32), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"the Triton kernels take head dims in \[16, 256\], got 8"):
        call(*(torch.randn(10, h, 8, device=DEVICE) for h in (4, 2, 2)), cu_seqlens=cu.to(DEVICE), backend="triton")
    with pytest.raises(ValueError, match="packed .* inputs need cu_seqlens"):
        call(q, kv, kv)
    with pytest.raises(ValueError, match="cu_seqlens goes with packed"):
        call(q[None], kv[None], kv[None], cu_seqlens=cu)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("with_spans", [True, False], ids=["spans", "no-spans"])
def test_padded_cpu_path_matches_the_per_sequence_reference(causal, with_spans):
    """The padded layout's PyTorch path is one SDPA call; it must equal the dense-mask oracle."""
    batch, length = 3, 37
    q, k, v = qkv(None, 4, 2, 40, torch.float32, 13, leading=(batch, length))
    spans = None
    if with_spans:
        spans = torch.full((batch, length), -1, dtype=torch.int32, device=DEVICE)
        spans[0, 4:15] = 0
        spans[2, 30:] = 1
    out, lse = mmfast.ops.mixed_attention(q, k, v, span_ids=spans, causal=causal, return_lse=True,
                                          backend="reference")
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=DEVICE)
    flat = [x.detach().reshape(batch * length, *x.shape[2:]) for x in (q, k, v)]
    flat_spans = spans.flatten() if with_spans else torch.full((batch * length,), -1, dtype=torch.int32,
                                                               device=DEVICE)
    expected, expected_lse = reference.attention(*flat, cu, flat_spans, causal, 40 ** -0.5)
    torch.testing.assert_close(out.reshape(batch * length, 4, 40), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.transpose(0, 1).reshape(4, -1), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_packed_cpu_path_matches_the_per_sequence_reference(seed):
    """Without return_lse the packed PyTorch path pads the sequences into one SDPA call; outputs and
    gradients must equal the loop over sequences (an empty sequence and GQA included)."""
    segments = random_segments(seed, max_length=90) + [[("text", 0)], [("image", 1)]]
    cu, spans, _ = packing_from_segments(segments, device=DEVICE)
    q, k, v = qkv(int(cu[-1]), 4, 2, 24, torch.float32, seed)
    causal = seed != 3
    out = mmfast.ops.mixed_attention(q, k, v, cu_seqlens=cu, span_ids=spans, causal=causal, backend="reference")
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    expected, _ = reference.attention(*leaves, cu, spans, causal, 24 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_packed_cpu_path_in_bf16_is_within_the_reference_error(seed):
    """In bfloat16 the packed PyTorch path spells the product out (PyTorch's CPU SDPA kernel is slow
    there): outputs and gradients against the float64 loop over sequences, within twice the error of
    that loop run in bfloat16 (GQA, spans, an empty sequence and a lone token included)."""
    segments = random_segments(seed, max_length=120) + [[("text", 0)], [("image", 1)]]
    cu, spans, _ = packing_from_segments(segments, device="cpu")
    q, k, v = (x.detach().cpu().requires_grad_() for x in qkv(int(cu[-1]), 4, 2, 32, torch.bfloat16, seed))
    causal = seed != 2
    out = mmfast.ops.mixed_attention(q, k, v, cu_seqlens=cu, span_ids=spans, causal=causal, backend="reference")
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(torch.bfloat16))
    results = {}
    for precision in (torch.float64, torch.bfloat16):
        leaves = [x.detach().to(precision).requires_grad_() for x in (q, k, v)]
        expected, _ = reference.attention(*leaves, cu, spans, causal, 32 ** -0.5, dtype=precision)
        results[precision] = (expected, torch.autograd.grad(expected, leaves, upstream.to(precision)))
    exact, low = results[torch.float64], results[torch.bfloat16]
    assert out.dtype == torch.bfloat16
    assert_within_reference_error("bf16 out", out, exact[0], low[0], torch.bfloat16)
    for name, grad, exact_grad, low_grad in zip(("dq", "dk", "dv"), grads, exact[1], low[1]):
        assert_within_reference_error(f"bf16 {name}", grad, exact_grad, low_grad, torch.bfloat16)


def test_cpu_path_groups_sequences_of_similar_lengths():
    """The packed CPU path pads each group of similar lengths to its own longest: every group's
    shortest is at least 3/4 of its longest, the groups cover every sequence with tokens, in order."""
    lengths = [0, 0, 1, 3, 4, 10, 12, 13, 40, 41, 140]
    groups = reference.length_groups(lengths)
    assert groups == [(2, 3), (3, 5), (5, 8), (8, 10), (10, 11)]
    for first, last in groups:
        assert lengths[first] >= 0.75 * lengths[last - 1]
    assert reference.length_groups([0, 0]) == []


@pytest.mark.parametrize("causal,with_spans", [(True, True), (True, False), (False, False)],
                         ids=["spans", "causal", "bidirectional"])
def test_padded_cpu_path_in_bf16_is_within_the_reference_error(causal, with_spans):
    """The padded layout's bf16 CPU path (the same spelled-out product, the causal triangle built when
    no spans are given) against the float64 loop over sequences, within twice that loop's bf16 error."""
    batch, length = 3, 37
    q, k, v = (x.detach().cpu() for x in qkv(None, 4, 2, 32, torch.bfloat16, 5, leading=(batch, length)))
    spans = torch.full((batch, length), -1, dtype=torch.int32)
    if with_spans:
        spans[0, 4:15], spans[2, 30:] = 0, 1
    out = mmfast.ops.mixed_attention(q, k, v, span_ids=spans if with_spans else None, causal=causal,
                                     backend="reference")
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
    results = [reference.attention(*(x.reshape(batch * length, *x.shape[2:]).to(precision) for x in (q, k, v)), cu,
                                   spans.flatten(), causal, 32 ** -0.5, dtype=precision)[0]
               for precision in (torch.float64, torch.bfloat16)]
    assert out.dtype == torch.bfloat16
    assert_within_reference_error("padded bf16 out", out.reshape(batch * length, 4, 32), *results, torch.bfloat16)
