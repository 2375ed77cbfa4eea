"""`sdvae encode` on one machine: list inputs, preprocess in worker processes, encode in batches, write shards.

Resumable: a shard is written whole or not at all, so a rerun with `resume=True` skips the images of complete
shards, throws away a half-written one and encodes the rest.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .dataset import (FORMAT, MANIFEST, complete_shards, file_sha256, read_errors, read_manifest, read_metadata,
                      settings_id, write_atomic, write_shard)
from .distribution import DiagonalGaussian
from .loading import load_encoder
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, load_rgb, make_buckets, prepare, target_size

log = logging.getLogger("sdvae")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
LIST_SUFFIXES = {".txt", ".lst"}
CAPTION_SUFFIXES = (".txt", ".caption")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Item:
    """One input image: a stable unique key, where it lives, and its caption if a sidecar file has one."""

    key: str
    source: str
    caption: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything that decides the stored latents besides the model."""

    resolution: int | None = None
    buckets: bool = False
    crop: str = "center"
    flip: bool = False
    seed: int = 0
    dtype: str = "float32"
    store_dtype: str = "float32"
    max_pixels: int = DEFAULT_MAX_PIXELS


def _caption(path: Path) -> str | None:
    for suffix in CAPTION_SUFFIXES:
        sidecar = path.with_suffix(suffix)
        if sidecar.is_file():
            return sidecar.read_text(errors="replace").strip()
    return None


def list_inputs(inputs: list[str]) -> list[Item]:
    """Image files, folders (recursive, image suffixes only) and text files listing paths, in a stable order.

    Keys: a folder's images by their path relative to it, listed or named files by the path as written.
    """
    items: list[Item] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            items += [Item(p.relative_to(path).as_posix(), str(p), _caption(p)) for p in files]
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            for line in path.read_text().splitlines():
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    listed = Path(entry) if Path(entry).is_absolute() else path.parent / entry
                    items.append(Item(entry, str(listed), _caption(listed)))
        elif path.exists():
            items.append(Item(spec, str(path), _caption(path)))
        else:
            raise FileNotFoundError(f"{spec}: no such file or folder")
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise ValueError(f"two inputs have the key {item.key!r}: {seen[item.key]} and {item.source}; "
                             "give them from one common folder")
        seen[item.key] = item.source
    return items


def _prepare(args: tuple[Item, Settings, list[tuple[int, int]] | None]) -> tuple[Item, Any]:
    """Worker: decode and crop one image; returns the Prepared image or the reason it failed."""
    item, settings, buckets = args
    try:
        im = load_rgb(item.source, settings.max_pixels)
        target = target_size(im.width, im.height, settings.resolution, buckets)
        rng = random.Random(f"{settings.seed}|{item.key}")
        return item, prepare(im, target, settings.crop, rng)
    except (ImageError, OSError) as e:
        return item, str(e) if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"


def _prepared(items: list[Item], settings: Settings, workers: int) -> Iterator[tuple[Item, Any]]:
    buckets = make_buckets(settings.resolution) if settings.buckets else None
    jobs = ((item, settings, buckets) for item in items)
    if workers <= 0:
        yield from map(_prepare, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_prepare, jobs, chunksize=4)


class Progress:
    """A tqdm bar on a terminal; otherwise a log line every few seconds. Counts images and reports images/s."""

    def __init__(self, total: int, interval: float = 10.0):
        self.total, self.interval = total, interval
        self.done = self.failed = 0
        self.start, self.last = time.time(), 0.0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if n and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%d/%d images, %d failed, %.1f img/s, ETA %.0fs", self.done, self.total, self.failed, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare_output(root: Path, manifest: dict[str, Any], resume: bool, overwrite: bool) -> None:
    existing = read_manifest(root)
    if existing is not None and overwrite:
        for name in ("shards", "metadata", "errors"):
            shutil.rmtree(root / name, ignore_errors=True)
        (root / "errors.jsonl").unlink(missing_ok=True)
    elif existing is not None and existing.get("settings_id") != manifest["settings_id"]:
        before = existing.get("settings", {})
        changed = sorted(k for k, v in manifest["settings"].items() if before.get(k) != v)
        raise ValueError(f"{root}: holds latents written with other settings ({', '.join(changed) or 'model'}); "
                         "use another --output, or --overwrite to replace them")
    elif existing is not None and not resume:
        raise ValueError(f"{root}: already holds latents; pass --resume to continue, or --overwrite to start over")
    elif existing is None and root.exists() and any(root.iterdir()):
        raise ValueError(f"{root}: is not empty and not an sdvae dataset; choose an empty or new --output")
    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    done = set(complete_shards(root))
    for folder, suffix in (("shards", ".safetensors"), ("errors", ".jsonl")):
        for path in (root / folder).glob("*") if (root / folder).is_dir() else []:
            if path.name.startswith(".") or (path.suffix == suffix and int(path.stem) not in done):
                path.unlink()  # a temporary file or a shard whose metadata never got written: redo it


