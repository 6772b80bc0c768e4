"""mmfast.models.lora: peft's adapters on our decoder's linear layers train alone and merge back into
plain weights that give the adapted model's logits; QLoRA's NF4 base weights stay within NF4's error
of float32 and merge exactly; bad settings are named."""
import copy

import pytest
import torch

pytest.importorskip("peft")

from mmfast.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from mmfast.models.lora import LoraConfig, add_lora, merge_lora  # noqa: E402
from tests.hf_weights import nudge  # noqa: E402

CONFIG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)


def _model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(CONFIG).eval()


def _nudge_adapters(model):
    """peft starts B at zero (the adapted model equals the base): give the adapters a value."""
    nudge(model, lambda name: "lora_B" in name, std=0.2)


def _tokens():
    return torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def test_adapters_train_alone_and_merge_into_the_plain_model():
    plain = _model()
    adapted = add_lora(copy.deepcopy(plain).model, LoraConfig(rank=4, alpha=8.0))
    model = copy.deepcopy(plain)
    model.model = adapted
    tokens = _tokens()
    torch.testing.assert_close(model(tokens), plain(tokens))  # B = 0: nothing changed yet
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    # the decoder's own weights are frozen; the head (outside the adapted module) keeps its setting
    assert trainable == {name for name, _ in model.named_parameters() if ".lora_" in name} | {"lm_head.weight"}
    assert len([name for name in trainable if ".lora_A." in name]) == 2 * 7  # 7 linear layers per block
    _nudge_adapters(model)
    assert not torch.allclose(model(tokens), plain(tokens), atol=1e-3)
    merged = merge_lora(model.state_dict(), 8.0 / 4)
    assert set(merged) == set(plain.state_dict())
    fresh = _model(seed=5)
    fresh.load_state_dict(merged)
    torch.testing.assert_close(fresh(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_only_the_named_layers_are_adapted():
    model = _model()
    add_lora(model.model, LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters()
               if ".lora_A." in name}
    assert adapted == {"q_proj", "v_proj"}


def test_qlora_keeps_nf4_base_weights_and_merges_them_exactly():
    bitsandbytes = pytest.importorskip("bitsandbytes")
    plain = _model()
    quantized = copy.deepcopy(plain)
    add_lora(quantized.model, LoraConfig(rank=4, alpha=8.0, quantize="nf4"))
    base = quantized.model.layers[0].self_attn.q_proj.base_layer
    assert type(base).__name__ == "Linear4bit" and base.weight.dtype == torch.uint8
    tokens = _tokens()
    # NF4 rounds each weight to one of 16 levels per block of 64: the quantized model is exactly the float
    # model holding the dequantized weights, near the original and not equal to it
    dequantized = copy.deepcopy(plain)
    state = dequantized.state_dict()
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            state[name.replace(".base_layer", "") + ".weight"] = bitsandbytes.functional.dequantize_4bit(
                module.weight.data, module.weight.quant_state)
    dequantized.load_state_dict(state)
    torch.testing.assert_close(quantized(tokens), dequantized(tokens), atol=1e-5, rtol=1e-5)
    difference = (quantized(tokens) - plain(tokens)).abs().max().item()
    assert 0 < difference < 0.25 * plain(tokens).abs().max().item()
    _nudge_adapters(quantized)
    logits = quantized(tokens)
    logits.sum().backward()
    assert quantized.model.layers[0].self_attn.q_proj.lora_A.default.weight.grad is not None
    merged = merge_lora(quantized.state_dict(), 2.0)
    assert set(merged) == set(plain.state_dict()) and all(value.dtype == torch.float32 for value in merged.values())
    fresh = _model(seed=5)
    fresh.load_state_dict(merged)
    torch.testing.assert_close(fresh(tokens), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings, message", [
    (dict(rank=-1), "model.lora.rank"),
    (dict(rank=4, alpha=0), "model.lora.alpha"),
    (dict(rank=4, dropout=1.0), "model.lora.dropout"),
    (dict(rank=4, target_modules=[]), "model.lora.target_modules"),
    (dict(rank=4, target_modules=["q_proj", "qkv"]), r"\['qkv'\], which are not linear layers"),
    (dict(rank=4, quantize="int3"), "model.lora.quantize"),
    (dict(quantize="nf4"), "model.lora.rank > 0"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        add_lora(_model().model, LoraConfig(**settings))
