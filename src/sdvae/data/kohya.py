"""kohya-ss/sd-scripts' latent cache (one `.npz` beside each image), as `sdvae encode --format kohya` writes it.

The rules are sd-scripts' own (README, "Training with kohya sd-scripts", cites each): its buckets (`BucketManager`,
`make_bucket_resolutions`, `select_bucket`), its resize and trim (`trim_and_resize_if_required`: OpenCV's
INTER_AREA to shrink, Pillow's Lanczos otherwise), images as stored (no EXIF rotation; an alpha channel dropped, or
kept as `alpha_mask`), pixels as torchvision's `ToTensor` and `Normalize(0.5, 0.5)` make them, and one file per
image and model, `{image path without extension}_{W:04d}x{H:04d}_{arch}.npz` (W x H the image's own size; arch sd,
sdxl, sd3 or flux), holding the arrays its `save_latents_to_disk` writes.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

# sd-scripts' name of each family it trains, its cache files' suffix (`strategy_sd.py`, `strategy_sd3.py`,
# `strategy_flux.py`).
ARCHITECTURES = {"sd15": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
# SD/SDXL: sd-scripts reads `{stem}.npz` (its old name) instead where one exists, and plain keys (its pull request
# #2269 reads resolution-keyed ones first), so both key sets are written; SD3 and FLUX.1 read resolution keys only.
PLAIN_KEYS = {"sd", "sdxl"}
# `--min/max-bucket-reso`, `--bucket-reso-steps` as sd-scripts defaults them.
DEFAULT_MIN_BUCKET, DEFAULT_MAX_BUCKET, DEFAULT_STEPS = 256, 1024, 64


def architecture(family: str | None, arch: str | None) -> str:
    """sd-scripts' name for latents of a VAE of `family` (`arch`, where given, must be it)."""
    if family not in ARCHITECTURES:
        raise ValueError(f"--format kohya: sd-scripts caches the latents of SD 1.x/2.x, SDXL, SD3 and FLUX.1; this "
                         f"VAE is {family or 'of no known family (name it with --family)'}")
    if arch not in (None, ARCHITECTURES[family]):
        raise ValueError(f"--arch {arch}: sd-scripts names the latents of a {family} VAE {ARCHITECTURES[family]}")
    return ARCHITECTURES[family]


