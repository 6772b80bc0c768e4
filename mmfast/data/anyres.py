"""LLaVA-NeXT's AnyRes: an image larger than the vision tower's input becomes a downscaled overview
plus tiles of the tower's size cut from the image at the best of a few grid resolutions, so larger
images give more image tokens (packing makes the varying count free). The tiles' features are
concatenated in order, overview first (LLaVA-NeXT's `flat` merge: no newline tokens, no unpadding).
"""
from __future__ import annotations

import torch

from mmfast.data.preprocess import Preprocess


def check_pinpoints(pinpoints, tile: int) -> list[tuple[int, int]]:
    """(height, width) pairs, each a whole number of tiles; an error naming the bad one otherwise."""
    checked = []
    for pinpoint in pinpoints:
        if len(pinpoint) != 2 or any(int(side) <= 0 or int(side) % tile for side in pinpoint):
            raise ValueError(f"image_grid_pinpoints: each must be [height, width], multiples of the tower's "
                             f"{tile}-pixel input, got {list(pinpoint)}")
        checked.append((int(pinpoint[0]), int(pinpoint[1])))
    return checked


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice among (height, width) resolutions: the most of the image's own pixels kept
    once it is scaled to fit, then the least padding."""
    best, kept_most, wasted_least = None, -1, float("inf")
    for target_height, target_width in pinpoints:
        scale = min(target_width / width, target_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - kept
        if kept > kept_most or (kept == kept_most and wasted < wasted_least):
            best, kept_most, wasted_least = (target_height, target_width), kept, wasted
    return best


def tile_count(height: int, width: int, pinpoints, tile: int) -> int:
    """How many tower inputs an image of this size becomes: the overview and its grid's tiles."""
    grid_height, grid_width = best_resolution(height, width, pinpoints)
    return 1 + (grid_height // tile) * (grid_width // tile)


def anyres_tiles(image, pinpoints, tile: int) -> torch.Tensor:
    """uint8 [1 + tiles, 3, tile, tile]: the image squeezed to one tile (the overview), then the tiles,
    row by row, of the image scaled to fit the best resolution and centred on black."""
    from PIL import Image

    image = image.convert("RGB")
    grid_height, grid_width = best_resolution(image.height, image.width, check_pinpoints(pinpoints, tile))
    scale = min(grid_width / image.width, grid_height / image.height)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (grid_width, grid_height), (0, 0, 0))
    canvas.paste(image.resize((width, height), Image.BICUBIC), ((grid_width - width) // 2, (grid_height - height) // 2))
    pieces = [image.resize((tile, tile), Image.BICUBIC)]
    pieces += [canvas.crop((left, top, left + tile, top + tile)) for top in range(0, grid_height, tile)
               for left in range(0, grid_width, tile)]
    to_tensor = Preprocess(tile)
    return torch.stack([to_tensor(piece) for piece in pieces])
