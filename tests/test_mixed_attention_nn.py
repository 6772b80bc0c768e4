"""mmfast.nn.MixedAttention and attn_implementation="mmfast" in HF transformers models built from
configs: outputs and gradients against "sdpa" (and "eager" with the equivalent 4-D mask)."""
import pytest
import torch

import mmfast
from mmfast.nn.attention import rotary_tables, rotate_half
from mmfast.ops.mixed_attention import packing_from_segments, reference, span_ids_from_token_ids
from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers")
mmfast_hf = pytest.importorskip("mmfast.integrations.transformers")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """The kernels (through the interpreter without a GPU), not the PyTorch fallback."""
    monkeypatch.setenv("MMFAST_BACKEND", "triton")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mmfast_hf.register()


def _reference_module(module, x, cu, spans, positions):
    """The same projections, rotary and mask rule in plain torch (dense mask per packed batch)."""
    q = module.q_proj(x).unflatten(-1, (module.num_heads, module.head_dim))
    k = module.k_proj(x).unflatten(-1, (module.num_kv_heads, module.head_dim))
    v = module.v_proj(x).unflatten(-1, (module.num_kv_heads, module.head_dim))
    cos, sin = rotary_tables(positions, module.head_dim, module.rotary_base, q.dtype)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    out, _ = reference.attention(q, k, v, cu, spans, True, module.head_dim ** -0.5)
    return module.o_proj(out.flatten(-2))


def test_mixed_attention_module_packed_matches_reference():
    torch.manual_seed(0)
    module = mmfast.nn.MixedAttention(96, num_heads=3, num_kv_heads=1, bias=True).to(DEVICE)
    cu, spans, longest = packing_from_segments([[("text", 7), ("image", 20), ("text", 9)], [("audio", 13)]],
                                               device=DEVICE)
    x = torch.randn(int(cu[-1]), 96).to(DEVICE).requires_grad_()
    ours = module(x, cu_seqlens=cu, max_seqlen=longest, span_ids=spans)
    positions = torch.cat([torch.arange(36), torch.arange(13)]).to(DEVICE)
    expected = _reference_module(module, x, cu, spans, positions)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    parameters = list(module.parameters()) + [x]
    for mine, exact in zip(torch.autograd.grad(ours.sum(), parameters), torch.autograd.grad(expected.sum(), parameters)):
        torch.testing.assert_close(mine, exact, rtol=1e-4, atol=1e-4)


def test_mixed_attention_module_padded_equals_packed():
    torch.manual_seed(1)
    module = mmfast.nn.MixedAttention(64, num_heads=2).to(DEVICE)
    x = torch.randn(2, 30, 64).to(DEVICE)
    spans = torch.full((2, 30), -1, dtype=torch.int32, device=DEVICE)
    spans[1, 3:10] = 0
    padded = module(x, span_ids=spans)
    cu = torch.tensor([0, 30, 60], dtype=torch.int32, device=DEVICE)
    packed = module(x.reshape(60, 64), cu_seqlens=cu, span_ids=spans.flatten())
    torch.testing.assert_close(padded.reshape(60, 64), packed, rtol=1e-5, atol=1e-5)


def _llama(**overrides):
    settings = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=128)
    settings.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval().to(DEVICE)


def _outputs_and_grads(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    model.zero_grad()
    logits = model(**inputs).logits
    weights = torch.linspace(-1, 1, logits.shape[-1], device=logits.device)
    valid = inputs.get("attention_mask")
    valid = torch.ones(logits.shape[:2], device=logits.device) if valid is None or valid.dim() != 2 else valid.float()
    (logits * weights * valid[..., None]).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_same(first, second, valid=None, rtol=1e-4, atol=1e-4):
    logits_a, grads_a = first
    logits_b, grads_b = second
    if valid is not None:
        logits_a, logits_b = logits_a[valid], logits_b[valid]
    torch.testing.assert_close(logits_a, logits_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("heads", [2, 4], ids=["head-dim-32", "head-dim-16"])  # 16: transformers' tiny test models
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_causal_lm_with_padding_matches_sdpa(family, heads):
    torch.manual_seed(2)
    if family == "llama":
        model = _llama(num_attention_heads=heads)
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=1, max_position_embeddings=128)).eval().to(DEVICE)
    ids = torch.randint(0, 101, (3, 19), device=DEVICE)
    mask = torch.ones(3, 19, dtype=torch.long, device=DEVICE)
    mask[1, :6] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    inputs = dict(input_ids=ids, attention_mask=mask)
    _assert_same(_outputs_and_grads(model, "mmfast", **inputs), _outputs_and_grads(model, "sdpa", **inputs),
                 valid=mask.bool())


