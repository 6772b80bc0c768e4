"""One LLaVA stage-2 training step in bf16 autocast (forward, backward and the AdamW step; the vision
tower frozen, the projector and language model trained): mmfast's Llava (conversations packed with
no padding, mixed_attention, the fused linear cross-entropy, uint8 pixels normalized inside the fused
patch embedding) against the same weights in HF transformers' LlavaForConditionalGeneration (SDPA,
the conversations right-padded to the longest, logits then cross-entropy). Both come from one HF
model (`from_hf_llava`) and see the same conversations of varied lengths.

Rate: real (unpadded) tokens/s. FLOPs: 6 x the language model's parameters per real token plus 2 x
the tower's per image patch (its forward only), attention left out.
"""
from __future__ import annotations

import torch

from mmfast.bench.case import Case

MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
SIZES = {
    "tiny": dict(vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2),
                 text=dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2), lengths=(40, 70)),
    # CLIP ViT-L/14 at 336 pixels (LLaVA-1.5's tower: 576 image tokens) and a 1.1B Llama (TinyLlama's shape)
    "ViT-L/14-336 + 1.1B": dict(
        vision=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, hidden_act="quick_gelu"),
        text=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4), lengths=(640, 2048)),
}


def _models(size: str, device):
    import transformers

    from mmfast.models.llava import from_hf_llava

    spec = SIZES[size]
    vision = transformers.CLIPVisionConfig(**spec["vision"])
    config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**spec["text"]),
                                      image_token_id=spec["text"]["vocab_size"] - 1, image_seq_length=_patches(size))
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config)
    hf.set_attn_implementation("sdpa")
    ours = from_hf_llava(hf, mean=MEAN, std=STD)
    for model in (hf, ours):  # LLaVA's stage 2: the tower frozen
        model.model.vision_tower.requires_grad_(False)
    return hf.to(device), ours.to(device)


def _patches(size: str) -> int:
    """Image tokens per image: the patches (LLaVA's default selection drops the class token)."""
    vision = SIZES[size]["vision"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def conversations(size: str, batch: int, generator: torch.Generator):
    """`batch` token sequences of lengths drawn from the size's range, each with one image's tokens
    after a short prefix, and HF-style labels (the tokens themselves, -100 on the image and the
    first 70 % of the text: what a user turn would be)."""
    spec = SIZES[size]
    vocab, low, high = spec["text"]["vocab_size"], *spec["lengths"]
    patches, ids, labels = _patches(size), [], []
    for _ in range(batch):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        tokens = torch.randint(0, vocab - 1, (length,), generator=generator)
        tokens[4:4 + patches] = vocab - 1
        label = tokens.clone()
        label[:4 + patches + int(0.7 * (length - 4 - patches))] = -100
        ids.append(tokens)
        labels.append(label)
    return ids, labels


def _case(size: str, batch: int, provider: str, device, dtype):
    spec = SIZES[size]

    generator = torch.Generator().manual_seed(0)
    ids, labels = conversations(size, batch, generator)

    def make():
        hf, ours = _models(size, device)
        side = spec["vision"]["image_size"]
        pixels = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator).to(device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        model = ours if provider == "mmfast" else hf
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        if provider == "mmfast":  # packed; labels already shifted (each token's target is the next one)
            input_ids = torch.cat(ids).to(device)
            shifted = torch.cat([torch.cat([label[1:], label.new_tensor([-100])]) for label in labels]).to(device)
            cu_seqlens = torch.tensor([0] + [len(x) for x in ids]).cumsum(0).to(torch.int32).to(device)

            def loss():
                losses = model(input_ids, pixels, cu_seqlens=cu_seqlens, labels=shifted)
                return losses.float().sum() / (shifted != -100).sum()
        else:  # right-padded to the longest, as HF's LLaVA collators do
            longest = max(len(x) for x in ids)
            input_ids = torch.zeros(batch, longest, dtype=torch.long)
            padded_labels = torch.full((batch, longest), -100, dtype=torch.long)
            mask = torch.zeros(batch, longest, dtype=torch.long)
            for row, (tokens, label) in enumerate(zip(ids, labels)):
                input_ids[row, :len(tokens)], padded_labels[row, :len(tokens)], mask[row, :len(tokens)] = \
                    tokens, label, 1
            input_ids, padded_labels, mask = input_ids.to(device), padded_labels.to(device), mask.to(device)
            mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

            def loss():
                normalized = (pixels.float() / 255 - mean) / std
                return model(input_ids=input_ids, pixel_values=normalized, attention_mask=mask,
                             labels=padded_labels).loss.float()

        def step():
            optimizer.step()  # the previous step's gradients
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                return loss()
        return step, []

    tokens = sum(len(x) for x in ids)  # real tokens: what both providers train on
    text, vision = spec["text"], spec["vision"]
    per_layer = 4 * text["hidden_size"] ** 2 + 3 * text["hidden_size"] * text["intermediate_size"]
    language = text["num_hidden_layers"] * per_layer + 2 * text["hidden_size"] * text["vocab_size"]
    tower = vision["num_hidden_layers"] * (4 * vision["hidden_size"] ** 2
                                           + 2 * vision["hidden_size"] * vision["intermediate_size"])
    flops = 6.0 * language * tokens + 2.0 * tower * (_patches(size) + 1) * batch
    return Case(suite="llava_train", group=f"LLaVA {size} batch {batch}", provider=provider,
                params={"model": size, "B": batch, "dtype": str(dtype).removeprefix("torch.")}, make=make,
                flops=lambda mode: flops, modes=("full",), is_mmfast=provider == "mmfast",
                rates={"tokens_per_s": tokens})


def cases(profile: str, device: torch.device):
    providers = ("mmfast", "hf sdpa padded")
    if profile == "cpu":
        return [_case("tiny", 3, provider, device, torch.float32) for provider in providers]
    batches = (8,) if profile == "quick" else (4, 8, 16)
    return [_case("ViT-L/14-336 + 1.1B", batch, provider, device, torch.bfloat16) for batch in batches
            for provider in providers]
