"""Images to the model's input: uint8 tensors of one size (the model normalizes them itself)."""
from __future__ import annotations

import numpy as np
import torch


class Preprocess:
    """PIL image (or HxWx3 uint8 array) -> uint8 tensor [3, size, size]: shorter side resized to
    `size` (bicubic), centre crop. Normalization happens inside the model's fused patch embedding,
    so pixels stay uint8 (a quarter of float32's bytes on their way to the GPU)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise ValueError(f"preprocess: expected a PIL image or an HxWx3 uint8 array, got shape "
                                 f"{array.shape} dtype {array.dtype}")
            image = Image.fromarray(array)
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = self._resize_and_crop(image)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()

    def _resize_and_crop(self, image):
        from PIL import Image

        scale = self.size / min(image.size)
        width, height = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))
