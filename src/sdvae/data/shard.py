"""The shard: the unit every engine runs. `prepare_shard` reads, decodes, resizes and crops its images (CPU work);
`ShardEncoder` turns them into latents, metadata rows and error records (the model's work)."""

from __future__ import annotations

import functools
import os
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.loading import load_encoder
from ..model.scaling import LatentScaling
from . import kohya, musubi
from .dataset import seeded_sample
from .job import STORE_DTYPES, Runtime, Settings
from .prepare import ImageError, Prepared, load_rgb, make_buckets, open_image, prepare, target_size
from .sources import Item, printable, read_images


@functools.lru_cache(maxsize=8)
def _buckets(resolution: int) -> list[tuple[int, int]]:
    return make_buckets(resolution)


@functools.lru_cache(maxsize=8)
def _kohya_buckets(settings: Settings) -> list[tuple[int, int]] | None:
    return settings.kohya_buckets()


def prepare_shard(items: list[Item], settings: Settings, base: str | None = None) -> list[tuple[Item, Prepared | str]]:
    """Read, decode, resize and crop a shard's images (relative sources from `base`); each comes back as its
    pixels or the reason it failed."""
    buckets = _buckets(settings.resolution) if settings.buckets and settings.format == "sdvae" else None
    out: list[tuple[Item, Prepared | str]] = []
    for item, data in read_images(items, base):
        if isinstance(data, str):
            out.append((item, data))
            continue
        rng = random.Random(f"{settings.seed}|{item.key}")
        try:
            if settings.format == "musubi":
                prepared = _musubi_prepare(data, settings, item.controls, base)
            elif settings.format == "kohya":
                prepared = _kohya_prepare(data, settings, rng if settings.crop == "random" else None)
            else:
                im = load_rgb(data, settings.max_pixels)
                prepared = prepare(im, target_size(im.width, im.height, settings.size, buckets), settings.crop,
                                   rng)
            out.append((item, prepared))
        except (ImageError, OSError) as e:
            out.append((item, str(e) if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"))
    return out


def _as_stored(data: str | bytes, settings: Settings, mode: str | None):
    """An image as the trainers read it: as stored (no EXIF rotation), converted to `mode` where it differs (None:
    RGB or RGBA as it is)."""
    im = open_image(data, settings.max_pixels, orient=False)
    wanted = mode or (im.mode if im.mode in ("RGB", "RGBA") else "RGB")
    try:
        return im if im.mode == wanted else im.convert(wanted)
    except ValueError as e:
        raise ImageError(f"cannot convert its {im.mode} pixels to {wanted}: {e}") from None


def _nonempty(bucket: tuple[int, int], size: tuple[int, int], step: int) -> tuple[int, int]:
    """A trainer's bucket, or ImageError where its rules leave none: without upscaling, a side under one step (or
    for sd-scripts, shrunk to the area, rounded to none)."""
    if 0 in bucket:
        raise ImageError(f"{size[0]}x{size[1]}: with --bucket-no-upscale the trainer's rules leave a side of its "
                         f"bucket under the {step}-px step, so it cannot train on it either")
    return bucket


def _musubi_prepare(data: str | bytes, settings: Settings, controls: tuple[str, ...] = (), base: str | None = None
                    ) -> Prepared:
    """An image as musubi-tuner's caching sees it: RGB or RGBA, its bucket, resized and cropped by its rules, the
    alpha channel dropped after (`sdvae.data.musubi`); and its control images (paths, relative ones from `base`),
    each resized and cropped to the bucket or with --no-resize-control to its own size rounded down to 16."""
    im = _as_stored(data, settings, None)
    bucket = _nonempty(musubi.bucket_for(im.size, settings.size, settings.buckets, settings.bucket_no_upscale),
                       im.size, musubi.STEP)
    pixels, crop = musubi.resize_to_bucket(im, bucket)
    resized = []
    for path in controls:
        try:
            control = _as_stored(os.path.join(base, path) if base else path, settings, None)
            size = _nonempty(musubi.control_bucket(control.size, bucket, settings.no_resize_control), control.size,
                             musubi.STEP)
        except (ImageError, OSError) as e:
            raise ImageError(f"its control image {printable(path)}: {e}") from None
        resized.append(np.ascontiguousarray(musubi.resize_to_bucket(control, size)[0][..., :3]))
    return Prepared(np.ascontiguousarray(pixels[..., :3]), im.size, crop, bucket, controls=tuple(resized))


def _kohya_prepare(data: str | bytes, settings: Settings, rng: random.Random | None) -> Prepared:
    """An image as sd-scripts' latent caching sees it: RGB (RGBA with --alpha-mask), its bucket, resized and
    trimmed by its rules (`sdvae.data.kohya`), the alpha channel kept apart."""
    im = _as_stored(data, settings, "RGBA" if settings.alpha_mask else "RGB")
    try:
        bucket, resized = kohya.select_bucket(im.size, settings.size, _kohya_buckets(settings), settings.steps)
    except ZeroDivisionError:  # (sd-scripts fails on it the same way)
        bucket = (0, 0)
    _nonempty(bucket, im.size, settings.steps)
    pixels, crop = kohya.resize_and_trim(np.asarray(im), bucket, resized, rng)
    alpha = np.ascontiguousarray(pixels[..., 3]) if settings.alpha_mask else None
    return Prepared(np.ascontiguousarray(pixels[..., :3]), im.size, crop, bucket, alpha)


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

    def format_files(self, prepared: list[tuple[Item, Prepared | str]], tensors: dict[str, torch.Tensor],
                     rows: list[dict[str, Any]], root: Path) -> dict[Path, bytes]:
        """The trainer's cache files of a shard's latents, by path: musubi-tuner's in the output folder `root`,
        sd-scripts' beside each image; none for --format sdvae."""
        settings, arch = self.settings, self.settings.arch
        if settings.format == "musubi":
            scaling, results = self.encoder.scaling, {item.key: result for item, result in prepared}
            files = {}
            for row in rows:
                mean = _stored(tensors, row)[0]
                controls = [musubi.cache_latent(arch, control.to(mean.dtype), scaling)
                            for control in self._means(results[row["key"]].controls)]
                files[root / musubi.cache_name(row["key"], row["original_size"], arch)] = musubi.cache_file(
                    arch, musubi.cache_latent(arch, mean, scaling), row["original_size"], controls)
            return files
        if settings.format != "kohya":
            return {}
        samples = {(row["key"], row["flipped"]): _kohya_latent(arch, *_stored(tensors, row), row, settings.seed,
                                                               self.encoder.scaling) for row in rows}
        files = {}
        for item, result in prepared:
            if isinstance(result, str) or (item.key, False) not in samples:
                continue
            files[kohya.cache_path(item.source, result.original_size, arch)] = kohya.cache_file(
                samples[item.key, False], result.original_size, kohya.crop_ltrb(result.bucket, result.original_size),
                arch, samples.get((item.key, True)), result.alpha)
        return files

    def _means(self, images: tuple[np.ndarray, ...]) -> list[torch.Tensor]:
        """The posterior means of images of any sizes, one by one (as musubi-tuner encodes control images)."""
        return [self._encode(np.stack([image])).mean[0].cpu() for image in images]

    def _encode(self, pixels: np.ndarray):
        if self.settings.format == "kohya":
            x = kohya.to_tensor(pixels).to(self.encoder.device)
        else:
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.encoder.device, torch.float32) / 127.5 - 1.0
        with torch.no_grad():
            return self.encoder.encode(x, tile_size=self.runtime.tile_size, max_memory=self.runtime.max_memory)


def _stored(tensors: dict[str, torch.Tensor], row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored mean and logvar a metadata row names."""
    return tensors[f"mean_{row['tensor']}"][row["row"]], tensors[f"logvar_{row['tensor']}"][row["row"]]


def _kohya_latent(arch: str, mean: torch.Tensor, logvar: torch.Tensor, row: dict[str, Any], seed: int,
                  scaling: LatentScaling) -> torch.Tensor:
    """What sd-scripts caches of a latent: a sample (the one LatentDataset gives at epoch 0), FLUX.1's shifted
    and scaled as its autoencoder returns it."""
    z = seeded_sample(mean, logvar, row["key"], row["flipped"], seed)
    return scaling.scale(z[None])[0] if arch == "flux" else z


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
