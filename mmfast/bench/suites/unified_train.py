"""One training step of a Transfusion-shaped unified model (mmfast.models.unified.UnifiedModel: forward
over a packed batch, next-token loss on the text plus flow-matching MSE on the image and audio patches,
backward, AdamW) with three attentions over the same weights and tokens:

- mmfast: mixed_attention, the packing tables built once per forward from cu_seqlens and span ids;
- flex: FlexAttention (compiled) with its block mask built from the same rule every step (the packing
  changes every step in training, so the mask does too), once per forward and shared by the layers;
- sdpa dense mask: SDPA with a boolean [tokens, tokens] mask built every step.

Every row holds samples of text with 2-4 images (256 patch tokens each) and one audio clip (250
spectrogram-patch tokens) packed to 8,192 tokens, a new packing each step as in training (drawn once
here, so every provider sees the same one). Rate: tokens/s. FLOPs: 6 x the non-embedding parameters
per token, attention left out.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

from mmfast.bench.case import Case
from mmfast.ops.mixed_attention import reference

SIZES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2), image_size=32, image_patch=8, n_mels=16, audio_frames=40,
                 audio_seconds=0.5, row=512, text_tokens=(20, 60)),
    # TinyLlama's 1.1B shape; 256 x 256 pixel images in 16 x 16 patches, 10 s clips at 80 mel bins
    "1.1B": dict(text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4), image_size=256, image_patch=16, n_mels=80, audio_frames=1000,
                 audio_seconds=10.0, row=8192, text_tokens=(64, 512)),
}
VOCABULARY = 32000


def _config(size: str):
    from mmfast.models.llama import LlamaConfig
    from mmfast.models.unified import SPECIAL_TOKENS, UnifiedConfig

    spec = SIZES[size]
    text = LlamaConfig(vocab_size=VOCABULARY + len(SPECIAL_TOKENS), **spec["text"])
    return UnifiedConfig(text=text, text_vocab_size=VOCABULARY, image_size=spec["image_size"],
                         image_patch=spec["image_patch"], n_mels=spec["n_mels"], audio_frames=spec["audio_frames"],
                         audio_seconds=spec["audio_seconds"], head_width=spec["text"]["hidden_size"])


def packed_batch(size: str, rows: int, generator: torch.Generator):
    """Token ids, shifted labels and cu_seqlens of `rows` rows of `row` tokens, each filled with samples
    (text, 2-4 image spans, an audio span, interleaved) until the next would not fit (the rest of the row:
    one text sample), and the number of images and clips."""
    from mmfast.models.unified import span_sequence

    config, spec = _config(size), SIZES[size]
    low, high = spec["text_tokens"]
    sequences, images, clips = [], 0, 0
    for _ in range(rows):
        used = 0
        while True:
            count = int(torch.randint(2, 5, (1,), generator=generator))
            parts = [torch.randint(0, VOCABULARY, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                                   generator=generator)]
            for modality in ["image"] * count + ["audio"]:
                parts += [torch.tensor(span_sequence(config, modality)),
                          torch.randint(0, VOCABULARY, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                                        generator=generator)]
            sample = torch.cat(parts)
            if used + len(sample) > spec["row"]:
                break
            sequences.append(sample)
            used, images, clips = used + len(sample), images + count, clips + 1
        if spec["row"] > used:
            sequences.append(torch.randint(0, VOCABULARY, (spec["row"] - used,), generator=generator))
    ids = torch.cat(sequences)
    labels = torch.cat([torch.cat([sequence[1:], sequence.new_tensor([-100])]) for sequence in sequences])
    labels[labels >= VOCABULARY] = -100  # span tokens are not predicted
    cu_seqlens = torch.tensor([0] + [len(sequence) for sequence in sequences]).cumsum(0).to(torch.int32)
    return ids, labels, cu_seqlens, images, clips


def _document_ids(packing) -> torch.Tensor:
    total = packing.span_ids.shape[0]
    return torch.searchsorted(packing.cu_seqlens[1:].long(), torch.arange(total, device=packing.span_ids.device),
                              right=True)


def _replacement(provider: str):
    """A stand-in for mmfast.nn.attention.mixed_attention over packed [total, H, D] inputs (with the
    packing LlamaModel builds once per forward): its mask is built once per forward and shared."""
    built = {}

    def mask_of(packing):
        key = id(packing)
        if key not in built:
            built.clear()
            document = _document_ids(packing)
            start = packing.cu_seqlens[:-1].long()[document]
            position = torch.arange(len(document), device=document.device) - start
            spans = packing.span_ids
            if provider == "flex":
                from torch.nn.attention.flex_attention import create_block_mask

                def rule(b, h, i, j):
                    return (document[i] == document[j]) & reference.allowed(position[i], position[j], spans[i],
                                                                            spans[j])

                built[key] = create_block_mask(rule, None, None, len(document), len(document),
                                               device=document.device, _compile=document.device.type == "cuda")
            else:
                built[key] = ((document[:, None] == document[None, :]) & reference.allowed(
                    position[:, None], position[None, :], spans[:, None], spans[None, :]))
        return built[key], packing

    def attention(q, k, v, *, packing=None, **_):
        mask, _ = mask_of(packing)
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, total, D]
        if provider == "flex":
            from mmfast.bench.suites.mixed_attention import _compiled_flex

            out = _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)

    return attention


def _case(size: str, rows: int, provider: str, device, dtype):
    generator = torch.Generator().manual_seed(0)
    ids, labels, cu_seqlens, images, clips = packed_batch(size, rows, generator)

    def make():
        from mmfast.models.unified import UnifiedModel

        torch.manual_seed(0)
        model = UnifiedModel(_config(size)).to(device)
        config = model.config
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        sample = torch.Generator(device=device).manual_seed(1)
        side, frames = config.image_size, config.audio_frames
        pixels = torch.rand(images, 3, side, side, device=device, generator=sample) * 2 - 1
        audio = torch.rand(clips, 1, config.n_mels, frames, device=device, generator=sample) * 2 - 1
        image_times = torch.rand(images, device=device, generator=sample)
        audio_times = torch.rand(clips, device=device, generator=sample)
        image_targets = torch.randn(images, config.span_tokens("image"), 3 * config.image_patch ** 2, device=device,
                                    generator=sample)
        audio_targets = torch.randn(clips, config.span_tokens("audio"), config.n_mels * config.audio_patch_frames,
                                    device=device, generator=sample)
        inputs = ids.to(device), cu_seqlens.to(device), labels.to(device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        patched = (contextlib.nullcontext() if provider == "mmfast"
                   else mock.patch("mmfast.nn.attention.mixed_attention", _replacement(provider)))

        def step():
            optimizer.step()  # the previous step's gradients
            optimizer.zero_grad(set_to_none=True)
            with autocast, patched:
                out = model(inputs[0], inputs[1], images=pixels, image_times=image_times, audio=audio,
                            audio_times=audio_times, labels=inputs[2])
                text = out["text"].float().sum() / (inputs[2] != -100).sum()
                return (text + F.mse_loss(out["image"], image_targets)
                        + F.mse_loss(out["audio"], audio_targets))
        return step, []

    config = _config(size)
    text = config.text
    per_layer = 4 * text.hidden_size ** 2 + 3 * text.hidden_size * text.intermediate_size
    parameters = text.num_hidden_layers * per_layer + text.hidden_size * text.vocab_size
    tokens = len(ids)
    return Case(suite="unified_train", group=f"unified {size}, {rows} x {SIZES[size]['row']} tokens",
                provider=provider, params={"model": size, "rows": rows, "tokens": tokens, "images": images,
                                           "clips": clips, "dtype": str(dtype).removeprefix("torch.")},
                make=make, flops=lambda mode: 6.0 * parameters * tokens, modes=("full",),
                is_mmfast=provider == "mmfast", rates={"tokens_per_s": tokens})


def cases(profile: str, device: torch.device):
    if profile == "cpu":
        return [_case("tiny", 2, provider, device, torch.float32) for provider in ("mmfast", "sdpa dense mask")]
    rows = 1 if profile == "quick" else 2
    return [_case("1.1B", rows, provider, device, torch.bfloat16) for provider in ("mmfast", "flex", "sdpa dense mask")]
