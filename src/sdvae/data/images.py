"""Pixels between Pillow images and the `[B, 3, H, W]` tensors in [-1, 1] the VAE reads and writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def pillow():
    """Pillow's `Image` module, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image I/O needs Pillow: pip install 'sdvae[images]'") from None
    return Image


def image_to_tensor(image) -> torch.Tensor:
    """An RGB Pillow image as a `[3, H, W]` float32 tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_image(x: torch.Tensor):
    """A `[3, H, W]` tensor in [-1, 1] as an RGB Pillow image (values outside are clipped)."""
    array = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pillow().fromarray(array.permute(1, 2, 0).numpy(), "RGB")


def save_format(path: str | Path) -> str:
    """The Pillow format that writes `path`, told by its suffix; ValueError naming the file where none does (checked
    before the work whose result it is to hold)."""
    image = pillow()
    found = image.registered_extensions().get(Path(path).suffix.lower())
    if found not in image.SAVE:
        raise ValueError(f"{path}: not the name of an image file Pillow writes (its suffix: .png, .jpg, .webp, ...)")
    return found
