"""One CLIP training step in bf16 autocast (forward, backward and the AdamW step): mmfast's CLIP
(fused patch embedding from uint8 pixels, mixed_attention, fused ClipLoss) against the same model
as HF transformers builds it (Conv2d patch embedding on pixels normalized in torch, SDPA attention)
with open_clip's ClipLoss (its formula, materialized logits, where open_clip is not installed).
Both start from the same weights (`from_hf_clip`) and batch.

The harness times forward + backward; each step first applies the previous step's gradients, so
the optimizer's time is in every step alike. Rate: samples/s; FLOPs: 3 x the forward's matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfast.bench.case import Case
from mmfast.bench.suites.contrastive import materialized_clip_loss
from mmfast.models.clip import ClipConfig, TextConfig, VisionConfig, flops_per_sample

MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
SIZES = {
    "tiny": dict(vision=dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=256),
                 text=dict(vocab_size=1000, max_position_embeddings=16, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=256), projection_dim=64),
    "ViT-B/16": dict(vision=dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                 num_attention_heads=12, intermediate_size=3072),
                     text=dict(vocab_size=49408, max_position_embeddings=77, hidden_size=512, num_hidden_layers=12,
                               num_attention_heads=8, intermediate_size=2048), projection_dim=512),
}


def _open_clip_loss():
    try:
        from open_clip.loss import ClipLoss

        return ClipLoss()
    except ImportError:  # the same computation: both N x N logits, cross-entropy each way
        return materialized_clip_loss


def _models(size: str, device):
    from transformers import CLIPConfig, CLIPModel

    import mmfast

    spec = SIZES[size]
    config = CLIPConfig(text_config=spec["text"], vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    torch.manual_seed(0)
    hf = CLIPModel(config)
    hf.set_attn_implementation("sdpa")
    ours = mmfast.models.from_hf_clip(hf, mean=MEAN, std=STD)
    return hf.to(device), ours.to(device)


def _case(size: str, batch: int, provider: str, device, dtype):

    import mmfast

    spec = SIZES[size]
    vision, text = spec["vision"], spec["text"]

    def make():
        hf, ours = _models(size, device)
        generator = torch.Generator(device=device).manual_seed(0)
        pixels = torch.randint(0, 256, (batch, 3, vision["image_size"], vision["image_size"]), device=device,
                               dtype=torch.uint8, generator=generator)
        tokens = torch.randint(1, text["vocab_size"] - 1, (batch, text["max_position_embeddings"]), device=device,
                               generator=generator)
        tokens[:, -1] = text["vocab_size"] - 1  # the end-of-text token: the largest id, pooled there
        model = ours if provider == "mmfast" else hf
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        if provider == "mmfast":
            loss_fn = mmfast.nn.ClipLoss()

            def features():
                output = model(pixels, tokens)
                return output["image_features"], output["text_features"], output["logit_scale"]
        else:
            loss_fn = _open_clip_loss()
            mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

            def features():
                normalized = (pixels.float() / 255 - mean) / std
                image = model.visual_projection(model.vision_model(pixel_values=normalized).pooler_output)
                words = model.text_projection(model.text_model(input_ids=tokens).pooler_output)
                return F.normalize(image, dim=-1), F.normalize(words, dim=-1), model.logit_scale.exp()

        def step():
            optimizer.step()  # the previous step's gradients
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                image, words, scale = features()
            return loss_fn(image.float(), words.float(), scale.float())
        return step, []

    config = ClipConfig(
        embed_dim=spec["projection_dim"],
        vision=VisionConfig(image_size=vision["image_size"], patch_size=vision["patch_size"], width=vision["hidden_size"],
                            layers=vision["num_hidden_layers"], heads=vision["num_attention_heads"]),
        text=TextConfig(vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
                        width=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"]))
    flops = flops_per_sample(config) * batch
    return Case(suite="clip_train", group=f"CLIP {size} batch {batch}", provider=provider,
                params={"model": size, "B": batch, "dtype": str(dtype).removeprefix("torch.")}, make=make,
                flops=lambda mode: flops, modes=("full",), is_mmfast=provider == "mmfast",
                rates={"samples_per_s": batch})


def cases(profile: str, device: torch.device):
    providers = ("mmfast", "hf sdpa + open_clip loss")
    if profile == "cpu":
        return [_case("tiny", 8, provider, device, torch.float32) for provider in providers]
    batches = (256,) if profile == "quick" else (128, 256, 512)
    return [_case("ViT-B/16", batch, provider, device, torch.bfloat16) for batch in batches for provider in providers]