def check_bucket_range(size: tuple[int, int], min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """sd-scripts' bucket size range: min rounded down and max up to multiples of `steps`, the resolution inside."""
    min_reso -= min_reso % steps
    max_reso += -max_reso % steps
    if min(size) < min_reso or max(size) > max_reso:
        raise ValueError(f"resolution {size[0]}x{size[1]} is outside the bucket sizes {min_reso}..{max_reso} "
                         "(--min-bucket-reso, --max-bucket-reso, rounded to --bucket-reso-steps): sd-scripts refuses "
                         "it too")
    return min_reso, max_reso


def bucket_resolutions(size: tuple[int, int], min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    """Every (width, height) bucket of at most the resolution's area, sides multiples of `steps` within the range,
    sorted (sd-scripts' predefined buckets)."""
    area = size[0] * size[1]
    side = int(math.sqrt(area) // steps) * steps
    sizes = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, area // width // steps * steps)
        if height >= min_reso:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def select_bucket(image_size: tuple[int, int], size: tuple[int, int], predefined: list[tuple[int, int]] | None,
                  steps: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The bucket of an image of `image_size` and the size it is resized to before the trim.

    With `predefined` buckets (the square's alone without buckets): the image's own size where it is one, else the
    one nearest its aspect ratio (the first on a tie), covered. Without (no upscale): the image shrunk to the
    resolution's area where it is larger, its side rounded to `steps` that keeps the aspect ratio best, and the bucket
    that size rounded down to `steps`."""
    w, h = image_size
    aspect = w / h
    if predefined is not None:
        if image_size in predefined:
            bucket = image_size
        else:
            bucket = predefined[int(np.abs(np.array([bw / bh for bw, bh in predefined]) - aspect).argmin())]
        scale = bucket[1] / h if aspect > bucket[0] / bucket[1] else bucket[0] / w
        return bucket, (int(w * scale + 0.5), int(h * scale + 0.5))

    def to_steps(x: float) -> int:
        x = int(x + 0.5)
        return x - x % steps

    area = size[0] * size[1]
    resized = image_size
    if w * h > area:
        width = math.sqrt(area * aspect)
        by_width, by_height = to_steps(width), to_steps(area / width)
        width_error = abs(by_width / to_steps(by_width / aspect) - aspect)
        if width_error < abs(to_steps(by_height * aspect) / by_height - aspect):
            resized = by_width, int(by_width / aspect + 0.5)
        else:
            resized = int(by_height * aspect + 0.5), by_height
    return (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps), resized


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' `crop_ltrb`: where the image, fitted inside the bucket, would lie (SDXL's size conditioning; it
    does not describe the trim)."""
    image_aspect = image_size[0] / image_size[1]
    if bucket[0] / bucket[1] > image_aspect:
        width, height = bucket[1] * image_aspect, bucket[1]
    else:
        width, height = bucket[0], bucket[0] / image_aspect
    left, top = (bucket[0] - width) // 2, (bucket[1] - height) // 2
    return left, top, left + width, top + height


def resize_and_trim(pixels: np.ndarray, bucket: tuple[int, int], resized: tuple[int, int],
                    rng: random.Random | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`[H, W, C]` uint8 pixels resized to `resized` (OpenCV's INTER_AREA where neither side grows, else Pillow's
    Lanczos) and trimmed to the bucket, centred or at `rng`'s offsets (width first); and the trim box (left, top,
    right, bottom) in the resized image."""
    import cv2

    from .images import pillow

    h, w = pixels.shape[:2]
    if (w, h) != resized:
        if w >= resized[0] and h >= resized[1]:
            pixels = cv2.resize(pixels, resized, interpolation=cv2.INTER_AREA)
        else:
            image = pillow()
            pixels = np.asarray(image.fromarray(pixels).resize(resized, image.Resampling.LANCZOS))
    start = [0, 0]
    for axis, side in ((1, bucket[0]), (0, bucket[1])):
        extra = pixels.shape[axis] - side
        if extra > 0:
            start[axis] = rng.randint(0, extra) if rng is not None else extra // 2
    top, left = start
    return pixels[top:top + bucket[1], left:left + bucket[0]], (left, top, left + bucket[0], top + bucket[1])


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """`[B, H, W, 3]` uint8 pixels as sd-scripts feeds its VAE: `ToTensor` then `Normalize([0.5], [0.5])`."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    return (x - 0.5) / 0.5


def cache_path(image: str | Path, original_size: tuple[int, int], arch: str) -> Path:
    """Where sd-scripts looks for the cache of `image` (a path), beside it."""
    return Path(f"{os.path.splitext(image)[0]}_{original_size[0]:04d}x{original_size[1]:04d}_{arch}.npz")


def caches_of(images: list[str], arch: str) -> tuple[list[Path], list[Path]]:
    """The cache files of `arch` beside `images` (every size, and the old `{stem}.npz` sd-scripts would read
    first), and the temporaries writes of them cut short left there."""
    by_folder: dict[str, set[str]] = {}
    for image in images:
        folder, name = os.path.split(os.path.abspath(image))
        by_folder.setdefault(folder, set()).add(os.path.splitext(name)[0])
    pattern = re.compile(rf"(.+)_\d{{4,}}x\d{{4,}}_{arch}\.npz")
    temporary = re.compile(r"\.(.+)\.[^.]+\.\d+\.tmp")
    found: list[Path] = []
    partial: list[Path] = []
    for folder, stems in by_folder.items():
        for name in sorted(os.listdir(folder)):
            inner = temporary.fullmatch(name)
            target = pattern.fullmatch(inner[1] if inner else name)
            ours = target is not None and target[1] in stems
            legacy = not inner and arch in PLAIN_KEYS and name.endswith(".npz") and name[:-4] in stems
            if ours or legacy:
                (partial if inner else found).append(Path(folder, name))
    return found, partial


def cache_file(latent: torch.Tensor, original_size: tuple[int, int], crop: tuple[float, ...], arch: str,
               flipped: torch.Tensor | None = None, alpha: np.ndarray | None = None) -> bytes:
    """The bytes of one cache file: `latents` `[C, h, w]` float32, `original_size` (width, height), `crop_ltrb`,
    and `latents_flipped` and `alpha_mask` where given, under `_{h}x{w}` keys (and plain ones for SD/SDXL)."""
    arrays: dict[str, Any] = {"latents": latent.float().numpy(), "original_size": np.array(original_size),
                              "crop_ltrb": np.array(crop)}
    if flipped is not None:
        arrays["latents_flipped"] = flipped.float().numpy()
    if alpha is not None:
        arrays["alpha_mask"] = alpha.astype(np.float32) / 255
    keyed = f"_{latent.shape[-2]}x{latent.shape[-1]}"
    out = {f"{key}{keyed}": value for key, value in arrays.items()}
    if arch in PLAIN_KEYS:
        out.update(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **out)
    return buffer.getvalue()
