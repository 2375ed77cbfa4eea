"""musubi-tuner's latent cache (kohya-ss/musubi-tuner), as `sdvae encode --format musubi` writes it.

The rules are musubi-tuner's own (README, "Training with musubi-tuner", cites each): its buckets (`BucketSelector`,
steps of 16 px), its resize (`resize_image_to_bucket`: Lanczos to enlarge, OpenCV's INTER_AREA to shrink, then the
centre crop), images as stored (no EXIF rotation; an alpha channel resized with the colours, then dropped), and one
file per image, `{stem}_{W:04d}x{H:04d}_{arch}.safetensors` (W x H the image's own size) holding one tensor under
its shape and dtype and the metadata its `cache_io.py` writes.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from ..model.scaling import LatentScaling

STEP = 16
FORMAT_VERSION = "1.0.1"
# musubi's short names (`dataset/architectures.py`): the VAE family each one encodes with, and the metadata name
# its writer stores (Qwen-Image's writer stores "qwen_image" for the edit model too).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "f2d": ("flux2", "flux_2_dev"), "f2k4b": ("flux2", "flux_2_klein_4b"), "f2k9b": ("flux2", "flux_2_klein_9b"),
    "qi": ("qwenimage", "qwen_image"), "qie": ("qwenimage", "qwen_image"), "zi": ("flux", "z_image"),
}
DEFAULT_ARCH = {"flux2": "f2d", "qwenimage": "qi", "flux": "zi"}


def architecture(family: str | None, arch: str | None) -> str:
    """The musubi architecture to write for a VAE of `family`: `arch`, else the family's base model's."""
    if arch is None:
        if family not in DEFAULT_ARCH:
            raise ValueError(f"--format musubi: musubi-tuner caches the latents of FLUX.2, Qwen-Image and Z-Image "
                             f"(the FLUX.1 VAE); this VAE is {family or 'of no known family'}")
        return DEFAULT_ARCH[family]
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch {arch!r}: musubi-tuner's architectures are {', '.join(ARCHITECTURES)}")
    if ARCHITECTURES[arch][0] != family:
        raise ValueError(f"--arch {arch}: it takes a {ARCHITECTURES[arch][0]} VAE, and this one is {family}")
    return arch


def check_opencv(format: str = "musubi") -> None:
    """The trainers shrink images with OpenCV: without it the pixels would not be theirs."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise ImportError(f"--format {format} resizes as the trainer does, with OpenCV: pip install "
                          "'sdvae[trainers]'") from None


def _floor(n: int) -> int:
    return n - n % STEP


def buckets(resolution: tuple[int, int]) -> list[tuple[int, int]]:
    """Every (width, height) bucket of about the area of `resolution` (width, height), sides multiples of 16,
    sorted."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    sizes = set()
    for w in range(_floor(side // 2), side + STEP, STEP):
        h = _floor(area // w)
        sizes |= {(w, h), (h, w)}
    return sorted(sizes)


def bucket_for(size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool, no_upscale: bool
               ) -> tuple[int, int]:
    """The bucket of an image of `size` (width, height): the resolution (width, height) without buckets; with them,
    its own size rounded down to 16 where `no_upscale` and it is no larger than the area, else the bucket nearest its
    aspect ratio (the first in sorted order on a tie)."""
    if not enable_bucket:
        return resolution
    w, h = size
    if no_upscale and w * h <= resolution[0] * resolution[1]:
        return _floor(w), _floor(h)
    options = buckets(resolution)
    ratios = np.array([bw / bh for bw, bh in options])
    return options[int(np.abs(ratios - w / h).argmin())]


def resize_to_bucket(image: Any, bucket: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The image's pixels `[H, W, C]` covering the bucket and cropped to its centre, and the crop box (left, top,
    right, bottom) in the resized image."""
    import cv2

    from .images import pillow

    bw, bh = bucket
    if image.size == bucket:
        return np.asarray(image), (0, 0, bw, bh)
    scale = max(bw / image.width, bh / image.height)
    size = int(image.width * scale + 0.5), int(image.height * scale + 0.5)
    if scale > 1:
        pixels = np.asarray(image.resize(size, pillow().Resampling.LANCZOS))
    else:
        pixels = cv2.resize(np.asarray(image), size, interpolation=cv2.INTER_AREA)
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    return pixels[top:top + bh, left:left + bw], (left, top, left + bw, top + bh)


def stem(key: str) -> str:
    """What musubi names an image's cache file by: the last path part of its key, without its extension."""
    return os.path.splitext(os.path.basename(key))[0]


def cache_name(key: str, original_size: tuple[int, int], arch: str) -> str:
    """musubi's file name for the image `key`."""
    return f"{stem(key)}_{original_size[0]:04d}x{original_size[1]:04d}_{arch}.safetensors"


def cache_latent(arch: str, mean: torch.Tensor, scaling: LatentScaling) -> torch.Tensor:
    """What musubi's caching script stores for the mean `[C, h, w]`: FLUX.2 the mean patchified and normalized by
    its bn statistics `[128, h/2, w/2]`; Qwen-Image the mean normalized per channel, with a frame axis
    `[16, 1, h, w]`; Z-Image the mean as it is (its scaling is applied in training)."""
    family = ARCHITECTURES[arch][0]
    if family == "flux":
        return mean.float()  # (musubi stores Z-Image's float32 whatever the VAE's dtype)
    scaled = scaling.scale(mean[None])[0]
    return scaled[:, None] if family == "qwenimage" else scaled


def cache_file(arch: str, latent: torch.Tensor, original_size: tuple[int, int]) -> bytes:
    """The safetensors bytes of one cache file: the tensor under `latents_{shape}_{dtype}`, and the metadata."""
    from safetensors.torch import save

    shape = "x".join(str(n) for n in latent.shape[1:])
    name = f"latents_{'1x' if ARCHITECTURES[arch][0] == 'flux' else ''}{shape}_{str(latent.dtype)[6:]}"
    metadata = {"architecture": ARCHITECTURES[arch][1], "width": str(original_size[0]),
                "height": str(original_size[1]), "format_version": FORMAT_VERSION}
    return save({name: latent.contiguous()}, metadata=metadata)
