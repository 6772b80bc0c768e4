"""mmfast.models.llava: HF LlavaForConditionalGeneration weights give HF's logits (padded, and packed
against HF sequence by sequence), export back, bidirectional images, the frozen tower, bad input."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from mmfast.models.clip import VisionConfig  # noqa: E402
from mmfast.models.llama import LlamaConfig  # noqa: E402
from mmfast.models.llava import Llava, LlavaConfig, from_hf_llava, to_hf_llava  # noqa: E402
from mmfast.nn import KVCache  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.hf_weights import nudge  # noqa: E402
from tests.tolerance import assert_within_reference_error  # noqa: E402

IMAGE = 119


def hf_llava(text: str = "llama", feature_layer: int = -2, strategy: str = "default", seed: int = 0,
             tower: str = "clip"):
    torch.manual_seed(seed)
    tower_config = transformers.SiglipVisionConfig if tower == "siglip" else transformers.CLIPVisionConfig
    vision = tower_config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=32, patch_size=8)
    kind = transformers.Qwen2Config if text == "qwen2" else transformers.LlamaConfig
    language = kind(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=language, image_token_id=IMAGE,
                                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                                      image_seq_length=16 + (tower == "clip") - (strategy == "default"))
    model = transformers.LlavaForConditionalGeneration(config).eval()
    return nudge(model)


def conversation(length: int, image_at: int | None, tokens: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 100, (length,), generator=torch.Generator().manual_seed(seed))
    if image_at is not None:
        ids[image_at:image_at + tokens] = IMAGE
    return ids


@pytest.mark.parametrize("text,feature_layer,strategy,tower", [
    ("llama", -2, "default", "clip"), ("qwen2", -1, "full", "clip"), ("llama", 1, "default", "clip"),
    ("qwen2", -1, "full", "siglip"), ("llama", -2, "default", "siglip")])  # SigLIP: no class token, GELU-tanh
def test_hf_weights_give_hf_logits_and_export_back(text, feature_layer, strategy, tower):
    hf = hf_llava(text, feature_layer, strategy, tower=tower)
    ours = from_hf_llava(hf).eval()
    tokens = ours.image_tokens
    assert tokens == 16 + (tower == "clip") - (strategy == "default")  # HF's "default" drops the first token
    assert len(ours.model.vision_tower.layers) == ours.config.feature_depth  # unused blocks are not kept
    ids = torch.stack([conversation(30, 3, tokens, 0), conversation(30, 10, tokens, 1)])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(ours(ids, pixels), expected, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(to_hf_llava(ours).eval()(input_ids=ids, pixel_values=pixels).logits, expected,
                                   atol=0, rtol=0)


def test_packed_conversations_equal_each_on_its_own():
    hf = hf_llava()
    ours = from_hf_llava(hf).eval()
    first, second, text_only = conversation(25, 2, 16, 3), conversation(31, 5, 16, 4), conversation(9, None, 16, 5)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    packed = torch.cat([first, second, text_only])
    cu_seqlens = torch.tensor([0, 25, 56, 65], dtype=torch.int32)
    with torch.no_grad():
        out = ours(packed, pixels, cu_seqlens=cu_seqlens)
        expected = torch.cat([hf(input_ids=first[None], pixel_values=pixels[:1]).logits[0],
                              hf(input_ids=second[None], pixel_values=pixels[1:]).logits[0],
                              hf(input_ids=text_only[None]).logits[0]])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_bf16_autocast_is_within_hfs_own_bf16_error():
    """Packed conversations in bf16 autocast on the test device (the GPU where there is one: the fused
    kernels in bf16) against HF's float32 logits: at most twice HF's own error in bf16 autocast (plus a
    floor), with finite gradients."""
    hf = hf_llava().to(DEVICE)
    ours = from_hf_llava(hf).to(DEVICE)
    first, second = conversation(25, 2, 16, 3).to(DEVICE), conversation(31, 5, 16, 4).to(DEVICE)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    cu_seqlens = torch.tensor([0, 25, 56], dtype=torch.int32, device=DEVICE)

    def hf_logits():
        return torch.cat([hf(input_ids=first[None], pixel_values=pixels[:1]).logits[0],
                          hf(input_ids=second[None], pixel_values=pixels[1:]).logits[0]])

    with torch.no_grad():
        exact = hf_logits()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            peer = hf_logits()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits = ours(torch.cat([first, second]), pixels, cu_seqlens=cu_seqlens)
    assert logits.dtype == torch.bfloat16
    assert_within_reference_error("llava bf16 logits", logits.float(), exact, peer.float(), torch.bfloat16)
    logits.float().logsumexp(-1).mean().backward()
    projector = ours.model.multi_modal_projector
    assert all(torch.isfinite(p.grad).all() for p in projector.parameters())


def test_labels_give_the_cross_entropy_of_the_logits():
    ours = from_hf_llava(hf_llava()).eval()
    ids = conversation(28, 2, 16, 7)[None]
    pixels = torch.randn(1, 3, 32, 32)
    labels = torch.full_like(ids, -100)
    labels[0, 20:27] = ids[0, 21:28]  # the answer only
    with torch.no_grad():
        losses = ours(ids, pixels, labels=labels)
        expected = F.cross_entropy(ours(ids, pixels)[0], labels[0], reduction="none")
    torch.testing.assert_close(losses[0], expected, atol=1e-5, rtol=1e-5)


def test_bidirectional_images_see_their_whole_image_only():
    config = LlavaConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
                         text=LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=2),
                         image_token_id=IMAGE, image_attention="bidirectional")
    torch.manual_seed(8)
    model = Llava(config).eval()
    ids = conversation(24, 4, 16, 9)
    pixels = torch.randn(1, 3, 32, 32)
    changed = pixels.clone()
    changed[..., 24:, 24:] += 1  # the last patch: the image's last token
    cu_seqlens = torch.tensor([0, 24], dtype=torch.int32)
    with torch.no_grad():
        moved = (model(ids, pixels, cu_seqlens=cu_seqlens) - model(ids, changed, cu_seqlens=cu_seqlens)).abs().amax(-1)
    assert moved[:4].max() == 0  # the text before the image
    assert moved[4:19].min() > 0  # every image token sees the image's last one


def test_a_frozen_tower_runs_without_autograd():
    model = from_hf_llava(hf_llava())
    model.model.vision_tower.requires_grad_(False)
    seen = []
    model.model.vision_tower.layers[0].register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    ids = conversation(20, 1, 16, 10)[None]
    model(ids, torch.randn(1, 3, 32, 32), labels=ids.roll(-1, 1)).mean().backward()
    assert seen == [False]
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None


def test_bad_input_is_named():
    model = from_hf_llava(hf_llava())
    with pytest.raises(ValueError, match="hold 15 image tokens .* expected 16 for each of the 1 images"):
        model(conversation(20, 1, 15, 11)[None], torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="projector must be one of"):
        LlavaConfig(projector="mlp3x")
    with pytest.raises(ValueError, match="vision_feature_layer must index"):
        LlavaConfig(vision=VisionConfig(layers=2), vision_feature_layer=-4)
    linear = Llava(LlavaConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
                               text=LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2),
                               projector="linear", vision_feature_layer=-1))
    with pytest.raises(ValueError, match="mlp2x_gelu projector only"):
        to_hf_llava(linear)


def test_generation_is_greedy_next_tokens_and_stops_at_eos():
    model = from_hf_llava(hf_llava()).eval()
    prompts = [conversation(20, 2, 16, 12), conversation(7, None, 16, 13), conversation(24, 5, 16, 14)]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(15))
    outputs = model.generate_packed(prompts, pixels, max_new_tokens=4)
    assert [len(o) for o in outputs] == [4, 4, 4]
    # the same as extending each prompt by its own argmax, one sequence at a time
    for prompt, images, output in zip(prompts, (pixels[:1], None, pixels[1:]), outputs):
        sequence = prompt.clone()
        for token in output.tolist():
            with torch.no_grad():
                logits = model(sequence[None], images)[0, -1]
            assert int(logits.argmax()) == token
            sequence = torch.cat([sequence, torch.tensor([token])])
    eos = int(outputs[1][1])
    stopped = model.generate_packed(prompts, pixels, max_new_tokens=4, eos_token_id=eos)[1]
    assert stopped.tolist() == outputs[1][:2].tolist()
    sampled = model.generate_packed(prompts, pixels, max_new_tokens=3, temperature=1.0, top_p=0.9,
                             generator=torch.Generator().manual_seed(0))
    again = model.generate_packed(prompts, pixels, max_new_tokens=3, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(0))
    assert [s.tolist() for s in sampled] == [a.tolist() for a in again]
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        model.generate_packed(prompts, pixels, top_p=0)


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_the_kv_cache_gives_the_logits_of_the_whole_sequence(image_attention):
    """Prompts once, then one token per row against the cache: each step's logits are the full
    forward's at that position, rows that stopped (eos) leaving the others' rows untouched."""
    model = from_hf_llava(hf_llava()).eval()
    model.config.image_attention = image_attention
    prompts = [conversation(20, 2, 16, 21), conversation(7, None, 16, 22), conversation(24, 5, 16, 23)]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(24))
    cached = model.generate_packed(prompts, pixels, max_new_tokens=5)
    assert [c.tolist() for c in cached] == [u.tolist() for u in
                                            model.generate_packed(prompts, pixels, max_new_tokens=5, use_cache=False)]
    eos = int(cached[1][1])  # row 1 stops after two tokens, the others go on against their own rows
    stopped = model.generate_packed(prompts, pixels, max_new_tokens=5, eos_token_id=eos)
    for row, (whole, short) in enumerate(zip(cached, stopped)):
        end = whole.tolist().index(eos) + 1 if eos in whole.tolist() else len(whole)
        assert short.tolist() == whole[:end].tolist(), row
    # the decoding step's hidden states themselves, against the whole sequence's
    language_model, sequence = model.model.language_model, torch.cat([prompts[1], cached[1]])
    cache = KVCache(rows=1, capacity=len(sequence))
    with torch.no_grad():
        language_model(prompts[1], cu_seqlens=torch.tensor([0, len(prompts[1])], dtype=torch.int32), cache=cache)
        steps = [language_model(token[None], cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), cache=cache)
                 for token in cached[1]]
        whole = language_model(sequence[None])[0]
    torch.testing.assert_close(torch.cat(steps), whole[len(prompts[1]):], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="either starts empty rows .* or adds one token"):
        language_model(sequence[:3], cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), cache=cache)
    with pytest.raises(ValueError, match="does not fit the capacity"):
        language_model(sequence[:1], cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), cache=cache)


def test_hf_style_generate_left_padded_batch():
    model = from_hf_llava(hf_llava()).eval()
    prompts = [conversation(20, 2, 16, 16), conversation(26, 4, 16, 17)]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(18))
    ids = torch.zeros(2, 26, dtype=torch.long)
    mask = torch.zeros(2, 26, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, -len(prompt):], mask[row, -len(prompt):] = prompt, 1
    out = model.generate(ids, pixels, mask, max_new_tokens=3)
    expected = model.generate_packed(prompts, pixels, max_new_tokens=3)
    assert out.shape == (2, 29) and torch.equal(out[:, :26], ids)
    assert [row.tolist() for row in out[:, 26:]] == [e.tolist() for e in expected]
