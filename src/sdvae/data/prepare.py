"""From an image file to the exact pixels the encoder sees: decode, orient, convert, bucket, resize, crop, flip."""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import pillow

BUCKET_STEP = 64
MAX_ASPECT = 4.0
DEFAULT_MAX_PIXELS = 16384 * 16384
MAX_COVER = 16  # the most pixels, in targets, that an image resized to cover its target may hold


class ImageError(ValueError):
    """An input that cannot become a training image; the message says why."""


def make_buckets(resolution: int, step: int = BUCKET_STEP, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiples of `step` and area about `resolution**2`, aspect <= `max_aspect`.

    For each width, the height is the multiple of `step` that brings the area closest to `resolution**2`.
    """
    area = resolution * resolution
    buckets = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        h = max(step, round(area / w / step) * step)
        if max(w / h, h / w) <= max_aspect:
            buckets.update({(w, h), (h, w)})
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space; ties go to the larger area)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def load_rgb(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode an image (a file, or its encoded bytes) as 8-bit RGB: EXIF orientation applied, alpha composited
    on white, 16-bit scaled down. Errors as `open_image`'s."""
    return to_rgb(open_image(source, max_pixels))


def open_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, orient: bool = True):
    """Decode an image (a file, or its encoded bytes), EXIF orientation applied unless `orient` is False.

    Raises ImageError for unreadable, truncated, empty or oversized (decompression bomb) files: over `max_pixels`,
    which replaces Pillow's own limit (89 MP with a warning, an error from 179 MP).
    """
    image_cls = pillow()
    from PIL import ImageOps, UnidentifiedImageError

    pillow_limit, image_cls.MAX_IMAGE_PIXELS = image_cls.MAX_IMAGE_PIXELS, None  # ours, from the header, instead
    try:
        with image_cls.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(f"{im.width}x{im.height} is over the {max_pixels}-pixel limit "
                                 "(decompression-bomb guard; raise --max-pixels to allow it)")
            im = ImageOps.exif_transpose(im) if orient else im.copy()  # (a copy: the file closes below)
            im.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (unknown format or damaged header)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode: {e}") from None
    finally:
        image_cls.MAX_IMAGE_PIXELS = pillow_limit
    return im


def to_rgb(im):
    """8-bit RGB from any Pillow mode: 16/32-bit grey is rescaled, transparency composited on white."""
    image_cls = pillow()
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or array.max() > 255 else 255.0
        grey = np.clip(np.round(array * 255.0 / peak), 0, 255).astype(np.uint8)
        return image_cls.fromarray(grey, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = image_cls.new("RGBA", rgba.size, (255, 255, 255, 255))
        return image_cls.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


@dataclass(frozen=True)
class Prepared:
    """One training image as the encoder sees it, and where its pixels came from."""

    pixels: np.ndarray  # uint8 [H, W, 3]
    original_size: tuple[int, int]  # (width, height) after EXIF orientation (as stored, for the trainers' formats)
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    bucket: tuple[int, int]  # (width, height)
    alpha: np.ndarray | None = None  # uint8 [H, W]: the alpha channel, where the format keeps it
    controls: tuple[np.ndarray, ...] = ()  # uint8 [h, w, 3] each: the control images, where the format has them


def target_size(width: int, height: int, size: tuple[int, int], buckets: list[tuple[int, int]] | None
                ) -> tuple[int, int]:
    """The (width, height) an image is cropped to: its bucket, or `size`."""
    return nearest_bucket(width, height, buckets) if buckets else size


def prepare(im, target: tuple[int, int], crop: str = "center", rng: random.Random | None = None) -> Prepared:
    """Resize `im` to cover `target` (Lanczos) and crop it to exactly `target`, centred or at a random offset.

    Where the covering image would exceed MAX_COVER times the target (a long strip: 20000x10 pixels cover a 512
    square at 1024000x512), only the crop's region is resized: the same pixels up to rounding (+-1 in a few), in
    the target's memory."""
    image_cls = pillow()
    tw, th = target
    scale = max(tw / im.width, th / im.height)
    rw, rh = max(tw, round(im.width * scale)), max(th, round(im.height * scale))
    if crop == "center":
        left, top = (rw - tw) // 2, (rh - th) // 2
    elif crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    box = (left, top, left + tw, top + th)
    if rw * rh > MAX_COVER * tw * th:
        sx, sy = im.width / rw, im.height / rh
        cropped = im.resize(target, image_cls.Resampling.LANCZOS,
                            box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))
    else:
        cropped = (im.resize((rw, rh), image_cls.Resampling.LANCZOS) if (rw, rh) != im.size else im).crop(box)
    return Prepared(pixels=np.asarray(cropped, dtype=np.uint8), original_size=im.size, crop=box, bucket=target)
