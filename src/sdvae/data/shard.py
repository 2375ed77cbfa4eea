"""The shard: the unit every engine runs. `prepare_shard` reads, decodes, resizes and crops its images (CPU work);
`ShardEncoder` turns them into latents, metadata rows and error records (the model's work)."""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..checkpoint.loading import load_encoder
from . import musubi
from .job import STORE_DTYPES, Runtime, Settings
from .prepare import ImageError, Prepared, load_rgb, make_buckets, open_image, prepare, target_size
from .sources import Item, printable, read_images


@functools.lru_cache(maxsize=8)
def _buckets(resolution: int) -> list[tuple[int, int]]:
    return make_buckets(resolution)


def prepare_shard(items: list[Item], settings: Settings, base: str | None = None) -> list[tuple[Item, Prepared | str]]:
    """Read, decode, resize and crop a shard's images (relative sources from `base`); each comes back as its
    pixels or the reason it failed."""
    buckets = _buckets(settings.resolution) if settings.buckets else None
    out: list[tuple[Item, Prepared | str]] = []
    for item, data in read_images(items, base):
        if isinstance(data, str):
            out.append((item, data))
            continue
        try:
            if settings.format == "musubi":
                out.append((item, _musubi_prepare(data, settings)))
                continue
            im = load_rgb(data, settings.max_pixels)
            target = target_size(im.width, im.height, settings.resolution, buckets)
            out.append((item, prepare(im, target, settings.crop, random.Random(f"{settings.seed}|{item.key}"))))
        except (ImageError, OSError) as e:
            out.append((item, str(e) if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"))
    return out


def _musubi_prepare(data: str | bytes, settings: Settings) -> Prepared:
    """An image as musubi-tuner's caching sees it: as stored (no EXIF rotation), RGB or RGBA, its bucket, resized
    and cropped by its rules, the alpha channel dropped after (`sdvae.data.musubi`)."""
    im = open_image(data, settings.max_pixels, orient=False)
    im = im if im.mode in ("RGB", "RGBA") else im.convert("RGB")
    bucket = musubi.bucket_for(im.size, settings.resolution, settings.buckets, settings.bucket_no_upscale)
    pixels, crop = musubi.resize_to_bucket(im, bucket)
    return Prepared(np.ascontiguousarray(pixels[..., :3]), im.size, crop, bucket)


class ShardEncoder:
    """The model side of a shard: loads the encoder once, turns prepared images into latents and metadata rows."""

    def __init__(self, model_file: str, config: dict[str, Any], settings: Settings, runtime: Runtime):
        self.settings, self.runtime = settings, runtime
        device = runtime.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and settings.dtype == "float32":
            torch.backends.cudnn.allow_tf32 = False  # cuDNN's default TF32 convs would put float32 latents ~1e-3 off
        self.encoder = load_encoder(model_file, config=config, device=device,
                                    dtype=settings.dtype, compile=runtime.compile)
        self.store_dtype = STORE_DTYPES[settings.store_dtype]

    def __call__(self, prepared: list[tuple[Item, Prepared | str]], on_batch: Callable[[int], None] = lambda n: None
                 ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[dict[str, Any]]]:
        """Encode in same-size batches; returns the shard's tensors, metadata rows and error records.

        An input whose latent (or its flipped twin's) is not finite as stored fails with the reason: NaN or inf is
        never stored as a latent."""
        errors = [item.record(result) for item, result in prepared if isinstance(result, str)]
        by_bucket: dict[tuple[int, int], list[tuple[Item, Prepared, bool]]] = defaultdict(list)
        for item, result in prepared:
            if not isinstance(result, str):
                versions = (False, True) if self.settings.flip else (False,)
                by_bucket[result.bucket] += [(item, result, flipped) for flipped in versions]
        encoded: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        failed: dict[str, str] = {}
        size = self.runtime.batch_size
        for bucket, entries in by_bucket.items():
            encoded[bucket] = []
            for start in range(0, len(entries), size):
                batch = entries[start:start + size]
                dist = self._encode(np.stack([_pixels(result, flipped) for _, result, flipped in batch]))
                mean, logvar = dist.mean.to("cpu", self.store_dtype), dist.logvar.to("cpu", self.store_dtype)
                for (item, _, _), reason in zip(batch, _not_finite(dist.mean, dist.logvar, mean, logvar)):
                    if reason:
                        failed.setdefault(item.key, reason)
                encoded[bucket] += zip(mean, logvar)
                on_batch(sum(1 for _, _, flipped in batch if not flipped))
        tensors: dict[str, torch.Tensor] = {}
        rows: list[dict[str, Any]] = []
        for bucket, entries in by_bucket.items():
            kept = [(entry, latent) for entry, latent in zip(entries, encoded[bucket]) if entry[0].key not in failed]
            if not kept:
                continue
            tag = f"{bucket[0]}x{bucket[1]}"
            tensors[f"mean_{tag}"] = torch.stack([mean for _, (mean, _) in kept])
            tensors[f"logvar_{tag}"] = torch.stack([logvar for _, (_, logvar) in kept])
            rows += [{"key": item.key, "source": printable(item.source), "caption": item.caption,
                      "input_id": item.input_id, "original_size": list(result.original_size),
                      "crop": list(result.crop), "bucket": list(bucket), "flipped": flipped, "tensor": tag, "row": i}
                     for i, ((item, result, flipped), _) in enumerate(kept)]
        errors += [item.record(failed[item.key]) for item, result in prepared
                   if not isinstance(result, str) and item.key in failed]
        return tensors, rows, errors

    def format_files(self, tensors: dict[str, torch.Tensor], rows: list[dict[str, Any]]) -> dict[str, bytes]:
        """The trainer's cache files of a shard's latents, by name in the output folder: musubi-tuner's with
        `--format musubi`, else none."""
        if self.settings.format != "musubi":
            return {}
        arch, scaling = self.settings.arch, self.encoder.scaling
        return {musubi.cache_name(row["key"], row["original_size"], arch):
                musubi.cache_file(arch, musubi.cache_latent(arch, tensors[f"mean_{row['tensor']}"][row["row"]],
                                                            scaling), row["original_size"]) for row in rows}

    def _encode(self, pixels: np.ndarray):
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.encoder.device, torch.float32) / 127.5 - 1.0
        with torch.no_grad():
            return self.encoder.encode(x, tile_size=self.runtime.tile_size, max_memory=self.runtime.max_memory)


def _pixels(prepared: Prepared, flipped: bool) -> np.ndarray:
    return np.ascontiguousarray(prepared.pixels[:, ::-1]) if flipped else prepared.pixels


def _not_finite(mean: torch.Tensor, logvar: torch.Tensor, stored_mean: torch.Tensor,
                stored_logvar: torch.Tensor) -> list[str | None]:
    """Per sample, why its latent cannot be stored (NaN or inf computed, or past the store dtype's range), or None."""
    def finite(*tensors: torch.Tensor) -> list[bool]:
        return torch.stack([torch.isfinite(t).flatten(1).all(1) for t in tensors]).all(0).tolist()

    return [None if stored else "the encoder's latent is not finite (NaN or inf): check the checkpoint's weights"
            if not computed else f"the latent overflows {str(stored_mean.dtype)[6:]} storage (inf): store float32"
            for computed, stored in zip(finite(mean, logvar), finite(stored_mean, stored_logvar))]
