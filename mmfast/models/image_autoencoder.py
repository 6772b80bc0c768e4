"""Images for the unified model as pixels (the default) or as latents of a diffusers `AutoencoderKL`
(Stable Diffusion's VAE family) loaded from a local directory: the model patches, noises and generates
the latents, 8x fewer a side with SD's VAE, and the frozen autoencoder turns them back into pixels.
The autoencoder is not part of the trained model: runs and `model.pt` name its directory."""
from __future__ import annotations

import os

import torch

_LOADED: dict[tuple[str, str], "ImageAutoencoder"] = {}  # one copy per (directory, device) in a process


def image_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, 3, H, W]` -> float in [-1, 1] (the space images are generated in)."""
    return images.float() / 127.5 - 1.0


def image_pixels(values: torch.Tensor) -> torch.Tensor:
    """image_values' inverse: uint8 `[N, 3, H, W]`."""
    return ((values.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError("model.image_autoencoder needs diffusers: pip install diffusers") from error
    return AutoencoderKL


def autoencoder_geometry(directory: str) -> tuple[int, int]:
    """(latent channels, pixels per latent a side) of the AutoencoderKL in `directory`, from its config."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"model.image_autoencoder: {directory!r} holds no config.json of a diffusers "
                                "AutoencoderKL (a folder written by AutoencoderKL.save_pretrained)")
    config = _autoencoder_class().load_config(directory)
    return int(config["latent_channels"]), 2 ** (len(config["block_out_channels"]) - 1)


class ImageAutoencoder:
    """A frozen AutoencoderKL: `encode(uint8 [N, 3, H, W])` -> the latent distribution's mean, shifted
    and scaled by the autoencoder's config (shift_factor, scaling_factor) as diffusion pipelines do;
    `decode(latents)` -> uint8 pixels."""

    def __init__(self, directory: str, device="cpu"):
        self.model = _autoencoder_class().from_pretrained(directory).to(device).eval().requires_grad_(False)
        config = self.model.config
        self.scale = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = image_values(images).to(self.model.dtype)
        return ((self.model.encode(pixels).latent_dist.mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return image_pixels(self.model.decode((latents / self.scale + self.shift).to(self.model.dtype)).sample.float())


class Pixels:
    """The default: images as pixel values in [-1, 1]."""

    encode = staticmethod(image_values)
    decode = staticmethod(image_pixels)


def image_codec(config, device) -> ImageAutoencoder | Pixels:
    """How a unified model of `config` (a UnifiedConfig) sees images: its autoencoder (loaded once per
    process and device) or pixels."""
    if not config.image_autoencoder:
        return Pixels()
    key = (os.path.abspath(config.image_autoencoder), str(torch.device(device)))
    if key not in _LOADED:
        _LOADED[key] = ImageAutoencoder(config.image_autoencoder, device)
    return _LOADED[key]