def encode_dataset(inputs: list[str], model: str, output: str | Path, settings: Settings, *, family: str | None = None,
                   batch_size: int = 8, device: str = "cpu", workers: int = 0, shard_size: int | None = None,
                   resume: bool = False, overwrite: bool = False, tile_size: int | None = None,
                   max_memory: int | str | None = None) -> dict[str, int]:
    """Encode every input image into the dataset at `output`; returns counts of images encoded and failed.

    `tile_size` and `max_memory` go to `VaeEncoder.encode` (exact tiling: they change memory, not latents).
    """
    root = Path(output)
    items = list_inputs(inputs)
    encoder = load_encoder(model, family=family, device=device, dtype=getattr(torch, settings.dtype))
    if settings.resolution is None:
        settings = replace(settings, resolution=encoder.config.sample_size)
    model_path = Path(encoder.load_report.source)
    config = encoder.config.to_diffusers()
    shape_settings = {**asdict(settings), "model_sha256": file_sha256(model_path), "config": config}
    store_dtype = STORE_DTYPES[settings.store_dtype]
    manifest = {
        "format": FORMAT, "sdvae_version": __version__, "settings_id": settings_id(shape_settings),
        "settings": shape_settings, "model": {"source": str(model), "file": str(model_path),
                                              "sha256": shape_settings["model_sha256"]},
        "config": config, "family": encoder.config.family,
        "scaling_factor": encoder.config.scaling_factor, "shift_factor": encoder.config.shift_factor,
        "latents": "mean and logvar (clamped to [-30, 20]) of the VAE posterior, stored as " + settings.store_dtype,
    }
    _prepare_output(root, manifest, resume, overwrite)
    done_shards = complete_shards(root)
    done = {r["key"] for r in read_metadata(root)} | {e["key"] for e in read_errors(root, done_shards)}
    todo = [item for item in items if item.key not in done]
    latent_bytes = 2 * encoder.config.latent_channels * (settings.resolution // 8) ** 2 * store_dtype.itemsize
    per_shard = shard_size or max(1, SHARD_BYTES // (latent_bytes * (2 if settings.flip else 1)))
    next_shard = max(done_shards, default=-1) + 1
    log.info("%d inputs, %d already stored, %d to encode into %s", len(items), len(done), len(todo), root)
    progress = Progress(len(todo))
    encode = functools.partial(encoder.encode, tile_size=tile_size, max_memory=max_memory)
    counts = {"encoded": 0, "failed": 0, "skipped": len(items) - len(todo)}
    prepared = _prepared(todo, settings, workers)
    try:
        for start in range(0, len(todo), per_shard):
            chunk = todo[start:start + per_shard]
            written = _encode_shard(root, next_shard, [next(prepared) for _ in chunk], encode, encoder.device,
                                    settings, batch_size, store_dtype, manifest["settings_id"], progress)
            counts["encoded"] += written[0]
            counts["failed"] += written[1]
            next_shard += 1
    finally:
        progress.close()
        prepared.close()
        errors = read_errors(root, complete_shards(root))
        write_atomic(root / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors).encode())
    return counts


def _encode_shard(root: Path, index: int, prepared: list[tuple[Item, Any]],
                  encode: Callable[[torch.Tensor], DiagonalGaussian], device: torch.device, settings: Settings,
                  batch_size: int, store_dtype: torch.dtype, sid: str, progress: Progress) -> tuple[int, int]:
    """Encode one shard's images in same-size batches and write the shard; returns (encoded, failed)."""
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    by_bucket: dict[tuple[int, int], list[tuple[dict[str, Any], np.ndarray]]] = defaultdict(list)
    for item, result in prepared:
        if isinstance(result, str):
            errors.append({"key": item.key, "path": item.source, "error": result})
            continue
        meta = {"key": item.key, "source": item.source, "caption": item.caption,
                "original_size": list(result.original_size), "crop": list(result.crop), "bucket": list(result.bucket)}
        by_bucket[result.bucket].append(({**meta, "flipped": False}, result.pixels))
        if settings.flip:
            by_bucket[result.bucket].append(({**meta, "flipped": True}, np.ascontiguousarray(result.pixels[:, ::-1])))
    tensors: dict[str, torch.Tensor] = {}
    for bucket, entries in by_bucket.items():
        tag = f"{bucket[0]}x{bucket[1]}"
        means, logvars = [], []
        for start in range(0, len(entries), batch_size):
            batch = entries[start:start + batch_size]
            pixels = torch.from_numpy(np.stack([p for _, p in batch])).permute(0, 3, 1, 2)
            x = pixels.to(device, torch.float32) / 127.5 - 1.0
            with torch.no_grad():
                dist = encode(x)
            means.append(dist.mean.to("cpu", store_dtype))
            logvars.append(dist.logvar.to("cpu", store_dtype))
            progress.update(sum(1 for meta, _ in batch if not meta["flipped"]))
        tensors[f"mean_{tag}"], tensors[f"logvar_{tag}"] = torch.cat(means), torch.cat(logvars)
        rows += [{**meta, "tensor": tag, "row": i} for i, (meta, _) in enumerate(entries)]
    progress.update(len(errors), failed=len(errors))
    write_shard(root, index, tensors, rows, errors, sid)
    return sum(1 for r in rows if not r["flipped"]), len(errors)
