"""`sdvae encode`: plan the shards, prepare images, encode them, write the dataset; and the local engine.

Both engines share every piece here. `plan_job` lists the inputs and assigns each image to a shard by its position
in the input order (never by scheduling), so a rerun maps every image to the same shard. A shard is written whole or
not at all (latents and errors first, the metadata part last, each under a temporary name and renamed), so
`resume=True` keeps the complete shards whose inputs are unchanged and redoes the rest.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import random
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .dataset import (FORMAT, MANIFEST, ShardError, check_shard, complete_shards, file_sha256, read_errors,
                      read_manifest, read_shard_rows, settings_id, shard_name, write_json, write_jsonl,
                      write_shard_data, write_shard_marker)
from .loading import load_encoder, open_checkpoint
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, Prepared, load_rgb, make_buckets, prepare, target_size
from .sources import FOLDER_SUFFIXES, INPUT_IDS, Item, list_inputs, printable, read_images
from .storage import LocalStore, open_store

log = logging.getLogger("sdvae")

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_BYTES = 64 * 2**20


def check_counts(**values: int | None) -> None:
    """Refuse a count that is not a whole number of at least 1 (None stands for the default)."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


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

    def __post_init__(self) -> None:
        check_counts(resolution=self.resolution, max_pixels=self.max_pixels)
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels (one latent), got {self.resolution}")
        for name, allowed in (("crop", ("center", "random")), ("dtype", ("float32", "bfloat16", "float16")),
                              ("store_dtype", tuple(STORE_DTYPES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Runtime:
    """How the encoder runs: these change speed and memory, never the latents."""

    batch_size: int = 8
    device: str | None = None  # None: CUDA when there is a GPU, else the CPU
    tile_size: int | None = None
    max_memory: int | str | None = None
    compile: bool = False  # torch.compile the encoder (GPUs; each new batch shape compiles first)

    def __post_init__(self) -> None:
        check_counts(batch_size=self.batch_size, tile_size=self.tile_size)


@dataclass
class Job:
    """A planned run: where it writes, what it promises (the manifest), every shard's items, and which to do."""

    store: LocalStore
    manifest: dict[str, Any]
    settings: Settings
    model_file: str
    plan: list[list[Item]]
    todo: list[int]

    @property
    def settings_id(self) -> str:
        return self.manifest["settings_id"]


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


def plan_shards(items: list[Item], per_shard: int) -> list[list[Item]]:
    """Consecutive runs of `per_shard` items in input order: shard i always holds the same images."""
    return [items[start:start + per_shard] for start in range(0, len(items), per_shard)]


def plan_job(inputs: list[str], model: str, store: LocalStore, settings: Settings, *, family: str | None = None,
             shard_size: int | None = None, resume: bool = False, overwrite: bool = False,
             image_column: str | None = None, caption_column: str | None = None) -> Job:
    """List the inputs, check the output against the settings, write the manifest, and find the shards to do.

    The caller holds the store's writer lock."""
    items = list_inputs(inputs, image_column, caption_column)
    if not items:
        raise ValueError(f"no images in {' '.join(inputs)} (files, folders and lists are read for "
                         f"{' '.join(sorted(FOLDER_SUFFIXES))})")
    checkpoint = open_checkpoint(model, family=family)
    if settings.resolution is None:
        settings = replace(settings, resolution=checkpoint.config.sample_size)
    config = checkpoint.config.to_diffusers()
    shaping = {**asdict(settings), "model_sha256": file_sha256(checkpoint.path), "config": config}
    manifest = {
        "format": FORMAT, "sdvae_version": __version__, "settings_id": settings_id(shaping), "settings": shaping,
        "model": {"source": str(model), "file": str(checkpoint.path.resolve()), "sha256": shaping["model_sha256"]},
        "config": config, "family": checkpoint.config.family,
        "scaling_factor": checkpoint.config.scaling_factor, "shift_factor": checkpoint.config.shift_factor,
        "latents": "mean and logvar (clamped to [-30, 20]) of the VAE posterior, stored as " + settings.store_dtype,
        "inputs": {"identified_by": INPUT_IDS},
    }
    _check_output(store, manifest, resume, overwrite)
    write_json(store, MANIFEST, manifest)
    store_bytes = STORE_DTYPES[settings.store_dtype].itemsize
    latent_bytes = 2 * checkpoint.config.latent_channels * (settings.resolution // 8) ** 2 * store_bytes
    per_shard = shard_size or max(1, SHARD_BYTES // (latent_bytes * (2 if settings.flip else 1)))
    plan = plan_shards(items, per_shard)
    todo = _shards_to_do(store, plan, manifest["settings_id"])
    log.info("%d inputs in %d shards, %d shard(s) to encode into %s", len(items), len(plan), len(todo), store)
    return Job(store, manifest, settings, manifest["model"]["file"], plan, todo)


def _refuse_foreign(store: LocalStore) -> dict[str, Any] | None:
    """The output's sdvae manifest, or None where it has none; ValueError for a folder that holds anything else
    (checked before the run creates anything there)."""
    existing = read_manifest(store)
    if existing is None:
        if not store.is_empty():
            raise ValueError(f"{store}: is not empty and not an sdvae dataset; choose an empty or new --output")
        return None
    if not isinstance(existing, dict) or existing.get("format") != FORMAT:
        raise ValueError(f"{store}: its {MANIFEST} is not one sdvae wrote (no format {FORMAT}); choose an empty or "
                         "new --output")
    return existing


def _check_output(store: LocalStore, manifest: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Refuse an output that holds anything but an sdvae dataset, or latents that `resume`/`overwrite` do not
    cover; `overwrite` removes the stored latents (only those), and a dataset that stores none yet starts over."""
    existing = _refuse_foreign(store)
    if existing is None:
        return
    if overwrite:
        for folder in ("metadata", "shards", "errors"):
            for name in store.list(folder):
                store.remove(f"{folder}/{name}")
        store.remove("errors.jsonl")
    elif not complete_shards(store):
        return  # a run that stopped before its first shard: starting over loses nothing
    elif existing.get("settings_id") != manifest["settings_id"]:
        before = existing.get("settings", {})
        changed = sorted(k for k, v in manifest["settings"].items() if before.get(k) != v)
        raise ValueError(f"{store}: holds latents written with other settings ({', '.join(changed) or 'model'}); "
                         "use another --output, or --overwrite to replace them")
    elif not resume:
        raise ValueError(f"{store}: already holds latents; pass --resume to continue, or --overwrite to start over")


def _kept(store: LocalStore, index: int, items: list[Item], settings: str) -> bool:
    """Whether complete shard `index` can be kept: it holds exactly `items`, unchanged since encoded, and its
    files are whole and written with `settings` (else the reason is logged)."""
    try:
        rows = read_shard_rows(store, index)
        stored = {(r["key"], r["input_id"]) for r in rows if not r["flipped"]}
        stored |= {(e["key"], e.get("input_id")) for e in read_errors(store, [index])}
        if stored != {(item.key, item.input_id) for item in items}:
            return False
        check_shard(store, index, rows, settings)
    except (ShardError, ValueError, KeyError, TypeError) as e:  # (an errors part that is not JSON records)
        log.warning("%s: encoding its %d input(s) again", e, len(items))
        return False
    return True


def _shards_to_do(store: LocalStore, plan: list[list[Item]], settings: str) -> list[int]:
    """The planned shards that are not complete with exactly their planned inputs, unchanged since encoded, in
    whole files written with `settings`.

    Complete shards that no longer match (an input changed, appeared or went away, or a file was lost, cut short or
    written by another run) lose their metadata part first, so a kill during cleanup leaves them incomplete rather
    than stale. Leftover temporary files go too.
    """
    done = set()
    stale = 0
    for index in complete_shards(store):
        if index < len(plan) and _kept(store, index, plan[index], settings):
            done.add(index)
            continue
        stale += index < len(plan)
        store.remove(f"metadata/{shard_name(index)}.parquet")
    for folder in ("shards", "errors"):
        for name in store.list(folder):
            index = name.split(".")[0]
            if index.isdigit() and int(index) not in done:
                store.remove(f"{folder}/{name}")
    store.remove_temporaries()
    if stale:
        log.info("%d stored shard(s) no longer match their inputs or files: encoding them again", stale)
    return [index for index in range(len(plan)) if index not in done]


def finish_job(job: Job) -> dict[str, int]:
    """Gather every complete shard's errors into errors.jsonl and record the totals in the manifest."""
    shards = complete_shards(job.store)
    errors = read_errors(job.store, shards)
    write_jsonl(job.store, "errors.jsonl", errors)
    stored = sum(1 for index in shards for row in read_shard_rows(job.store, index) if not row["flipped"])
    totals = {"images": sum(map(len, job.plan)), "stored": stored, "failed": len(errors),
              "shards": len(job.plan), "complete_shards": len(shards)}
    write_json(job.store, MANIFEST, {**job.manifest, "totals": totals})
    return totals


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
            im = load_rgb(data, settings.max_pixels)
            target = target_size(im.width, im.height, settings.resolution, buckets)
            out.append((item, prepare(im, target, settings.crop, random.Random(f"{settings.seed}|{item.key}"))))
        except (ImageError, OSError) as e:
            out.append((item, str(e) if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"))
    return out


def check_device(name: str | None, here: bool = True) -> None:
    """Refuse a device that cannot encode before anything is written (torch would fail at the first batch): a name
    torch does not know, `meta` (its tensors hold no data), and where the model runs `here`, a device this machine
    lacks or cannot make a tensor on."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type == "meta":
        raise ValueError(f"--device {name}: a meta device holds no data (its tensors have shapes only), so it "
                         "cannot encode; use cpu or cuda")
    if not here:
        return
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU here (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    try:
        torch.ones(1, device=device).cpu()
    except Exception as e:  # each backend fails its own way (NotImplementedError, RuntimeError, ImportError, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # (torch's first sentence)
        raise ValueError(f"--device {name}: torch cannot make a tensor there on this machine ({reason})") from None


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


def _prepared_shards(job: Job, workers: int) -> Iterator[list[tuple[Item, Prepared | str]]]:
    """The to-do shards prepared in order, by `workers` processes (at most one shard ahead each) or inline."""
    shards = (job.plan[index] for index in job.todo)
    if workers <= 0:
        yield from (prepare_shard(items, job.settings) for items in shards)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque = deque()
        for items in shards:
            pending.append(pool.apply_async(prepare_shard, (items, job.settings)))
            if len(pending) > workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def encode_dataset(inputs: list[str], model: str, output: str | Path, settings: Settings, *, family: str | None = None,
                   runtime: Runtime = Runtime(), workers: int = 0, shard_size: int | None = None,
                   resume: bool = False, overwrite: bool = False, image_column: str | None = None,
                   caption_column: str | None = None, engine: str = "local", ray_address: str | None = None,
                   ray_actors: int | None = None, ray_actor_cpus: float = 1.0) -> dict[str, int]:
    """Encode every input image into the dataset at `output`; returns the counts: encoded and failed in this run,
    and of the inputs kept from earlier runs, stored (skipped) and failed (failed_before).

    `engine="local"` runs here (`workers` processes decode while the model runs); `engine="ray"` runs the same
    plan on a Ray cluster (`ray_address`, else RAY_ADDRESS, else a local instance) with `ray_actors` encoders.
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    check_counts(shard_size=shard_size)
    check_device(runtime.device, here=engine == "local")  # (a Ray cluster's devices are its nodes', not ours)
    if engine == "ray":
        from .ray_engine import connect, run_ray

        pool = connect(ray_address, ray_actors, ray_actor_cpus, runtime.device)  # setup errors before any write
    store = open_store(output)
    _refuse_foreign(store)  # before the lock creates anything there
    with store.writer_lock():
        job = plan_job(inputs, model, store, settings, family=family, shard_size=shard_size, resume=resume,
                       overwrite=overwrite, image_column=image_column, caption_column=caption_column)
        if engine == "ray":
            return run_ray(job, runtime, pool)
        return run_local(job, ShardEncoder(job.model_file, job.manifest["config"], job.settings, runtime), workers)


class Tally:
    """A run's counts and progress bar: `done` as each shard's marker lands, `close` at the end (which also
    gathers errors.jsonl and the manifest's totals, and splits the kept shards' inputs into stored and failed).

    As a context manager it closes however the run ends; where an error stopped the run, that error is the one
    reported, not an I/O error of the gathering (on a full disk both fail)."""

    def __init__(self, job: Job):
        self.job = job
        self.progress = Progress(sum(len(job.plan[index]) for index in job.todo))
        self.counts = {"encoded": 0, "failed": 0, "skipped": sum(map(len, job.plan)) - self.progress.total,
                       "failed_before": 0}

    def done(self, index: int, failed: int) -> None:
        self.counts["encoded"] += len(self.job.plan[index]) - failed
        self.counts["failed"] += failed

    def close(self) -> None:
        self.progress.close()
        earlier = finish_job(self.job)["failed"] - self.counts["failed"]
        self.counts["failed_before"], self.counts["skipped"] = earlier, self.counts["skipped"] - earlier

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if error is None:
            self.close()
            return
        with contextlib.suppress(OSError):
            self.close()


def run_local(job: Job, shard_encoder: ShardEncoder, workers: int) -> dict[str, int]:
    """The local engine: prepare (inline or in worker processes), encode and write the to-do shards in order."""
    prepared = _prepared_shards(job, workers)
    with Tally(job) as tally, contextlib.closing(prepared):
        for index, shard in zip(job.todo, prepared):
            tensors, rows, errors = shard_encoder(shard, tally.progress.update)
            tally.progress.update(len(errors), failed=len(errors))
            write_shard_data(job.store, index, tensors, rows, errors, job.settings_id)
            write_shard_marker(job.store, index, rows, job.settings_id)
            tally.done(index, len(errors))
    return tally.counts
