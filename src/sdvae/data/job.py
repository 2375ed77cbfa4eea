"""The job of `sdvae encode`: its settings, the shards, and which of them to encode.

Both engines share it. `open_job` lists the inputs and assigns each image to a shard by its position in the input
order (never by scheduling), so a rerun maps every image to the same shard. A shard is written whole or not at all
(latents and errors first, the metadata part last, each under a temporary name and renamed), so `resume=True` keeps
the complete shards whose inputs are unchanged and files whole, and redoes the rest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..checkpoint.loading import open_checkpoint
from ..model.config import VaeConfig
from ..model.networks import encoder_network
from ..tiled.budget import plan_tiling
from ..util import COMPUTE_DTYPES, spans
from . import kohya, musubi
from .dataset import (
    FORMAT,
    MANIFEST,
    ShardError,
    check_shard,
    complete_shards,
    file_sha256,
    read_errors,
    read_manifest,
    read_shard_rows,
    settings_id,
    shard_files,
    shard_name,
    write_json,
    write_jsonl,
)
from .prepare import DEFAULT_MAX_PIXELS, make_buckets
from .sources import FOLDER_SUFFIXES, INPUT_IDS, Item, file_id, list_inputs, printable
from .store import LocalStore

log = logging.getLogger("sdvae")

STORE_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}
FORMATS = ("sdvae", "musubi", "kohya")
SHARD_BYTES = 64 * 2**20


# Settings added after the dataset format's first options, with their defaults (see `Settings.recorded`).
LATER_OPTIONS = {"min_bucket_reso": None, "max_bucket_reso": None, "bucket_reso_steps": None, "alpha_mask": False,
                 "control_dir": None, "no_resize_control": False}


def check_counts(**values: int | None) -> None:
    """Refuse a count that is not a whole number of at least 1 (None stands for the default)."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the stored latents besides the model."""

    resolution: int | tuple[int, int] | None = None  # a square's side, or (width, height)
    buckets: bool = False
    crop: str = "center"
    flip: bool = False
    seed: int = 0
    dtype: str = "float32"
    store_dtype: str = "float32"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # "musubi"/"kohya": a trainer's cache files too, by its buckets and resize (`sdvae.data.musubi`, `.kohya`)
    format: str = "sdvae"
    arch: str | None = None  # the trainer's name for the model (None: the VAE family's; musubi: its base model's)
    bucket_no_upscale: bool = False  # (trainers) images no larger than the area keep their size, rounded down
    min_bucket_reso: int | None = None  # (kohya) the bucket sides' range and step (None: sd-scripts' defaults)
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    alpha_mask: bool = False  # (kohya) store the alpha channel as sd-scripts' alpha_mask
    control_dir: str | None = None  # (musubi) the folder of control images (edit models' references)
    no_resize_control: bool = False  # (musubi) controls keep their size, rounded down to 16

    def __post_init__(self) -> None:
        if isinstance(self.resolution, (tuple, list)):
            if len(self.resolution) != 2:
                raise ValueError(f"resolution must be a side or (width, height), got {self.resolution!r}")
            width, height = self.resolution
            check_counts(width=width, height=height)
            object.__setattr__(self, "resolution", width if width == height else (width, height))
        else:
            check_counts(resolution=self.resolution)
        check_counts(max_pixels=self.max_pixels, min_bucket_reso=self.min_bucket_reso,
                     max_bucket_reso=self.max_bucket_reso, bucket_reso_steps=self.bucket_reso_steps)
        if self.resolution is not None and min(self.size) < 8:
            raise ValueError(f"resolution must be at least 8 pixels (one latent), got {self.resolution}")
        for name, allowed in (("crop", ("center", "random")), ("dtype", COMPUTE_DTYPES),
                              ("store_dtype", COMPUTE_DTYPES), ("format", FORMATS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self._check_format()
        if self.resolution is not None:
            pixels = self.size[0] * self.size[1]  # about a bucket's area too: the buckets are made only where it fits
            if pixels <= self.max_pixels:
                pixels = max(w * h for w, h in self.targets())
            if pixels > self.max_pixels:
                raise ValueError(f"resolution {self.resolution} makes targets of {pixels} pixels, over max_pixels "
                                 f"{self.max_pixels}")

    def _check_format(self) -> None:
        """Refuse options the format does not have."""
        def given(*names: str) -> list[str]:
            return [f"--{n.replace('_', '-')}" for n in names if getattr(self, n) not in (None, False)]

        if self.format == "musubi" and (self.crop != "center" or self.flip):
            raise ValueError("--format musubi: musubi-tuner crops the centre and caches no flipped latents; "
                             "drop --crop random and --flip")
        if self.format == "sdvae" and given("arch", "bucket_no_upscale"):
            raise ValueError(f"{' and '.join(given('arch', 'bucket_no_upscale'))}: a trainer's options, for "
                             "--format kohya or musubi")
        kohya_only = given("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "alpha_mask")
        if self.format != "kohya" and kohya_only:
            raise ValueError(f"{' and '.join(kohya_only)}: sd-scripts' options, for --format kohya")
        musubi_only = given("control_dir", "no_resize_control")
        if self.format != "musubi" and musubi_only:
            raise ValueError(f"{' and '.join(musubi_only)}: musubi-tuner's options, for --format musubi")
        if self.no_resize_control and self.control_dir is None:
            raise ValueError("--no-resize-control: give the control images with --control-dir")
        if self.format == "sdvae" and self.buckets and isinstance(self.resolution, tuple):
            raise ValueError(f"resolution {self.resolution}: sdvae's buckets are made around a square; give one side, "
                             "or drop --buckets")
        if self.format == "kohya" and self.buckets and self.resolution is not None:
            self.kohya_range()  # (sd-scripts checks the range with no_upscale too, though it then ignores it)

    def recorded(self) -> dict[str, Any]:
        """The settings as the manifest records them (and their id hashes them): the options added after the
        musubi format only where set, so a dataset written before they existed keeps its id and resumes."""
        return {k: v for k, v in asdict(self).items() if k not in LATER_OPTIONS or v != LATER_OPTIONS[k]}

    @property
    def size(self) -> tuple[int, int]:
        """The resolution as (width, height)."""
        return self.resolution if isinstance(self.resolution, tuple) else (self.resolution, self.resolution)

    @property
    def steps(self) -> int:
        """sd-scripts' bucket step (64 unless given)."""
        return self.bucket_reso_steps or kohya.DEFAULT_STEPS

    def kohya_range(self) -> tuple[int, int]:
        """sd-scripts' bucket side range for these settings; ValueError where it excludes the resolution."""
        return kohya.check_bucket_range(self.size, self.min_bucket_reso or kohya.DEFAULT_MIN_BUCKET,
                                        self.max_bucket_reso or kohya.DEFAULT_MAX_BUCKET, self.steps)

    def kohya_buckets(self) -> list[tuple[int, int]] | None:
        """sd-scripts' predefined buckets (the resolution alone without --buckets), or None where each image's
        size makes its own (--bucket-no-upscale)."""
        if not self.buckets:
            return [self.size]
        return None if self.bucket_no_upscale else kohya.bucket_resolutions(self.size, *self.kohya_range(),
                                                                           self.steps)

    def targets(self) -> list[tuple[int, int]]:
        """The (width, height) of every target an image may be cropped to: the buckets, or the resolution (for
        buckets each image's size makes, those of about the same area)."""
        if not self.buckets:
            return [self.size]
        if self.format == "kohya":
            return self.kohya_buckets() or kohya.bucket_resolutions(self.size, self.steps, max(self.size), self.steps)
        return musubi.buckets(self.size) if self.format == "musubi" else make_buckets(self.resolution)


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
    shards: list[list[Item]]
    todo: list[int]

    @property
    def settings_id(self) -> str:
        return self.manifest["settings_id"]


def assign_shards(items: list[Item], per_shard: int) -> list[list[Item]]:
    """Consecutive runs of `per_shard` items in input order: shard i always holds the same images."""
    return [items[start:stop] for start, stop in spans(len(items), per_shard)]


def open_job(inputs: list[str], model: str, store: LocalStore, settings: Settings, *, family: str | None = None,
             shard_size: int | None = None, resume: bool = False, overwrite: bool = False,
             image_column: str | None = None, caption_column: str | None = None,
             check_memory: Callable[[VaeConfig, Settings, int], None] | None = None) -> Job:
    """List the inputs, check the output against the settings, write the manifest, and find the shards to do.

    `check_memory(config, settings, images)` (an engine's) refuses targets its encoders cannot encode within their
    memory budget, before anything is written. The caller holds the store's writer lock."""
    items = list_inputs(inputs, image_column, caption_column)
    if not items:
        raise ValueError(f"no images in {' '.join(inputs)} (files, folders and lists are read for "
                         f"{' '.join(sorted(FOLDER_SUFFIXES))})")
    checkpoint = open_checkpoint(model, family=family)
    if settings.resolution is None:
        settings = replace(settings, resolution=checkpoint.config.sample_size)
    family = checkpoint.config.family
    if settings.format != "sdvae":
        musubi.check_opencv(settings.format)
    if settings.format == "musubi":
        settings = replace(settings, arch=musubi.architecture(family, settings.arch))
        _refuse_shared_stems(items)
        if settings.control_dir is not None:
            settings = replace(settings, control_dir=os.path.abspath(settings.control_dir))
            items = _with_controls(items, settings.control_dir, settings.arch)
    elif settings.format == "kohya":
        settings = replace(settings, arch=kohya.architecture(family, settings.arch))
        items = _kohya_items(items)
    multiple = checkpoint.config.latent_multiple
    sides = [side for target in settings.targets() for side in target]
    if settings.format == "kohya" and settings.buckets and settings.bucket_no_upscale:
        sides.append(settings.steps)  # (each image's bucket is its size rounded down to the step)
    if any(side % multiple for side in sides):
        raise ValueError(f"resolution {settings.resolution}: image sides must be multiples of {multiple} px for the "
                         f"latents of this VAE ({family or 'family unknown'})")
    if check_memory is not None:
        check_memory(checkpoint.config, settings, len(items))
    config = checkpoint.config.to_diffusers()
    shaping = {**settings.recorded(), "model_sha256": file_sha256(checkpoint.path), "config": config}
    manifest = {
        "format": FORMAT, "sdvae_version": __version__, "settings_id": settings_id(shaping), "settings": shaping,
        "model": {"source": str(model), "file": str(checkpoint.path.resolve()), "sha256": shaping["model_sha256"]},
        "config": config, "family": checkpoint.config.family,
        "scaling_factor": checkpoint.config.scaling_factor, "shift_factor": checkpoint.config.shift_factor,
        "latent_scaling": checkpoint.scaling().to_json(),
        "latents": "mean and logvar (clamped to [-30, 20]) of the VAE posterior, stored as " + settings.store_dtype,
        "inputs": {"identified_by": INPUT_IDS},
    }
    written = _written_files(store)
    _check_output(store, manifest, resume, overwrite)
    if overwrite:
        for path in written:
            path.unlink(missing_ok=True)
    if settings.format == "kohya":
        _check_kohya_caches(items, settings.arch, set(written), overwrite)
    write_json(store, MANIFEST, manifest)
    store_bytes = STORE_DTYPES[settings.store_dtype].itemsize
    latent_bytes = 2 * checkpoint.config.latent_channels * settings.size[0] * settings.size[1] // 64 * store_bytes
    per_shard = shard_size or max(1, SHARD_BYTES // (latent_bytes * (2 if settings.flip else 1)))
    shards = assign_shards(items, per_shard)
    todo = _shards_to_do(store, shards, settings, manifest["settings_id"])
    log.info("%d inputs in %d shards, %d shard(s) to encode into %s", len(items), len(shards), len(todo), store)
    return Job(store, manifest, settings, manifest["model"]["file"], shards, todo)


def _refuse_shared_stems(items: list[Item]) -> None:
    """musubi-tuner names a cache file by the image's stem alone: two inputs of one stem would share it."""
    seen: dict[str, Item] = {}
    for item in items:
        stem = musubi.stem(item.key)
        if stem in seen:
            first = seen[stem]
            raise ValueError(f"--format musubi: {printable(first.key)} ({printable(first.source)}) and "
                             f"{printable(item.key)} ({printable(item.source)}) have the same file stem, so "
                             "musubi-tuner would give them one cache file; rename one")
        seen[stem] = item


def _with_controls(items: list[Item], folder: str, arch: str) -> list[Item]:
    """The inputs with their control images (musubi's matching), whose sizes and times join the input's identity:
    an edited control is encoded again."""
    found = musubi.find_controls([item.key for item in items if item.error is None], folder, arch)
    return [replace(item, controls=tuple(found[item.key]), input_id=";".join(
        [item.input_id, *(file_id(Path(path)) for path in found[item.key])])) if item.key in found else item
            for item in items]


def _kohya_items(items: list[Item]) -> list[Item]:
    """The inputs as image files at absolute paths (where sd-scripts finds their caches), each with a cache name of
    its own; ValueError naming the input otherwise."""
    seen: dict[str, Item] = {}
    out = []
    for item in items:
        if item.kind != "file":
            raise ValueError(f"--format kohya: {printable(item.source)} is a {item.kind} file; sd-scripts reads a "
                             "latent cache beside each image file, so give image files or folders")
        item = replace(item, source=os.path.abspath(item.source))
        stem = os.path.splitext(item.source)[0]
        if stem in seen:
            raise ValueError(f"--format kohya: {printable(seen[stem].source)} and {printable(item.source)} would "
                             f"share sd-scripts' cache file name {printable(stem)}_WxH_*.npz; rename one")
        seen[stem] = item
        out.append(item)
    return out


def _check_kohya_caches(items: list[Item], arch: str, ours: set[Path], overwrite: bool) -> None:
    """Refuse (or with `overwrite` remove) the sd-scripts caches of `arch` beside the inputs that this output did
    not write: sd-scripts could read one of them instead of ours. Leftover temporaries of ours go."""
    found, partial = kohya.caches_of([item.source for item in items if item.error is None], arch)
    for path in partial:
        path.unlink(missing_ok=True)
    foreign = [path for path in found if path not in ours]
    if foreign and not overwrite:
        shown = ", ".join(printable(str(path)) for path in foreign[:3])
        raise ValueError(f"--format kohya: {len(foreign)} sd-scripts cache file(s) of another run lie beside the "
                         f"images ({shown}{', ...' if len(foreign) > 3 else ''}); sd-scripts could read them instead "
                         "of this run's: pass --overwrite to replace them")
    for path in foreign:
        path.unlink(missing_ok=True)


def trainer_files(store: LocalStore, settings: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    """The trainer's cache files that latents of `rows` were written to under `settings` (a manifest's): musubi-tuner's
    in the output folder, sd-scripts' beside each image; none for sdvae's own format."""
    arch = settings.get("arch")
    if settings.get("format") == "musubi":
        return [store.root / musubi.cache_name(row["key"], row["original_size"], arch) for row in rows]
    if settings.get("format") == "kohya":
        return [kohya.cache_path(row["source"], row["original_size"], arch) for row in rows if not row["flipped"]]
    return []


def _written_files(store: LocalStore) -> list[Path]:
    """The trainer's cache files the output's shards were written to, complete or cut short by a kill (none where
    it holds no dataset)."""
    existing = read_manifest(store)
    if not isinstance(existing, dict) or existing.get("format") != FORMAT:
        return []
    indices = {int(name.split(".")[0]) for name in store.list("shards") if name.split(".")[0].isdigit()}
    return [path for index in sorted(indices | set(complete_shards(store)))
            for path in _shard_files(store, existing.get("settings", {}), index)]


def _shard_files(store: LocalStore, settings: dict[str, Any], index: int) -> list[Path]:
    """The trainer's cache files shard `index` was written to: as its latents file lists them, else (files of an
    earlier sdvae) as its metadata rows name them under `settings`."""
    listed = shard_files(store, index)
    return listed if listed is not None else trainer_files(store, settings, _rows_or_none(store, index) or [])


def refuse_foreign(store: LocalStore) -> dict[str, Any] | None:
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
    existing = refuse_foreign(store)
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


def _kept(store: LocalStore, index: int, items: list[Item], settings: Settings, settings_id: str) -> bool:
    """Whether complete shard `index` can be kept: it holds exactly `items`, unchanged since encoded, its files are
    whole and written with `settings_id`, and the trainer's cache files made of it are there (else the reason is
    logged)."""
    try:
        rows = read_shard_rows(store, index)
        stored = {(r["key"], r["input_id"]) for r in rows if not r["flipped"]}
        stored |= {(e["key"], e.get("input_id")) for e in read_errors(store, [index])}
        if stored != {(item.key, item.input_id) for item in items}:
            return False
        check_shard(store, index, rows, settings_id)
        for path in trainer_files(store, asdict(settings), rows):
            if not path.is_file():
                raise ShardError(f"{printable(str(path))}: the {settings.format} cache file of its latent is gone")
    except (ShardError, ValueError, KeyError, TypeError) as e:  # (an errors part that is not JSON records)
        log.warning("%s: encoding its %d input(s) again", e, len(items))
        return False
    return True


def _shards_to_do(store: LocalStore, shards: list[list[Item]], settings: Settings, settings_id: str) -> list[int]:
    """The planned shards that are not complete with exactly their planned inputs, unchanged since encoded, in
    whole files written with `settings_id` (and the trainer's cache files of `settings.format`).

    Complete shards that no longer match (an input changed, appeared or went away, or a file was lost, cut short or
    written by another run) lose their metadata part first, so a kill during cleanup leaves them incomplete rather
    than stale. Leftover temporary files go too.
    """
    done = set()
    stale = 0
    for index in complete_shards(store):
        if index < len(shards) and _kept(store, index, shards[index], settings, settings_id):
            done.add(index)
            continue
        stale += index < len(shards)
        files = _shard_files(store, asdict(settings), index)
        store.remove(f"metadata/{shard_name(index)}.parquet")
        for path in files:
            path.unlink(missing_ok=True)  # (ours; re-encoding writes them again)
    for folder in ("shards", "errors"):
        for name in store.list(folder):
            index = name.split(".")[0]
            if index.isdigit() and int(index) not in done:
                for path in (shard_files(store, int(index)) or []) if folder == "shards" else []:
                    path.unlink(missing_ok=True)  # (those a killed run wrote before the shard was complete)
                store.remove(f"{folder}/{name}")
    store.remove_temporaries()
    if stale:
        log.info("%d stored shard(s) no longer match their inputs or files: encoding them again", stale)
    return [index for index in range(len(shards)) if index not in done]


def _rows_or_none(store: LocalStore, index: int) -> list[dict[str, Any]] | None:
    try:
        return read_shard_rows(store, index)
    except (ShardError, ValueError, KeyError, TypeError):
        return None


def finish_job(job: Job) -> dict[str, int]:
    """Gather every complete shard's errors into errors.jsonl and record the totals in the manifest."""
    shards = complete_shards(job.store)
    errors = read_errors(job.store, shards)
    write_jsonl(job.store, "errors.jsonl", errors)
    stored = sum(1 for index in shards for row in read_shard_rows(job.store, index) if not row["flipped"])
    totals = {"images": sum(map(len, job.shards)), "stored": stored, "failed": len(errors),
              "shards": len(job.shards), "complete_shards": len(shards)}
    write_json(job.store, MANIFEST, {**job.manifest, "totals": totals})
    return totals


def check_memory(config: VaeConfig, settings: Settings, runtime: Runtime, images: int, device: str,
                 free_memory: bool = True) -> None:
    """Refuse, naming the resolution and the budget, targets that the encoder on `device` cannot encode in batches
    of up to `runtime.batch_size` (at most `images` of them, twice with flips) within `runtime.max_memory`, else
    what is free on the device here; without `free_memory` (another machine encodes) only a given `max_memory` is
    checked."""
    if runtime.max_memory is None and not free_memory:
        return
    batch = min(runtime.batch_size, images * (2 if settings.flip else 1))
    with torch.device("meta"):
        encoder = encoder_network(config)
    for width, height in sorted(settings.targets(), key=lambda size: -size[0] * size[1]):
        try:
            plan_tiling(encoder, config, (batch, 3, height, width), getattr(torch, settings.dtype),
                        torch.device(device), runtime.tile_size, runtime.max_memory)
        except MemoryError as e:
            raise ValueError(f"resolution {settings.resolution} ({width}x{height} targets, batches of {batch}): "
                             f"{e}, or lower batch_size") from None


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


