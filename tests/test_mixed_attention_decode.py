"""mmfast.ops.mixed_attention_decode (generation against a KV cache) against the float64 reference of
one sequence and against the last rows of full mixed_attention: 1..16 new queries, caches of 1..5000
keys, padded (cache_seqlens, cache_leftpad) and packed (cu_seqlens), GQA, spans over the new
tokens, several key splits; bad input; transformers' generate through it."""
import pytest
import torch

import mmfast
from mmfast.ops.mixed_attention import mixed_attention_decode
from mmfast.ops.mixed_attention.reference import decode_sequence
from tests.conftest import DEVICE
from tests.tolerance import assert_within_reference_error

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
BACKENDS = ["triton", "reference"]


def cache(batch, capacity, heads, kv_heads, dim, new, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, new, heads, dim, generator=generator)
    k, v = (torch.randn(batch, capacity, kv_heads, dim, generator=generator) for _ in range(2))
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def spans_over_new_tokens(batch, capacity, lengths, leftpad, new):
    """Per row: an image span of 6 tokens ending at the newest key (so the new queries see keys after
    them), and another early in the cache."""
    spans = torch.full((batch, capacity), -1, dtype=torch.int32)
    for row in range(batch):
        end = leftpad[row] + lengths[row]
        spans[row, max(leftpad[row], end - max(6, new)):end] = 1
        spans[row, leftpad[row]:leftpad[row] + min(3, lengths[row] - new)] = 0
    return spans.to(DEVICE)


def expected(q, k, v, lengths, leftpad, spans, causal, dtype):
    """The reference, one sequence at a time, in `dtype`."""
    rows = []
    for row in range(q.shape[0]):
        window = slice(leftpad[row], leftpad[row] + lengths[row])
        rows.append(decode_sequence(q[row].to(dtype), k[row, window].to(dtype), v[row, window].to(dtype),
                                    None if spans is None else spans[row, window], causal,
                                    q.shape[-1] ** -0.5, dtype=dtype))
    return torch.stack(rows)


