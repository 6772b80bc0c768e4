"""Scoring image-caption pairs with a CLIP (`mmfast data score`'s work, bf16 autocast on a GPU): from
decoded pictures of web sizes to each pair's cosine. mmfast: `Preprocess` (resize and crop in PIL,
uint8 tensor; a quarter of float32's bytes to the device) and its CLIP (fused uint8 patch embedding
with the normalization inside, mixed_attention). The peer, with the same weights: open_clip's CLIP and
its `image_transform` (PIL resize, crop, ToTensor, Normalize in float32) where open_clip is installed;
HF transformers' CLIPModel (SDPA) with the same torchvision transform otherwise.

Decoding the files is the same PIL work for both and is left out; tokens are made once (the
tokenizer is the same for both). Rate: pairs/s.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch
import torch.nn.functional as F

from mmfast.bench.case import Case
from mmfast.bench.suites.clip_train import MEAN, SIZES, STD, _models


def _pictures(count: int, seed: int = 0) -> list:
    """Pictures of web sizes (shorter side 256-400, aspect up to 4:3), smooth enough to resample like photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(count):
        short = int(rng.integers(256, 401))
        long = int(short * rng.uniform(1.0, 4 / 3))
        coarse = rng.integers(0, 256, (short // 16 + 1, long // 16 + 1, 3), dtype=np.uint8)
        pictures.append(Image.fromarray(coarse).resize((long, short), Image.BILINEAR))
    return pictures


def _torchvision_transform(size: int):
    """open_clip's evaluation transform (its own where installed)."""
    if importlib.util.find_spec("open_clip"):
        import open_clip

        return open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD)
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), lambda image: image.convert("RGB"), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])


def _case(size: str, batch: int, provider: str, device, dtype):
    spec = SIZES[size]
    vision, text = spec["vision"], spec["text"]
    image_size = vision["image_size"]

    def make():
        from mmfast.data.preprocess import Preprocess

        ours, peer = _pair(size, device)
        pictures = _pictures(batch)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(1, text["vocab_size"] - 1, (batch, text["max_position_embeddings"]), generator=generator)
        tokens[:, -1] = text["vocab_size"] - 1  # the end-of-text token: the largest id, pooled there
        tokens = tokens.to(device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        if provider == "mmfast":
            model, preprocess = ours.eval(), Preprocess(image_size)

            def step():
                pixels = torch.stack([preprocess(picture) for picture in pictures]).to(device, non_blocking=True)
                with torch.no_grad(), autocast:
                    image = model.encode_image(pixels, normalize=True)
                    words = model.encode_text(tokens, normalize=True)
                return (image.float() * words.float()).sum(-1).cpu()
        else:
            model, transform = peer, _torchvision_transform(image_size)

            def step():
                pixels = torch.stack([transform(picture) for picture in pictures]).to(device, non_blocking=True)
                with torch.no_grad(), autocast:
                    image, words = model(pixels, tokens)
                return (F.normalize(image.float(), dim=-1) * F.normalize(words.float(), dim=-1)).sum(-1).cpu()
        return step, []

    return Case(suite="data_score", group=f"CLIP {size} batch {batch}", provider=provider,
                params={"model": size, "B": batch, "dtype": str(dtype).removeprefix("torch.")}, make=make,
                modes=("forward",), is_mmfast=provider == "mmfast", rates={"pairs_per_s": batch})


def _pair(size: str, device):
    """(mmfast's CLIP, the peer's (pixels, tokens) -> (image, text features)) with the same weights."""
    if not importlib.util.find_spec("open_clip"):
        hf, ours = _models(size, device)
        hf = hf.eval()

        def encode(pixels, tokens):
            image = hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output)
            return image, hf.text_projection(hf.text_model(input_ids=tokens).pooler_output)

        return ours, encode
    import open_clip.model as open_clip_model

    import mmfast

    spec = SIZES[size]
    vision, text = spec["vision"], spec["text"]
    torch.manual_seed(0)
    theirs = open_clip_model.CLIP(
        embed_dim=spec["projection_dim"], quick_gelu=False,
        vision_cfg=open_clip_model.CLIPVisionCfg(
            layers=vision["num_hidden_layers"], width=vision["hidden_size"], patch_size=vision["patch_size"],
            head_width=vision["hidden_size"] // vision["num_attention_heads"], image_size=vision["image_size"],
            mlp_ratio=vision["intermediate_size"] / vision["hidden_size"]),
        text_cfg=open_clip_model.CLIPTextCfg(
            context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"], width=text["hidden_size"],
            heads=text["num_attention_heads"], layers=text["num_hidden_layers"],
            mlp_ratio=text["intermediate_size"] / text["hidden_size"])).eval()
    ours = mmfast.models.from_open_clip(theirs, quick_gelu=False, mean=MEAN, std=STD)
    theirs, ours = theirs.to(device), ours.to(device)
    return ours, lambda pixels, tokens: (theirs.encode_image(pixels), theirs.encode_text(tokens))


def peer_name() -> str:
    return "open_clip" if importlib.util.find_spec("open_clip") else "hf sdpa + torchvision"


def cases(profile: str, device: torch.device):
    providers = ("mmfast", peer_name())
    if profile == "cpu":
        return [_case("tiny", 8, provider, device, torch.float32) for provider in providers]
    batches = (256,) if profile == "quick" else (128, 256, 512)
    return [_case("ViT-B/16", batch, provider, device, torch.bfloat16) for batch in batches for provider in providers]
