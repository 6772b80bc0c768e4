"""mmfast.models.CLIP: loading HF CLIPModel and open_clip CLIP weights (random models built from
configs) gives the same embeddings; a training step of the dual encoder on the fused loss."""
import pytest
import torch

import mmfast
import mmfast.models


def _tokens(batch, length, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab - 1, (batch, length), generator=generator)
    ends = torch.tensor([length - 1, length // 2, 3][:batch])
    tokens[torch.arange(batch), ends] = vocab - 1  # end-of-text: the largest id (OpenAI's convention)
    for row, end in enumerate(ends.tolist()):
        tokens[row, end + 1:] = 0
    return tokens


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_hf_clip_weights_give_the_same_embeddings(backend):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=48)
    hf = transformers.CLIPModel(config).eval()
    ours = mmfast.models.from_hf_clip(hf, backend=backend).eval()
    pixels = torch.randn(3, 3, 32, 32)
    tokens = _tokens(3, 16, 99, seed=1)
    as_tensor = lambda output: output if torch.is_tensor(output) else output.pooler_output  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), as_tensor(hf.get_image_features(pixel_values=pixels)),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.encode_text(tokens), as_tensor(hf.get_text_features(input_ids=tokens)),
                                   rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.logit_scale.detach(), hf.logit_scale.detach().reshape(1))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_open_clip_weights_give_the_same_embeddings(backend):
    open_clip_model = pytest.importorskip("open_clip.model")
    torch.manual_seed(2)
    theirs = open_clip_model.CLIP(
        embed_dim=48, quick_gelu=True,
        vision_cfg=open_clip_model.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=open_clip_model.CLIPTextCfg(context_length=16, vocab_size=99, width=64, heads=2, layers=2)).eval()
    ours = mmfast.models.from_open_clip(theirs, quick_gelu=True, backend=backend).eval()
    pixels = torch.randn(3, 3, 32, 32)
    tokens = _tokens(3, 16, 99, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), theirs.encode_image(pixels), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), rtol=1e-4, atol=1e-4)


def test_training_step_on_the_fused_loss_lowers_the_loss():
    torch.manual_seed(4)
    model = mmfast.models.CLIP(mmfast.models.clip_config("tiny"))
    loss_fn = mmfast.nn.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixels, tokens = torch.randn(8, 3, 32, 32), _tokens(3, 16, 1000, seed=5).repeat(3, 1)[:8]
    tokens[:, 1] = torch.arange(8) + 10  # distinct captions
    losses = []
    for _ in range(15):
        output = model(pixels, tokens)
        loss = loss_fn(output["image_features"], output["text_features"], output["logit_scale"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_named_sizes_and_bad_names():
    config = mmfast.models.clip_config("ViT-B/16")
    assert (config.vision.width, config.vision.layers, config.vision.patch_size) == (768, 12, 16)
    assert mmfast.models.clip_config("ViT-L/14").vision.width == 1024
    with pytest.raises(ValueError, match="size must be one of"):
        mmfast.models.clip_config("ViT-H/99")


def test_overlapping_patches_and_normalization_come_from_the_vision_config():
    from mmfast.models.clip import flops_per_sample, patch_count

    config = mmfast.models.clip_config("tiny")
    config.vision.patch_stride, config.vision.mean, config.vision.std = 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    assert patch_count(config.vision) == 49  # (32 - 8) // 4 + 1 = 7 per side
    model = mmfast.models.CLIP(config)
    assert model.vision_model.embeddings.position_embedding.weight.shape[0] == 50
    assert model.vision_model.embeddings.mean == (0.5, 0.5, 0.5)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    output = model(pixels, torch.randint(1, 100, (2, 16)))
    assert output["image_features"].shape == (2, config.embed_dim)
    # uint8 pixels normalized in the embedding give what the float pixels normalized by hand give
    model.vision_model.embeddings.mean = model.vision_model.embeddings.std = None
    by_hand = model.encode_image((pixels.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(output["image_features"], torch.nn.functional.normalize(by_hand, dim=-1),
                               rtol=1e-4, atol=1e-4)
    plain = mmfast.models.clip_config("tiny")
    assert flops_per_sample(config) > flops_per_sample(plain)  # 49 patches instead of 16


def test_mean_pooling_averages_the_states_up_to_the_end_token():
    config = mmfast.models.clip_config("tiny")
    config.text.pooling = "mean"
    torch.manual_seed(0)
    model = mmfast.models.CLIP(config).eval()
    tokens = _tokens(3, 16, 1000, seed=2)
    with torch.no_grad():
        states = model.text_model.hidden_states(tokens)
        pooled = model.text_model(tokens)
        ends = tokens.argmax(dim=-1)
        for row, end in enumerate(ends.tolist()):
            torch.testing.assert_close(pooled[row], states[row, : end + 1].mean(0))
        # padding after the end token changes nothing (the blocks are causal)
        padded = torch.cat([tokens[:, :12], torch.zeros(3, 4, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model.text_model(padded)[1:], pooled[1:])


def test_mean_pooling_tells_one_word_apart_at_initialization():
    """Why the main job pools by the mean: at the end token alone, a fresh tower gives captions that
    differ in one word nearly the same features."""
    cosines = {}
    for pooling in ("eot", "mean"):
        config = mmfast.models.clip_config("tiny")
        config.text.pooling = pooling
        torch.manual_seed(0)
        model = mmfast.models.CLIP(config).eval()
        tokens = _tokens(1, 16, 1000, seed=3).repeat(2, 1)
        tokens[1, 2] = (tokens[0, 2] + 7) % 998 + 1  # one word swapped
        with torch.no_grad():
            features = model.encode_text(tokens, normalize=True)
        cosines[pooling] = (features[0] @ features[1]).item()
    assert cosines["mean"] < cosines["eot"] - 0.02, cosines


def test_bad_pooling_is_refused():
    config = mmfast.models.clip_config("tiny")
    config.text.pooling = "max"
    with pytest.raises(ValueError, match="text.pooling must be 'eot' or 'mean', got 'max'"):
        mmfast.models.CLIP(config)


def test_vision_embeddings_start_small_beside_the_patches():
    """Positions and class token at 0.02 (HF's initializer range), not the std 1 of nn.Embedding."""
    torch.manual_seed(0)
    embeddings = mmfast.models.CLIP(mmfast.models.clip_config("tiny")).vision_model.embeddings
    assert embeddings.position_embedding.weight.std().item() < 0.03
    assert embeddings.class_embedding.std().item() < 0.03
    patch = embeddings.patch_embedding.weight
    assert abs(patch.std().item() * patch[0].numel() ** 0.5 - 1) < 0.1
