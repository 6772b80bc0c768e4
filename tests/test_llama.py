"""mmfast.models.llama: HF Llama / Qwen2 weights load one to one and give HF's logits (padded, and packed
against HF run sequence by sequence), export back to HF, the fused loss, bidirectional spans, one
packing per forward, gradient checkpointing, bad input."""
import importlib

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from mmfast.models import llama  # noqa: E402
from mmfast.models.llama import (LlamaConfig, LlamaForCausalLM, from_hf_causal_lm, llama_config_of_hf,  # noqa: E402
                                 to_hf_causal_lm)
from tests.hf_weights import nudge  # noqa: E402

VOCAB = 101
KINDS = {
    # Llama with biases on all four projections, GQA, an untied head; Qwen2: q/k/v biases, a tied head
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}


def hf_model(kind: str, seed: int = 0):
    config_class, model_class, extra = KINDS[kind]
    torch.manual_seed(seed)
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **extra)
    model = model_class(config).eval()
    return nudge(model)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_hf_weights_give_hf_logits_padded_packed_and_back(kind):
    hf = hf_model(kind)
    ours = from_hf_causal_lm(hf).eval()
    assert ours.config.model_type == kind and ours.config.rope_theta == 500.0
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=2e-5, rtol=1e-5)
        lengths = [5, 13, 7]
        packed = torch.cat([ids[row, :length] for row, length in enumerate(lengths)])
        cu_seqlens = torch.tensor([0, 5, 18, 25], dtype=torch.int32)
        per_sequence = torch.cat([hf(ids[row:row + 1, :length]).logits[0] for row, length in enumerate(lengths)])
        torch.testing.assert_close(ours(packed, cu_seqlens=cu_seqlens), per_sequence, atol=2e-5, rtol=1e-5)
        back = to_hf_causal_lm(ours).eval()
        assert type(back) is type(hf)
        torch.testing.assert_close(back(ids).logits, expected, atol=0, rtol=0)


def test_tied_head_shares_the_embedding():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_labels_give_per_token_cross_entropy_of_the_logits():
    model = from_hf_causal_lm(hf_model("llama")).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100  # a prompt: not supervised
    with torch.no_grad():
        losses = model(ids, labels=labels)
        expected = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="none").view(2, 9)
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    assert (losses[labels == -100] == 0).all()


def test_spans_are_bidirectional_inside_causal_text():
    model = from_hf_causal_lm(hf_model("qwen2")).eval()
    ids = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(3))
    cu_seqlens = torch.tensor([0, 10], dtype=torch.int32)
    spans = torch.full((10,), -1, dtype=torch.int32)
    spans[2:6] = 0  # an image of four tokens after two text tokens
    changed = ids.clone()
    changed[5] = (ids[5] + 1) % VOCAB  # the span's last token
    with torch.no_grad():
        before = model(ids, cu_seqlens=cu_seqlens, span_ids=spans)
        after = model(changed, cu_seqlens=cu_seqlens, span_ids=spans)
        causal = model(changed, cu_seqlens=cu_seqlens)
    moved = (before - after).abs().amax(dim=-1)
    assert moved[:2].max() == 0  # text before the span does not see it
    assert moved[2:5].min() > 1e-4  # the span's earlier tokens see its last one
    torch.testing.assert_close(causal[:5], model(ids, cu_seqlens=cu_seqlens)[:5].detach())


def test_one_packing_per_forward_shared_by_every_layer(monkeypatch):
    op = importlib.import_module("mmfast.ops.mixed_attention")  # the package (mmfast.ops exports the function)

    model = from_hf_causal_lm(hf_model("llama"), backend="triton").eval()
    built = []
    original = op.build_packing
    monkeypatch.setattr(llama, "build_packing", lambda *args, **kwargs: built.append(1) or original(*args, **kwargs))
    monkeypatch.setattr(op, "build_packing", lambda *args, **kwargs: pytest.fail("a layer rebuilt the packing"))
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(4))
    cu_seqlens = torch.tensor([0, 4, 12], dtype=torch.int32)
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu_seqlens)
        assert built == [1]
        reference = from_hf_causal_lm(hf_model("llama"), backend="reference").eval()(ids, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)  # the Triton kernels (interpreter on CPU)


def test_gradient_checkpointing_keeps_the_gradients():
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    labels = ids.roll(-1, dims=1)
    gradients = []
    for recompute in (False, True):
        model = from_hf_causal_lm(hf_model("llama"))
        model.set_grad_checkpointing(recompute)
        model(ids, labels=labels).mean().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_runs_and_stays_near_float32():
    """Under autocast the rotary tables follow the float32 residual stream while q, k and v come out of
    the projections in bf16: the rotation must keep one dtype (it once promoted q and k alone)."""
    model = from_hf_causal_lm(hf_model("llama"))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = model(ids)
    assert found.dtype == torch.bfloat16
    torch.testing.assert_close(found.float(), reference, atol=0.1, rtol=0.05)


def test_bad_input_is_named():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"packed \[total\]"):
        model(torch.zeros(2, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="model_type must be one of"):
        LlamaConfig(model_type="gpt2")
    scaled = transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="only the default rotary embedding"):
        llama_config_of_hf(scaled)
    with pytest.raises(ValueError, match="expected a Llama or Qwen2 config"):
        llama_config_of_hf(transformers.GPT2Config())