CASES = [  # batch, capacity, lengths, leftpad, heads, kv_heads, dim, new, splits
    pytest.param(2, 1, [1, 1], [0, 0], 4, 4, 40, 1, None, id="cache1-new1"),
    pytest.param(3, 37, [37, 20, 5], [0, 10, 32], 8, 2, 64, 5, 2, id="cache37-new5-leftpad-gqa4"),
    pytest.param(2, 130, [130, 17], [0, 0], 6, 3, 40, 16, 3, id="cache130-new16-seqlens"),
    pytest.param(1, 5000, [5000], [0], 8, 2, 64, 1, 4, id="cache5000-new1"),
    pytest.param(2, 5000, [4093, 5000], [907, 0], 4, 1, 64, 16, None, id="cache5000-new16-mqa"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_spans", [False, True], ids=["causal", "spans"])
@pytest.mark.parametrize("batch,capacity,lengths,leftpad,heads,kv_heads,dim,new,splits", CASES)
def test_padded_cache_matches_reference(batch, capacity, lengths, leftpad, heads, kv_heads, dim, new, splits,
                                        with_spans, backend, dtype):
    q, k, v = cache(batch, capacity, heads, kv_heads, dim, new, dtype)
    spans = spans_over_new_tokens(batch, capacity, lengths, leftpad, new) if with_spans else None
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    starts = torch.tensor(leftpad, dtype=torch.int32, device=DEVICE)
    out = mixed_attention_decode(q, k, v, cache_seqlens=seqlens, cache_leftpad=starts, span_ids=spans,
                                 num_splits=splits, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    exact = expected(q, k, v, lengths, leftpad, spans, True, torch.float64)
    low = expected(q, k, v, lengths, leftpad, spans, True, dtype)
    assert_within_reference_error(f"decode {backend}", out, exact, low, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_and_full_attention_agree(backend):
    """causal=False sees the whole cache; and the causal decode of the last tokens equals the last rows
    of full mixed_attention over the sequence (spans included)."""
    q_all, k, v = cache(2, 90, 4, 2, 40, 90, torch.float32, seed=1)
    spans = spans_over_new_tokens(2, 90, [90, 90], [0, 0], 4)
    for causal in (True, False):
        full = mixed_attention(q_all, k, v, span_ids=spans, causal=causal, backend="reference")
        out = mixed_attention_decode(q_all[:, -4:], k, v, span_ids=spans, causal=causal, num_splits=2,
                                     backend=backend)
        torch.testing.assert_close(out, full[:, -4:], rtol=1e-5, atol=1e-5)


def mixed_attention(*args, **kwargs):
    return mmfast.ops.mixed_attention(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_cache_matches_padded(backend):
    """The same sequences packed (cu_seqlens_q, cu_seqlens_k) give the padded layout's rows."""
    lengths, new = [9, 300, 1], [3, 1, 1]
    q, k, v = cache(3, 300, 4, 2, 64, 3, torch.float32, seed=2)
    padded = [mixed_attention_decode(q[row:row + 1, :new[row]], k[row:row + 1, :lengths[row]],
                                     v[row:row + 1, :lengths[row]], backend=backend)[0] for row in range(3)]
    packed_q = torch.cat([q[row, :new[row]] for row in range(3)])
    packed_k, packed_v = (torch.cat([x[row, :lengths[row]] for row in range(3)]) for x in (k, v))
    cu_q = torch.tensor([0, 3, 4, 5], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 309, 310], dtype=torch.int32, device=DEVICE)
    out = mixed_attention_decode(packed_q, packed_k, packed_v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                 num_splits=2, backend=backend)
    torch.testing.assert_close(out, torch.cat(padded), rtol=1e-5, atol=1e-5)


BAD = [
    pytest.param(dict(cache_seqlens=torch.tensor([2, 2])), ValueError, "cache_seqlens must be an int32", id="int64"),
    pytest.param(dict(cache_seqlens=torch.tensor([2, 1], dtype=torch.int32)), ValueError, "at least as many keys",
                 id="fewer-keys"),
    pytest.param(dict(cache_leftpad=torch.tensor([9, 0], dtype=torch.int32)), ValueError, "inside the cache",
                 id="leftpad"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "packed 3-D", id="cu"),
    pytest.param(dict(num_splits=0), ValueError, "num_splits", id="splits"),
    pytest.param(dict(span_ids=torch.zeros(2, 5, dtype=torch.int32)), ValueError, "span_ids", id="spans"),
]


@pytest.mark.parametrize("change,error,message", BAD)
def test_bad_input_is_named(change, error, message):
    q, k, v = cache(2, 10, 4, 2, 40, 2, torch.float32)
    with pytest.raises(error, match=message):
        mixed_attention_decode(q, k, v, **change)


def test_gradient_is_refused():
    q, k, v = cache(1, 10, 4, 2, 40, 1, torch.float32)
    with pytest.raises(ValueError, match="no backward"):
        mixed_attention_decode(q.requires_grad_(), k, v)
    with torch.no_grad():
        assert mixed_attention_decode(q, k, v).shape == q.shape


def test_transformers_generate_decodes_with_the_kernel(monkeypatch):
    """Batched greedy generation with left padding through attn_implementation="mmfast" on the Triton
    kernels (the interpreter on a CPU): the new tokens go through mixed_attention_decode and the
    output equals sdpa's."""
    transformers = pytest.importorskip("transformers")
    import mmfast.integrations.transformers as mmfast_hf

    mmfast_hf.register()
    torch.manual_seed(4)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval().to(DEVICE)
    ids = torch.randint(1, 101, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    calls = []
    import mmfast.nn.transformers_attention as attention

    decode = attention.mixed_attention_decode
    monkeypatch.setattr(attention, "mixed_attention_decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    monkeypatch.setenv("MMFAST_BACKEND", "triton")
    results = {}
    for implementation in ("sdpa", "mmfast"):
        model.set_attn_implementation(implementation)
        results[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                 do_sample=False, pad_token_id=0)
    assert torch.equal(results["mmfast"], results["sdpa"])
    assert len(calls) == 2 * 3  # two layers, three steps after the prompt
