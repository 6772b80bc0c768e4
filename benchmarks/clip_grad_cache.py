"""One training step of a CLIP with a contrastive batch far beyond activation memory, by gradient
caching (mmfast.train.grad_cache_step) and the fused loss: prints time and peak memory as JSON.

    python benchmarks/clip_grad_cache.py --size ViT-B/16 --batch 65536 --micro-batch 512   # one H100
    python benchmarks/clip_grad_cache.py --size tiny --batch 64 --micro-batch 16           # CPU check

Pixels are random uint8 and tokens random ids: the step's cost does not depend on the data.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import mmfast
from mmfast.models import CLIP, clip_config
from mmfast.train import grad_cache_step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="ViT-B/16", help="tiny, ViT-B/16 or ViT-L/14")
    parser.add_argument("--batch", type=int, default=65536, help="the contrastive batch")
    parser.add_argument("--micro-batch", type=int, default=512, help="rows per encoder forward/backward")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = clip_config(args.size)
    torch.manual_seed(0)
    model = CLIP(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size, text = config.vision.image_size, config.text
    pixels = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)  # host memory, moved per step
    tokens = torch.randint(1, text.vocab_size - 1, (args.batch, text.context_length))
    tokens[:, -1] = text.vocab_size - 1
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    loss_fn = mmfast.nn.ClipLoss()
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 1):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = grad_cache_step(model, loss_fn, pixels.to(device), tokens.to(device), args.micro_batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        losses.append(loss.item())
        if step:  # the first step warms up kernels and allocator
            times.append(time.perf_counter() - started)
    result = {"size": args.size, "batch": args.batch, "micro_batch": args.micro_batch, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "seconds_per_step": sorted(times)[len(times) // 2], "samples_per_s": args.batch / min(times),
              "losses": losses, "finite": all(map(lambda value: value == value, losses))}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
