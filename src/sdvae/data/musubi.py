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
# How many control images each architecture's dataset takes per image (`ImageDataset.__init__`; None: all found),
# and the image suffixes its `glob_images` lists (`dataset/media_utils.py` IMAGE_EXTENSIONS).
CONTROLS = {"f2d": None, "f2k4b": None, "f2k9b": None, "qie": None, "qi": 1}
CONTROL_SUFFIXES = {s for suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif") for s in (suffix,
                                                                                                   suffix.upper())}


def architecture(family: str | None, arch: str | None) -> str:
    """The musubi architecture to write for a VAE of `family`: `arch`, else the family's base model's."""
    if arch is None:
        if family not in DEFAULT_ARCH:
            raise ValueError(f"--format musubi: musubi-tuner caches the latents of FLUX.2, Qwen-Image and Z-Image "
                             f"(the FLUX.1 VAE); this VAE is {family or 'of no known family'}")
        return DEFAULT_ARCH[family]
    if arch == "qil":
        raise ValueError("--arch qil: musubi-tuner caches Qwen-Image-Layered items as several RGBA layers through "
                         "its 4-channel VAE (qwen_image_cache_latents.py); sdvae encodes one RGB image per item")
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


def find_controls(keys: list[str], folder: str, arch: str) -> dict[str, list[str]]:
    """The control images (paths in `folder`) of each image key, as musubi matches them (`ImageDirectoryDatasource`):
    images with longer names first, each taking the unclaimed files named its stem then "." or "_"; its own stem
    first, then by the number after the last "_" (ties by name), as many as `arch` takes. ValueError naming the
    file or the images where musubi-tuner would stop."""
    if arch not in CONTROLS:
        raise ValueError(f"--control-dir: musubi-tuner's {arch} caches store no control images")
    if not os.path.isdir(folder):
        raise ValueError(f"--control-dir {folder}: not a folder")
    pool = {name for name in os.listdir(folder) if not name.startswith(".")
            and os.path.splitext(name)[1] in CONTROL_SUFFIXES and os.path.isfile(os.path.join(folder, name))}
    found: dict[str, list[str]] = {}
    for key in sorted(keys, key=lambda k: -len(os.path.basename(k))):
        own = stem(key)
        matched = sorted(name for name in pool if name.startswith((own + ".", own + "_")))
        pool -= set(matched)

        def order(name: str, own: str = own) -> int:
            base = os.path.splitext(name)[0]
            if base == own:
                return 0
            digits = base.rsplit("_", 1)[-1]
            if not digits.isdigit():
                raise ValueError(f"--control-dir: {os.path.join(folder, name)} matches {own} but its suffix "
                                 f"{digits!r} is not a number (musubi-tuner refuses it too)")
            return int(digits) + 1

        if matched:
            found[key] = [os.path.join(folder, name) for name in sorted(matched, key=order)][:CONTROLS[arch]]
    missing = [key for key in keys if key not in found]
    if missing:
        raise ValueError(f"--control-dir {folder}: no control image for {len(missing)} image(s) "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); musubi-tuner needs one "
                         "for each")
    return found


def control_bucket(size: tuple[int, int], bucket: tuple[int, int], no_resize: bool) -> tuple[int, int]:
    """The size a control image is resized and cropped to: the target's bucket, or with `no_resize` its own size
    rounded down to 16."""
    return (_floor(size[0]), _floor(size[1])) if no_resize else bucket


def cache_latent(arch: str, mean: torch.Tensor, scaling: LatentScaling) -> torch.Tensor:
    """What musubi's caching script stores for the mean `[C, h, w]`: FLUX.2 the mean patchified and normalized by
    its bn statistics `[128, h/2, w/2]`; Qwen-Image the mean normalized per channel, with a frame axis
    `[16, 1, h, w]`; Z-Image the mean as it is (its scaling is applied in training)."""
    family = ARCHITECTURES[arch][0]
    if family == "flux":
        return mean.float()  # (musubi stores Z-Image's float32 whatever the VAE's dtype)
    scaled = scaling.scale(mean[None])[0]
    return scaled[:, None] if family == "qwenimage" else scaled


def cache_file(arch: str, latent: torch.Tensor, original_size: tuple[int, int],
               controls: list[torch.Tensor] = ()) -> bytes:
    """The safetensors bytes of one cache file: the tensor under `latents_{shape}_{dtype}`, each control's under
    `latents_control_{i}_{shape}_{dtype}` (the target's dtype name), and the metadata."""
    from safetensors.torch import save

    def shape(tensor: torch.Tensor) -> str:
        return ("1x" if ARCHITECTURES[arch][0] == "flux" else "") + "x".join(str(n) for n in tensor.shape[1:])

    dtype = str(latent.dtype)[6:]
    tensors = {f"latents_{shape(latent)}_{dtype}": latent.contiguous()}
    tensors |= {f"latents_control_{i}_{shape(c)}_{dtype}": c.contiguous() for i, c in enumerate(controls)}
    metadata = {"architecture": ARCHITECTURES[arch][1], "width": str(original_size[0]),
                "height": str(original_size[1]), "format_version": FORMAT_VERSION}
    return save(tensors, metadata=metadata)
