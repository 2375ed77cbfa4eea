"""Images/s of `sdvae encode` at 256 px: the local engine and Ray with 1 and 2 actors, and where the time goes.

Writes a random-weight SD 1.5 checkpoint and N generated JPEGs (512x384) as WebDataset tars (img2dataset's layout:
JPEG, caption, JSON) to a temporary folder, then
  - times each stage alone on one core: listing the tars (the driver's planning), reading member bytes, JPEG
    decoding, resize + crop, the encoder (batch 8), writing the shard (safetensors + Parquet);
  - runs `encode_dataset` with the local engine and with Ray (a local 2-CPU instance) with 1 and 2 actors.
Usage: python bench/encode_dataset.py [N]   (N images, default 48)
"""

from __future__ import annotations

import io
import math
import random
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from common import cpu_line
from PIL import Image

from sdvae.data.dataset import write_shard_data, write_shard_marker
from sdvae.data.encode import encode_dataset
from sdvae.data.job import Runtime, Settings
from sdvae.data.local import LocalEngine
from sdvae.data.prepare import load_rgb, prepare
from sdvae.data.ray_engine import RayEngine
from sdvae.data.shard import ShardEncoder
from sdvae.data.sources import list_inputs, read_images
from sdvae.data.store import LocalStore
from sdvae.demo import write_random_checkpoint

SIZE = 256
PER_TAR = 16


def write_tars(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    tars = []
    for first in range(0, n, PER_TAR):
        path = folder / f"{first // PER_TAR:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(first, min(n, first + PER_TAR)):
                base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                jpeg = io.BytesIO()
                Image.fromarray(base).resize((512, 384), Image.Resampling.BICUBIC).save(jpeg, "JPEG", quality=90)
                for name, data in ((f"{i:09d}.jpg", jpeg.getvalue()), (f"{i:09d}.txt", b"a generated image"),
                                   (f"{i:09d}.json", b'{"width": 512, "height": 384}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tars.append(path)
    return tars


def stage_times(tars: list[Path], ckpt: Path, tmp: Path, settings: Settings) -> dict[str, tuple[float, str]]:
    """Seconds per image of each stage, run one after the other on the same images."""
    out: dict[str, tuple[float, str]] = {}
    tracemalloc.start()
    start = time.perf_counter()
    items = list_inputs([str(t) for t in tars])
    n = len(items)
    out["plan (list tars, driver)"] = ((time.perf_counter() - start) / n,
                                       f"{tracemalloc.get_traced_memory()[0] / n:.0f} B/item held")
    tracemalloc.stop()
    start = time.perf_counter()
    blobs = [data for _, data in read_images(items)]
    out["read member bytes"] = ((time.perf_counter() - start) / n, f"{sum(map(len, blobs)) / n / 1024:.0f} KiB/img")
    start = time.perf_counter()
    images = [load_rgb(b) for b in blobs]
    out["decode JPEG"] = ((time.perf_counter() - start) / n, "512x384")
    start = time.perf_counter()
    prepared = [prepare(im, (SIZE, SIZE), "center", random.Random(0)) for im in images]
    out["resize + crop"] = ((time.perf_counter() - start) / n, f"Lanczos to {SIZE}")
    encoder = ShardEncoder(str(ckpt), _config(ckpt), settings, Runtime(batch_size=8))
    start = time.perf_counter()
    tensors, rows, errors = encoder(list(zip(items, prepared)))
    out["encode (batch 8)"] = ((time.perf_counter() - start) / n, f"{torch.get_num_threads()} threads")
    store = LocalStore(tmp / "stage-write")
    start = time.perf_counter()
    write_shard_data(store, 0, tensors, rows, errors, "bench")
    write_shard_marker(store, 0, rows, "bench")
    out["write shard"] = ((time.perf_counter() - start) / n, "safetensors + Parquet, fsync")
    return out


def _config(ckpt: Path) -> dict:
    from sdvae.checkpoint.loading import open_checkpoint

    return open_checkpoint(ckpt, family="sd15").config.to_diffusers()


def main(n: int = 48) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sdvae-bench-"))
    ckpt = tmp / "sd15.safetensors"
    write_random_checkpoint(ckpt)
    (tmp / "wds").mkdir()
    tars = write_tars(tmp / "wds", n)
    settings = Settings(resolution=SIZE)
    stages = stage_times(tars, ckpt, tmp, settings)
    runs = []
    inputs = [str(tmp / "wds")]
    common = dict(family="sd15", shard_size=PER_TAR)
    start = time.perf_counter()
    encode_dataset(inputs, str(ckpt), tmp / "local", settings, engine=LocalEngine(Runtime(batch_size=8)), **common)
    runs.append(("local engine (--workers 0)", time.perf_counter() - start))
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    for actors, cpus in ((1, 1.5), (2, 0.75)):
        start = time.perf_counter()
        engine = RayEngine(Runtime(batch_size=8), actors=actors, actor_cpus=cpus)
        encode_dataset(inputs, str(ckpt), tmp / f"ray{actors}", settings, engine=engine, **common)
        runs.append((f"ray, {actors} actor(s) of {cpus:g} CPU ({math.ceil(cpus)} threads)",
                     time.perf_counter() - start))
    ray.shutdown()
    print(f"{cpu_line(torch.get_num_threads())}; {n} JPEGs 512x384 in WebDataset tars -> {SIZE}x{SIZE}, "
          f"SD 1.5 encoder, float32, shards of {PER_TAR}")
    print("\n| stage (one core unless noted) | ms/image | images/s | note |\n|---|---|---|---|")
    for name, (seconds, note) in stages.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {1 / seconds:.1f} | {note} |")
    print("\n| engine (whole run, incl. start-up) | seconds | images/s |\n|---|---|---|")
    for name, seconds in runs:
        print(f"| {name} | {seconds:.1f} | {n / seconds:.2f} |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