def test_one_unpad_and_packing_per_forward(monkeypatch):
    """transformers hands every layer the same mask: the unpad and the packing tables are built once a
    forward, and again for a new mask (or the same mask changed in place)."""
    built = []
    import mmfast.nn.transformers_attention as attention

    original = attention.build_packing
    monkeypatch.setattr(attention, "build_packing", lambda *a, **k: built.append(1) or original(*a, **k))
    model = _llama(num_hidden_layers=3)
    model.set_attn_implementation("mmfast")
    ids = torch.randint(0, 101, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        assert len(built) == 1
        model(input_ids=ids, attention_mask=mask.clone())
        assert len(built) == 2
        mask[0, :3], mask[1, 7:] = 1, 0
        changed = model(input_ids=ids, attention_mask=mask).logits  # in place: the cached tables are stale
        assert len(built) == 3
    assert not torch.allclose(first[0, 3:], changed[0, 3:])


def test_packed_batch_matches_separate_sequences():
    """One row holding two sequences (position_ids restart at 0, or cu_seq_lens_q given) equals
    running each sequence on its own with sdpa."""
    torch.manual_seed(3)
    model = _llama()
    first, second = torch.randint(0, 101, (1, 11), device=DEVICE), torch.randint(0, 101, (1, 8), device=DEVICE)
    model.set_attn_implementation("sdpa")
    separate = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
    packed_ids = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(8)])[None].to(DEVICE)
    model.set_attn_implementation("mmfast")
    by_positions = model(input_ids=packed_ids, position_ids=positions).logits
    cu = torch.tensor([0, 11, 19], dtype=torch.int32, device=DEVICE)
    by_cu = model(input_ids=packed_ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=11, max_length_k=11).logits
    torch.testing.assert_close(by_positions, separate, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_cu, separate, rtol=1e-4, atol=1e-4)


def test_generation_matches_sdpa():
    torch.manual_seed(4)
    model = _llama()
    ids = torch.randint(0, 101, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    results = {}
    for implementation in ("sdpa", "mmfast"):
        model.set_attn_implementation(implementation)
        results[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                                 do_sample=False, pad_token_id=0)
    assert torch.equal(results["mmfast"], results["sdpa"])


def test_clip_towers_match_sdpa():
    torch.manual_seed(5)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32),
        vision_config=dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=32)
    model = transformers.CLIPModel(config).eval().to(DEVICE)
    ids = torch.randint(1, 99, (2, 12), device=DEVICE)
    mask = torch.ones(2, 12, dtype=torch.long, device=DEVICE)
    mask[1, 9:] = 0
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)
    outputs = {}
    for implementation in ("sdpa", "mmfast"):
        model.set_attn_implementation(implementation)
        result = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        outputs[implementation] = (result.text_embeds, result.image_embeds)
    for mine, expected in zip(outputs["mmfast"], outputs["sdpa"]):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-4)


def _tiny_llava():
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=32, patch_size=16),
        text_config=transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=128),
        image_token_id=110, vision_feature_layer=-1, projector_hidden_act="gelu")
    return transformers.LlavaForConditionalGeneration(config).eval().to(DEVICE)


def test_llava_matches_sdpa_and_bidirectional_images_match_eager_with_mask():
    torch.manual_seed(6)
    model = _tiny_llava()
    image_tokens = 4  # (32 / 16)^2 patches, the class token dropped
    ids = torch.cat([torch.randint(0, 100, (2, 3)), torch.full((2, image_tokens), 110),
                     torch.randint(0, 100, (2, 6))], dim=1).to(DEVICE)
    pixels = torch.randn(2, 3, 32, 32).to(DEVICE)
    inputs = dict(input_ids=ids, pixel_values=pixels)
    _assert_same(_outputs_and_grads(model, "mmfast", **inputs), _outputs_and_grads(model, "sdpa", **inputs))

    spans = span_ids_from_token_ids(ids, 110)
    length = ids.shape[1]
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=DEVICE))
    same_span = (spans[:, :, None] >= 0) & (spans[:, :, None] == spans[:, None, :])
    allowed = lower[None] | same_span
    additive = torch.zeros(2, 1, length, length, device=DEVICE).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    ours = _outputs_and_grads(model, "mmfast", **inputs, span_ids=spans)
    eager = _outputs_and_grads(model, "eager", **inputs, attention_mask=additive)
    _assert_same(ours, eager)
    # and the option changes something: image tokens now see each other
    assert not torch.allclose(ours[0], _outputs_and_grads(model, "sdpa", **inputs)[0], atol=1e-4)


def test_attention_dropout_in_training_is_refused():
    model = _llama(attention_dropout=0.1).train()
    model.set_attn_implementation("mmfast")
    with pytest.raises(ValueError, match="has no attention dropout"):
        model(input_ids=torch.randint(0, 101, (1, 5), device=DEVICE))


def test_output_attentions_warns_once_as_sdpa_does(caplog, monkeypatch):
    import mmfast.nn.transformers_attention as attention

    monkeypatch.setattr(attention, "_warned", [])
    model = _llama()
    model.set_attn_implementation("mmfast")
    ids = torch.randint(0, 101, (1, 6), device=DEVICE)
    with caplog.at_level("WARNING", logger="mmfast"):
        model(input_ids=ids, output_attentions=True)
        model(input_ids=ids, output_attentions=True)
    warnings = [r for r in caplog.records if "does not return attention weights" in r.getMessage()]
    assert len(warnings) == 1
